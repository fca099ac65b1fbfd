"""Shared helpers: temporary modelbuild projects driven through the real doit command line."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = "tiny-travel-cpu-int4-smoke"


def pytest_configure(config):
    """Every test runs in a network of its own with only loopback (tests/netns.py), so nothing a
    test starts (Ray, SeaweedFS, a library's cloud probe) can send traffic past 127.0.0.1."""
    from netns import private_network

    private_network()


@dataclass
class DoitResult:
    returncode: int
    out: str  # stdout + stderr

    @property
    def executed(self) -> set[str]:
        return set(re.findall(r"^\.  (\S+)$", self.out, re.M))

    @property
    def up_to_date(self) -> set[str]:
        return set(re.findall(r"^-- (\S+)$", self.out, re.M))


class Project:
    """A copy of the repo's dodo.py and targets/ in a temporary folder, with its own cache."""

    def __init__(self, root: Path, cache: Path):
        self.root = root
        self.cache = cache

    def env(self, extra: dict | None = None) -> dict:
        return {"MODELBUILD_CACHE": str(self.cache), **(extra or {})}

    def doit(self, *args: str, env: dict | None = None, check: bool = True) -> DoitResult:
        result = run_cmd([sys.executable, "-m", "doit", *args], self.root, self.env(env))
        if check and result.returncode != 0:
            raise AssertionError(f"doit {' '.join(args)} failed ({result.returncode}):\n{result.out[-4000:]}")
        return result

    def doit_with(self, rel: str, text: str, *args: str) -> DoitResult:
        """``doit *args`` (unchecked) with an extra target file that exists only for this run."""
        path = self.path(rel)
        path.write_text(text)
        try:
            return self.doit(*args, check=False)
        finally:
            path.unlink()

    def modelbuild(self, *args: str, env: dict | None = None) -> DoitResult:
        return run_cmd([sys.executable, "-m", "modelbuild", *args], self.root, self.env(env))

    def path(self, rel: str) -> Path:
        return self.root / rel

    def edit(self, rel: str, old: str, new: str) -> None:
        path = self.path(rel)
        text = path.read_text()
        assert old in text, f"{old!r} not in {rel}"
        path.write_text(text.replace(old, new, 1))

    def append(self, rel: str, text: str) -> None:
        with open(self.path(rel), "a") as handle:
            handle.write(text)


def run_cmd(argv: list[str], cwd: Path, env: dict | None = None) -> DoitResult:
    full_env = dict(os.environ)
    full_env["HF_HUB_OFFLINE"] = "1"
    full_env.update(env or {})
    proc = subprocess.run(argv, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return DoitResult(proc.returncode, proc.stdout)


def ort_logits(model_dir: Path, input_ids, adapter_file: Path | None = None):
    """Logits (float64) of a genai bundle's model.onnx for one whole sequence, empty KV cache,
    through plain onnxruntime: an independent check of what the passes build."""
    import json

    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    config = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
    feeds = {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids)}
    if "position_ids" in {i.name for i in session.get_inputs()}:
        feeds["position_ids"] = np.arange(input_ids.shape[1], dtype=np.int64)[None, :]
    for layer in range(config["num_hidden_layers"]):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{layer}.{kind}"] = np.zeros(
                (1, config["num_key_value_heads"], 0, config["head_size"]), dtype=np.float32
            )
    options = ort.RunOptions()
    if adapter_file is not None:
        adapter = ort.LoraAdapter()
        adapter.Load(str(adapter_file))
        options.add_active_adapter(adapter)
    return session.run(["logits"], feeds, options)[0].astype(np.float64)


def new_project(root: Path, cache: Path | None = None) -> Project:
    """A fresh project; its cache is empty but shares the repo's sha256-pinned downloads
    (install.sh fetched the embedded wheel), so tests never download."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dodo.py", root / "dodo.py")
    shutil.copytree(REPO / "targets", root / "targets")
    cache = cache or root.parent / f"{root.name}-cache"
    cache.mkdir(parents=True, exist_ok=True)
    if not (cache / "downloads").exists():
        (cache / "downloads").symlink_to(REPO / "cache" / "downloads")
    return Project(root, cache)


def copy_project(source: Project, root: Path) -> Project:
    """A private copy of a built project and its cache: tests that edit it own it (no order dependence)."""
    shutil.copytree(source.root, root, symlinks=True)
    cache = root.parent / f"{root.name}-cache"
    shutil.copytree(source.cache, cache, symlinks=True)
    return Project(root, cache)


@pytest.fixture
def project(tmp_path) -> Project:
    return new_project(tmp_path / "project")


@pytest.fixture(scope="module")
def built_tiny(tmp_path_factory) -> Project:
    """A project with the tiny travel recipe built once for the module's tests (read-only use)."""
    project = new_project(tmp_path_factory.mktemp("tiny") / "project")
    project.doit(TINY)
    return project
