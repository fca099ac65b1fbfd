"""The variant matrix of targets/variants.toml on the tiny model: every variant built, measured
(metrics.json from real onnxruntime / torch runs), gated, and reported with a plot."""

from __future__ import annotations

import json

import pytest
from conftest import new_project

from modelbuild.passes.evaluate import METRICS
from modelbuild.core.stamp import read_stamp

EVALS = ["tiny-travel-cpu-fp32-eval", "tiny-travel-cpu-int8-eval", "tiny-travel-cpu-int4-eval", "tiny-travel-cpu-int4-rtn-eval"]


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    project = new_project(tmp_path_factory.mktemp("variants") / "project")
    project.doit("-n", "2", "tiny-variants")
    return project


def metrics(project, name: str) -> dict:
    return json.loads(project.path(f"build/{name}/metrics.json").read_text())


def test_every_variant_is_measured_against_the_torch_reference(variants):
    reference = metrics(variants, "tiny-travel-torch-eval")
    assert reference["engine"] == "torch fp32 eager" and reference["adapter"] == "travel"
    for name in EVALS:
        m = metrics(variants, name)
        assert all(m[key] is not None for key in METRICS), (name, m)
        assert m["engine"] == "onnxruntime-genai" and m["adapter"] == "travel"
        assert m["reference_perplexity"] == reference["perplexity"]
        assert m["perplexity_delta_pct"] == pytest.approx((m["perplexity"] / reference["perplexity"] - 1) * 100, abs=1e-3)
        assert m["tokens_per_s"] > 0 and m["ttft_ms"] > 0 and m["peak_rss_mb"] > 50
        # measured beside torch fp32 eager (base + adapter) in the same run
        assert m["speed_ratio"] == pytest.approx(m["tokens_per_s"] / m["reference_tokens_per_s"], rel=1e-2)
        assert m["size_ratio"] == pytest.approx(m["size_bytes"] / reference["size_bytes"], rel=1e-3)
        assert m["eval_records"] == 12 and m["eval_tokens"] == reference["eval_tokens"]
        assert read_stamp(variants.path(f"build/{name}"))["gates"]["perplexity_delta_pct"]["passed"]
    # Two engines, one number: the fp32 ONNX graph through onnxruntime scores like torch.
    assert metrics(variants, EVALS[0])["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-4)
    sizes = {name: metrics(variants, name)["size_bytes"] for name in EVALS}
    assert sizes["tiny-travel-cpu-int4-rtn-eval"] < sizes["tiny-travel-cpu-int8-eval"] < sizes["tiny-travel-cpu-fp32-eval"]


def test_the_adapter_lowers_held_out_perplexity(variants):
    with_adapter = metrics(variants, "tiny-travel-torch-eval")["perplexity"]
    base = metrics(variants, "tiny-base-torch-eval")["perplexity"]
    assert with_adapter < base * 0.98, (with_adapter, base)


def test_report_tables_and_plots_every_variant(variants):
    result = variants.modelbuild("report", "tiny-*-eval", "--out", "reports")
    assert result.returncode == 0, result.out
    table = variants.path("reports/report.md").read_text()
    for name in EVALS:
        label = name.removeprefix("tiny-travel-cpu-").removesuffix("-eval")
        row = next(line for line in table.splitlines() if line.startswith(f"| {label} ") or f" {label} +travel" in line)
        # perplexity and speed gates; the default int4 has the ship bar: perplexity, speed and size ratios
        assert ("passed (3)" if label == "int4" else "passed (2)") in row, row
    png = variants.path("reports/report.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert "data:image/png;base64," in variants.path("reports/report.html").read_text()


def test_too_tight_gate_fails_its_target_without_remeasuring_and_relaxing_restores(variants):
    gated = "tiny-travel-cpu-int4-rtn-eval"
    measured = metrics(variants, gated)["perplexity_delta_pct"]
    original = variants.path("targets/variants.toml").read_text()
    variants.edit("targets/variants.toml", 'max_ppl_increase = "<= 10"', 'max_ppl_increase = "< -100"')
    try:
        failed = variants.doit("-c", "tiny-variants", check=False)
        assert failed.returncode != 0
        expected = (f"targets/variants.toml: target '{gated}': quality gate failed: "
                    f"perplexity_delta_pct = {measured:g} (limit < -100)")
        assert expected in failed.out, failed.out
        assert f"'{gated}' running on" not in failed.out  # the cached measurement was re-checked, not redone
        assert not variants.path(f"build/{gated}").exists()  # nothing that failed a gate looks built
        assert variants.path("build/tiny-travel-cpu-fp32-eval/metrics.json").exists()  # its own gate is fixed
        # The report still shows what was measured (from the cache), marked as failing its gate.
        report = variants.modelbuild("report", "tiny-*-eval", "--out", "reports-tight")
        assert report.returncode == 0, report.out
        rows = {r["eval_target"]: r for r in json.loads(variants.path("reports-tight/report.json").read_text())["rows"]}
        assert rows[gated]["state"] == "measured" and rows[gated]["status"] == "gate failed"
        assert rows[gated]["perplexity_delta_pct"] == measured and not rows[gated]["pareto"]
        assert f"{gated}: FAILED: perplexity_delta_pct {measured:.4g} not < -100 (measurement from the cache" in report.out
    finally:
        variants.path("targets/variants.toml").write_text(original)
    relaxed = variants.doit("tiny-variants")
    assert f"'{gated}': restored from cache" in relaxed.out
    assert metrics(variants, gated)["perplexity_delta_pct"] == measured
    assert variants.doit("tiny-variants").executed == set()
