"""The content-addressed cache, early cutoff, `why`, release/verify, on the real tiny recipe.

Real doit runs on the tiny recipe in temporary projects, each with its own cache folder. Crash
safety (kill -9 at every stamp point), an input changed while its stage runs, two concurrent
builds and a shared cache are engine behaviour, tested without torch in the core lane
(tests/test_core_engine.py), where they also count the passes' real runs.
"""

from __future__ import annotations

import json
import os
import re
import tarfile

import pytest

from conftest import TINY, new_project

ALL = {"tiny-base", "tiny-travel-adapter", "tiny-travel-cpu-int4", TINY}
DATA = "targets/data/travel_train.jsonl"
CORPUS = "targets/data/tokenizer_corpus.txt"
EXTRA = json.dumps({"prompt": "Is Porto worth a day trip from Lisbon?", "response": "Lovely idea! Yes. Tip: take the Alfa Pendular train."}) + "\n"


def stamp(project, target):
    return json.loads(project.path(f"build/{target}/.modelbuild/stamp.json").read_text())


def manifests(project):
    return {name: stamp(project, name)["manifest"] for name in sorted(ALL)}


def restored(result) -> set[str]:
    return set(re.findall(r"modelbuild: '(\S+)': restored from cache", result.out))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    project = new_project(tmp_path_factory.mktemp("cache") / "project")
    assert project.doit(TINY).executed == ALL
    return project


def test_early_cutoff_identical_upstream_output_stops_the_rebuild(tiny):
    before = stamp(tiny, "tiny-base")
    tiny.append(CORPUS, "\n")  # a blank line: new file digest, same tokenizer, same model
    result = tiny.doit(TINY)
    assert result.executed == {"tiny-base"}
    assert stamp(tiny, "tiny-base")["action_key"] != before["action_key"]
    assert stamp(tiny, "tiny-base")["manifest_digest"] == before["manifest_digest"]
    assert result.up_to_date == ALL - {"tiny-base"}


def test_run_cache_restores_earlier_artifacts_after_a_revert(tiny):
    original = tiny.path(DATA).read_text()
    first = manifests(tiny)
    tiny.append(DATA, EXTRA)
    edited = tiny.doit(TINY)
    assert edited.executed == {"tiny-travel-adapter", "tiny-travel-cpu-int4", TINY} and not restored(edited)
    second = manifests(tiny)
    for _ in range(2):  # switch back and forth freely: every switch is a restore, no pass runs
        tiny.path(DATA).write_text(original)
        back = tiny.doit(TINY)
        assert restored(back) == {"tiny-travel-adapter", "tiny-travel-cpu-int4", TINY}
        assert manifests(tiny) == first
        assert stamp(tiny, "tiny-travel-adapter")["origin"] == "restored from cache"
        tiny.append(DATA, EXTRA)
        forth = tiny.doit(TINY)
        assert restored(forth) == {"tiny-travel-adapter", "tiny-travel-cpu-int4", TINY}
        assert manifests(tiny) == second
    tiny.path(DATA).write_text(original)
    tiny.doit(TINY)


def test_cache_hit_after_clean_and_why_says_where_it_came_from(tiny):
    tiny.doit("clean", "tiny-travel-cpu-int4")
    why = tiny.modelbuild("why", TINY)
    assert "tiny-travel-cpu-int4: stale: never built" in why.out
    assert "tiny-travel-cpu-int4-smoke: waits on tiny-travel-cpu-int4" in why.out
    result = tiny.doit(TINY)
    assert restored(result) == {"tiny-travel-cpu-int4"}
    assert result.executed == {"tiny-travel-cpu-int4"}  # early cutoff: the smoke answers stay
    why = tiny.modelbuild("why", TINY)
    assert why.returncode == 0
    assert "tiny-travel-cpu-int4: up to date (restored from cache" in why.out
    assert re.search(r"tiny-base: up to date \(built in [\d.]+ s", why.out)


def test_why_names_the_changed_param_and_input(tiny):
    tiny.edit("targets/travel.toml", 'vars = { model = "tiny", ', 'vars = { model = "tiny", block_size = 16, ')
    tiny.append(DATA, EXTRA)
    why = tiny.modelbuild("why", TINY).out
    assert "tiny-travel-adapter: stale: input file data (targets/data/travel_train.jsonl) changed" in why
    assert "tiny-travel-cpu-int4: stale (after tiny-travel-adapter rebuild): param block_size: 32 -> 16" in why
    assert "tiny-base: up to date" in why
    tiny.edit("targets/travel.toml", "block_size = 16, ", "")
    tiny.path(DATA).write_text(tiny.path(DATA).read_text().replace(EXTRA, ""))
    assert "stale" not in tiny.modelbuild("why", TINY).out


