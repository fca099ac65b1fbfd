"""Hostile but realistic inputs: the corpus of bad target files, data, environments, commands and
cache tampering that once gave a traceback, a misleading message, a silent no-op or wrong bytes.

Every case is a row: what is set up, the command, the exit code and a fragment of the one line
that must explain it. Add a row for every bug found. Rules each row is held to:

- exit code as expected (2 for a user mistake caught before anything runs, 1 for a stage that
  fails while building), never a Python traceback;
- the message names what is wrong (file, target, key where there is one);
- nothing half-written that looks up to date: a failed target has no output folder;
- secrets never echoed.

Tampering cases (an edited cache entry, gc against a release pin) check bytes: the build ends
byte-identical to a clean build, or restores instead of rebuilding.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from conftest import TINY, new_project

LORA = '[target.x]\npass = "lora-finetune"\ninputs = {{ base = ":tiny-base", data = "{data}" }}\nparams = {{ {params} }}\n'
BUILD = '[target.x]\npass = "genai-build"\ninputs = {{ base = ":tiny-base" }}\nparams = {{ {params} }}\n'
SECRET = "hf_SECRETtoken123"


@dataclass
class Case:
    id: str
    files: dict[str, str | bytes] = field(default_factory=dict)  # project-relative path -> content
    args: tuple[str, ...] = ("list",)  # doit arguments, or ("modelbuild", ...) for python -m modelbuild
    env: dict[str, str] = field(default_factory=dict)
    exit: int = 2
    says: tuple[str, ...] = ()  # fragments of the output, each must appear
    prepare: Callable | None = None  # (project) -> None, after files are written
    no_output: str | None = None  # a target whose output folder must not exist afterwards
    hides: tuple[str, ...] = ()  # must not appear in the output


def _link(target: str, link: str):
    def prepare(project):
        path = project.path(link)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(target)
    return prepare


def _hf_folder_with_link(project):
    folder = project.path("targets/model")
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    (folder / "config.json").symlink_to("/etc/passwd")


def _garbage(rel: str):
    def prepare(project):
        path = project.path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"this is not a sqlite database" * 100)
    return prepare


def _cache_is_a_file(project):
    (project.root / "cache-file").write_text("not a folder")


LOAD_CASES = [
    # --- ranges checked at load: a silent no-op model or a traceback in the worker before
    Case("learning-rate-zero", {"targets/bad.toml": LORA.format(data="data/travel_train.jsonl", params="learning_rate = 0.0")},
         says=("targets/bad.toml: target 'x'", "params.learning_rate: must be positive, got 0.0")),
    Case("learning-rate-negative", {"targets/bad.toml": LORA.format(data="data/travel_train.jsonl", params="learning_rate = -1e-3")},
         says=("target 'x'", "params.learning_rate: must be positive")),
    Case("learning-rate-nan", {"targets/bad.toml": LORA.format(data="data/travel_train.jsonl", params="learning_rate = nan")},
         says=("target 'x'", "params.learning_rate: expected a finite number, got nan")),
    Case("learning-rate-inf", {"targets/bad.toml": LORA.format(data="data/travel_train.jsonl", params="learning_rate = inf")},
         says=("params.learning_rate: expected a finite number, got inf",)),
    Case("dropout-above-one", {"targets/bad.toml": LORA.format(data="data/travel_train.jsonl", params="dropout = 1.5")},
         says=("target 'x'", "params.dropout: must be in [0, 1), got 1.5")),
    Case("dropout-one", {"targets/bad.toml": LORA.format(data="data/travel_train.jsonl", params="dropout = 1.0")},
         says=("params.dropout: must be in [0, 1)",)),
    Case("rank-zero", {"targets/bad.toml": LORA.format(data="data/travel_train.jsonl", params="rank = 0")},
         says=("params.rank: must be at least 1, got 0",)),
    Case("eval-one-token", {"targets/bad.toml": '[target.x]\npass = "evaluate"\ninputs = { model = ":tiny-base", data = "data/travel_eval.jsonl" }\nparams = { new_tokens = 1 }\n'},
         says=("target 'x'", "params.new_tokens: must be at least 2")),
    Case("smoke-no-prompts", {"targets/bad.toml": '[target.x]\npass = "smoke"\ninputs = { bundle = ":tiny-travel-cpu-int4" }\nparams = { prompts = [] }\n'},
         says=("params.prompts: must be a non-empty list",)),
    # --- pass-specific combinations the graph can answer, checked at load
    Case("gptq-without-calibration", {"targets/bad.toml": '[target.x]\npass = "quantize-onnx"\ninputs = { bundle = ":tiny-base" }\nparams = { algorithm = "gptq" }\n'},
         says=("targets/bad.toml: target 'x'", "inputs.calibration: algorithm 'gptq' needs calibration data")),
    Case("adapter-name", {"targets/bad.toml": '[target.x]\npass = "genai-build"\ninputs = { base = ":tiny-base", adapters = { "a.b" = ":tiny-travel-adapter" } }\n'},
         says=("target 'x'", "inputs.adapters.a.b: adapter names use letters, digits")),
    # --- writes outside the project, undeclared reads, credentials in target files
    Case("builder-filename-absolute", {"targets/bad.toml": BUILD.format(params='extra_options = { filename = "/tmp/x.onnx" }')},
         says=("target 'x'", "params.extra_options.filename: '/tmp/x.onnx' must be a plain file name")),
    Case("builder-filename-parent", {"targets/bad.toml": BUILD.format(params='extra_options = { filename = "../../x.onnx" }')},
         says=("params.extra_options.filename: '../../x.onnx' must be a plain file name",)),
    Case("builder-adapter-path", {"targets/bad.toml": BUILD.format(params='extra_options = { adapter_path = "/tmp/a" }')},
         says=("params.extra_options.adapter_path: names a file the builder would read", "use inputs.adapters")),
    Case("builder-own-option", {"targets/bad.toml": BUILD.format(params='extra_options = { block_size = 64 }')},
         says=("params.extra_options.block_size: set by this pass; use params.block_size",)),
    Case("builder-hf-token", {"targets/bad.toml": BUILD.format(params=f'extra_options = {{ hf_token = "{SECRET}" }}')},
         says=("params.extra_options.hf_token: credentials never go into target files",), hides=(SECRET,)),
    # --- symbolic links that pull outside files into artifacts and the cache
    Case("corpus-symlink-outside", {"targets/bad.toml": '[target.x]\npass = "random-init"\ninputs = { corpus = "data/linked.txt" }\n'},
         prepare=_link("/etc/passwd", "targets/data/linked.txt"),
         says=("target 'x'", "inputs.corpus: targets/data/linked.txt is a symbolic link to /etc/passwd, outside the project")),
    Case("hf-folder-symlink-outside", {"targets/bad.toml": '[target.x]\npass = "hf-import"\ninputs = { local = "model" }\n'},
         prepare=_hf_folder_with_link,
         says=("target 'x'", "inputs.local: config.json is a symbolic link to /etc/passwd, outside model/")),
    Case("hf-import-etc", {"targets/bad.toml": '[target.x]\npass = "hf-import"\ninputs = { local = "/etc" }\n'},
         says=("target 'x'", "inputs.local: /etc has no config.json: not a Hugging Face model folder")),
    # --- names, types and sizes in target files
    Case("name-too-long", {"targets/bad.toml": f'[target.{"x" * 300}]\npass = "device-probe"\n'},
         says=("target 'xxxx", "target name is 300 characters long (at most 200")),
    Case("name-is-a-doit-command", {"targets/bad.toml": '[target.list]\npass = "device-probe"\n'},
         says=("targets/bad.toml: target 'list'", "'list' is a doit command")),
    Case("group-is-a-doit-command", {"targets/bad.toml": '[group]\nclean = ["tiny-*"]\n'},
         says=("targets/bad.toml: group.clean", "'clean' is a doit command")),
    Case("pass-not-a-string", {"targets/bad.toml": '[target.x]\npass = 5\n'},
         says=("target 'x'", "pass: must be a string (a pass name), got int 5")),
    Case("default-targets-empty", {"targets/travel.toml": None},
         prepare=lambda p: p.edit("targets/travel.toml", 'default_targets = ["smollm2-travel-cpu-int4-smoke", "smollm2-travel-cpu-int4-eval"]', "default_targets = []"),
         says=("targets/travel.toml: default_targets: empty list",)),
    Case("matrix-too-big", {"targets/bad.toml": '[target."p-{a}-{b}-{c}"]\npass = "device-probe"\nmatrix = { a = %s, b = %s, c = %s }\n'
                            % (list(range(100)), list(range(100)), list(range(10)))},
         says=("target 'p-{a}-{b}-{c}'", "matrix: 100 x 100 x 10 = 100000 targets, more than 1000")),
    # --- environment and command line
    Case("gpus-listed-twice", env={"MODELBUILD_GPUS": "0,0"},
         files={"targets/gpu.toml": '[target.probe]\npass = "device-probe"\ndevice = "cuda"\n'},
         says=("environment.gpus: GPU 0 is listed twice",)),
    Case("negative-jobs", args=("-n", "-1", "tiny-base"), says=("doit -n -1: the number of parallel jobs must be 0 or more",),
         no_output="tiny-base"),
    Case("cache-is-a-file", env={"MODELBUILD_CACHE": "{root}/cache-file"}, prepare=_cache_is_a_file,
         says=("cache-file (MODELBUILD_CACHE): not a folder",)),
    Case("cache-in-proc", env={"MODELBUILD_CACHE": "/proc/modelbuild-cache"},
         says=("cache folder /proc/modelbuild-cache (MODELBUILD_CACHE): cannot be created",)),
    Case("garbage-doit-database", prepare=_garbage("build/.modelbuild/doit.sqlite3"),
         says=("build/.modelbuild/doit.sqlite3: not a readable sqlite database", "deleting it is safe")),
    Case("garbage-doit-database-why", args=("modelbuild", "why", "tiny-base"), prepare=_garbage("build/.modelbuild/doit.sqlite3"),
         says=("build/.modelbuild/doit.sqlite3: not a readable sqlite database", "deleting it is safe")),
    Case("garbage-stat-cache", prepare=_garbage("build/.modelbuild/stat-blake3.sqlite3"),
         says=("stat-blake3.sqlite3: not a readable sqlite database", "the stat cache: deleting it is safe")),
    # --- commands given the wrong thing
    Case("verify-garbage", {"x.lock.json": "garbage {"}, args=("modelbuild", "verify", "x.lock.json"),
         says=("x.lock.json: not a lock manifest: not JSON",)),
    Case("verify-json-list", {"x.lock.json": "[1, 2]"}, args=("modelbuild", "verify", "x.lock.json"),
         says=("x.lock.json: not a modelbuild lock manifest (a JSON list",)),
    Case("verify-archive", {"x.tar.gz": gzip.compress(b"\x00\xff" * 64, mtime=0)}, args=("modelbuild", "verify", "x.tar.gz"),
         says=("x.tar.gz: not a lock manifest: binary data (that is the release archive",)),
    Case("report-nothing-built", args=("modelbuild", "report", "tiny-*-eval"),
         says=("report: no evaluation of the", "is built and current", "doit -c tiny-")),
]


@pytest.mark.parametrize("case", LOAD_CASES, ids=[c.id for c in LOAD_CASES])
def test_bad_input_is_one_line_before_anything_runs(tmp_path, case):
    project = new_project(tmp_path / "project")
    for rel, content in case.files.items():
        if content is None:
            continue
        path = project.path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    if case.prepare:
        case.prepare(project)
    env = {k: v.format(root=project.root) for k, v in case.env.items()}
    started = time.monotonic()
    if case.args[0] == "modelbuild":
        result = project.modelbuild(*case.args[1:], env=env)
    else:
        result = project.doit(*case.args, env=env, check=False)
    elapsed = time.monotonic() - started
    assert result.returncode == case.exit, result.out
    assert "Traceback" not in result.out, result.out
    lines = [line for line in result.out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("modelbuild: "), result.out
    for part in case.says:
        assert part in lines[0], (part, lines[0])
    for part in case.hides:
        assert part not in result.out
    assert elapsed < 60, f"took {elapsed:.1f} s"  # caught at load: no stage ran (generous for a loaded machine)
    if case.no_output:
        assert not project.path(f"build/{case.no_output}").exists()
    assert not list(project.root.glob("build/*/.modelbuild/stamp.json"))  # nothing was built


def test_doit_commands_are_the_names_the_loader_refuses():
    """DOIT_COMMANDS must follow doit: a new doit command would otherwise become an unbuildable target name."""
    from doit.doit_cmd import DoitMain

    from modelbuild.core.project import DOIT_COMMANDS

    assert {cmd.get_name() for cmd in DoitMain.DOIT_CMDS} == DOIT_COMMANDS


# --- bad data: the stage fails in one line while building, and leaves nothing that looks up to date

BAD_DATA = [
    ("not-utf8", b'{"prompt": "caf\xe9", "response": "ok"}\n', "targets/data/bad.jsonl: line 1: not UTF-8 text"),
    ("binary", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 20, "targets/data/bad.jsonl: line 1: not UTF-8 text"),
    ("response-not-a-string", b'{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": 42}\n',
     "targets/data/bad.jsonl: line 2: field 'response' must be a string, got int 42"),
    ("prompt-fills-max-length", (json.dumps({"prompt": "Paris " * 20000, "response": "Tip: go."}) + "\n").encode(),
     "targets/data/bad.jsonl: record 1: its prompt alone is"),
]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    project = new_project(tmp_path_factory.mktemp("hostile-base") / "project")
    project.doit("tiny-base")
    return project


@pytest.mark.parametrize("name, data, says", BAD_DATA, ids=[row[0] for row in BAD_DATA])
def test_bad_training_data_fails_the_stage_in_one_line(tiny_base, name, data, says):
    tiny_base.path("targets/data/bad.jsonl").write_bytes(data)
    result = tiny_base.doit_with("targets/bad.toml", LORA.format(data="data/bad.jsonl", params="max_steps = 1, max_length = 64"), "x")
    assert result.returncode == 1, result.out
    assert "Traceback" not in result.out
    failing = [line for line in result.out.splitlines() if line.startswith("modelbuild: targets/bad.toml: target 'x': ")]
    assert len(failing) == 1 and says in failing[0], result.out
    if name == "prompt-fills-max-length":
        assert "no response token fits in params.max_length = 64" in failing[0]
        assert "learning_rate" not in result.out  # the old message blamed the learning rate
    assert not tiny_base.path("build/x").exists()


def test_corpus_that_is_not_text_fails_in_one_line(project):
    project.path("targets/data/corpus.bin").write_bytes(b"\xff\xfe\x00binary" * 50)
    result = project.doit_with("targets/bad.toml", '[target.x]\npass = "random-init"\ninputs = { corpus = "data/corpus.bin" }\n', "x")
    assert result.returncode == 1 and "Traceback" not in result.out, result.out
    assert "target 'x': inputs.corpus: corpus.bin is not UTF-8 text" in result.out
    assert not project.path("build/x").exists()


# --- a built project: damaged bundles, tampered cache entries, gc against release pins

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    project = new_project(tmp_path_factory.mktemp("hostile-built") / "project")
    project.doit(TINY)
    return project


def _stamp(project, target):
    return json.loads(project.path(f"build/{target}/.modelbuild/stamp.json").read_text())


def test_chat_on_a_truncated_bundle_is_one_line(built, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(built.path("build/tiny-travel-cpu-int4"), bundle)
    model = bundle / "model.onnx"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 3])
    result = built.modelbuild("chat", str(bundle), "hello", "--max-new-tokens", "4")
    assert result.returncode == 2 and "Traceback" not in result.out, result.out
    assert f"modelbuild: {bundle}: the bundle does not load in onnxruntime-genai" in result.out


def test_an_edited_action_entry_is_never_served(built):
    """Hole 1: point one manifest entry at another object's digest, delete the output, rebuild."""
    target = "tiny-travel-adapter"
    good = _stamp(built, target)
    entry_path = built.cache / "actions" / f"{good['action_key']}.json"
    entry = json.loads(entry_path.read_text())
    other = _stamp(built, "tiny-base")["manifest"]["config.json"]
    entry["manifest"]["adapter_config.json"] = dict(other)
    os.chmod(entry_path, 0o644)
    entry_path.write_text(json.dumps(entry))

    verify = built.modelbuild("cache", "verify")
    assert verify.returncode == 1, verify.out
    assert re.search(rf"action {target} \({good['action_key'][:12]}…\) is inconsistent \(its manifest does not hash", verify.out)
    assert not entry_path.exists()

    entry_path.write_text(json.dumps(entry))  # put it back: the build must refuse it by itself
    shutil.rmtree(built.path(f"build/{target}"))
    result = built.doit(TINY)
    assert f"cache entry {good['action_key'][:12]}… is inconsistent" in result.out
    assert target in result.executed
    assert _stamp(built, target)["manifest"] == good["manifest"]  # rebuilt byte-identical, not the swapped file
    assert _stamp(built, target)["origin"] == "built"
    assert built.modelbuild("cache", "verify").returncode == 0


