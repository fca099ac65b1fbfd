"""graph-optimize, onnx-fp16 and onnx-int8 on the tiny model's ONNX export, built by real doit runs
and checked here with onnxruntime directly: the fusions, the float16 weights and the int8 ops are
really in the graphs, the files really shrink, the logits stay within each pass's documented
tolerance at shapes the passes' own checks never used, static int8 without calibration data is
refused at load time, and a rebuild in a fresh project is byte-identical."""

from __future__ import annotations

import json
import time
from collections import Counter

import numpy as np
import pytest
from conftest import new_project

EXPORT = "tiny-onnx-fp32"
TARGETS = """
[target.tiny-opt]
pass = "graph-optimize"
inputs = { model = ":tiny-onnx-fp32" }
params = { opt_level = 2 }

[target.tiny-opt-fp16]
pass = "onnx-fp16"
inputs = { model = ":tiny-opt" }

[target.tiny-fp16]
pass = "onnx-fp16"
inputs = { model = ":tiny-onnx-fp32" }

[target.tiny-int8]
pass = "onnx-int8"
inputs = { model = ":tiny-onnx-fp32" }

[target.tiny-int8-nodown]
pass = "onnx-int8"
inputs = { model = ":tiny-onnx-fp32" }
params = { exclude = ["*mlp.down_proj"], per_channel = true }

[target.tiny-int8-static]
pass = "onnx-int8"
inputs = { model = ":tiny-onnx-fp32", calibration = "data/travel_train.jsonl" }
params = { mode = "static", calibration_samples = 4 }
"""
BUILT = ["tiny-opt", "tiny-opt-fp16", "tiny-fp16", "tiny-int8", "tiny-int8-nodown", "tiny-int8-static"]
# Token ids at a batch and length neither the passes' probes nor the export's check used.
IDS = np.random.default_rng(1).integers(5, 500, size=(2, 29)).astype(np.int64)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    project = new_project(tmp_path_factory.mktemp("onnx-passes") / "project")
    project.path("targets/onnx_passes.toml").write_text(TARGETS)
    result = project.doit(*BUILT)
    assert set(BUILT) <= result.executed
    return project


def graph(project, target):
    import onnx

    return onnx.load(str(project.path(f"build/{target}/model.onnx")))


def ops(model) -> Counter:
    return Counter(node.op_type for node in model.graph.node)


def size(project, target) -> int:
    folder = project.path(f"build/{target}")
    return (folder / "model.onnx").stat().st_size + (folder / "model.onnx.data").stat().st_size


def run_logits(project, target, ids=IDS):
    import onnxruntime as ort

    session = ort.InferenceSession(str(project.path(f"build/{target}/model.onnx")), providers=["CPUExecutionProvider"])
    out = session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    assert out.dtype == np.float32 and out.shape == (*ids.shape, 512)
    return out.astype(np.float64)


def agreement(reference, got) -> tuple[float, float, float]:
    """max |difference|, top-1 agreement over the positions, Pearson correlation."""
    return (float(np.abs(got - reference).max()), float((got.argmax(-1) == reference.argmax(-1)).mean()),
            float(np.corrcoef(reference.ravel(), got.ravel())[0, 1]))


def test_graph_optimize_fuses_the_rmsnorms_and_keeps_the_logits(built):
    before, after = graph(built, EXPORT), graph(built, "tiny-opt")
    ops_before, ops_after = ops(before), ops(after)
    # 2 layers x (input + post-attention RMSNorm) + the final norm: each Pow/ReduceMean/Sqrt chain fused.
    assert ops_before["Pow"] == ops_before["ReduceMean"] == 5
    assert ops_after["SkipSimplifiedLayerNormalization"] == 4 and ops_after["SimplifiedLayerNormalization"] == 1
    assert ops_after["Pow"] == ops_after["ReduceMean"] == ops_after["Sqrt"] == 0
    assert ops_after["QuickGelu"] == 2  # opt_level 2: onnxruntime fuses x * sigmoid(x) (SiLU)
    assert len(after.graph.node) < len(before.graph.node) - 30
    record = json.loads(built.path("build/tiny-opt/graph_optimize.json").read_text())
    assert record["model_type"] == "gpt2" and record["model_type_from"] == "config.json model_type 'phi3'"
    assert record["fused_operators"]["SkipSimplifiedLayerNormalization"] == 4
    assert record["nodes_after"] == len(after.graph.node)
    assert record["num_heads"] == 4 and record["hidden_size"] == 128
    max_diff, top1, _ = agreement(run_logits(built, EXPORT), run_logits(built, "tiny-opt"))
    assert max_diff < 1e-3 and top1 == 1.0  # params.max_logit_diff's default
    assert built.path("build/tiny-opt/tokenizer.json").read_bytes() == built.path(f"build/{EXPORT}/tokenizer.json").read_bytes()
    assert built.path("build/tiny-opt/config.json").is_file()


