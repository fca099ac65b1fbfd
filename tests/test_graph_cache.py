"""The graph cache (modelbuild/graph/graph_cache.py): a cached graph is served only while everything its
loading read is unchanged (target files, input files and links, pass code and plug-ins, the
environment, the machine's answers); anything else loads again, a load that fails is never
cached, and a cache file that cannot be read is ignored and replaced."""

from __future__ import annotations

import pickle
import sys
import time

import pytest

from modelbuild import UserError, passdef
from modelbuild.exec import devices
from modelbuild.exec.executor import resolve_devices
from modelbuild.graph import graph_cache
from modelbuild.engine import stage

PLUGIN = '''
from dataclasses import dataclass
from modelbuild.passdef import Input, PassDef, param

@dataclass(frozen=True)
class Params:
    text: str = param("hello", "text to write")

def run(params, inputs, out_dir, ctx):
    (out_dir / "out.txt").write_text(params.text)

PASS = PassDef(name="count-words", version=VERSION, doc="count words", params=Params,
               inputs={"source": Input("a text file", kind="file")}, run=run)
'''


@pytest.fixture
def cached(project, monkeypatch):
    """The test project, with the same-tick guard narrowed to files changed during the load itself
    (a test writes its files moments before loading)."""
    monkeypatch.setattr(graph_cache, "RACY_NS", 0)
    for name in ("MODELBUILD_GPUS", "MODELBUILD_GRAPH_CACHE", "MODELBUILD_SIMULATED_GPUS"):
        monkeypatch.delenv(name, raising=False)
    return project


def load(project):
    """What a doit process starts from (tasks.project_at): the cached graph, then its device
    preference lists resolved on the slot pool's machine. Each load is a new Run, as in a new
    process: nothing the previous one learned about the machine carries over."""
    graph = graph_cache.load(project.root)
    return resolve_devices(graph, lambda: stage.slot_pool(graph).machine), graph.run.graph_outcome


def test_the_second_load_is_served_from_the_cache_and_equals_the_first(cached):
    first, outcome = load(cached)
    assert outcome == "stored"
    second, outcome = load(cached)
    assert outcome == "hit"
    assert list(second.targets) == list(first.targets)
    assert (second.groups, second.default_targets, second.devices) == (first.groups, first.default_targets, first.devices)
    for name, target in first.targets.items():
        again = second.targets[name]
        fields = ("params", "inputs", "device", "file", "doc", "origin", "gpu_memory_gb", "gates")
        assert [getattr(again, f) for f in fields] == [getattr(target, f) for f in fields], name
        for attr in ("name", "version", "doc", "libraries", "devices", "metrics", "inputs", "params"):
            assert getattr(again.pass_def, attr) == getattr(target.pass_def, attr), (name, attr)
        assert again.pass_def.code_digest() == target.pass_def.code_digest()
        assert (again.pass_def.resolve is None) == (target.pass_def.resolve is None)
    # What the cache did not record is the pass itself, imported on demand.
    assert second.targets["tiny-base"].pass_def.run is first.targets["tiny-base"].pass_def.run


def test_a_target_file_edit_is_seen(cached):
    load(cached)
    cached.edit("targets/models.toml", "params = { seed = 0 }", "params = { seed = 1 }")
    graph, outcome = load(cached)
    assert outcome == "stored" and graph.targets["tiny-base"].params["seed"] == 1
    assert load(cached)[1] == "hit"


def test_a_new_and_a_removed_target_file_are_seen(cached):
    load(cached)
    extra = cached.path("targets/extra.toml")
    extra.write_text('[target.extra]\npass = "random-init"\ninputs = { corpus = "data/tokenizer_corpus.txt" }\n')
    assert "extra" in load(cached)[0].targets
    extra.unlink()
    graph, outcome = load(cached)
    assert outcome == "stored" and "extra" not in graph.targets
    hidden = cached.path("targets/.hidden.toml")  # Path.glob("*.toml") loads dot-files too
    hidden.write_text('[target.hidden]\npass = "random-init"\ninputs = { corpus = "data/tokenizer_corpus.txt" }\n')
    assert "hidden" in load(cached)[0].targets
    hidden.write_text('[target.hidden2]\npass = "random-init"\ninputs = { corpus = "data/tokenizer_corpus.txt" }\n')
    graph, outcome = load(cached)
    assert outcome == "stored" and "hidden2" in graph.targets and "hidden" not in graph.targets


