"""import-olive maps the passes the CPU/CUDA LLM recipes use most: the GraphSurgeries surgeons to
graph-surgery steps (Olive's order and options, one target per pass; GemmToMatMulAdd named as no
step where the graph is modelbuild's own), OnnxPeepholeOptimizer, MatMulNBitsToQDQ and
DynamicToFixedShape to their passes with Olive's options; what cannot be faithful is one line.
The imported targets build on the tiny model (real doit runs), the changes really in the bundle."""

from __future__ import annotations

import json

import onnx

from test_olive_import import TRAIN, assert_refused, bare, import_olive, targets_of, tiny  # noqa: F401 (tiny: fixture)

SURGERIES = [
    {"surgeon": "GemmToMatMulAdd"},
    {"surgeon": "SimplifiedLayerNormToL2Norm"},
    {"surgeon": "RenameOutputDims", "output_idx": 0, "dim_idx": 1, "dim_name": "tokens"},
    {"surgeon": "AttentionMaskToSequenceLengths"},
]


def workflow(tmp_path, surgeries, name="workflow.json"):
    doc = {"input_model": {"type": "HfModel", "model_path": "org/model"},
           "passes": {"m": {"type": "ModelBuilder", "precision": "fp32"}, "g": {"type": "GraphSurgeries", "surgeries": surgeries}}}
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def test_surgeons_become_one_graph_surgery_target_that_builds(tiny, tmp_path):
    project = bare(tmp_path)
    result = import_olive(project, workflow(tmp_path, SURGERIES), "--name", "gs", "--model-path", tiny)
    assert result.returncode == 0, result.out
    targets = targets_of(project)
    assert targets["gs-g"]["pass"] == "graph-surgery" and targets["gs-g"]["inputs"] == {"model": ":gs-m"}
    assert targets["gs-g"]["params"]["steps"] == SURGERIES[1:]  # Olive's order and options
    assert [n for n, t in targets.items() if t["pass"] == "graph-surgery"] == ["gs-g"]
    text = (project.root / "targets" / "gs.toml").read_text()
    assert "GemmToMatMulAdd needs no step: gs-m (genai-build) writes Linear layers as MatMul already" in text

    built = project.doit("gs-g")
    assert {"gs-m", "gs-g"} <= built.executed
    model = onnx.load(str(project.root / "build" / "gs-g" / "model.onnx"), load_external_data=False)
    op_types = {node.op_type for node in model.graph.node}
    assert "LpNormalization" in op_types and not {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"} & op_types
    assert {"past_seq_len", "total_seq_len"} <= {i.name for i in model.graph.input}
    assert model.graph.output[0].type.tensor_type.shape.dim[1].dim_param == "tokens"
    record = json.loads((project.root / "build" / "gs-g" / "graph_surgery.json").read_text())
    assert [s["surgeon"] for s in record["steps"]] == [s["surgeon"] for s in SURGERIES[1:]]


def test_surgeons_that_cannot_apply_are_refused_in_one_line(tmp_path):
    cases = {
        "packed": ([{"surgeon": "PackedAttentionToLoopMHA"}], "passes.g.surgeries[0].surgeon", "custom::PackedAttention"),
        "option": ([{"surgeon": "RemoveRopeMultiCache", "large": True}], "passes.g.surgeries[0].large", "RemoveRopeMultiCache has no option 'large'"),
        "missing": ([{"surgeon": "RenameOutputDims", "dim_idx": 0, "dim_name": "b"}], "passes.g.surgeries[0].output_idx", "RenameOutputDims needs it"),
    }
    for name, (surgeries, json_path, words) in cases.items():
        path = workflow(tmp_path, surgeries, f"{name}.json")
        project = bare(tmp_path, name)
        assert_refused(import_olive(project, path), path, json_path, words)
        assert not list((project.root / "targets").iterdir())


def chain_workflow(tmp_path, passes, name):
    path = tmp_path / name
    path.write_text(json.dumps({"input_model": {"type": "HfModel", "model_path": "org/model"}, "passes": passes}))
    return path


def test_qdq_and_fixed_shape_map_with_olives_options_and_build(tiny, tmp_path):
    passes = {"m": {"type": "ModelBuilder", "precision": "int4"},
              "p": {"type": "OnnxPeepholeOptimizer", "onnxscript_optimize": False},
              "q": {"type": "MatMulNBitsToQDQ", "use_signed_int": True, "add_zero_point": False, "save_as_external_data": True},
              "f": {"type": "DynamicToFixedShape", "dim_param": ["batch_size"], "dim_value": [1]}}
    project = bare(tmp_path)
    result = import_olive(project, chain_workflow(tmp_path, passes, "qdq.json"), "--name", "qf", "--model-path", tiny)
    assert result.returncode == 0, result.out
    targets = targets_of(project)
    assert targets["qf-p"]["pass"] == "onnx-peephole" and targets["qf-p"]["params"] == {"onnxscript_optimize": False}
    assert targets["qf-q"] == {"doc": targets["qf-q"]["doc"], "pass": "nbits-to-qdq", "inputs": {"model": ":qf-p"},
                               "params": {"use_signed_int": True, "add_zero_point": False}}
    assert targets["qf-f"]["pass"] == "fixed-shape" and targets["qf-f"]["inputs"] == {"model": ":qf-q"}
    assert targets["qf-f"]["params"] == {"dim_param": ["batch_size"], "dim_value": [1]}

    assert {"qf-m", "qf-p", "qf-q", "qf-f"} <= project.doit("qf-f").executed
    model = onnx.load(str(project.root / "build" / "qf-f" / "model.onnx"), load_external_data=False)
    assert not any(node.op_type == "MatMulNBits" for node in model.graph.node)
    assert any(node.op_type == "DequantizeLinear" for node in model.graph.node)
    assert all(value.type.tensor_type.shape.dim[0].dim_value == 1 for value in model.graph.input)


def test_graph_pass_options_olive_would_reject_are_one_line(tmp_path):
    cases = {
        "both": ({"m": {"type": "ModelBuilder", "precision": "int4"},
                  "f": {"type": "DynamicToFixedShape", "dim_param": ["batch_size"], "dim_value": [1], "input_name": ["input_ids"], "input_shape": [[1, 8]]}},
                 "passes.f.dim_param", "cannot be set together with params.input_name"),
        "count": ({"m": {"type": "ModelBuilder", "precision": "int4"}, "f": {"type": "DynamicToFixedShape", "dim_param": ["a", "b"], "dim_value": [1]}},
                  "passes.f.dim_value", "1 values for 2 dim_param names"),
        "fp32": ({"m": {"type": "ModelBuilder", "precision": "fp32"}, "q": {"type": "MatMulNBitsToQDQ"}},
                 "passes.q.type", "the chain's bundle is fp32, which has none"),
        "cast": ({"m": {"type": "ModelBuilder", "precision": "fp32"}, "p": {"type": "OnnxPeepholeOptimizer", "cast_chain_elimination": True}},
                 "passes.p.cast_chain_elimination", "not the Cast round-trip collapse"),
    }
    for name, (passes, json_path, words) in cases.items():
        path = chain_workflow(tmp_path, passes, f"{name}.json")
        project = bare(tmp_path, name)
        assert_refused(import_olive(project, path), path, json_path, words)


def test_gptqmodel_is_the_gptq_mapping_with_gptqmodels_defaults(tmp_path):
    data = [{"name": "calib", "type": "HuggingfaceContainer", "load_dataset_config": {"data_name": "json", "data_files": str(TRAIN)}}]
    passes = {"g": {"type": "GptqModel", "bits": 4, "group_size": 64, "desc_act": False, "data_config": "calib"},
              "m": {"type": "ModelBuilder", "precision": "int4"}}
    path = tmp_path / "gptqmodel.json"
    path.write_text(json.dumps({"input_model": {"type": "HfModel", "model_path": "org/model"}, "data_configs": data, "passes": passes}))
    project = bare(tmp_path)
    result = import_olive(project, path, "--name", "gm")
    assert result.returncode == 0, result.out
    quantized = [t for t in targets_of(project).values() if t["pass"] == "quantize-onnx"]
    assert len(quantized) == 1
    assert quantized[0]["params"]["algorithm"] == "gptq" and quantized[0]["params"]["block_size"] == 64
    assert quantized[0]["params"]["symmetric"] is True  # GptqModel's default, not gptq's (asymmetric)
    assert quantized[0]["inputs"]["calibration"] == str(TRAIN)

    for name, change, json_path, words in (
        ("channel", {}, "passes.g.group_size", "group_size -1"),  # GptqModel's default: one group per channel
        ("rotation", {"group_size": 64, "rotation": "hadamard"}, "passes.g.rotation", "quantizes the model as it is"),
    ):
        doc = json.loads(path.read_text())
        doc["passes"]["g"] = {"type": "GptqModel", "data_config": "calib", **change}
        bad = tmp_path / f"{name}.json"
        bad.write_text(json.dumps(doc))
        assert_refused(import_olive(bare(tmp_path, name), bad), bad, json_path, words)
