"""fixed-shape (Olive's DynamicToFixedShape) on the tiny model's ONNX export, built by real doit
runs and checked here with onnxruntime: the inputs and outputs really have the fixed shapes,
onnxruntime runs them at those shapes with the export's logits and refuses any other shape, and
bad params are one line at load or when the graph is read."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import new_project

TARGETS = """
[target.fx-inputs]
pass = "fixed-shape"
inputs = { model = ":tiny-onnx-fp32" }
params = { input_name = ["input_ids", "attention_mask"], input_shape = [[2, 16], [2, 16]] }

[target.fx-batch]
pass = "fixed-shape"
inputs = { model = ":tiny-onnx-fp32" }
params = { dim_param = ["batch"], dim_value = [3] }
"""
BUILT = ["fx-inputs", "fx-batch"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("fixed-shape")
    project = new_project(root / "project")
    project.path("targets/fixed_shape.toml").write_text(TARGETS)
    assert set(BUILT) <= project.doit(*BUILT).executed
    return project


def dims(values):
    return {v.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim] for v in values}


def run(project, target, ids):
    session = ort.InferenceSession(str(project.path(f"build/{target}/model.onnx")), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]


@pytest.mark.parametrize("target, shape, other", [("fx-inputs", (2, 16), (2, 17)), ("fx-batch", (3, 11), (1, 11))])
def test_fixed_shapes_run_with_the_exports_logits_and_nothing_else_runs(built, target, shape, other):
    model = onnx.load(str(built.path(f"build/{target}/model.onnx")))
    inputs, outputs = dims(model.graph.input), dims(model.graph.output)
    if target == "fx-inputs":
        assert inputs == {"input_ids": [2, 16], "attention_mask": [2, 16]} and outputs == {"logits": [2, 16, 512]}
    else:
        assert inputs == {"input_ids": [3, "sequence"], "attention_mask": [3, "sequence"]} and outputs["logits"][0] == 3
    ids = np.random.default_rng(3).integers(5, 500, size=shape).astype(np.int64)
    assert np.abs(run(built, target, ids) - run(built, "tiny-onnx-fp32", ids)).max() <= 1e-6
    with pytest.raises(Exception, match="Got invalid dimensions"):
        run(built, target, np.ones(other, dtype=np.int64))
    record = json.loads(built.path(f"build/{target}/fixed_shape.json").read_text())
    assert record["after"]["inputs"] == inputs and record["check"]["max_abs_diff"] == 0.0


REFUSED = {
    "both": ('dim_param = ["batch"], dim_value = [1], input_name = ["input_ids"], input_shape = [[1, 4]]', 2,
             "params.dim_param: cannot be set together with params.input_name"),
    "count": ('dim_param = ["batch", "sequence"], dim_value = [1]', 2, "params.dim_value: 1 values for 2 dim_param names"),
    "zero": ('input_name = ["input_ids"], input_shape = [[0, 4]]', 2, "params.input_shape: every size must be > 0"),
    "name": ('dim_param = ["batch_size"], dim_value = [1]', 1, "params.dim_param: the graph has no dimension named 'batch_size' (it has batch, sequence)"),
    "rank": ('input_name = ["input_ids"], input_shape = [[1, 4, 2]]', 1, "params.input_shape: input_ids: Rank mismatch"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_bad_params_are_one_line(built, case):
    params, code, message = REFUSED[case]
    text = f'[target.fx-bad]\npass = "fixed-shape"\ninputs = {{ model = ":tiny-onnx-fp32" }}\nparams = {{ {params} }}\n'
    result = built.doit_with("targets/bad.toml", text, "fx-bad")
    assert result.returncode == code and message in result.out and "Traceback" not in result.out, result.out[-2000:]
    assert not built.path("build/fx-bad").exists()
