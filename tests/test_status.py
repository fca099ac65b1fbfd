"""One decision in one place: status() is what doit, `why`, the report and release act on."""

from __future__ import annotations

import json

from conftest import new_project

from modelbuild.graph.loader import load_project
from modelbuild.engine.stage import stat_cache
from modelbuild.core.status import Fresh, Missing, Stale, status

EVAL = """
[target.base-eval]
pass = "evaluate"
inputs = {{ model = ":tiny-base", data = "data/travel_eval.jsonl" }}
params = {{ template = "<|user|>\\n{{prompt}}<|end|>\\n<|assistant|>\\n{{response}}<|end|>", samples = 4, new_tokens = 4, speed_runs = 1 }}
gates = {{ tokens_per_s = "{gate}" }}
"""


def state(project, name):
    graph = load_project(project.root)
    return status(graph, graph.targets[name], stat_cache(graph))


def test_missing_stale_and_fresh_for_each_kind_of_change(tmp_path):
    project = new_project(tmp_path / "project")
    assert isinstance(state(project, "tiny-base"), Missing)
    project.doit("tiny-base")
    assert isinstance(state(project, "tiny-base"), Fresh)
    config = project.path("build/tiny-base/config.json")
    config.write_text(config.read_text() + " ")
    changed = state(project, "tiny-base")
    assert isinstance(changed, Stale) and changed.why == "output" and "config.json" in changed.text
    project.doit("tiny-base")
    project.edit("targets/models.toml", "params = { seed = 0 }", "params = { seed = 1 }")
    edited = state(project, "tiny-base")
    assert isinstance(edited, Stale) and edited.why == "key" and edited.reasons == ("param seed: 0 -> 1",)


def test_why_is_the_executors_decision_for_a_tightened_gate(tmp_path):
    project = new_project(tmp_path / "project")
    project.path("targets/eval.toml").write_text(EVAL.format(gate=">= 0.001"))
    project.doit("base-eval")
    assert "base-eval: up to date" in project.modelbuild("why", "base-eval").out
    speed = json.loads(project.path("build/base-eval/metrics.json").read_text())["tokens_per_s"]

    project.path("targets/eval.toml").write_text(EVAL.format(gate=">= 1e9"))  # gates are not in the key
    why = project.modelbuild("why", "base-eval").out
    assert f"base-eval: stale: quality gate failed: tokens_per_s = {speed:g} (limit >= 1e+09)" in why
    failed = project.doit("base-eval", check=False)
    assert failed.returncode != 0
    assert f"target 'base-eval': quality gate failed: tokens_per_s = {speed:g} (limit >= 1e+09)" in failed.out
    assert not project.path("build/base-eval").exists()  # nothing that failed looks up to date

    project.path("targets/eval.toml").write_text(EVAL.format(gate=">= 0.001"))
    assert "base-eval: stale: never built" in project.modelbuild("why", "base-eval").out
    restored = project.doit("base-eval")
    assert "modelbuild: 'base-eval': restored from cache" in restored.out  # measured once, never again
    assert "base-eval: up to date (restored from cache" in project.modelbuild("why", "base-eval").out
