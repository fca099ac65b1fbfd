"""modelbuild/ml/lora_gemm.py on synthetic decoders: the 2-D rewrite keeps the function (batch and
sequence > 1, stacked and block-diagonal B), cuts the LoRA ops, keeps the graph's inputs, outputs
and LM head node, and leaves a graph with an op, operand or output it cannot vouch for alone. (Real builds with it:
tests/test_lora_graph.py.)"""

from __future__ import annotations

import numpy as np
import pytest

K, VOCAB = 32, 50


def _decoder(widths, ranks, tail_op="Relu"):
    """input_ids -> embedding -> one group of LoRA'd projections sharing that input (fused by
    fuse_lora) -> tail_op each -> Concat -> LM head -> logits."""
    from onnx import TensorProto, helper, numpy_helper

    from modelbuild.ml.lora_graph import fuse_lora

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gather", ["embed.weight", "input_ids"], ["x"], name="/model/embed_tokens/Gather")]
    inits = [numpy_helper.from_array(rng.standard_normal((VOCAB, K)).astype(np.float32), "embed.weight")]
    outs = []
    for i, (width, rank) in enumerate(zip(widths, ranks)):
        mod = f"/model/layers.0/mlp/{'gu'[i]}_proj"
        stem = mod.lstrip("/").replace("/", ".")
        for name, shape in ((f"{stem}.MatMul.weight", (K, width)), (f"{stem}.lora_A.MatMul.weight", (K, rank)),
                            (f"{stem}.lora_B.MatMul.weight", (rank, width))):
            inits.append(numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name))
        nodes += [
            helper.make_node("MatMul", ["x", f"{stem}.MatMul.weight"], [f"{mod}/MatMul/output_0"], name=f"{mod}/MatMul"),
            helper.make_node("MatMul", ["x", f"{stem}.lora_A.MatMul.weight"], [f"{mod}/lora_A/MatMul/output_0"], name=f"{mod}/lora_A/MatMul"),
            helper.make_node("MatMul", [f"{mod}/lora_A/MatMul/output_0", f"{stem}.lora_B.MatMul.weight"],
                             [f"{mod}/lora_B/MatMul/output_0"], name=f"{mod}/lora_B/MatMul"),
            helper.make_node("Add", [f"{mod}/MatMul/output_0", f"{mod}/lora_B/MatMul/output_0"], [f"{mod}/lora/Add/output_0"], name=f"{mod}/lora/Add"),
            helper.make_node(tail_op, [f"{mod}/lora/Add/output_0"], [f"y{i}"], name=f"{mod}/{tail_op}"),
        ]
        outs.append(f"y{i}")
    inits.append(numpy_helper.from_array(rng.standard_normal((sum(widths), VOCAB)).astype(np.float32), "lm_head.weight"))
    nodes += [helper.make_node("Concat", outs, ["h"], name="/model/Concat", axis=-1),
              helper.make_node("MatMul", ["h", "lm_head.weight"], ["logits"], name="/lm_head/MatMul")]
    graph = helper.make_graph(nodes, "decoder", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", VOCAB])], inits,
                              value_info=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", K])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    fuse_lora(model)
    return model


def _logits(model):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(1).integers(0, VOCAB, (2, 3), dtype=np.int64)
    return session.run(["logits"], {"input_ids": ids})[0]


@pytest.mark.parametrize("widths, ranks, b_before", [
    ((16, 16), (4, 4), [2, 4, 16]),  # stacked B: becomes block-diagonal, its Reshapes go
    ((16, 8), (4, 2), [6, 24]),  # block-diagonal B already
])
def test_the_2d_decoder_computes_the_same_logits_with_fewer_lora_ops(widths, ranks, b_before):
    from onnx import checker, numpy_helper

    from modelbuild.ml.lora_gemm import lora_as_gemm
    from modelbuild.ml.lora_graph import lora_op_count

    model = _decoder(widths, ranks)
    b_name = "model.layers.0.mlp.gu_proj.lora_B.MatMul.weight"
    b = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}[b_name]
    assert list(b.shape) == b_before
    expected, ops_before = _logits(model), lora_op_count(model)
    record = lora_as_gemm(model, numpy_helper.to_array)
    checker.check_model(model)
    assert record["gemms"] == 1 and "left_3d" not in record  # (4 nodes are added once: Shape, Concat, Flatten, the head's Reshape)
    assert lora_op_count(model) == ops_before - (3 if b.ndim == 3 else 1)  # the Add (and 2 Reshapes) gone
    got = _logits(model)
    assert got.shape == expected.shape == (2, 3, VOCAB)
    assert np.abs(got - expected).max() < 1e-4 * np.abs(expected).max()
    gemm = [n for n in model.graph.node if n.op_type == "Gemm"]
    assert [n.name for n in gemm] == ["/model/layers.0/mlp/gu_proj/lora_B/Gemm"]
    after = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}[b_name]
    assert after.shape == (sum(ranks), sum(widths))  # 2-D: stacked blocks on the diagonal
    r, w = ranks[0], widths[0]
    assert np.array_equal(after[:r, :w], b[0] if b.ndim == 3 else b[:r, :w]) and not after[:r, w:].any()
    assert not any(n.name.endswith(("/lora/Reshape_in", "/lora/Reshape_out")) for n in model.graph.node)
    head = next(n for n in model.graph.node if "logits" in n.output)
    assert head.name == "/lm_head/MatMul"  # the LM head still produces the logits (tie-embeddings finds it)
    assert [i.name for i in model.graph.input] == ["input_ids"] and [o.name for o in model.graph.output] == ["logits"]


def _hidden_output(model):
    from onnx import TensorProto, helper

    model.graph.output.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, ["b", "s", 24]))


def _rank2_constant(model):
    from onnx import numpy_helper

    from modelbuild.ml.graph import producers_and_consumers

    _, consumers = producers_and_consumers(model.graph)
    model.graph.initializer.append(numpy_helper.from_array(np.ones((1, 24), np.float32), "bias2d"))
    model.graph.node.append(_node("Add", ["h", "bias2d"], ["h_biased"]))
    consumers["h"][0].input[0] = "h_biased"


def _split_on_axis_0(model):
    split = next(n for n in model.graph.node if n.op_type == "Split")
    next(a for a in split.attribute if a.name == "axis").i = 0


def _node(op, inputs, outputs):
    from onnx import helper

    return helper.make_node(op, inputs, outputs, name=f"/extra/{op}")


@pytest.mark.parametrize("case, edit, tail_op, why", [
    ("softmax", None, "Softmax", "Softmax is not an op that works row by row"),
    ("hidden state as a graph output", _hidden_output, "Relu", "graph output h is a hidden state"),
    ("rank-2 constant", _rank2_constant, "Relu", "input bias2d is neither on the hidden path nor a rank <= 1 constant"),
    ("split on axis 0", _split_on_axis_0, "Relu", "Split is not an op that works row by row"),
])
def test_what_it_cannot_vouch_for_leaves_the_graph_alone(case, edit, tail_op, why):
    """All or nothing: an op, operand or output the 2-D graph would change -> the graph stays
    byte for byte, and the record says which node stopped it."""
    from onnx import numpy_helper

    from modelbuild.ml.lora_gemm import lora_as_gemm

    model = _decoder((8, 16), (4, 4), tail_op=tail_op)
    if edit is not None:
        edit(model)
    before = model.SerializeToString()
    record = lora_as_gemm(model, numpy_helper.to_array)
    assert set(record) == {"left_3d"} and why in record["left_3d"], (case, record)
    assert model.SerializeToString() == before
