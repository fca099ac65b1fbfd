"""source_grid: weights already on a GGUF-style grid are re-expressed, not re-quantized.

Each test builds a real ONNX graph, quantizes it with modelbuild.ml.source_grid and runs it in
onnxruntime (fp32 compute, accuracy_level 0, so what is measured is the weight encoding), against
x @ W in float64 and against onnxruntime's own RTN at the same bits and block size.
"""

from __future__ import annotations

import numpy as np
import pytest

K, N, BLOCK = 128, 48, 32


def _q4_1(rng, k=K, n=N):
    """A [K, N] weight as a Q4_1 GGUF dequantizes: per output column and block of 32 inputs,
    w = d * q + m with q in 0..15, d and m fp16 (m not a multiple of d)."""
    q = rng.integers(0, 16, size=(n, k // BLOCK, BLOCK))
    q[..., 0], q[..., 1] = 0, 15  # Q4_1 maps the block's minimum to 0 and maximum to 15
    d = rng.uniform(0.002, 0.02, size=(n, k // BLOCK, 1)).astype(np.float16).astype(np.float32)
    m = (-rng.uniform(2.0, 13.0, size=(n, k // BLOCK, 1)) * d).astype(np.float16).astype(np.float32)
    return (d * q + m).reshape(n, k).T.astype(np.float32)


def _q8_0(rng, k=K, n=N):
    q = rng.integers(-127, 128, size=(n, k // BLOCK, BLOCK))
    q[..., 0] = 127
    d = rng.uniform(0.001, 0.01, size=(n, k // BLOCK, 1)).astype(np.float16).astype(np.float32)
    return (d * q).reshape(n, k).T.astype(np.float32)


def _graph(weight, tied: bool = False):
    """x [batch, seq, K] -> MatMul(W) -> y; with ``tied``, also ids -> Gather(Transpose(W)) -> emb."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="/head/MatMul")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", weight.shape[0]])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if tied:
        nodes += [helper.make_node("Transpose", ["W"], ["Wt"], name="/embed/Transpose"),
                  helper.make_node("Gather", ["Wt", "ids"], ["emb"], name="/embed/Gather")]
        inputs.append(helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"]))
        outputs.append(helper.make_tensor_value_info("emb", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(weight, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model


def _run(model, feeds):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _source_grid(weight, bits=4, offsets=True, tied=False):
    from modelbuild.ml.source_grid import quantize_decoder

    model = _graph(weight, tied)
    record = quantize_decoder(model, {"/head/MatMul": "W"}, int8={"/head/MatMul"} if bits == 8 else (),
                              block_size=BLOCK, accuracy_level=0, block_offsets=offsets)
    return model, record


def _rtn(weight, bits=4):
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    model = _graph(weight)
    config = mnq.DefaultWeightOnlyQuantConfig(block_size=BLOCK, is_symmetric=False, bits=bits)
    quantizer = mnq.MatMulNBitsQuantizer(model, bits=bits, block_size=BLOCK, is_symmetric=False, algo_config=config)
    quantizer.process()
    return quantizer.model.model


def _relative_error(model, weight, x):
    got = _run(model, {"x": x})[0].astype(np.float64)
    expected = x.astype(np.float64) @ weight.astype(np.float64)
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


@pytest.fixture
def activations():
    rng = np.random.default_rng(7)
    # a non-zero mean per channel, as LLM activations have: block sums are then large
    return (rng.normal(size=(2, 5, K)) + rng.normal(size=K)).astype(np.float32)


def test_a_q4_1_grid_is_recognised_and_kept_exactly_with_block_offsets(activations):
    weight = _q4_1(np.random.default_rng(0))
    model, record = _source_grid(weight)
    assert record["grid_blocks"] == record["blocks"] == N * K // BLOCK
    assert record["offset_nodes"] == 1
    exact = _relative_error(model, weight, activations)
    plain = _relative_error(_source_grid(weight, offsets=False)[0], weight, activations)
    rtn = _relative_error(_rtn(weight), weight, activations)
    # offsets remove the zero point's rounding (what is left: the offsets' own 4-bit rounding)
    assert exact < plain / 16, (exact, plain)
    assert exact < rtn / 16, (exact, rtn)
    assert plain < rtn * 1.1  # keeping the grid's codes and refitting is never worse than RTN


def test_a_q4_1_grid_whose_minimum_is_a_multiple_of_its_step_is_exact_without_offsets(activations):
    rng = np.random.default_rng(1)
    q = rng.integers(0, 16, size=(N, K // BLOCK, BLOCK))
    q[..., 0], q[..., 1] = 0, 15
    d = rng.uniform(0.002, 0.02, size=(N, K // BLOCK, 1)).astype(np.float32)
    weight = (d * (q - 8)).reshape(N, K).T.astype(np.float32)  # Q4_0: w = d * (q - 8)
    model, _ = _source_grid(weight, offsets=False)
    assert _relative_error(model, weight, activations) < 1e-6


def test_a_q8_0_grid_stays_8_bit_exactly_and_a_tied_lookup_reads_the_quantized_head(activations):
    weight = _q8_0(np.random.default_rng(2))  # [K = hidden, N = vocab], as an LM head
    model, record = _source_grid(weight, tied=True)  # not asked for 8 bits: the grid says so
    assert record["bits"] == {"/head/MatMul": 8}
    assert record["grid_blocks"] == record["blocks"] and record["tied_lookup"]
    ops = [n.op_type for n in model.graph.node]
    assert "GatherBlockQuantized" in ops and "Gather" not in ops and "Transpose" not in ops
    assert [i.name for i in model.graph.initializer if i.name == "W"] == []  # the float copy is gone
    ids = np.array([[0, 5, N - 1]], dtype=np.int64)
    y, emb = _run(model, {"x": activations, "ids": ids})
    np.testing.assert_allclose(y, activations.astype(np.float64) @ weight, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(emb[0], weight.T[ids[0]])


def test_a_float_weight_falls_back_to_rtn_and_offsets_still_help(activations):
    weight = np.random.default_rng(3).normal(size=(K, N)).astype(np.float32)
    model, record = _source_grid(weight)
    assert record["grid_blocks"] == 0
    corrected = _relative_error(model, weight, activations)
    rtn = _relative_error(_rtn(weight), weight, activations)
    assert corrected < rtn, (corrected, rtn)


GRID_TARGETS = """
[target.tiny-grid-base]
doc = "tiny-base with its Linear weights written onto a Q4_1 grid and its LM head onto Q8_0, as a GGUF import"
pass = "hf-import"
inputs = { local = "grid-base" }

[target.tiny-grid-fp32]
pass = "genai-build"
inputs = { base = ":tiny-grid-base", adapters = { travel = ":tiny-travel-adapter" } }
params = { precision = "fp32" }

[target.tiny-grid-int4]
pass = "genai-build"
inputs = { base = ":tiny-grid-base", adapters = { travel = ":tiny-travel-adapter" } }
params = { precision = "int4", int4_algorithm = "source_grid" }

[target.tiny-grid-kquant]
pass = "genai-build"
inputs = { base = ":tiny-grid-base", adapters = { travel = ":tiny-travel-adapter" } }
params = { precision = "int4", int4_algorithm = "k_quant_mixed" }
"""


def _write_gguf_like(source, target):
    """tiny-base as a Q4_1/Q8_0 GGUF import would give it: Linear weights w = d*q + m per block of
    32 inputs (d, m fp16), the LM head w = d*q (Q8_0); embeddings and norms untouched."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    state = load_file(str(source / "model.safetensors"))
    for name, weight in state.items():
        if weight.dim() != 2 or "embed" in name:
            continue
        blocks = weight.float().reshape(weight.shape[0], -1, BLOCK)
        if "lm_head" in name:
            d = (blocks.abs().amax(-1, keepdim=True) / 127).half().float()
            grid = d * torch.round(blocks / d)
        else:
            lo, hi = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
            d, m = ((hi - lo) / 15).half().float(), lo.half().float()
            grid = d * torch.clamp(torch.round((blocks - m) / d), 0, 15) + m
        state[name] = grid.reshape(weight.shape).to(weight.dtype).contiguous()
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})


def test_a_gguf_like_base_keeps_its_grid_through_genai_build(project):
    """Through real doit: genai-build's source_grid int4 of a base on a Q4_1/Q8_0 grid follows
    the fp32 bundle far closer than the builder's k_quant_mixed, and the adapter still switches."""
    import json

    project.doit("tiny-base", "tiny-travel-adapter")
    _write_gguf_like(project.path("build/tiny-base"), project.path("targets/grid-base"))
    project.append("targets/grid.toml", GRID_TARGETS)
    project.doit("-n", "2", "tiny-grid-fp32", "tiny-grid-int4", "tiny-grid-kquant")
    record = json.loads(project.path("build/tiny-grid-int4/modelbuild.json").read_text())["source_grid"]
    assert record["grid_blocks"] == record["blocks"] > 0
    assert record["int8_nodes"] == 1 and record["offset_nodes"] == record["int4_nodes"] > 0  # Q8_0 head, Q4_1 rest

    from conftest import ort_logits

    ids = np.array([[1, 17, 99, 230, 5, 42, 300, 7]], dtype=np.int64)
    adapter = "adapters/travel.onnx_adapter"
    error = {}
    for name in ("int4", "kquant"):
        bundle = project.path(f"build/tiny-grid-{name}")
        for active in (None, adapter):
            reference = ort_logits(project.path("build/tiny-grid-fp32"), ids, project.path(f"build/tiny-grid-fp32/{active}") if active else None)
            got = ort_logits(bundle, ids, bundle / active if active else None)
            error[name, active] = float(np.abs(got - reference).max())
    switched = np.abs(ort_logits(project.path("build/tiny-grid-int4"), ids, project.path(f"build/tiny-grid-int4/{adapter}"))
                      - ort_logits(project.path("build/tiny-grid-int4"), ids)).max()
    for active in (None, adapter):
        assert error["int4", active] < error["kquant", active] / 4, error
    assert switched > 10 * error["int4", adapter], (switched, error)


def test_a_tied_head_with_block_offsets_keeps_its_float_lookup(activations):
    """A 4-bit head with offsets reads extra block-sum columns; a lookup of its rows would return
    them too, so the embedding stays the float Gather (and still returns the exact rows)."""
    weight = _q4_1(np.random.default_rng(4))
    model, record = _source_grid(weight, tied=True)
    assert record["offset_nodes"] == 1 and not record["tied_lookup"]
    assert "GatherBlockQuantized" not in [n.op_type for n in model.graph.node]
    ids = np.array([[0, 3, N - 1]], dtype=np.int64)
    _, emb = _run(model, {"x": activations, "ids": ids})
    np.testing.assert_array_equal(emb[0], weight.T[ids[0]])


def test_fitting_in_column_chunks_changes_nothing(monkeypatch):
    """Large weights are fitted (and their block offsets found) ELEMENTS_PER_FIT weights at a time
    to bound memory: the codes, scales and zero points are those of the whole weight at once."""
    from modelbuild.ml import source_grid

    weight = np.concatenate([_q4_1(np.random.default_rng(5)), np.random.default_rng(6).normal(size=(K, 7)).astype(np.float32)], axis=1)
    for offsets in (False, True):
        whole = source_grid.fit_grid(weight, BLOCK, refit=False)
        if offsets:
            whole = source_grid.with_block_offsets(whole, weight, BLOCK)
        monkeypatch.setattr(source_grid, "ELEMENTS_PER_FIT", 10 * K)  # 10 columns at a time
        chunked = source_grid.fit_columns(weight, BLOCK, refit=False, block_offsets=offsets)
        monkeypatch.undo()
        for field in ("codes", "scales", "zero_points"):
            np.testing.assert_array_equal(getattr(chunked, field), getattr(whole, field))
        assert (chunked.on_grid, chunked.blocks) == (whole.on_grid, whole.blocks) == (N * K // BLOCK, (N + 7) * K // BLOCK)
    assert chunked.codes.shape[1] > K // BLOCK  # the offsets' blocks are there