def test_fp16_holds_float16_weights_and_halves_the_files(built):
    import onnx

    model = graph(built, "tiny-fp16")
    big = [init for init in model.graph.initializer if np.prod(init.dims) >= 1024]
    assert big and all(init.data_type == onnx.TensorProto.FLOAT16 for init in big)
    assert 0.45 < size(built, "tiny-fp16") / size(built, EXPORT) < 0.6
    # keep_io_types: the graph still takes int64 ids and returns float32 logits (Casts inside)
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert ops(model)["Cast"] > ops(graph(built, EXPORT))["Cast"]
    max_diff, top1, correlation = agreement(run_logits(built, EXPORT), run_logits(built, "tiny-fp16"))
    assert max_diff < 1.0 and top1 >= 0.9  # the documented defaults
    assert max_diff < 0.01 and correlation > 0.9999  # what the tiny model really gets
    record = json.loads(built.path("build/tiny-fp16/onnx_fp16.json").read_text())
    assert record["initializers_after"]["FLOAT16"] >= len(big) and "Range" in record["op_block_list"]


def test_fp16_chains_after_graph_optimize(built):
    model = graph(built, "tiny-opt-fp16")
    assert ops(model)["SkipSimplifiedLayerNormalization"] == 4  # the fused ops run in float16 on CPU
    assert size(built, "tiny-opt-fp16") < 0.6 * size(built, "tiny-opt")
    max_diff, top1, _ = agreement(run_logits(built, "tiny-opt"), run_logits(built, "tiny-opt-fp16"))
    assert max_diff < 1.0 and top1 >= 0.9


