"""quantize-onnx on the tiny model: real doit, a real fp32 genai bundle, every algorithm.

The fp32 bundle (tiny base + the switchable 'travel' adapter) is quantized with rtn, k_quant, hqq
and gptq; the outputs are checked as graphs (int4 MatMulNBits, LoRA untouched), as bundles
(onnxruntime-genai loads and generates, with and without the adapter) and numerically (logits
close to fp32, measured against how far the adapter moves them).
"""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest

from conftest import new_project, ort_logits

ALGORITHMS = ("source_grid", "rtn", "k_quant", "hqq", "gptq")
DETERMINISTIC = ("source_grid", "rtn", "k_quant", "hqq")
FP32 = "tiny-q-fp32"

TARGETS = f"""
[target.{FP32}]
pass = "genai-build"
inputs = {{ base = ":tiny-base", adapters = {{ travel = ":tiny-travel-adapter" }} }}
params = {{ precision = "fp32" }}
""" + "".join(f"""
[target.tiny-q-{algorithm}]
pass = "quantize-onnx"
inputs = {{ bundle = ":{FP32}"{', calibration = "data/travel_train.jsonl"' if algorithm == "gptq" else ""} }}
params = {{ algorithm = "{algorithm}"{', calibration_samples = 8, max_length = 96' if algorithm == "gptq" else ""} }}
""" for algorithm in ALGORITHMS) + """
[target.tiny-q-block128]
pass = "quantize-onnx"
inputs = { bundle = ":tiny-q-fp32" }
params = { algorithm = "k_quant", block_size = 128 }

[target.tiny-q-float-head]
pass = "quantize-onnx"
inputs = { bundle = ":tiny-q-fp32" }
params = { algorithm = "hqq", keep_float = ["/lm_head/MatMul"] }

[target.tiny-q-int8-head]
pass = "quantize-onnx"
inputs = { bundle = ":tiny-q-fp32" }
params = { algorithm = "hqq", int8_nodes = ["/lm_head/*"] }
"""


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """A project with the fp32 tiny bundle and one quantized bundle per algorithm."""
    project = new_project(tmp_path_factory.mktemp("quantize") / "project")
    project.path("targets/quantize.toml").write_text(TARGETS)
    targets = [f"tiny-q-{a}" for a in ALGORITHMS] + ["tiny-q-block128", "tiny-q-float-head", "tiny-q-int8-head"]
    result = project.doit(*targets)
    assert set(targets) <= result.executed
    return project


def _bundle(project, algorithm):
    return project.path(f"build/tiny-q-{algorithm}")


def _record(project, algorithm):
    return json.loads((_bundle(project, algorithm) / "quantization.json").read_text())


