"""genai-build's LoRA fusion (modelbuild/ml/lora_graph.py, then modelbuild/ml/lora_gemm.py's
2-D decoder): fewer ops per token, the same function, adapters still switchable. Real doit builds
of the tiny random Phi3, fused (int4's default; ``fuse_lora = "always"`` for fp32) against
unfused (``"never"``; fp32's default) and fused on 3-D tensors (``lora_gemm = false``), plus the
surgery on small synthetic graphs."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest

from conftest import new_project, ort_logits

TEMPLATE = "<|user|>\\n{prompt}<|end|>\\n<|assistant|>\\n{response}<|end|>"
TARGETS = f"""
[target.tiny-adapter-b]
pass = "lora-finetune"
inputs = {{ base = ":tiny-base", data = "data/travel_train.jsonl" }}
params = {{ template = "{TEMPLATE}", max_steps = 10, batch_size = 2, max_length = 64, learning_rate = 5e-3, rank = 4, seed = 7 }}

[target.tiny-int4-unfused]
pass = "genai-build"
inputs = {{ base = ":tiny-base", adapters = {{ travel = ":tiny-travel-adapter" }} }}
params = {{ precision = "int4", fuse_lora = "never" }}

[target.tiny-int4-3d]
pass = "genai-build"
inputs = {{ base = ":tiny-base", adapters = {{ travel = ":tiny-travel-adapter" }} }}
params = {{ precision = "int4", lora_gemm = false }}

[target.tiny-int4-two]
pass = "genai-build"
inputs = {{ base = ":tiny-base", adapters = {{ travel = ":tiny-travel-adapter", other = ":tiny-adapter-b" }} }}
params = {{ precision = "int4" }}

[target.tiny-fp32-fused]
pass = "genai-build"
inputs = {{ base = ":tiny-base", adapters = {{ travel = ":tiny-travel-adapter", other = ":tiny-adapter-b" }} }}
params = {{ precision = "fp32", fuse_lora = "always" }}