def test_an_entry_whose_manifest_escapes_the_output_is_never_served(built):
    target = "tiny-travel-cpu-int4-smoke"
    good = _stamp(built, target)
    entry_path = built.cache / "actions" / f"{good['action_key']}.json"
    entry = json.loads(entry_path.read_text())
    from modelbuild.core.digest import hash_json

    entry["manifest"] = {"../../escaped.txt": next(iter(entry["manifest"].values()))}
    entry["manifest_digest"] = hash_json(entry["manifest"])  # self-consistent, but it writes outside
    os.chmod(entry_path, 0o644)
    entry_path.write_text(json.dumps(entry))
    shutil.rmtree(built.path(f"build/{target}"))
    result = built.doit(TINY)
    assert "is malformed" in result.out and target in result.executed
    assert not (built.root / "escaped.txt").exists() and not (built.root.parent / "escaped.txt").exists()
    assert _stamp(built, target)["manifest"] == good["manifest"]


def test_gc_keeps_what_a_release_pins_so_it_restores(built):
    released = built.modelbuild("release", "tiny-travel-cpu-int4")
    assert released.returncode == 0, released.out
    gc = built.modelbuild("cache", "gc", "--max-size", "0")
    assert gc.returncode == 0, gc.out
    for target in ("tiny-base", "tiny-travel-adapter", "tiny-travel-cpu-int4"):
        shutil.rmtree(built.path(f"build/{target}"))
    result = built.doit("tiny-travel-cpu-int4")
    restored = set(re.findall(r"modelbuild: '(\S+)': restored from cache", result.out))
    assert restored == {"tiny-base", "tiny-travel-adapter", "tiny-travel-cpu-int4"}, result.out


