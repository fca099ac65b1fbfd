"""The core test lane's project: the repo's dodo.py with a small targets/ folder of toy passes.

``pytest -m core`` tests the engine (executor, caches, locks, kill -9 recovery, remote tiers,
``why``/``status``, the loader) through real ``doit`` subprocesses without torch, onnx or
onnxruntime: the passes are tests/toypass, a pure-Python plug-in registered by its dist-info
folder on PYTHONPATH. Each stage runs in milliseconds, so every test builds its own project.

The graph (targets/toy.toml)::

    targets/data/words.txt -> words -> upper -> shout
                                   \\-> slow (toy-sleep, reads words)

Every real pass run appends its target's name to ``runs.log`` beside the project
(``$TOYPASS_RUN_LOG``): ``project.runs()`` says which passes really ran, whatever doit printed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, DoitResult, Project, run_cmd

TOYPASS = Path(__file__).resolve().parent / "toypass"

TOY_TOML = """\
# The core lane's graph: pure-Python toy passes (tests/toypass), milliseconds per stage.
default_targets = ["shout"]

[target.words]
doc = "word counts of data/words.txt"
pass = "toy-words"
inputs = { text = "data/words.txt" }

[target.upper]
doc = "the counts, upper-cased"
pass = "toy-upper"
inputs = { source = ":words" }

[target.shout]
doc = "the upper-cased counts with a suffix"
pass = "toy-upper"
inputs = { source = ":upper" }
params = { suffix = "!" }

[target.slow]
doc = "slow writes after the counts (locks, kill -9)"
pass = "toy-sleep"
inputs = { source = ":words" }
params = { seconds = 0.3, parts = 3 }
"""

WORDS = "the quick brown fox\njumps over the lazy dog\nthe end\n"
CHAIN = {"words", "upper", "shout"}
ALL = CHAIN | {"slow"}


class CoreProject(Project):
    """A toy project: its own targets/, cache and run log; the toy plug-in on PYTHONPATH."""

    def __init__(self, root: Path, cache: Path, run_log: Path):
        super().__init__(root, cache)
        self.run_log = run_log

    def env(self, extra: dict | None = None) -> dict:
        path = os.pathsep.join(p for p in (str(TOYPASS), os.environ.get("PYTHONPATH", "")) if p)
        return {"MODELBUILD_CACHE": str(self.cache), "PYTHONPATH": path, "TOYPASS_RUN_LOG": str(self.run_log),
                "MODELBUILD_REMOTE_CACHE": "off", **(extra or {})}

    def runs(self) -> list[str]:
        """The targets whose pass really ran since the last ``clear_runs``, in order."""
        try:
            return [line.split()[0] for line in self.run_log.read_text().splitlines() if line.strip()]
        except FileNotFoundError:
            return []

    def clear_runs(self) -> None:
        self.run_log.unlink(missing_ok=True)

    def stamp(self, target: str) -> dict:
        return json.loads(self.path(f"build/{target}/.modelbuild/stamp.json").read_text())

    def manifests(self, targets=ALL) -> dict:
        return {name: self.stamp(name)["manifest"] for name in sorted(targets)}

    def files(self, target: str) -> dict[str, bytes]:
        """What build/<target> holds besides its stamp."""
        out = self.path(f"build/{target}")
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
                if p.is_file() and ".modelbuild" not in p.relative_to(out).parts}

    def start(self, *args: str, env: dict | None = None) -> subprocess.Popen:
        """``doit *args`` in the background, in a process group of its own (to kill it whole)."""
        full = {**os.environ, "HF_HUB_OFFLINE": "1", **self.env(env)}
        return subprocess.Popen([sys.executable, "-m", "doit", *args], cwd=self.root, env=full,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def wait_for(self, proc: subprocess.Popen, pattern: str, timeout: float = 60) -> None:
        """Until build/ shows ``pattern`` (a stage's temporary folder, a part file, a stamp)."""
        deadline = time.time() + timeout
        while not list(self.path("build").glob(pattern)):
            assert time.time() < deadline and proc.poll() is None, f"the build never reached {pattern}"
            time.sleep(0.01)


def said(result: DoitResult, what: str) -> set[str]:
    """Targets of which modelbuild said ``'<target>': <what>`` (``what`` is a regex)."""
    return set(re.findall(rf"modelbuild: '(\S+)': {what}", result.out))


def new_core_project(root: Path, cache: Path | None = None, toml: str = TOY_TOML, words: str = WORDS) -> CoreProject:
    """A fresh toy project at ``root``: dodo.py from the repo, its own targets/ and cache folder."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dodo.py", root / "dodo.py")
    (root / "targets" / "data").mkdir(parents=True)
    (root / "targets" / "toy.toml").write_text(toml)
    (root / "targets" / "data" / "words.txt").write_text(words)
    cache = cache or root.parent / f"{root.name}-cache"
    cache.mkdir(parents=True, exist_ok=True)
    return CoreProject(root, cache, root.parent / f"{root.name}-runs.log")


def modules_loaded_by(project: CoreProject, *args: str) -> set[str]:
    """Top-level modules a ``doit *args`` process had imported when it exited (an atexit hook
    through sitecustomize on PYTHONPATH writes them), for the no-torch check."""
    hook = project.root.parent / f"{project.root.name}-hook"
    hook.mkdir(exist_ok=True)
    listing = hook / "modules.txt"
    (hook / "sitecustomize.py").write_text(
        "import atexit, sys\n"
        "def _dump():\n"
        f"    with open({str(listing)!r}, 'a') as f:\n"
        "        f.write('\\n'.join(sorted({m.split('.')[0] for m in sys.modules})) + '\\n')\n"
        "atexit.register(_dump)\n")
    path = os.pathsep.join((str(hook), project.env()["PYTHONPATH"]))
    result = run_cmd([sys.executable, "-m", "doit", *args], project.root, project.env({"PYTHONPATH": path}))
    assert result.returncode == 0, result.out[-3000:]
    return set(listing.read_text().split())
