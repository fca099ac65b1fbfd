"""The core lane: the executor, the local cache, locks, kill -9 recovery, ``why`` and the loader,
through real doit runs of toy passes (tests/toypass, tests/core_project.py). No torch, onnx or
onnxruntime in any process; ``pytest -m core`` runs this lane alone.

Each assertion counts real pass runs twice: what doit printed (``.executed``/``-- up to date``)
and the toy passes' own run log (``project.runs()``), so a restore that secretly ran the pass fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys

import pytest

from conftest import run_cmd
from core_project import ALL, CHAIN, TOY_TOML, WORDS, modules_loaded_by, new_core_project, said

pytestmark = pytest.mark.core

WORDS_FILE = "targets/data/words.txt"
TOML = "targets/toy.toml"


@pytest.fixture
def toy(tmp_path):
    project = new_core_project(tmp_path / "project")
    first = project.doit("shout")
    assert first.executed == CHAIN and project.runs() == ["words", "upper", "shout"]
    project.clear_runs()
    return project


def object_file(project, target: str, rel: str):
    digest = project.stamp(target)["manifest"][rel]["digest"]
    return project.cache / "objects" / digest[:2] / digest[2:]


# --- incremental builds ------------------------------------------------------------------------

def test_noop_then_a_param_edit_rebuilds_that_stage_and_its_dependents_only(toy):
    noop = toy.doit("shout")
    assert noop.executed == set() and noop.up_to_date == CHAIN and toy.runs() == []
    before = toy.files("shout")

    toy.edit(TOML, 'pass = "toy-upper"\ninputs = { source = ":words" }\n',
             'pass = "toy-upper"\ninputs = { source = ":words" }\nparams = { suffix = "." }\n')
    edited = toy.doit("shout")
    assert edited.executed == {"upper", "shout"} and edited.up_to_date == {"words"}
    assert toy.runs() == ["upper", "shout"]
    assert toy.stamp("upper")["components"]["params"]["suffix"] == "."
    assert toy.files("shout")["total.txt"] == b"11.!\n" and toy.files("shout") != before
    assert toy.doit("shout").executed == set()

    # Editing only a doc string changes no action key: nothing runs.
    toy.edit(TOML, 'doc = "the counts, upper-cased"', 'doc = "The counts, in capitals"')
    assert toy.doit("shout").executed == set() and toy.runs() == ["upper", "shout"]


def test_an_input_file_edit_reruns_the_chain_with_new_bytes(toy):
    before = toy.stamp("words")
    toy.append(WORDS_FILE, "a fox again\n")
    result = toy.doit("shout")
    assert result.executed == CHAIN and toy.runs() == ["words", "upper", "shout"]
    assert toy.stamp("words")["manifest_digest"] != before["manifest_digest"]
    assert json.loads(toy.files("words")["counts.json"])["fox"] == 2
    assert toy.doit("shout").executed == set()


@pytest.mark.parametrize("change", ["whitespace", "param"])
def test_early_cutoff_an_identical_upstream_output_stops_the_rebuild(toy, change):
    before = toy.stamp("words")
    if change == "whitespace":  # a new file digest, the same word counts
        toy.path(WORDS_FILE).write_text(WORDS.replace(" ", "   ") + "\n\n")
    else:  # a param in the key that shapes no byte of the output
        toy.edit(TOML, 'inputs = { text = "data/words.txt" }\n', 'inputs = { text = "data/words.txt" }\nparams = { label = "v2" }\n')
    result = toy.doit("shout")
    assert result.executed == {"words"} and result.up_to_date == {"upper", "shout"}
    assert toy.runs() == ["words"]
    after = toy.stamp("words")
    assert after["action_key"] != before["action_key"]
    assert after["manifest_digest"] == before["manifest_digest"]
    assert toy.modelbuild("why", "shout").out.count("up to date") == 3


def test_a_revert_restores_the_earlier_artifacts_from_the_cache(toy):
    original = toy.manifests(CHAIN)
    original_text = toy.path(WORDS_FILE).read_text()
    toy.append(WORDS_FILE, "more words here\n")
    edited = toy.doit("shout")
    assert edited.executed == CHAIN and not said(edited, "restored from cache")
    second = toy.manifests(CHAIN)
    toy.clear_runs()
    for _ in range(2):  # back and forth: every switch is a restore, no pass runs
        toy.path(WORDS_FILE).write_text(original_text)
        back = toy.doit("shout")
        assert said(back, "restored from cache") == CHAIN and toy.manifests(CHAIN) == original
        assert toy.stamp("upper")["origin"] == "restored from cache"
        toy.append(WORDS_FILE, "more words here\n")
        forth = toy.doit("shout")
        assert said(forth, "restored from cache") == CHAIN and toy.manifests(CHAIN) == second
    assert toy.runs() == []


def test_a_deleted_output_is_restored_from_the_cache_without_running_the_pass(toy):
    files = toy.files("upper")
    shutil.rmtree(toy.path("build/upper"))
    why = toy.modelbuild("why", "shout")
    assert "upper: stale: never built" in why.out and "shout: waits on upper" in why.out
    result = toy.doit("shout")
    assert said(result, r"restored from cache \(built in [\d.]+ s\)") == {"upper"}
    assert result.executed == {"upper"} and result.up_to_date == {"words", "shout"}  # early cutoff
    assert toy.runs() == [] and "running on" not in result.out
    assert toy.files("upper") == files and toy.stamp("upper")["origin"] == "restored from cache"
    why = toy.modelbuild("why", "shout")
    assert why.returncode == 0 and "upper: up to date (restored from cache" in why.out
    assert re.search(r"words: up to date \(built in [\d.]+ s", why.out)


def test_a_second_project_on_a_shared_cache_restores_everything(tmp_path):
    shared = tmp_path / "shared-cache"
    one = new_core_project(tmp_path / "one", cache=shared)
    one.doit("shout")
    two = new_core_project(tmp_path / "two", cache=shared)
    result = two.doit("shout")
    assert said(result, "restored from cache") == CHAIN and two.runs() == []
    assert two.manifests(CHAIN) == one.manifests(CHAIN)


def test_forget_clean_and_force_behave_as_in_doit(toy):
    before = toy.stamp("shout")
    toy.doit("forget", "shout")
    result = toy.doit("shout")  # re-checked: the intact output is re-verified and reused
    assert result.executed == {"shout"} and "modelbuild: 'shout': output already complete" in result.out
    assert toy.stamp("shout") == before and toy.runs() == []
    toy.doit("forget", "shout")
    forced = toy.doit("shout", env={"MODELBUILD_FORCE": "1"})
    assert forced.executed == {"shout"} and "output already complete" not in forced.out
    assert toy.runs() == ["shout"] and toy.stamp("shout")["origin"] == "built"
    assert toy.stamp("shout")["manifest"] == before["manifest"]
    toy.doit("clean", "shout")
    assert not toy.path("build/shout").exists() and toy.path("build/upper").is_dir()
    assert toy.doit("shout").executed == {"shout"}


def test_a_failing_pass_leaves_nothing_that_counts_as_up_to_date(toy):
    toy.doit("slow")
    good = toy.stamp("slow")
    toy.clear_runs()
    toy.edit(TOML, "params = { seconds = 0.3, parts = 3 }", "params = { seconds = 0.0, parts = 3, fail = true }")
    failed = toy.doit("slow", check=False)
    assert failed.returncode != 0 and toy.runs() == ["slow"]
    assert "targets/toy.toml: target 'slow': failing as asked (params.fail)" in failed.out
    assert "Traceback" not in failed.out
    assert toy.stamp("slow") == good  # the previous output, untouched, and not taken as up to date
    assert not list(toy.path("build").glob(".slow~*"))
    assert not any(json.loads(p.read_text())["components"]["params"].get("fail")
                   for p in (toy.cache / "actions").glob("*.json"))  # nothing of it cached
    assert "slow: stale: param fail: False -> True" in toy.modelbuild("why", "slow").out
    again = toy.doit("slow", check=False)
    assert again.returncode != 0 and "slow" not in again.up_to_date
    toy.edit(TOML, ", fail = true", "")
    back = toy.doit("slow")  # the good key is in the cache (and the output still holds it)
    assert back.executed == {"slow"} and toy.stamp("slow")["manifest"] == good["manifest"]


# --- damage: outputs and the cache -----------------------------------------------------------

def test_a_tampered_output_is_stale_and_restored(toy):
    total = toy.path("build/words/total.txt")
    total.write_text("12\n")
    why = toy.modelbuild("why", "shout")
    assert "words: stale: output changed since it was built: total.txt" in why.out
    assert "upper: waits on words" in why.out
    result = toy.doit("shout")
    assert "words" in result.executed and total.read_text() == "11\n"
    assert toy.runs() == []  # the cache had the action: restored, not rerun
    assert "stale" not in toy.modelbuild("why", "shout").out

    # A file deleted from the output, and a stray one added: the same story.
    toy.path("build/upper/counts.json").unlink()
    (toy.path("build/shout") / "stray.txt").write_text("x")
    why = toy.modelbuild("why", "shout").out
    assert "upper: stale: output changed since it was built: counts.json" in why
    assert "shout: stale: output changed since it was built: stray.txt" in why
    result = toy.doit("shout")
    assert {"upper", "shout"} <= result.executed and toy.runs() == []
    assert toy.path("build/upper/counts.json").is_file() and not (toy.path("build/shout") / "stray.txt").exists()
    assert toy.doit("shout").executed == set()


def test_tampered_or_missing_cache_objects_are_never_served(toy):
    upper = toy.stamp("upper")
    good = toy.files("upper")
    obj = object_file(toy, "upper", "counts.json")
    os.chmod(obj, 0o644)
    obj.write_bytes(obj.read_bytes()[:-8] + b"tampered")
    toy.doit("clean", "upper")
    result = toy.doit("shout")
    assert "cache object for counts.json is corrupt (dropped); rebuilding" in result.out
    assert toy.runs() == ["upper"] and toy.files("upper") == good  # rebuilt, identical
    assert toy.stamp("upper")["manifest"] == upper["manifest"] and toy.stamp("upper")["origin"] == "built"
    assert result.up_to_date == {"words", "shout"}

    obj.unlink()
    toy.doit("clean", "upper")
    toy.clear_runs()
    result = toy.doit("shout")
    assert "cache object for counts.json is missing; rebuilding" in result.out
    assert toy.runs() == ["upper"] and toy.files("upper") == good


def test_a_tampered_cache_entry_is_dropped_never_served(toy):
    key = toy.stamp("upper")["action_key"]
    entry_file = toy.cache / "actions" / f"{key}.json"
    entry = json.loads(entry_file.read_text())
    entry["manifest"]["counts.json"]["digest"] = "0" * 64  # points at other bytes, digests not recomputed
    entry_file.write_text(json.dumps(entry))
    toy.doit("clean", "upper")
    result = toy.doit("shout")
    assert f"cache entry {key[:12]}… is inconsistent" in result.out and "never served" in result.out
    assert toy.runs() == ["upper"] and toy.stamp("upper")["origin"] == "built"
    assert json.loads(entry_file.read_text())["manifest"] == toy.stamp("upper")["manifest"]  # re-recorded


def test_cache_verify_finds_a_corrupt_object_and_gc_keeps_the_build_up_to_date(toy):
    assert toy.modelbuild("cache", "verify").returncode == 0
    obj = object_file(toy, "words", "counts.json")
    os.chmod(obj, 0o644)
    obj.write_bytes(b"garbage")
    result = toy.modelbuild("cache", "verify")
    assert result.returncode == 1 and "corrupt object" in result.out and not obj.exists()
    assert toy.modelbuild("cache", "verify").returncode == 0
    gc = toy.modelbuild("cache", "gc", "--max-size", "0")
    assert gc.returncode == 0 and "now 0.0 MB in 0 objects" in gc.out
    assert toy.doit("shout").executed == set()  # the build folder is intact and up to date


# --- concurrency and crashes ------------------------------------------------------------------

def test_two_concurrent_builds_run_each_pass_once(tmp_path):
    toml = TOY_TOML.replace("seconds = 0.3, parts = 3", "seconds = 1.0, parts = 2")  # long enough to overlap
    project = new_core_project(tmp_path / "project", toml=toml)
    procs = [project.start("slow", "shout"), project.start("slow", "shout")]
    outs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), outs
    assert sorted(project.runs()) == sorted(ALL), outs  # every pass ran exactly once in all
    assert any("waiting for another process building" in out for out in outs), outs
    for name in ALL:
        ran = sum(f"modelbuild: '{name}' running on" in out for out in outs)
        other = sum(f"modelbuild: '{name}': output already complete" in out or
                    f"modelbuild: '{name}': restored from cache" in out or
                    bool(re.search(rf"^-- {name}$", out, re.M)) for out in outs)
        assert ran == 1 and other == 1, (name, outs)
    reference = new_core_project(tmp_path / "reference", toml=toml)
    reference.doit("slow", "shout")
    assert project.manifests() == reference.manifests()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    project = new_core_project(tmp_path_factory.mktemp("reference") / "project")
    project.doit("slow", "shout")
    return project.manifests()


@pytest.mark.parametrize("moment", [
    ".words~*.tmp/plan.json",  # the first stage's pass is starting
    "words/.modelbuild/stamp.json",  # the first stage is in place
    ".slow~*.tmp/plan.json",  # the slow stage's pass is starting
    ".slow~*.tmp/out/part1.txt",  # the slow stage is half-written
])
def test_kill_9_at_any_point_never_leaves_a_wrong_up_to_date_artifact(tmp_path, reference, moment):
    project = new_core_project(tmp_path / "project")
    proc = project.start("-n", "1", "slow", "shout")
    project.wait_for(proc, moment)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # Before anything repairs it: every stage that `why` calls up to date holds the reference bytes.
    why = project.modelbuild("why", "slow", "shout")
    assert why.returncode == 0, why.out
    fresh = set(re.findall(r"^(\S+): up to date", why.out, re.M))
    for name in fresh:
        assert project.stamp(name)["manifest"] == reference[name], (moment, name)
    assert "slow" not in fresh  # it was killed before or while it ran
    if moment.startswith(".slow"):
        assert list(project.path("build").glob(".slow~*.tmp"))  # the kill really left a half-written folder
    # Whatever finished before the kill may be reused; everything must end byte-identical.
    project.clear_runs()
    again = project.doit("slow", "shout")
    assert project.manifests() == reference
    assert not list(project.path("build").glob(".*.tmp"))
    ran, restored = set(project.runs()), said(again, "restored from cache")
    assert "slow" in ran and not ran & fresh  # what had finished was not rerun
    assert ran | restored | fresh == ALL and len(project.runs()) == len(ran)
    assert project.doit("slow", "shout").executed == set(), again.out


def test_an_input_changed_while_its_stage_runs_is_not_recorded(tmp_path):
    toml = ('[target.slowfile]\npass = "toy-sleep"\ninputs = { source = "data/words.txt" }\n'
            'params = { seconds = 0.4, parts = 2 }\n')
    project = new_core_project(tmp_path / "project", toml=toml)
    proc = project.start("slowfile")
    project.wait_for(proc, ".slowfile~*.tmp/plan.json")
    project.append(WORDS_FILE, "late words\n")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0, out
    assert "input source changed while the stage ran; nothing recorded" in out
    assert not project.path("build/slowfile").exists()
    assert not list((project.cache / "actions").glob("*.json"))
    assert project.doit("slowfile").executed == {"slowfile"}  # the next run builds the new input
    assert "late words" in project.files("slowfile")["part0.txt"].decode()


# --- why ----------------------------------------------------------------------------------------

def test_why_names_the_changed_param_and_input_and_says_fresh_when_fresh(toy):
    fresh = toy.modelbuild("why", "shout")
    assert fresh.returncode == 0 and "stale" not in fresh.out
    assert all(f"{name}: up to date (built in" in fresh.out for name in CHAIN)

    toy.edit(TOML, 'params = { suffix = "!" }', 'params = { suffix = "?" }')
    toy.append(WORDS_FILE, "one more\n")
    why = toy.modelbuild("why", "shout").out
    assert "words: stale: input file text (targets/data/words.txt) changed" in why
    assert "upper: waits on words: reruns only if their output changes" in why
    assert "shout: stale: param suffix: '!' -> '?'" in why

    toy.edit(TOML, 'inputs = { source = ":words" }\n', 'inputs = { source = ":words" }\nparams = { upper = false }\n')
    why = toy.modelbuild("why", "shout").out
    assert "upper: stale (after words rebuild): param upper: True -> False" in why
    assert "shout: stale (after upper rebuild): param suffix: '!' -> '?'" in why

    toy.edit(TOML, "params = { upper = false }\n", "")
    toy.path(WORDS_FILE).write_text(WORDS)
    why = toy.modelbuild("why", "shout").out
    assert "words: up to date" in why and "shout: stale: param suffix: '!' -> '?'" in why
    toy.edit(TOML, 'params = { suffix = "?" }', 'params = { suffix = "!" }')
    assert "stale" not in toy.modelbuild("why", "shout").out
    assert toy.doit("shout").executed == set() and toy.runs() == []


# --- the loader ---------------------------------------------------------------------------------

BASE = '[target.base]\npass = "toy-words"\ninputs = { text = "data/words.txt" }\n'


@pytest.mark.parametrize("extra, expected", [
    ('[target.x]\npass = "toy-upper"\ninputs = { source = ":base" }\nparams = { colour = 1 }\n',
     ["targets/bad.toml", "target 'x'", "params.colour: unknown param of pass 'toy-upper' (known: suffix, upper)"]),
    ('[target.x]\npass = "toy-upper"\ninputs = { source = ":base" }\nparams = { upper = "yes" }\n',
     ["targets/bad.toml", "target 'x'", "params.upper: expected bool, got str"]),
    ('[target.x]\npass = "toy-sleep"\nparams = { parts = 0 }\n',
     ["targets/bad.toml", "target 'x'", "params.parts: must be at least 1, got 0"]),
    ('[target.x]\npass = "toy-words"\ninputs = { text = "data/nope.txt" }\n',
     ["targets/bad.toml", "target 'x'", "inputs.text: missing input file targets/data/nope.txt"]),
    ('[target.x]\npass = "toy-upper"\n',
     ["targets/bad.toml", "target 'x'", "inputs.source: required input of pass 'toy-upper' is missing"]),
    ('[target.x]\npass = "toy-upper"\ninputs = { source = ":ghost" }\n',
     ["targets/bad.toml", "target 'x'", "inputs.source: unknown target 'ghost'"]),
    ('[target.x]\npass = "no-such-pass"\n', ["targets/bad.toml", "target 'x'", "pass: unknown pass 'no-such-pass'"]),
    ('[target.x]\npass = "toy-upper"\ninputs = { source = ":y" }\n[target.y]\npass = "toy-upper"\ninputs = { source = ":x" }\n',
     ["targets/bad.toml", "dependency cycle x -> y -> x"]),
    ('[target.x]\npass = "toy-upper"\ninputs = { source = ":base" }\ncolour = "red"\n',
     ["targets/bad.toml", "target 'x'", "colour: unknown key"]),
])
def test_a_bad_target_file_is_one_line_naming_file_target_and_key(tmp_path, extra, expected):
    project = new_core_project(tmp_path / "project", toml=BASE)
    project.path("targets/bad.toml").write_text(extra)
    result = project.doit("list", check=False)
    assert result.returncode != 0 and "Traceback" not in result.out
    lines = [line for line in result.out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("modelbuild: "), result.out
    for part in expected:
        assert part in lines[0], lines[0]
    assert project.runs() == [] and not project.path("build/base").exists()


# --- the lane itself ---------------------------------------------------------------------------

HEAVY = {"torch", "onnx", "onnxruntime", "onnxruntime_genai", "transformers", "peft"}


def test_the_core_lane_imports_no_torch_onnx_or_onnxruntime(tmp_path):
    project = new_core_project(tmp_path / "project")
    loaded = modules_loaded_by(project, "slow", "shout")  # doit and every worker it started
    assert len(project.runs()) == len(ALL) and "toypass" in loaded
    assert not loaded & HEAVY, loaded & HEAVY
    # The lane's own modules, imported as pytest imports them (a collection of the whole suite
    # imports torch through other modules, so this is checked in a process of its own).
    tests = os.path.dirname(os.path.abspath(__file__))
    check = ("import sys; sys.path.insert(0, sys.argv[1]); import conftest, core_project, test_core_engine, "
             "test_core_remote, test_code_key; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    result = run_cmd([sys.executable, "-c", check, tests], project.root)
    assert result.returncode == 0, result.out
    assert "core_project" in result.out.split() and not set(result.out.split()) & HEAVY, result.out