def test_a_load_error_is_reported_on_every_run_and_never_cached(cached):
    load(cached)
    cache_file = cached.path("build/.modelbuild/graph.pickle")
    before = cache_file.read_bytes()
    cached.append("targets/models.toml", '\n[target.broken]\npass = "no-such-pass"\n')
    for _ in range(2):
        with pytest.raises(UserError, match="target 'broken': pass: unknown pass 'no-such-pass'"):
            load(cached)
    assert cache_file.read_bytes() == before


def test_an_environment_change_is_seen(cached, monkeypatch):
    monkeypatch.setattr(devices, "discover_gpus", lambda: ([], "test: none"))
    graph, _ = load(cached)
    assert graph.targets["phi35-travel-adapter"].device == "cpu"  # device = ["cuda", "cpu"]
    assert load(cached)[1] == "hit"
    monkeypatch.setenv("MODELBUILD_GPUS", "0")
    graph, outcome = load(cached)
    assert outcome == "stored" and graph.targets["phi35-travel-adapter"].device == "cuda"
    monkeypatch.setenv("MODELBUILD_EXECUTOR", "local")  # any MODELBUILD_* variable: loaded again
    assert load(cached)[1] == "stored"


def test_the_cache_holds_no_machine_answer_each_run_asks(cached, monkeypatch):
    gpus: list = []
    monkeypatch.setattr(devices, "discover_gpus", lambda: (list(gpus), "test"))
    assert load(cached)[0].targets["phi35-travel-adapter"].device == "cpu"
    assert load(cached)[1] == "hit"
    gpus.append(devices.Gpu(0, 80.0))  # the machine gained a GPU: the same cached graph, another answer
    graph, outcome = load(cached)
    assert outcome == "hit" and graph.targets["phi35-travel-adapter"].device == "cuda"
    cache_file = cached.path("build/.modelbuild/graph.pickle")
    stored = pickle.loads(cache_file.read_bytes())["project"].targets["phi35-travel-adapter"]
    assert (stored.device, stored.device_choices) == ("", ("cuda", "cpu"))  # the list as the file says it


def test_an_input_file_change_or_removal_is_seen(cached):
    load(cached)
    corpus = cached.path("targets/data/tokenizer_corpus.txt")
    corpus.write_text(corpus.read_text() + "one more line\n")
    assert load(cached)[1] == "stored"
    assert load(cached)[1] == "hit"
    corpus.unlink()
    with pytest.raises(UserError, match="missing input file targets/data/tokenizer_corpus.txt"):
        load(cached)


def test_a_link_pointed_elsewhere_is_seen(cached):
    data = cached.path("targets/data")
    (data / "a.txt").write_text("a b c\n")
    (data / "b.txt").write_text("d e f\n")
    (data / "corpus.txt").symlink_to("a.txt")
    cached.path("targets/extra.toml").write_text(
        '[target.linked]\npass = "random-init"\ninputs = { corpus = "data/corpus.txt" }\n')
    assert load(cached)[0].targets["linked"].inputs["corpus"].value == "targets/data/a.txt"
    (data / "corpus.txt").unlink()
    (data / "corpus.txt").symlink_to("b.txt")
    graph, outcome = load(cached)
    assert outcome == "stored" and graph.targets["linked"].inputs["corpus"].value == "targets/data/b.txt"