[target.tiny-fp32-unfused]
pass = "genai-build"
inputs = {{ base = ":tiny-base", adapters = {{ travel = ":tiny-travel-adapter", other = ":tiny-adapter-b" }} }}
params = {{ precision = "fp32" }}  # fp32 keeps one MatMul per projection by default
"""
BUILT = ["tiny-travel-cpu-int4", "tiny-int4-unfused", "tiny-int4-3d", "tiny-int4-two", "tiny-fp32-fused", "tiny-fp32-unfused"]
IDS = np.array([[5, 17, 42, 99, 300, 7, 8, 250]], dtype=np.int64)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    project = new_project(tmp_path_factory.mktemp("lora") / "project")
    project.path("targets/lora_graph.toml").write_text(TARGETS)
    project.doit(*BUILT)
    return project


def graph(project, target):
    import onnx

    return onnx.load(str(project.path(f"build/{target}/model.onnx")), load_external_data=False)


def ops_per_layer(model, layer: int) -> Counter:
    return Counter(n.op_type for n in model.graph.node if f"/layers.{layer}/" in n.name)


def lora_ops(model) -> int:
    return sum(1 for n in model.graph.node if re.search(r"/lora(_A|_B)?/", n.name))


def logits(project, target, adapter=None):
    bundle = project.path(f"build/{target}")
    return ort_logits(bundle, IDS, bundle / f"adapters/{adapter}.onnx_adapter" if adapter else None)


def test_fusion_cuts_the_ops_of_every_lora_layer(built):
    fused_3d, unfused = graph(built, "tiny-int4-3d"), graph(built, "tiny-int4-unfused")
    fused = graph(built, "tiny-travel-cpu-int4")
    for layer in (0, 1):
        before, after = ops_per_layer(unfused, layer), ops_per_layer(fused_3d, layer)
        assert before["MatMul"] == 14 and before["Add"] == 7 and before["MatMulNBits"] == 7
        # gate/up always share one MatMulNBits and one LoRA A/B pair; q/k/v too where k_quant_mixed
        # gave them one bit width (else they stay as they are)
        qkv = any(n.name == f"/model/layers.{layer}/attn/qkv_proj/lora_A/MatMul" for n in fused_3d.graph.node)
        assert (after["MatMul"], after["Add"], after["MatMulNBits"]) == ((8, 4, 4) if qkv else (12, 6, 6)), after
        assert sum(after.values()) < sum(before.values())
        # on 2-D tensors each B MatMul and its Add are one Gemm; gate/up's Reshapes go, and the
        # attention reads each of its q/k/v inputs through a Reshape to 3-D and gives 2-D back
        gemm = ops_per_layer(fused, layer)
        assert (gemm["MatMul"], gemm["Gemm"], gemm["Add"]) == ((4, 4, 0) if qkv else (6, 6, 0)), gemm
        assert (gemm["Reshape"], gemm["Flatten"]) == ((1, 1) if qkv else (3, 1)), gemm
        assert sum(gemm.values()) < sum(after.values())
    assert lora_ops(fused) < lora_ops(fused_3d) < lora_ops(unfused)
    # Packed q/k/v reach the attention packed, as the builder makes them without LoRA.
    fp32 = graph(built, "tiny-fp32-fused")
    gqa = [n for n in fp32.graph.node if n.op_type == "GroupQueryAttention"]
    assert gqa and all(list(n.input[1:3]) == ["", ""] for n in gqa)
    # The LoRA MatMuls / Gemms keep their markers and read switchable float graph inputs.
    lora = [n for n in fused.graph.node if "/lora_A/" in n.name or "/lora_B/" in n.name]
    inputs = {i.name: i for i in fused.graph.input}
    assert lora and all(n.op_type in ("MatMul", "Gemm") and n.input[1] in inputs for n in lora)
    assert all(inputs[n.input[1]].type.tensor_type.elem_type == 1 for n in lora)  # float
    record = json.loads(built.path("build/tiny-travel-cpu-int4/modelbuild.json").read_text())["lora_fusion"]
    assert record["groups"] >= 2 and record["nodes"][1] < record["nodes"][0]
    assert record["gemm"]["gemms"] == sum(n.op_type == "Gemm" for n in fused.graph.node) > 0
    assert json.loads(built.path("build/tiny-int4-3d/modelbuild.json").read_text())["lora_fusion"]["gemm"] is None
    # Without an adapter (zero B: the Gemm adds exactly 0) the 2-D bundle is the 3-D one, to the bit.
    assert np.array_equal(logits(built, "tiny-travel-cpu-int4"), logits(built, "tiny-int4-3d"))
    assert json.loads(built.path("build/tiny-fp32-fused/modelbuild.json").read_text())["lora_fusion"]["groups"] == 4


def test_fused_bundle_computes_what_the_unfused_one_does(built):
    """fp32: the same logits with each adapter and without; the adapters do move the logits."""
    for adapter in (None, "travel", "other"):
        fused, unfused = logits(built, "tiny-fp32-fused", adapter), logits(built, "tiny-fp32-unfused", adapter)
        assert np.abs(fused - unfused).max() < 1e-4, adapter
    none, travel, other = (logits(built, "tiny-fp32-fused", a) for a in (None, "travel", "other"))
    assert np.abs(travel - none).max() > 1e-2 and np.abs(other - none).max() > 1e-2
    assert np.abs(travel - other).max() > 1e-2


@pytest.mark.parametrize("target", ["tiny-travel-cpu-int4", "tiny-int4-3d"])
def test_fused_int4_bundle_follows_the_unfused_one(built, target):
    """int4 (k_quant_mixed: some v_proj int8, so those q/k/v cannot share one MatMulNBits and stay
    unfused): with the adapter the fused logits (2-D and 3-D) stay next to the unfused ones, far
    closer than the adapter's own effect; without it they are the base's."""
    fused, unfused = logits(built, target, "travel"), logits(built, "tiny-int4-unfused", "travel")
    base = logits(built, "tiny-int4-unfused")
    effect = np.abs(unfused - base).max()
    assert effect > 1e-2
    assert np.abs(fused - unfused).max() < 0.05 * effect
    assert np.abs(logits(built, target) - base).max() < 1e-3


def test_fused_fp32_bundle_matches_torch_peft(built):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(built.path("build/tiny-base"), dtype=torch.float32).eval()
    tuned = PeftModel.from_pretrained(base, built.path("build/tiny-travel-adapter")).eval()
    with torch.no_grad():
        expected = tuned(torch.from_numpy(IDS)).logits.numpy()
    assert np.abs(logits(built, "tiny-fp32-fused", "travel") - expected).max() < 1e-4


def test_og_switches_the_fused_adapters(built):
    from modelbuild.ml.genai import Chat

    chat = Chat(built.path("build/tiny-fp32-fused"))
    assert sorted(chat.adapter_names) == ["other", "travel"]
    prompt = "What should I see in Chicago?"
    base = chat.generate(prompt, None, 16)
    travel, other = chat.generate(prompt, "travel", 16), chat.generate(prompt, "other", 16)
    assert base and travel and other and len({tuple(base), tuple(travel), tuple(other)}) == 3
    assert chat.generate(prompt, None, 16) == base
    unfused = Chat(built.path("build/tiny-fp32-unfused"))
    assert unfused.generate(prompt, "travel", 16) == travel and unfused.generate(prompt, "other", 16) == other


def test_second_adapter_of_a_partly_fused_int4_bundle(built):
    """k_quant_mixed leaves some q/k/v groups unfused: the second adapter, laid out from an fp32
    build, must be fused exactly where the bundle is, and still match the fp32 bundle's adapter."""
    from modelbuild.ml.genai import Chat

    chat = Chat(built.path("build/tiny-int4-two"))
    prompt = "Plan a rainy day in London."
    base, other = chat.generate(prompt, None, 16), chat.generate(prompt, "other", 16)
    assert other and other != base
    int4, fp32 = logits(built, "tiny-int4-two", "other"), logits(built, "tiny-fp32-fused", "other")
    none = logits(built, "tiny-int4-two")
    assert np.corrcoef((int4 - none).ravel(), (fp32 - logits(built, "tiny-fp32-fused")).ravel())[0, 1] > 0.8