def test_corpus_size_is_stated_in_the_reliability_doc():
    """The reliability page (docs/reliability.md) states how many cases this module holds."""
    doc = Path(__file__).resolve().parent.parent.joinpath("docs", "reliability.md").read_text()
    count = len(LOAD_CASES) + len(BAD_DATA) + len(NOT_A_FILE) + 6  # + the not-text corpus, chat, two entry tamperings, gc pins, doit names
    match = re.search(r"tests/test_hostile\.py.{0,200}?\*\*(\d+) cases\*\*", doc, re.S)
    assert match, "docs/reliability.md: state the number of cases of tests/test_hostile.py"
    assert int(match.group(1)) == count


# --- inputs that are not files: a named pipe, a device or a socket where a file is read (#24, item 7).
# Opening a named pipe blocks until something writes to it; a device such as /dev/zero reads
# without end (its size says 0). Each is refused in one line naming the path, within seconds:
# the commands run under a timeout, as a hang is the bug these rows keep out.

HF_LOCAL = '[target.x]\npass = "hf-import"\ninputs = { local = "model" }\n'


def _fifo(rel: str):
    def prepare(project):
        os.mkfifo(project.path(rel))
    return prepare


def _socket(rel: str):
    def prepare(project):
        import socket

        server = socket.socket(socket.AF_UNIX)
        server.bind(str(project.path(rel)))  # the file stays after close: a socket node, as a crashed server leaves
        server.close()
    return prepare