def test_a_folder_input_that_gains_a_link_out_of_it_is_refused(cached, tmp_path):
    model = cached.path("targets/data/model")
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"x")
    cached.path("targets/extra.toml").write_text(
        '[target.local]\npass = "hf-import"\nparams = { model = "tiny" }\ninputs = { local = "data/model" }\n')
    load(cached)
    assert load(cached)[1] == "hit"
    (tmp_path / "secret").write_text("s")
    (model / "extra.json").symlink_to(tmp_path / "secret")
    with pytest.raises(UserError, match="inputs.local: extra.json is a symbolic link"):
        load(cached)


@pytest.mark.parametrize("junk", [b"", b"not a pickle", b"\x80\x05\x95", pickle.dumps({"format": 999}), pickle.dumps(["x"])])
def test_a_corrupt_cache_file_is_ignored_and_replaced(cached, junk):
    load(cached)
    cache_file = cached.path("build/.modelbuild/graph.pickle")
    cache_file.write_bytes(junk)
    graph, outcome = load(cached)
    assert outcome == "stored" and "tiny-base" in graph.targets
    assert load(cached)[1] == "hit"


def test_it_can_be_turned_off(cached, monkeypatch):
    monkeypatch.setenv("MODELBUILD_GRAPH_CACHE", "0")
    graph, outcome = load(cached)
    assert "tiny-base" in graph.targets
    assert outcome == "off" and not cached.path("build/.modelbuild/graph.pickle").exists()


def test_a_plug_in_edited_or_removed_is_seen(cached, tmp_path, monkeypatch):
    site = tmp_path / "site"
    dist_info = site / "countwords_plugin-0.1.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: countwords-plugin\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[modelbuild.passes]\ncount-words = countwords_plugin:PASS\n")
    module = site / "countwords_plugin.py"
    module.write_text(PLUGIN.replace("VERSION", "1"))
    cached.path("targets/plug.toml").write_text(
        '[target.words]\npass = "count-words"\ninputs = { source = "data/tokenizer_corpus.txt" }\n')
    monkeypatch.syspath_prepend(str(site))

    def new_process() -> None:  # what a fresh doit process starts from: nothing found or imported yet
        monkeypatch.setattr(passdef, "_entries", None)
        monkeypatch.setattr(passdef, "_loaded", {})
        sys.modules.pop("countwords_plugin", None)

    try:
        new_process()
        assert load(cached)[0].targets["words"].pass_def.version == 1
        (site / "__pycache__").mkdir(exist_ok=True)  # the first import's bytecode, as users run Python
        new_process()
        graph, outcome = load(cached)
        assert outcome == "hit" and graph.targets["words"].pass_def.params().text == "hello"
        time.sleep(0.01)
        # Another size: Python trusts a __pycache__ entry of the same size and mtime second.
        module.write_text(PLUGIN.replace("VERSION", "10"))
        new_process()
        graph, outcome = load(cached)
        assert outcome == "stored" and graph.targets["words"].pass_def.version == 10
        (dist_info / "entry_points.txt").unlink()  # uninstalled
        (dist_info / "METADATA").unlink()
        dist_info.rmdir()
        new_process()
        with pytest.raises(UserError, match="unknown pass 'count-words'"):
            load(cached)
    finally:
        sys.modules.pop("countwords_plugin", None)


def test_doit_sees_edits_after_cached_runs(project):
    time.sleep(2.1)  # past the same-tick guard for the files the fixture just copied: runs below are cached
    assert "tiny-base" in project.doit("list").out
    assert "tiny-base" in project.doit("list").out
    project.path("targets/extra.toml").write_text(
        '[target.extra-words]\npass = "random-init"\ninputs = { corpus = "data/tokenizer_corpus.txt" }\n')
    assert "extra-words" in project.doit("list").out
    project.path("targets/extra.toml").write_text('[target.extra-words]\npass = "random-init"\nparams = { sead = 1 }\n')
    for _ in range(2):
        result = project.doit("list", check=False)
        assert result.returncode != 0 and "params.sead: unknown param of pass 'random-init'" in result.out
        assert "Traceback" not in result.out
