"""The pass's code in its action key follows the real import graph (passdef.code_files): absolute,
relative and in-function imports, into modelbuild, into a plug-in's own package and into the
modules beside it, never into Python's or an installed library's (those are keyed by version).
Editing any module a pass imports changes its key and ``why`` says so; editing one it does not
import changes nothing. A toy plug-in drives it: no torch, onnx or onnxruntime anywhere."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.core

PASS_MODULE = '''
from dataclasses import dataclass

from modelbuild.passdef import Input, PassDef, param

from . import helper
from .fmt import shout


@dataclass(frozen=True)
class Params:
    text: str = param("hello", "text to write")


def run(params, inputs, out_dir, ctx):
    import toyplug_extra
    from toyplug import late

    words = (inputs["source"].read_text().split())
    (out_dir / "out.txt").write_text(shout(helper.PREFIX + params.text) + late.SUFFIX + toyplug_extra.MARK
                                     + str(len(words)))


PASS = PassDef(name="toy-words", version=1, doc="count words, loudly", params=Params,
               inputs={"source": Input("a text file", kind="file")}, run=run)
'''

FILES = {
    "toyplug/__init__.py": "",
    "toyplug/wordpass.py": PASS_MODULE,
    "toyplug/helper.py": 'PREFIX = "> "\n',
    "toyplug/fmt.py": "def shout(text):\n    return text.upper()\n",
    "toyplug/late.py": 'SUFFIX = "!"\n',
    "toyplug/unrelated.py": "VALUE = 1\n",
    "toyplug_extra.py": 'MARK = "#"\n',
}


def write_plugin(site: Path) -> None:
    for rel, text in FILES.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(textwrap.dedent(text))
    dist_info = site / "toyplug-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: toyplug\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[modelbuild.passes]\ntoy-words = toyplug.wordpass:PASS\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    write_plugin(site)
    monkeypatch.syspath_prepend(str(site))
    yield site
    for name in [n for n in sys.modules if n.split(".")[0] in ("toyplug", "toyplug_extra")]:
        del sys.modules[name]


def fresh_pass():
    """The plug-in's PassDef as a new process would load it: nothing of it imported yet."""
    for name in [n for n in sys.modules if n.split(".")[0] in ("toyplug", "toyplug_extra")]:
        del sys.modules[name]
    importlib.invalidate_caches()
    return importlib.import_module("toyplug.wordpass").PASS


def test_the_key_follows_relative_absolute_and_in_function_imports_of_a_plug_in(site):
    files = fresh_pass().code_files()
    assert set(files) == {"modelbuild", "toyplug", "toyplug.wordpass", "toyplug.helper", "toyplug.fmt",
                          "toyplug.late", "toyplug_extra"}, files
    assert "toyplug.unrelated" not in files and "modelbuild.passdef" not in files


@pytest.mark.parametrize("rel", ["toyplug/helper.py", "toyplug/fmt.py", "toyplug/late.py", "toyplug_extra.py",
                                 "toyplug/wordpass.py", "toyplug/__init__.py"])
def test_editing_any_module_the_pass_imports_changes_its_code_digest(site, rel):
    before = fresh_pass().code_digest()
    with open(site / rel, "a") as handle:
        handle.write("# edited\n")
    assert fresh_pass().code_digest() != before


def test_editing_a_module_the_pass_does_not_import_changes_nothing(site):
    before = fresh_pass().code_digest()
    (site / "toyplug/unrelated.py").write_text("VALUE = 2\n")
    (site / "toyplug/new_module.py").write_text("VALUE = 3\n")
    assert fresh_pass().code_digest() == before


def test_installed_libraries_and_python_stay_out_of_the_code(site):
    """A pass importing torch-sized libraries must not hash them (they are keyed by version), and
    locating them imports nothing: task loading stays light."""
    (site / "toyplug/fmt.py").write_text("import json\n\n\ndef shout(text):\n    import pygments.lexers\n"
                                         "    import doit.cmd_base\n    return text.upper()\n")
    sys.modules.pop("pygments.lexers", None)
    sys.modules.pop("pygments", None)
    from modelbuild.passdef import code_files

    loaded = set(sys.modules)
    files = code_files("toyplug.wordpass", site / "toyplug/wordpass.py")
    assert set(sys.modules) == loaded  # locating pygments.lexers did not import pygments
    assert "toyplug.fmt" in files
    assert not any(name.split(".")[0] in ("json", "pygments", "doit") for name in files), files


def test_modelbuild_helpers_imported_relatively_are_in_the_key():
    """genai.py imports its siblings with ``from . import``; such helpers shape outputs too."""
    from modelbuild.passdef import registry

    genai_build = registry()["genai-build"].code_files()
    assert {"modelbuild.ml.genai", "modelbuild.ml.bundle", "modelbuild.ml.lora_graph"} <= set(genai_build)


def test_doit_rebuilds_when_a_relatively_imported_helper_changes_and_why_says_so(project, tmp_path):
    site = tmp_path / "site"
    write_plugin(site)
    project.path("targets/toy.toml").write_text(
        '[target.toy]\npass = "toy-words"\ninputs = { source = "data/tokenizer_corpus.txt" }\n')
    env = {"PYTHONPATH": str(site)}
    first = project.doit("toy", env=env)
    assert "toy" in first.executed
    out = project.path("build/toy/out.txt")
    assert out.read_text().startswith("> HELLO!#")
    assert "toy" in project.doit("toy", env=env).up_to_date

    (site / "toyplug/unrelated.py").write_text("VALUE = 2\n")  # imported by nothing the pass runs
    assert "toy" in project.doit("toy", env=env).up_to_date

    (site / "toyplug/helper.py").write_text('PREFIX = ">> "\n')  # `from . import helper`
    why = project.modelbuild("why", "toy", env=env)
    assert why.returncode == 0, why.out
    assert "pass code:" in why.out, why.out
    again = project.doit("toy", env=env)
    assert "toy" in again.executed
    assert out.read_text().startswith(">> HELLO!#")

    (site / "toyplug_extra.py").write_text('MARK = "%"\n')  # a helper module beside the package, imported in run()
    assert "pass code:" in project.modelbuild("why", "toy", env=env).out
    assert "toy" in project.doit("toy", env=env).executed
    assert "%" in out.read_text()
