"""onnx-peephole (Olive's OnnxPeepholeOptimizer) on the tiny model's ONNX export and int4 bundle,
built by real doit runs and checked here with onnxruntime: the graphs really shrink, the logits
are the input's at a batch and length the pass never probed (padding included), the bundle still
loads in onnxruntime-genai, and the stage Olive has that this pass does not is one line at load."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import new_project

TARGETS = """
[target.pp-int4]
pass = "genai-build"
inputs = { base = ":tiny-base" }
params = { precision = "int4" }

[target.pp-onnx]
pass = "onnx-peephole"
inputs = { model = ":tiny-onnx-fp32" }

[target.pp-bundle]
pass = "onnx-peephole"
inputs = { model = ":pp-int4" }
params = { fix_com_microsoft_opset = true, fuse_reshape_operations = false }
"""
BUILT = ["pp-onnx", "pp-bundle"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("peephole")
    project = new_project(root / "project")
    project.path("targets/peephole.toml").write_text(TARGETS)
    assert set(BUILT) <= project.doit(*BUILT).executed
    return project


def nodes(project, target):
    return len(onnx.load(str(project.path(f"build/{target}/model.onnx")), load_external_data=False).graph.node)


def test_the_export_shrinks_with_the_same_logits(built):
    assert nodes(built, "pp-onnx") < nodes(built, "tiny-onnx-fp32")
    ids = np.random.default_rng(11).integers(5, 500, size=(2, 23)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, 15:] = 0
    out = [ort.InferenceSession(str(built.path(f"build/{t}/model.onnx")), providers=["CPUExecutionProvider"])
           .run(["logits"], {"input_ids": ids, "attention_mask": mask})[0] for t in ("tiny-onnx-fp32", "pp-onnx")]
    assert np.abs(out[0][mask == 1] - out[1][mask == 1]).max() <= 1e-6
    record = json.loads(built.path("build/pp-onnx/peephole.json").read_text())
    assert set(record["nodes"]) == {"input", "onnxscript_optimize", "onnxoptimizer_optimize", "fuse_reshape_operations"}
    assert record["nodes"]["fuse_reshape_operations"] == nodes(built, "pp-onnx")


def test_the_bundle_still_generates_and_declares_com_microsoft(built):
    model = onnx.load(str(built.path("build/pp-bundle/model.onnx")), load_external_data=False)
    assert "com.microsoft" in {o.domain for o in model.opset_import}
    assert nodes(built, "pp-bundle") < nodes(built, "pp-int4")  # the builder graph has dead constants
    record = json.loads(built.path("build/pp-bundle/peephole.json").read_text())
    assert record["generated_tokens"]["(none)"] > 0 and "fuse_reshape_operations" not in record["nodes"]
    assert record["check"]["max_abs_diff"] <= 1e-5


@pytest.mark.parametrize("params, message", [
    ("cast_chain_elimination = true", "params.cast_chain_elimination: not implemented"),
    ("onnxscript_optimize = false, onnxoptimizer_optimize = false, fuse_reshape_operations = false", "every stage is off"),
])
def test_refused_at_load_in_one_line(built, params, message):
    text = f'[target.pp-bad]\npass = "onnx-peephole"\ninputs = {{ model = ":tiny-onnx-fp32" }}\nparams = {{ {params} }}\n'
    result = built.doit_with("targets/bad.toml", text, "pp-bad")
    assert result.returncode == 2 and "target 'pp-bad'" in result.out and message in result.out and "Traceback" not in result.out
