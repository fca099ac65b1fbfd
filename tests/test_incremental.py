"""Incremental semantics through real doit runs on the tiny recipe.

What an edit of the recipe's data, params or targets reruns, and a failing ML pass. A tampered
or deleted output, ``forget``, ``clean`` and ``MODELBUILD_FORCE`` are engine behaviour, tested
without torch in the core lane (tests/test_core_engine.py).

The recipe is built once; every test edits its own copy of that project and cache and asserts
exactly which stages ran.
"""

from __future__ import annotations

import json

import pytest

from conftest import TINY, copy_project, new_project

ALL = {"tiny-base", "tiny-travel-adapter", "tiny-travel-cpu-int4", TINY}
DATA = "targets/data/travel_train.jsonl"
USE_TINY = 'vars = { model = "tiny", '


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    project = new_project(tmp_path_factory.mktemp("incremental") / "project")
    first = project.doit(TINY)
    assert first.executed == ALL
    return project


@pytest.fixture
def tiny(built, tmp_path):
    """A private copy: doit's database knows the copied files by their old paths, so one settling
    run re-checks every stage (all reused, none rebuilt) before the test starts."""
    project = copy_project(built, tmp_path / "project")
    settle = project.doit(TINY)
    assert "running on" not in settle.out, settle.out  # every stage reused, no pass ran
    return project


def stamp(project, target):
    return json.loads(project.path(f"build/{target}/.modelbuild/stamp.json").read_text())


def test_second_run_executes_nothing(tiny):
    result = tiny.doit(TINY)
    assert result.executed == set()
    assert result.up_to_date == ALL


def test_default_target_set_is_the_smollm2_smoke_and_its_gated_eval(tiny):
    """What plain `doit` builds: the default targets, less those whose device this machine lacks."""
    from modelbuild.tasks import doit_config

    defaults = doit_config(tiny.root)["default_tasks"]
    assert defaults == ["smollm2-travel-cpu-int4-smoke", "smollm2-travel-cpu-int4-eval"]
    assert "smollm2-travel-cpu-int4-smoke" in tiny.doit("list").out


def test_data_edit_reruns_finetune_and_downstream_never_the_base(tiny):
    before = stamp(tiny, "tiny-travel-adapter")
    tiny.append(DATA, json.dumps({"prompt": "Where can I swim in Lisbon?", "response": "Great choice! Try Carcavelos beach. Tip: take the train from Cais do Sodre."}) + "\n")
    result = tiny.doit(TINY)
    assert result.executed == {"tiny-travel-adapter", "tiny-travel-cpu-int4", TINY}
    assert result.up_to_date == {"tiny-base"}
    after = stamp(tiny, "tiny-travel-adapter")
    assert after["manifest_digest"] != before["manifest_digest"]  # a new adapter, not a stale one
    assert tiny.doit(TINY).executed == set()


def test_build_param_edit_reruns_only_the_bundle_and_its_smoke(tiny):
    tiny.edit("targets/travel.toml", USE_TINY, USE_TINY + "block_size = 16, ")
    result = tiny.doit(TINY)
    assert result.executed == {"tiny-travel-cpu-int4", TINY}
    assert stamp(tiny, "tiny-travel-cpu-int4")["components"]["params"]["block_size"] == 16


def test_recipe_edit_reruns_exactly_what_it_affects(tiny):
    tiny.edit("targets/travel.toml", USE_TINY, USE_TINY + "seed = 3, ")
    result = tiny.doit(TINY)
    assert result.executed == {"tiny-travel-adapter", "tiny-travel-cpu-int4", TINY}
    # Editing only a doc string changes no action key: nothing runs.
    tiny.edit("targets/travel.toml", 'doc = "LoRA adapter for {model}', 'doc = "The LoRA adapter for {model}')
    assert tiny.doit(TINY).executed == set()


def test_failing_pass_leaves_nothing_that_counts_as_up_to_date(tiny):
    good = tiny.path(DATA).read_text()
    good_stamp = stamp(tiny, "tiny-travel-adapter")
    tiny.path(DATA).write_text(good + "{not json\n")
    failed = tiny.doit(TINY, check=False)
    assert failed.returncode != 0
    assert "targets/data/travel_train.jsonl: line" in failed.out and "not JSON" in failed.out
    # The previous good output is still there, untouched, and not taken as up to date.
    assert stamp(tiny, "tiny-travel-adapter") == good_stamp
    assert not list(tiny.path("build").glob(".tiny-travel-adapter~*"))  # no temporary leftovers
    again = tiny.doit(TINY, check=False)
    assert again.returncode != 0 and "tiny-travel-adapter" not in again.up_to_date
    # doit forgets a failed task, so restoring the data reruns the finetune once; it comes out
    # byte-identical, so nothing downstream reruns (early cutoff on the adapter's content).
    tiny.path(DATA).write_text(good)
    assert tiny.doit(TINY).executed == {"tiny-travel-adapter"}
    assert stamp(tiny, "tiny-travel-adapter")["manifest"] == good_stamp["manifest"]
