"""nbits-to-qdq (Olive's MatMulNBitsToQDQ) on the tiny model's int4 RTN bundle, built by real doit
runs and checked here with onnxruntime: every MatMulNBits is a DequantizeLinear + MatMul over
uint4 (or int4) codes, the graph run as written equals the MatMulNBits bundle at float
accumulation (accuracy_level 0, set here) to float rounding at a batch and length the pass never
probed, the excluded node stays, onnxruntime-genai still generates, and a bundle without
MatMulNBits is one line."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import new_project

TARGETS = """
[target.qdq-fp32]
pass = "genai-build"
inputs = { base = ":tiny-base" }
params = { precision = "fp32" }

[target.qdq-rtn]
pass = "quantize-onnx"
inputs = { bundle = ":qdq-fp32" }
params = { algorithm = "rtn" }

[target.qdq-plain]
pass = "nbits-to-qdq"
inputs = { model = ":qdq-rtn" }

[target.qdq-signed]
pass = "nbits-to-qdq"
inputs = { model = ":qdq-rtn" }
params = { use_transpose_op = true, use_signed_int = true, nodes_to_exclude = ["/lm_head/MatMul_Q4"] }
"""
BUILT = ["qdq-plain", "qdq-signed"]
IDS = np.random.default_rng(5).integers(5, 500, size=(2, 21)).astype(np.int64)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("qdq")
    project = new_project(root / "project")
    project.path("targets/qdq.toml").write_text(TARGETS)
    assert set(BUILT) <= project.doit(*BUILT).executed
    return project


def logits(path, optimize=True):
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": IDS, "attention_mask": np.ones_like(IDS)}
    for value in session.get_inputs():
        if value.name.startswith("past_key_values."):
            feeds[value.name] = np.zeros((IDS.shape[0], 4, 0, 32), dtype=np.float32)
    return session.run(["logits"], feeds)[0].astype(np.float64)


def float_reference(project, tmp_path, keep=()):
    """The MatMulNBits bundle with float accumulation: the accuracy_level of every node but
    ``keep`` set to 0, here."""
    model = onnx.load(str(project.path("build/qdq-rtn/model.onnx")))
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and node.name not in keep:
            next(a for a in node.attribute if a.name == "accuracy_level").i = 0
    onnx.save_model(model, str(tmp_path / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    return logits(tmp_path / "model.onnx", optimize=False)


@pytest.mark.parametrize("target, code_type, kept", [("qdq-plain", onnx.TensorProto.UINT4, ()), ("qdq-signed", onnx.TensorProto.INT4, ("/lm_head/MatMul_Q4",))])
def test_matmulnbits_become_dequantize_linear_with_the_same_logits(built, tmp_path, target, code_type, kept):
    nbits_left = len(kept)
    model = onnx.load(str(built.path(f"build/{target}/model.onnx")))
    ops = Counter(node.op_type for node in model.graph.node)
    assert ops["MatMulNBits"] == nbits_left and ops["DequantizeLinear"] == 11 - nbits_left
    initializers = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            assert initializers[node.input[0]].data_type == code_type
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 21
    got = logits(built.path(f"build/{target}/model.onnx"), optimize=False)  # as written: no re-fusion
    assert np.abs(got - float_reference(built, tmp_path, kept)).max() <= 1e-5
    assert np.abs(got - logits(built.path("build/qdq-rtn/model.onnx"))).max() > 1e-4  # the input's int8 activations
    record = json.loads(built.path(f"build/{target}/qdq.json").read_text())
    assert record["generated_tokens"]["(none)"] > 0 and len(record["converted"]) == 11 - nbits_left
    assert record["kept"] == {name: "params.nodes_to_exclude" for name in kept}


def test_a_bundle_without_matmulnbits_is_one_line(built):
    result = built.doit_with("targets/bad.toml", '[target.qdq-bad]\npass = "nbits-to-qdq"\ninputs = { model = ":qdq-fp32" }\n', "qdq-bad")
    assert result.returncode == 1 and "Traceback" not in result.out
    assert "target 'qdq-bad': inputs.model: no MatMulNBits node to convert (the graph has no MatMulNBits node)" in result.out
    assert not built.path("build/qdq-bad").exists()
