"""precision-search and precision-plan on the tiny model (targets/precision.toml), through doit:
the plan keeps to its budget and picks the smallest candidate that does, a new budget re-runs only
the plan, an impossible one fails in one line, and the sensitivities are real measurements."""

from __future__ import annotations

import json

import pytest
from conftest import new_project

from modelbuild import UserError
from modelbuild.ml.precision import read_plan

SEARCH, PLAN = "tiny-precision-search", "tiny-precision-plan"
TOML = "targets/precision.toml"
BUDGET = "max_ppl_increase_pct = 10.0, max_size_ratio = 0.5 }"  # the tiny [[use]] line's budget


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    project = new_project(tmp_path_factory.mktemp("precision") / "project")
    project.doit(PLAN)
    return project


def candidates(project) -> dict:
    return json.loads(project.path(f"build/{SEARCH}/candidates.json").read_text())


def plan(project) -> dict:
    return json.loads(project.path(f"build/{PLAN}/plan.json").read_text())


def within(c: dict, ppl: float, size: float, speed: float) -> bool:
    return c["perplexity_delta_pct"] <= ppl and c["size_ratio"] <= size and (not speed or c["speed_ratio"] >= speed)


def test_plan_is_the_smallest_measured_candidate_within_the_budget(planned):
    search, chosen = candidates(planned), plan(planned)
    ref = search["fp32"]
    assert ref["perplexity"] > 0 and ref["size_bytes"] > 1_000_000 and ref["tokens_per_s"] > 0
    assert len(ref["tokens_per_s_runs"]) == 4  # once alone, then beside each candidate
    assert [c["int8_count"] for c in search["candidates"]] == [0, 2, 4]
    ranked = [row["node"] for row in search["sensitivity"]]
    for c in search["candidates"]:
        assert c["int8_nodes"] == ranked[: c["int8_count"]]  # the most sensitive ones
        assert c["perplexity_delta_pct"] == pytest.approx((c["perplexity"] / ref["perplexity"] - 1) * 100, abs=1e-2)
        assert c["size_ratio"] == pytest.approx(c["size_bytes"] / ref["size_bytes"], abs=1e-3)
        assert c["tokens_per_s"] > 0 and c["speed_ratio"] == pytest.approx(c["tokens_per_s"] / c["fp32_tokens_per_s"], rel=1e-2)
    sizes = [c["size_bytes"] for c in search["candidates"]]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3 and sizes[-1] < ref["size_bytes"] / 2  # int8 costs bytes
    fitting = [c for c in search["candidates"] if within(c, 10.0, 0.5, 0.0)]
    best = min(fitting, key=lambda c: c["size_bytes"])
    assert chosen["candidate"] == best["name"] and chosen["int8_nodes"] == best["int8_nodes"]
    assert within(chosen["measured"], 10.0, 0.5, 0.0)
    assert chosen["algorithm"] == "rtn" and chosen["block_size"] == 32
    assert read_plan(planned.path(f"build/{PLAN}")) == {
        "algorithm": "rtn", "block_size": 32, "symmetric": True, "accuracy_level": 4, "int8_nodes": best["int8_nodes"]}
    report = planned.path(f"build/{PLAN}/plan.md").read_text()
    for c in search["candidates"]:
        row = next(line for line in report.splitlines() if line.startswith(f"| {c['name']} |"))
        assert ("won:" if c is best else "lost:") in row, row