def test_dynamic_int8_holds_integer_matmuls_and_shrinks(built):
    import onnx

    model, source = graph(built, "tiny-int8"), graph(built, EXPORT)
    counts = ops(model)
    weights = {init.name for init in source.graph.initializer}
    constant_matmuls = [n for n in source.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    assert counts["MatMulInteger"] == len(constant_matmuls) == 9  # 2 layers x (qkv, o, gate_up, down) + LM head
    assert counts["DynamicQuantizeLinear"] >= 1
    assert counts["MatMul"] == ops(source)["MatMul"] - 9  # attention's activation products stay float
    assert any(init.data_type == onnx.TensorProto.INT8 for init in model.graph.initializer)
    assert size(built, "tiny-int8") < 0.5 * size(built, EXPORT)
    _, top1, correlation = agreement(run_logits(built, EXPORT), run_logits(built, "tiny-int8"))
    assert top1 >= 0.5 and correlation >= 0.9  # the documented defaults
    record = json.loads(built.path("build/tiny-int8/onnx_int8.json").read_text())
    assert record["quantized_ops"]["MatMulInteger"] == 9 and record["calibration"] is None


def test_int8_exclude_keeps_the_matched_modules_float(built):
    counts = ops(graph(built, "tiny-int8-nodown"))
    assert counts["MatMulInteger"] == 7  # the two layers' mlp.down_proj stay float MatMuls
    assert json.loads(built.path("build/tiny-int8-nodown/onnx_int8.json").read_text())["excluded_nodes"] == 2
    assert size(built, "tiny-int8") < size(built, "tiny-int8-nodown") < size(built, EXPORT)


def test_static_int8_is_calibrated_on_the_projects_jsonl(built):
    counts = ops(graph(built, "tiny-int8-static"))
    assert counts["QLinearMatMul"] == 9 and counts["QuantizeLinear"] >= 1 and "MatMulInteger" not in counts
    assert size(built, "tiny-int8-static") < 0.5 * size(built, EXPORT)
    record = json.loads(built.path("build/tiny-int8-static/onnx_int8.json").read_text())
    assert record["calibration"]["file"] == "travel_train.jsonl" and record["calibration"]["records"] == 4
    assert record["calibration"]["chat_template"] is True and record["calibration"]["tokens"] > 4 * 40
    _, top1, correlation = agreement(run_logits(built, EXPORT), run_logits(built, "tiny-int8-static"))
    assert top1 >= 0.5 and correlation >= 0.9


def test_static_int8_without_calibration_is_refused_at_load(built):
    started = time.perf_counter()
    failed = built.doit_with("targets/bad.toml",
        '[target.bad-int8]\npass = "onnx-int8"\ninputs = { model = ":tiny-onnx-fp32" }\nparams = { mode = "static" }\n',
        "bad-int8")
    assert failed.returncode == 2
    assert ("modelbuild: targets/bad.toml: target 'bad-int8': inputs.calibration: mode 'static' needs calibration data"
            in failed.out)
    assert "Traceback" not in failed.out and not failed.executed
    assert time.perf_counter() - started < 15  # at load: no pass process ran
    dynamic = built.doit_with("targets/bad.toml",
        '[target.bad-int8]\npass = "onnx-int8"\ninputs = { model = ":tiny-onnx-fp32", calibration = "data/travel_train.jsonl" }\n',
        "bad-int8")
    assert dynamic.returncode == 2
    assert "target 'bad-int8': inputs.calibration: mode 'dynamic' uses no calibration data" in dynamic.out
    built.path("targets/data/broken.jsonl").write_text('{"prompt": "no response"}\n')
    try:
        broken = built.doit_with("targets/bad.toml",
            '[target.bad-int8]\npass = "onnx-int8"\ninputs = { model = ":tiny-onnx-fp32", calibration = "data/broken.jsonl" }\n'
            'params = { mode = "static" }\n', "bad-int8")
    finally:
        built.path("targets/data/broken.jsonl").unlink()
    assert broken.returncode == 2
    assert ("target 'bad-int8': inputs.calibration: broken.jsonl: line 1: expected an object with string 'prompt' and "
            "'response' (or 'text')") in broken.out
    assert not built.path("build/bad-int8").exists()


def test_a_check_that_fails_is_one_line_and_leaves_nothing(built):
    failed = built.doit_with("targets/strict.toml",
        '[target.strict-fp16]\npass = "onnx-fp16"\ninputs = { model = ":tiny-onnx-fp32" }\nparams = { max_logit_diff = 1e-9 }\n'
        '[target.bad-exclude]\npass = "onnx-int8"\ninputs = { model = ":tiny-onnx-fp32" }\nparams = { exclude = ["*nowhere*"] }\n',
        "-c", "strict-fp16", "bad-exclude")
    assert failed.returncode != 0 and "Traceback" not in failed.out
    assert ("modelbuild: targets/strict.toml: target 'strict-fp16': fp16 model's logits differ from the input's: max |dlogit| "
            in failed.out) and "> params.max_logit_diff 1e-09" in failed.out
    assert "target 'bad-exclude': params.exclude: '*nowhere*' matches no MatMul node by name or module path" in failed.out
    assert not built.path("build/strict-fp16").exists() and not built.path("build/bad-exclude").exists()


def test_rebuild_in_a_fresh_project_is_byte_identical(built, tmp_path):
    again = new_project(tmp_path / "again")  # its own empty cache: everything really runs again
    again.path("targets/onnx_passes.toml").write_text(TARGETS)
    targets = ["tiny-opt-fp16", "tiny-int8-static"]
    result = again.doit(*targets)
    assert {"tiny-opt", *targets} <= result.executed
    for target in ["tiny-opt", *targets]:
        first = json.loads(built.path(f"build/{target}/.modelbuild/stamp.json").read_text())
        second = json.loads(again.path(f"build/{target}/.modelbuild/stamp.json").read_text())
        assert first["action_key"] == second["action_key"]
        assert first["manifest"] == second["manifest"], target