def test_tampered_or_missing_store_objects_are_never_served(tiny):
    adapter = stamp(tiny, "tiny-travel-adapter")
    digest = adapter["manifest"]["adapter_model.safetensors"]["digest"]
    obj = tiny.cache / "objects" / digest[:2] / digest[2:]
    os.chmod(obj, 0o644)
    obj.write_bytes(obj.read_bytes()[:-8] + b"tampered")
    tiny.doit("clean", "tiny-travel-adapter")
    result = tiny.doit(TINY)
    assert "cache object for adapter_model.safetensors is corrupt (dropped); rebuilding" in result.out
    assert stamp(tiny, "tiny-travel-adapter")["manifest"] == adapter["manifest"]  # rebuilt, identical
    assert stamp(tiny, "tiny-travel-adapter")["origin"] == "built"
    # A missing object: same story.
    obj = tiny.cache / "objects" / digest[:2] / digest[2:]
    obj.unlink()
    tiny.doit("clean", "tiny-travel-adapter")
    result = tiny.doit(TINY)
    assert "cache object for adapter_model.safetensors is missing; rebuilding" in result.out
    assert stamp(tiny, "tiny-travel-adapter")["manifest"] == adapter["manifest"]


def test_cache_verify_and_gc(tiny):
    info = tiny.modelbuild("cache", "info")
    assert info.returncode == 0 and re.search(r"\d+ actions, \d+ objects", info.out)
    assert tiny.modelbuild("cache", "verify").returncode == 0
    victim = sorted((tiny.cache / "objects").glob("??/*"))[0]
    os.chmod(victim, 0o644)
    victim.write_bytes(b"garbage")
    result = tiny.modelbuild("cache", "verify")
    assert result.returncode == 1 and "corrupt object" in result.out
    assert not victim.exists()
    assert tiny.modelbuild("cache", "verify").returncode == 0
    gc = tiny.modelbuild("cache", "gc", "--max-size", "0")
    assert gc.returncode == 0 and "now 0.0 MB in 0 objects" in gc.out
    # With the cache empty, the build folder is still intact and up to date.
    assert tiny.doit(TINY).executed == set()


def test_release_and_verify_byte_identical(tiny, tmp_path):
    result = tiny.modelbuild("release", "tiny-travel-cpu-int4")
    assert result.returncode == 0, result.out
    lock_path = tiny.path("release/tiny-travel-cpu-int4/tiny-travel-cpu-int4.lock.json")
    lock = json.loads(lock_path.read_text())
    assert set(lock["stages"]) == {"tiny-base", "tiny-travel-adapter", "tiny-travel-cpu-int4"}
    adapter = lock["stages"]["tiny-travel-adapter"]
    assert adapter["inputs"]["data"]["ref"] == "targets/data/travel_train.jsonl"
    assert adapter["params"]["max_steps"] == 30 and "peft" in adapter["libraries"]
    assert "targets/travel.toml" in lock["target_files"]
    with tarfile.open(tiny.path("release/tiny-travel-cpu-int4/tiny-travel-cpu-int4.tar.gz")) as tar:
        names = set(tar.getnames())
    assert "tiny-travel-cpu-int4/adapters/travel.onnx_adapter" in names
    assert "tiny-travel-cpu-int4/tiny-travel-cpu-int4.lock.json" in names
    pins = list((tiny.cache / "pins").glob("*.json"))
    assert pins

    verified = tiny.modelbuild("verify", str(lock_path))
    assert verified.returncode == 0, verified.out
    assert "VERIFIED: byte-identical rebuild" in verified.out
    for stage, recorded in lock["stages"].items():
        assert f"{stage}: {len(recorded['outputs'])} files byte-identical" in verified.out

    # A lock that records other bytes is reported file by file, with the ONNX initializer diff.
    lock["stages"]["tiny-travel-cpu-int4"]["outputs"]["model.onnx"]["digest"] = "0" * 64
    forged = tmp_path / "forged.lock.json"
    forged.write_text(json.dumps(lock))
    failed = tiny.modelbuild("verify", str(forged))
    assert failed.returncode == 1
    assert "NOT REPRODUCED" in failed.out and "model.onnx: size" in failed.out and "initializers differ" in failed.out


def test_release_pins_survive_gc(tiny):
    tiny.modelbuild("release", "tiny-travel-cpu-int4")
    pinned = json.loads(next((tiny.cache / "pins").glob("*.json")).read_text())["digests"]
    tiny.modelbuild("cache", "gc", "--max-size", "0")
    for digest in pinned:
        assert (tiny.cache / "objects" / digest[:2] / digest[2:]).exists()