def test_sensitivity_is_the_measured_output_error_of_each_matmul(planned):
    """The reported int4 error of the most sensitive MatMul, measured again here: its activations
    from onnxruntime, its int4 weight run through onnxruntime's own MatMulNBits kernel (a one-node
    model); and int8 lowers the error of every MatMul."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from modelbuild.ml.genai import prefill_feeder
    from modelbuild.ml.calibration import calibration_feeds
    from modelbuild.ml.weight_only import quantize_matmuls

    ort.set_default_logger_severity(3)
    rows = candidates(planned)["sensitivity"]
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    assert all(0 < r["int8_error"] < r["int4_error"] / 5 for r in rows), rows
    assert [r["int4_error"] for r in rows] == sorted((r["int4_error"] for r in rows), reverse=True)

    top = rows[0]["node"]
    bundle = planned.path("build/tiny-travel-cpu-fp32")
    model = onnx.load(str(bundle / "model.onnx"))
    constant = {i.name for i in model.graph.initializer} - {i.name for i in model.graph.input}
    base = {n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in constant and "/lora_" not in n.name}
    assert {r["node"] for r in rows} == base and "/lm_head/MatMul" in base  # every base MatMul, no LoRA one
    node = next(n for n in model.graph.node if n.name == top)
    weight = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == node.input[1]))
    decoder = json.loads((bundle / "genai_config.json").read_text())["model"]["decoder"]
    template = "<|user|>\n{prompt}<|end|>\n<|assistant|>\n{response}<|end|>"
    feeds, _ = calibration_feeds(bundle, planned.path("targets/data/travel_train.jsonl"), "train", template, 4, 256,
                                 prefill_feeder(model, decoder, "bundle"))
    model.graph.output.append(onnx.ValueInfoProto(name=node.input[0]))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.concatenate([session.run([node.input[0]], f)[0].reshape(-1, weight.shape[0]) for f in feeds])
    del model.graph.output[-1]

    others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name != top]
    quantized = quantize_matmuls(model, "rtn", block_size=32, symmetric=True, accuracy_level=0, exclude=others, int8=[],
                                 weights={top: node.input[1]})
    q_node = next(n for n in quantized.graph.node if n.name == f"{top}_Q4")
    inits = [i for i in quantized.graph.initializer if i.name in set(q_node.input[1:])]
    one = helper.make_model(
        helper.make_graph([q_node], "one", [helper.make_tensor_value_info(q_node.input[0], onnx.TensorProto.FLOAT, ["t", x.shape[1]])],
                          [helper.make_tensor_value_info(q_node.output[0], onnx.TensorProto.FLOAT, ["t", weight.shape[1]])], inits),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], ir_version=10)
    y4 = ort.InferenceSession(one.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {q_node.input[0]: x})[0]
    y = x.astype(np.float64) @ weight.astype(np.float64)
    expected = np.linalg.norm(y - y4) / np.linalg.norm(y)
    assert rows[0]["int4_error"] == pytest.approx(expected, rel=1e-3)


def test_new_budget_reruns_only_the_plan(planned):
    search = candidates(planned)
    before = planned.path(f"build/{SEARCH}/candidates.json").read_bytes()
    # A size limit between the two smallest candidates: only the all-int4 one fits.
    sizes = sorted(c["size_ratio"] for c in search["candidates"])
    limit = round((sizes[0] + sizes[1]) / 2, 4)
    ppl = max(0.0, round(search["candidates"][0]["perplexity_delta_pct"] + 0.5, 2))
    planned.edit(TOML, BUDGET, f"max_ppl_increase_pct = {ppl}, max_size_ratio = {limit} }}")
    try:
        result = planned.doit(PLAN)
        assert PLAN in result.executed and SEARCH in result.up_to_date, result.out
        assert planned.path(f"build/{SEARCH}/candidates.json").read_bytes() == before
        chosen = plan(planned)
        assert chosen["candidate"] == "int8x0" and within(chosen["measured"], ppl, limit, 0.0)
        assert chosen["budget"] == {"max_ppl_increase_pct": ppl, "max_size_ratio": limit, "min_speed_ratio": 0.0}
    finally:
        planned.edit(TOML, f"max_ppl_increase_pct = {ppl}, max_size_ratio = {limit} }}", BUDGET)


def test_impossible_budget_fails_in_one_line_naming_the_closest_candidate(planned):
    smallest = min(candidates(planned)["candidates"], key=lambda c: c["size_bytes"])
    planned.edit(TOML, BUDGET, "max_ppl_increase_pct = 10.0, max_size_ratio = 0.05 }")
    try:
        result = planned.doit(PLAN, check=False)
    finally:
        planned.edit(TOML, "max_ppl_increase_pct = 10.0, max_size_ratio = 0.05 }", BUDGET)
    assert result.returncode != 0 and SEARCH not in result.executed
    lines = [line for line in result.out.splitlines() if "no precision candidate meets the budget" in line]
    assert len(lines) == 1, result.out
    assert f"closest: {smallest['name']} (perplexity {smallest['perplexity_delta_pct']:+.2f} %, size {smallest['size_ratio']:.3f}" in lines[0]
    assert "size <= 0.05" in lines[0] and f"size {smallest['size_ratio']:.3f} of fp32 > 0.05" in lines[0]


def test_bad_budgets_and_plans_are_refused(planned, tmp_path):
    for bad, key in (("max_size_ratio = 1.5 }", "max_size_ratio"), ("max_size_ratio = 0.0 }", "max_size_ratio")):
        result = planned.doit_with("targets/bad.toml", f"""