def _zero_device(rel: str):
    def prepare(project):
        try:
            os.mknod(project.path(rel), 0o644 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero's major, minor
        except PermissionError:
            pytest.skip("making a device node needs root (CAP_MKNOD)")
    return prepare


def _model_folder(then: Callable):
    def prepare(project):
        folder = project.path("targets/model")
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"\0" * 16)
        then(project)
    return prepare


NOT_A_FILE = [
    Case("target-file-fifo", prepare=_fifo("targets/x.toml"),
         says=("targets/x.toml: a named pipe (FIFO), not a regular file",)),
    Case("target-file-fifo-plan", args=("modelbuild", "plan"), prepare=_fifo("targets/x.toml"),
         says=("targets/x.toml: a named pipe (FIFO), not a regular file",)),
    Case("target-file-dev-zero", prepare=_link("/dev/zero", "targets/x.toml"),
         says=("targets/x.toml: a character device, not a regular file",)),
    Case("target-file-socket", prepare=_socket("targets/x.toml"),
         says=("targets/x.toml: a socket, not a regular file",)),
    Case("hf-folder-fifo", {"targets/bad.toml": HF_LOCAL}, args=("x",), prepare=_model_folder(_fifo("targets/model/weights.bin")),
         says=("weights.bin is a named pipe (FIFO), not a file or a folder: remove it from model/",), no_output="x"),
    Case("hf-folder-dev-zero", {"targets/bad.toml": HF_LOCAL}, args=("x",),
         prepare=_model_folder(_zero_device("targets/model/weights.bin")),
         says=("weights.bin is a character device, not a file or a folder: remove it from model/",), no_output="x"),
    Case("hf-folder-link-to-dev-zero", {"targets/bad.toml": HF_LOCAL}, args=("x",),
         prepare=_model_folder(_link("/dev/zero", "targets/model/weights.bin")),
         says=("weights.bin is a symbolic link to /dev/zero, outside model/",), no_output="x"),
    Case("hf-folder-socket", {"targets/bad.toml": HF_LOCAL}, args=("x",), prepare=_model_folder(_socket("targets/model/agent.sock")),
         says=("agent.sock is a socket, not a file or a folder: remove it from model/",), no_output="x"),
    Case("corpus-fifo", {"targets/bad.toml": '[target.x]\npass = "random-init"\ninputs = { corpus = "data/pipe.txt" }\n'},
         prepare=_fifo("targets/data/pipe.txt"),
         says=("target 'x'", "inputs.corpus: targets/data/pipe.txt is a named pipe (FIFO), not a file")),
]


@pytest.mark.parametrize("case", NOT_A_FILE, ids=[c.id for c in NOT_A_FILE])
def test_an_input_that_is_not_a_file_is_one_line_never_a_hang(tmp_path, case):
    project = new_project(tmp_path / "project")
    for rel, content in case.files.items():
        project.path(rel).write_text(content)
    case.prepare(project)
    argv = ["-m", "modelbuild", *case.args[1:]] if case.args[0] == "modelbuild" else ["-m", "doit", *case.args]
    try:
        proc = subprocess.run([sys.executable, *argv], cwd=project.root, env={**os.environ, **project.env(), "HF_HUB_OFFLINE": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(case.args)} hung on {case.id} (killed after 60 s)")
    assert proc.returncode == case.exit, proc.stdout
    assert "Traceback" not in proc.stdout, proc.stdout
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("modelbuild: "), proc.stdout
    for part in case.says:
        assert part in lines[0], (part, lines[0])
    if case.no_output:
        assert not project.path(f"build/{case.no_output}").exists()
    assert not list(project.root.glob("build/*/.modelbuild/stamp.json"))
