"""Rewriting a decoder without loading its weights: load_decoder_lazily + save_decoder_streaming
(modelbuild/ml/bundle.py), what genai-build's LoRA fusion and source-grid fit run on."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from modelbuild.ml.bundle import load_decoder_lazily, save_decoder, save_decoder_streaming


def _decoder(folder):
    """A MatMul chain with two large weights, one small one and an fp16 one, saved the builder's way."""
    rng = np.random.default_rng(0)
    weights = {"w1": rng.normal(size=(64, 32)).astype(np.float32), "w2": rng.normal(size=(32, 16)).astype(np.float32),
               "small": rng.normal(size=(16, 2)).astype(np.float32), "half": rng.normal(size=(16, 64)).astype(np.float16)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"]),
             helper.make_node("MatMul", ["y", "small"], ["z"]), helper.make_node("Cast", ["half"], ["half32"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["y", "half32"], ["u"])]
    graph = helper.make_graph(nodes, "decoder", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("z", "u")],
                              [numpy_helper.from_array(value, name) for name, value in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    save_decoder(model, folder / "model.onnx", "model.onnx.data")
    return weights


def test_an_unchanged_decoder_is_written_back_byte_for_byte(tmp_path):
    _decoder(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in ("model.onnx", "model.onnx.data")}
    model, read = load_decoder_lazily(tmp_path / "model.onnx")
    assert all(isinstance(read(init), np.memmap) for init in model.graph.initializer if init.name != "small")
    save_decoder_streaming(model, tmp_path / "model.onnx", read)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]  # no .partial left


def test_a_rewrite_keeps_mapped_weights_and_writes_new_ones(tmp_path):
    weights = _decoder(tmp_path)
    model, read = load_decoder_lazily(tmp_path / "model.onnx")
    inits = {init.name: init for init in model.graph.initializer}
    packed = np.concatenate([read(inits["w2"]), read(inits["w2"])], axis=1)  # a new weight made from a mapped one
    model.graph.initializer.append(numpy_helper.from_array(packed, "packed"))
    inits["w1"].CopyFrom(numpy_helper.from_array(np.zeros_like(weights["w1"]), "w1"))  # one replaced in memory
    save_decoder_streaming(model, tmp_path / "model.onnx", read)
    del model, read, inits

    loaded = onnx.load(str(tmp_path / "model.onnx"))
    got = {init.name: numpy_helper.to_array(init) for init in loaded.graph.initializer}
    np.testing.assert_array_equal(got["w1"], 0)
    np.testing.assert_array_equal(got["packed"], np.concatenate([weights["w2"]] * 2, axis=1))
    for name in ("w2", "small", "half"):
        np.testing.assert_array_equal(got[name], weights[name])
    locations = {init.name: init.data_location for init in onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph.initializer}
    assert locations["small"] == TensorProto.DEFAULT  # under 1 KiB: inline, as save_decoder leaves it
    assert {locations[name] for name in ("w1", "w2", "half", "packed")} == {TensorProto.EXTERNAL}