def _eval_ids(bundle, count=4):
    """Token ids of a few held-out travel Q&A records, chat-rendered as generation sees them."""
    import onnxruntime_genai as og

    tokenizer = og.Tokenizer(og.Config(str(bundle)))
    lines = [json.loads(line) for line in (bundle.parents[1] / "targets/data/travel_eval.jsonl").read_text().splitlines() if line.strip()]
    out = []
    for record in lines[:count]:
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
        text = tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=False)
        out.append(np.asarray(tokenizer.encode(text), dtype=np.int64)[None, :96])
    return out


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_matmuls_are_int4_and_lora_stays_float(quantized, algorithm):
    import onnx

    bundle = _bundle(quantized, algorithm)
    fp32 = onnx.load(str(quantized.path(f"build/{FP32}/model.onnx")), load_external_data=False)
    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    lora = [n for n in fp32.graph.node if "/lora_A/" in n.name or "/lora_B/" in n.name]
    lora_names = {n.name for n in lora}
    base_matmuls = [n.name for n in fp32.graph.node if n.op_type == "MatMul" and n.name not in lora_names]
    assert lora and base_matmuls
    # Every base MatMul (2 layers x 7 + lm_head) became MatMulNBits; every LoRA MatMul is untouched.
    nbits = {n.name: n for n in model.graph.node if n.op_type == "MatMulNBits"}
    assert sorted(nbits) == sorted(f"{name}_Q4" for name in base_matmuls)
    for node in nbits.values():
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["bits"] == 4 and attrs["block_size"] == 32 and attrs["accuracy_level"] == 4
    nodes = {n.name: n for n in model.graph.node}
    graph_inputs = {i.name for i in model.graph.input}
    for node in lora:
        assert nodes[node.name].op_type == "MatMul" and list(nodes[node.name].input) == list(node.input)
        assert node.input[1] in graph_inputs  # still overridable: the adapter switches it
    record = _record(quantized, algorithm)
    assert record["algorithm"] == algorithm
    assert record["quantized"] == len(base_matmuls) and record["kept_float"]["lora"] == len(lora)
    assert record["quantized_matmuls"] == sorted(base_matmuls)
    assert record["verified_tokens"]["(none)"] > 0 and record["verified_tokens"]["travel"] > 0
    # The bundle is complete: the rest is copied unchanged, the model files keep their names.
    source = quantized.path(f"build/{FP32}")
    for name in ["genai_config.json", "tokenizer.json", "tokenizer_config.json", "adapters/travel.onnx_adapter"]:
        assert (bundle / name).read_bytes() == (source / name).read_bytes(), name
    assert (bundle / "model.onnx.data").is_file() and not (bundle / "modelbuild.json").exists()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_model_files_are_smaller(quantized, algorithm):
    bundle, source = _bundle(quantized, algorithm), quantized.path(f"build/{FP32}")
    size = lambda folder: sum((folder / n).stat().st_size for n in ("model.onnx", "model.onnx.data"))  # noqa: E731
    before, after = size(source), size(bundle)
    # The tiny model is mostly MatMul weights: int4 blocks take ~1/6 of fp32 even with scales.
    assert after < 0.5 * before
    assert _record(quantized, algorithm)["model_bytes"] == {"before": before, "after": after, "ratio": round(after / before, 4)}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_bundle_loads_in_genai_and_generates_with_and_without_adapter(quantized, algorithm):
    from modelbuild.ml.genai import Chat

    chat = Chat(_bundle(quantized, algorithm))
    assert chat.adapter_names == ["travel"]
    base = chat.generate("What should I see in Chicago?", None, 12)
    tuned = chat.generate("What should I see in Chicago?", "travel", 12)
    assert base and tuned


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_logits_stay_close_to_fp32_and_the_adapter_still_moves_them(quantized, algorithm):
    source, bundle = quantized.path(f"build/{FP32}"), _bundle(quantized, algorithm)
    adapter = source / "adapters/travel.onnx_adapter"
    for ids in _eval_ids(source):
        fp32, fp32_tuned = ort_logits(source, ids), ort_logits(source, ids, adapter)
        q, q_tuned = ort_logits(bundle, ids), ort_logits(bundle, ids, bundle / "adapters/travel.onnx_adapter")
        adapter_effect = _rel(fp32_tuned, fp32)
        assert adapter_effect > 0.3  # the yardstick: a trained adapter moves the logits this much
        # int4 noise is a fraction of that (a wrong packing or scale layout is ~1: unrelated logits).
        error, tuned_error = _rel(q, fp32), _rel(q_tuned, fp32_tuned)
        assert error < 0.3 and error < adapter_effect / 3, (error, adapter_effect)
        assert tuned_error < 0.3 and tuned_error < adapter_effect / 3, (tuned_error, adapter_effect)
        # The adapter still switches in the quantized bundle, by about as much as in fp32.
        assert 0.7 < _rel(q_tuned, q) / adapter_effect < 1.3


def test_gptq_beats_rtn_on_held_out_text(quantized):
    """GPTQ's error compensation must show: onnxruntime 1.31's own GPTQ returns RTN's exact bytes."""
    source = quantized.path(f"build/{FP32}")
    errors = {algorithm: [] for algorithm in ("rtn", "gptq")}  # both symmetric, block 32
    for ids in _eval_ids(source):
        fp32 = ort_logits(source, ids)
        for algorithm in errors:
            errors[algorithm].append(_rel(ort_logits(_bundle(quantized, algorithm), ids), fp32))
    assert np.mean(errors["gptq"]) < 0.95 * np.mean(errors["rtn"]), errors


def test_odd_block_count_packs_zero_points_per_column(quantized):
    """block 128 on K=128 is one block a column: asymmetric zero points must be packed per column."""
    source, bundle = quantized.path(f"build/{FP32}"), quantized.path("build/tiny-q-block128")
    ids = _eval_ids(source, 1)[0]
    error = _rel(ort_logits(bundle, ids), ort_logits(source, ids))
    assert error < 0.3, error
    assert _record(quantized, "block128")["symmetric"] is False


@pytest.mark.parametrize("algorithm", DETERMINISTIC)
def test_rebuild_is_byte_identical(quantized, algorithm):
    target = f"tiny-q-{algorithm}"
    bundle = _bundle(quantized, algorithm)
    digests = {p.relative_to(bundle).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
               for p in sorted(bundle.rglob("*")) if p.is_file() and ".modelbuild" not in p.parts}
    quantized.doit("forget", target)
    result = quantized.doit(target, env={"MODELBUILD_FORCE": "1"})  # run the pass again, no cache
    assert result.executed == {target}
    assert json.loads((bundle / ".modelbuild/stamp.json").read_text())["origin"] == "built"
    again = {p.relative_to(bundle).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(bundle.rglob("*")) if p.is_file() and ".modelbuild" not in p.parts}
    assert again == digests