[target.bad-plan]
pass = "precision-plan"
inputs = {{ candidates = ":{SEARCH}" }}
params = {{ max_ppl_increase_pct = 5.0, {bad}
""", "list")
        assert result.returncode != 0 and f"params.{key}: must be" in result.out, result.out
    result = planned.doit_with("targets/bad.toml", f"""
[target.bad-plan]
pass = "precision-plan"
inputs = {{ candidates = ":{SEARCH}" }}
params = {{ max_ppl_increase_pct = -1.0 }}
""", "list")
    assert result.returncode != 0 and "params.max_ppl_increase_pct: must be 0 or more" in result.out
    good = plan(planned)
    for broken, message in (({**good, "int8_nodes": "x"}, "'int8_nodes' must be a list"),
                            ({**good, "schema": 9}, "not a schema-1 precision plan")):
        (tmp_path / "plan.json").write_text(json.dumps(broken))
        with pytest.raises(UserError, match=message):
            read_plan(tmp_path)


def test_int8_always_keeps_the_lm_head_8_bit_in_every_candidate(planned):
    """Olive's int4 recipes keep the LM head 8-bit: int8_always puts it in every candidate, and
    the k most sensitive are chosen among the other MatMuls."""
    template = "<|user|>\\n{prompt}<|end|>\\n<|assistant|>\\n{response}<|end|>"
    text = ('[target.tiny-search-q8head]\npass = "precision-search"\n'
            'inputs = { bundle = ":tiny-travel-cpu-fp32", calibration = "data/travel_train.jsonl", heldout = "data/travel_eval.jsonl" }\n'
            f'params = {{ algorithm = "rtn", ladder = [0, 2], int8_always = ["/lm_head/*"], adapter = "travel", template = "{template}", '
            'calibration_samples = 4, heldout_samples = 12, new_tokens = 16, speed_runs = 1 }\n')
    result = planned.doit_with("targets/zz-q8head.toml", text, "tiny-search-q8head")
    assert result.returncode == 0, result.out[-3000:]
    forced = json.loads(planned.path("build/tiny-search-q8head/candidates.json").read_text())["candidates"]
    assert [c["name"] for c in forced] == ["int8x1", "int8x3"]
    assert all(c["int8_nodes"][0] == "/lm_head/MatMul" for c in forced)
    others = [row["node"] for row in candidates(planned)["sensitivity"] if row["node"] != "/lm_head/MatMul"]
    assert forced[1]["int8_nodes"][1:] == others[:2]
    all_int4 = next(c for c in candidates(planned)["candidates"] if c["name"] == "int8x0")
    assert forced[0]["size_bytes"] > all_int4["size_bytes"]  # measured: the head really went 8-bit