# --- the surgery on synthetic graphs: block-diagonal B (unequal widths), stacked B (equal),
# MatMulNBits packing, unpackable bases left alone, each against the graph before fusion.

def _synthetic(widths, ranks, base="float", bits=(4, 4, 4)):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    K, nodes, inits, outs = 32, [], [], []
    for i, (width, rank) in enumerate(zip(widths, ranks)):
        mod = f"/model/layers.0/attn/{'qkv'[i]}_proj"
        stem = mod.lstrip("/").replace("/", ".")
        if base == "float":
            inits.append(numpy_helper.from_array(rng.standard_normal((K, width)).astype(np.float32), f"{stem}.MatMul.weight"))
            nodes.append(helper.make_node("MatMul", ["x", f"{stem}.MatMul.weight"], [f"{mod}/MatMul/output_0"], name=f"{mod}/MatMul"))
        else:
            blob = 32 * bits[i] // 8
            q = rng.integers(0, 255, (width, 1, blob), dtype=np.uint8)
            scale = rng.uniform(0.01, 0.02, (width, 1)).astype(np.float32)
            inits += [numpy_helper.from_array(q, f"{stem}.MatMul.weight_Q"), numpy_helper.from_array(scale, f"{stem}.MatMul.weight_scale")]
            nodes.append(helper.make_node("MatMulNBits", ["x", f"{stem}.MatMul.weight_Q", f"{stem}.MatMul.weight_scale"],
                                          [f"{mod}/MatMul/output_0"], name=f"{mod}/MatMul_Q", domain="com.microsoft",
                                          K=K, N=width, bits=bits[i], block_size=32, accuracy_level=0))
        inits.append(numpy_helper.from_array(rng.standard_normal((K, rank)).astype(np.float32), f"{stem}.lora_A.MatMul.weight"))
        inits.append(numpy_helper.from_array(rng.standard_normal((rank, width)).astype(np.float32), f"{stem}.lora_B.MatMul.weight"))
        nodes.append(helper.make_node("MatMul", ["x", f"{stem}.lora_A.MatMul.weight"], [f"{mod}/lora_A/MatMul/output_0"], name=f"{mod}/lora_A/MatMul"))
        nodes.append(helper.make_node("MatMul", [f"{mod}/lora_A/MatMul/output_0", f"{stem}.lora_B.MatMul.weight"],
                                      [f"{mod}/lora_B/MatMul/output_0"], name=f"{mod}/lora_B/MatMul"))
        nodes.append(helper.make_node("Add", [f"{mod}/MatMul/output_0", f"{mod}/lora_B/MatMul/output_0"], [f"{mod}/lora/Add/output_0"], name=f"{mod}/lora/Add"))
        nodes.append(helper.make_node("Relu", [f"{mod}/lora/Add/output_0"], [f"y{i}"], name=f"/out{i}"))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, "s", width]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", K])
    graph = helper.make_graph(nodes, "g", [x], outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)], ir_version=10)


def _run(model):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((1, 3, 32)).astype(np.float32)
    return session.run(None, {"x": x})


@pytest.mark.parametrize("widths, ranks, base, bits, packed, b_shape", [
    ((16, 8, 8), (4, 4, 4), "float", (4, 4, 4), True, [12, 32]),  # block-diagonal B
    ((8, 8, 8), (4, 4, 4), "float", (4, 4, 4), True, [3, 4, 8]),  # stacked B
    ((16, 8, 8), (4, 2, 4), "nbits", (4, 4, 4), True, [10, 32]),  # packed MatMulNBits
    ((8, 8, 8), (4, 4, 4), "nbits", (4, 8, 4), False, None),  # int8 v: bases cannot pack, left alone
])
def test_fuse_lora_keeps_the_function(widths, ranks, base, bits, packed, b_shape):
    from onnx import checker

    from modelbuild.ml.lora_graph import fuse_lora, lora_op_count

    model = _synthetic(widths, ranks, base, bits)
    expected, lora_before = _run(model), lora_op_count(model)
    stats = fuse_lora(model)
    checker.check_model(model)
    assert stats["modules"] == (["/model/layers.0/attn/qkv_proj"] if packed else [])
    for want, got in zip(expected, _run(model)):
        assert np.abs(want - got).max() < 1e-4
    if not packed:
        assert lora_op_count(model) == lora_before
        return
    assert lora_op_count(model) < lora_before
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    assert inits["model.layers.0.attn.qkv_proj.lora_A.MatMul.weight"] == [32, sum(ranks)]
    assert inits["model.layers.0.attn.qkv_proj.lora_B.MatMul.weight"] == b_shape
    bases = [n for n in model.graph.node if n.op_type in ("MatMul", "MatMulNBits") and "/lora" not in n.name]
    assert len(bases) == (1 if packed else 3)
