"""The builder's int4/int8, quantized node by node in parts (modelbuild/ml/builder.py), is exactly
the builder's own whole-graph quantization: same nodes, same tensors, bit for bit."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from modelbuild.ml.builder import run_builder

TIED = """
[target.tied-base]
pass = "random-init"
inputs = { corpus = "data/tokenizer_corpus.txt" }
params = { seed = 1, config = { model_type = "phi3", vocab_size = 512, hidden_size = 128, intermediate_size = 384, num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 4, max_position_embeddings = 512, original_max_position_embeddings = 512, tie_word_embeddings = true } }
"""


def _whole_graph(base, out, precision, options):
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    opts = parse_extra_options(None, str(base), str(out), precision, "cpu", str(out) + "-cache", options)
    create_model(None, str(base), str(out), precision, "cpu", str(out) + "-cache", **opts)
    return onnx.load(str(out / "model.onnx"))


def _nodes(model):
    return sorted((n.name, n.op_type, tuple(n.input), tuple(n.output),
                   repr(sorted((a.name, onnx.helper.get_attribute_value(a)) for a in n.attribute))) for n in model.graph.node)


@pytest.mark.parametrize("base_target, precision, algorithm", [
    ("tiny-base", "int4", "k_quant_mixed"),
    ("tiny-base", "int4", "rtn"),
    ("tiny-base", "int8", "default"),
    ("tied-base", "int4", "k_quant_mixed"),  # the LM head's int4 is also the embedding (GatherBlockQuantized)
])
def test_per_node_parts_give_the_builders_own_quantized_model(project, tmp_path, base_target, precision, algorithm):
    project.append("targets/tied.toml", TIED)
    project.doit(base_target)
    base = project.path(f"build/{base_target}")
    options = ["accuracy_level=4"]
    if precision == "int4":
        options += [f"algo_config={algorithm}", "block_size=32", "is_symmetric=true"]
    whole = _whole_graph(base, tmp_path / "whole", precision, options)
    calls = []
    (tmp_path / "parts").mkdir()
    # 64 output columns per part: every MatMul of this model (128..768 wide) but o_proj goes in parts
    run_builder(base, tmp_path / "parts", precision, "cpu", options, tmp_path, progress=lambda d, n: calls.append((d, n)),
                columns=64)
    parts = onnx.load(str(tmp_path / "parts" / "model.onnx"))

    quantized = [n for n in parts.graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")]
    assert quantized and calls[-1] == (len(calls), len(calls)) and len(calls) >= sum(n.op_type == "MatMulNBits" for n in quantized)
    assert _nodes(parts) == _nodes(whole)
    tensors = {t.name: numpy_helper.to_array(t) for t in whole.graph.initializer}
    got = {t.name: numpy_helper.to_array(t) for t in parts.graph.initializer}
    assert set(got) == set(tensors)
    differ = [name for name in tensors if tensors[name].dtype != got[name].dtype or not np.array_equal(tensors[name], got[name])]
    assert not differ, differ
    assert [o.name for o in parts.graph.output] == [o.name for o in whole.graph.output]
    assert [i.name for i in parts.graph.input] == [i.name for i in whole.graph.input]
    if base_target == "tied-base":
        assert any(n.op_type == "GatherBlockQuantized" for n in parts.graph.node)