def test_gptq_calibrates_on_the_project_data(quantized):
    calibration = _record(quantized, "gptq")["calibration"]
    assert calibration["file"] == "targets/data/travel_train.jsonl"
    assert calibration["records"] == 8 and 8 <= calibration["tokens"] <= 8 * 96
    assert _record(quantized, "rtn")["calibration"] is None


def test_gptq_without_calibration_fails_in_one_line(quantized):
    result = quantized.doit_with("targets/nocal.toml", f"""
[target.tiny-q-nocal]
pass = "quantize-onnx"
inputs = {{ bundle = ":{FP32}" }}
params = {{ algorithm = "gptq" }}
""", "tiny-q-nocal")
    assert result.returncode != 0
    assert "modelbuild: targets/nocal.toml: target 'tiny-q-nocal': inputs.calibration: algorithm 'gptq' needs calibration data" in result.out
    assert "Traceback" not in result.out
    assert not quantized.path("build/tiny-q-nocal").exists()


def test_quantizing_switchable_lora_is_refused(quantized):
    result = quantized.doit_with("targets/lora.toml", f"""
[target.tiny-q-lora]
pass = "quantize-onnx"
inputs = {{ bundle = ":{FP32}" }}
params = {{ algorithm = "rtn", exclude_lora = false }}
""", "tiny-q-lora")
    assert result.returncode != 0
    assert "modelbuild: targets/lora.toml: target 'tiny-q-lora': params.exclude_lora: false would quantize 28 LoRA MatMuls" in result.out
    assert "Traceback" not in result.out


def test_an_int4_bundle_is_not_quantized_again(quantized):
    result = quantized.doit_with("targets/twice.toml", """
[target.tiny-q-twice]
pass = "quantize-onnx"
inputs = { bundle = ":tiny-q-rtn" }
""", "tiny-q-twice")
    assert result.returncode != 0
    assert "inputs.bundle: already quantized (15 MatMulNBits nodes)" in result.out


def test_keep_float_and_int8_nodes_change_the_named_matmul_and_nothing_else(quantized):
    import onnx

    def ops(name):
        """original MatMul name -> (op, bits) in the bundle ``name``."""
        model = onnx.load(str(quantized.path(f"build/{name}/model.onnx")), load_external_data=False)
        return {
            re.sub(r"_Q[48]$", "", n.name): (n.op_type, next((a.i for a in n.attribute if a.name == "bits"), None))
            for n in model.graph.node if n.op_type in ("MatMul", "MatMulNBits")
        }

    head_float, head_int8, all_int4 = ops("tiny-q-float-head"), ops("tiny-q-int8-head"), ops("tiny-q-hqq")
    assert all_int4["/lm_head/MatMul"] == ("MatMulNBits", 4)
    assert head_float["/lm_head/MatMul"] == ("MatMul", None)
    assert head_int8["/lm_head/MatMul"] == ("MatMulNBits", 8)
    others = {n: v for n, v in all_int4.items() if n != "/lm_head/MatMul"}
    assert {n: v for n, v in head_float.items() if n != "/lm_head/MatMul"} == others
    assert {n: v for n, v in head_int8.items() if n != "/lm_head/MatMul"} == others
    assert _record(quantized, "int8-head")["int8"] == ["/lm_head/MatMul"]
    sizes = {name: sum(p.stat().st_size for p in quantized.path(f"build/{name}").glob("model.onnx*"))
             for name in ("tiny-q-hqq", "tiny-q-int8-head", "tiny-q-float-head")}
    assert sizes["tiny-q-hqq"] < sizes["tiny-q-int8-head"] < sizes["tiny-q-float-head"]
    assert _record(quantized, "float-head")["kept_float"]["other"] == ["/lm_head/MatMul"]
    result = quantized.doit_with("targets/nomatch.toml",
        '[target.tiny-q-nomatch]\npass = "quantize-onnx"\ninputs = { bundle = ":tiny-q-fp32" }\nparams = { keep_float = ["/head/*"] }\n',
        "tiny-q-nomatch")
    assert result.returncode != 0
    assert "target 'tiny-q-nomatch': params.keep_float: '/head/*' matches no MatMul with a constant weight" in result.out
