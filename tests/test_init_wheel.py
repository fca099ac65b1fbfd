"""`init` the way a user meets it: modelbuild built into a wheel, installed into a fresh venv
(modelbuild only from the wheel; its heavy dependencies shared from this checkout's venv through a
.pth file, so nothing is downloaded), an empty folder initialised, and the tiny recipe built there
with doit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_cmd

SITE = Path(next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_relative_to(REPO)))


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv with the modelbuild wheel installed and the checkout's dependencies linked."""
    tmp = tmp_path_factory.mktemp("wheel")
    wheels = tmp / "dist"
    source = tmp / "source"  # setuptools writes build/ and *.egg-info beside the sources: not into the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "modelbuild", source / "modelbuild", ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(source)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    wheel = next(wheels.glob("modelbuild-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    # Dependencies: every distribution of the checkout's venv except modelbuild itself (its
    # editable install would shadow the wheel), through symlinks in one folder named by a .pth.
    deps = tmp / "deps"
    deps.mkdir()
    for entry in SITE.iterdir():
        if not entry.name.lower().startswith(("modelbuild", "__editable__", "_modelbuild")):
            (deps / entry.name).symlink_to(entry)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "_checkout_deps.pth").write_text(f"{deps}\n")
    return venv


def test_modelbuild_comes_from_the_wheel(venv):
    python = venv / "bin" / "python"
    out = subprocess.run([str(python), "-c", "import modelbuild, modelbuild.olive, modelbuild.cli.init_project; print(modelbuild.__file__)"],
                         capture_output=True, text=True, cwd="/", check=True).stdout.strip()
    assert Path(out).is_relative_to(venv), out
    from modelbuild.cli.init_project import template_files

    # the wheel's template data is the checkout's (and its data files are targets/data's own)
    packaged = template_files()
    for name in ("tokenizer_corpus.txt", "travel_train.jsonl", "travel_eval.jsonl"):
        assert packaged[f"targets/data/{name}"] == (REPO / "targets" / "data" / name).read_bytes()
    assert packaged["dodo.py"] == (REPO / "dodo.py").read_bytes()


def test_init_an_empty_folder_and_build_the_tiny_recipe(venv, tmp_path):
    python = str(venv / "bin" / "python")
    folder = tmp_path / "myproject"
    env = {"MODELBUILD_CACHE": "", "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    result = run_cmd([python, "-m", "modelbuild", "init", str(folder)], tmp_path, env)
    assert result.returncode == 0, result.out
    assert f"next: cd {folder} && doit list && doit" in result.out
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        ".gitignore", "dodo.py", "targets/data/README.md", "targets/data/tokenizer_corpus.txt",
        "targets/data/travel_eval.jsonl", "targets/data/travel_train.jsonl", "targets/devices.toml", "targets/example.toml"]
    assert {"build/", "cache/"} <= set((folder / ".gitignore").read_text().splitlines())

    built = run_cmd([python, "-m", "doit"], folder, env)
    assert built.returncode == 0, built.out[-3000:]
    answers = json.loads((folder / "build" / "tiny-travel-cpu-int4-smoke" / "answers.json").read_text())
    assert answers and (folder / "build" / "tiny-travel-cpu-int4" / "adapters" / "travel.onnx_adapter").is_file()
    stamp = json.loads((folder / "build" / "tiny-travel-cpu-int4" / ".modelbuild" / "stamp.json").read_text())
    assert stamp  # built in this project, by the wheel's passes
    assert (folder / "cache" / "actions").is_dir()  # the project's own cache, as .gitignore expects
    noop = run_cmd([python, "-m", "doit"], folder, env)
    assert noop.returncode == 0 and "\n.  " not in "\n" + noop.out  # nothing rebuilt

    again = run_cmd([python, "-m", "modelbuild", "init", str(folder)], tmp_path, env)
    assert again.returncode == 2 and "already a project" in again.out


def test_init_from_olive(venv, tmp_path):
    python = str(venv / "bin" / "python")
    folder = tmp_path / "fromolive"
    seed = REPO / "tests" / "data" / "olive" / "seeds" / "phi4-mini_modelbuilder_int4.json"
    result = run_cmd([python, "-m", "modelbuild", "init", str(folder), "--from-olive", str(seed)], tmp_path)
    assert result.returncode == 0, result.out
    text = (folder / "targets" / "phi-4-mini-instruct.toml").read_text()
    assert 'default_targets = ["phi-4-mini-instruct-convert"]' in text
    assert not (folder / "targets" / "example.toml").exists()
    listing = run_cmd([python, "-m", "doit", "list"], folder)
    assert listing.returncode == 0 and "phi-4-mini-instruct-convert" in listing.out
    bad = run_cmd([python, "-m", "modelbuild", "init", str(tmp_path / "bad"), "--from-olive", str(tmp_path / "none.json")], tmp_path)
    assert bad.returncode == 2 and len(bad.out.strip().splitlines()) == 1 and not (tmp_path / "bad" / "dodo.py").exists()
