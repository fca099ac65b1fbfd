"""graph-surgery on the tiny model's graphs, built by real doit runs and checked here with
onnxruntime directly (the pass's own check aside): each surgeon's change is really in the graph,
and the logits are what the surgeon promises, at a batch and lengths the pass never probed.

- SimplifiedLayerNormToL2Norm on the fp32 genai bundle: no (Skip)SimplifiedLayerNormalization
  left, one LpNormalization per norm; logits equal (<= 1e-5) those of the input bundle with its
  epsilons set to 0 here (an L2 norm has none), and differ from the untouched input (the
  epsilon's share, ~1e-2 on this random model) by more than 1e-4: the rewrite is real.
- AttentionMaskToSequenceLengths: attention_mask gone, past_seq_len/total_seq_len int32 inputs;
  the same logits as the input fed the equivalent all-ones mask.
- RemoveRopeMultiCache on a LongRoPE tiny Phi3 (original context 256): no If left; with the
  small cache the logits equal the input's below 256 tokens and the graph runs no further (its
  cache has 256 rows); with use_large_cache they equal the input's past 256 and differ below it
  (where the input took the small cache).
- ReplaceAttentionMaskValue on onnx-export: the causal mask's float32-min constant is -1e4 now;
  logits equal, padded batch included.
- RenameOutputDims: the logits' dimension is renamed in the saved graph.
- Refusals: surgeons that cannot apply and unknown or missing options at load (exit 2); a step
  that matches nothing and AttentionMaskToSequenceLengths before RemoveRopeMultiCache when the
  graph is read (the build fails, exit 1): one line each, nothing built.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import new_project

LONG_FACTORS = "[" + ", ".join(["1.0"] * 16) + "]"
TARGETS = f"""
[target.gs-fp32]
pass = "genai-build"
inputs = {{ base = ":tiny-base" }}
params = {{ precision = "fp32" }}

[target.gs-long-base]
pass = "random-init"
inputs = {{ corpus = "data/tokenizer_corpus.txt" }}
params = {{ seed = 0, config = {{ model_type = "phi3", vocab_size = 512, hidden_size = 128, intermediate_size = 384, num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 4, max_position_embeddings = 1024, original_max_position_embeddings = 256, rope_scaling = {{ type = "longrope", short_factor = {LONG_FACTORS}, long_factor = {LONG_FACTORS.replace("1.0", "2.0")} }} }} }}

[target.gs-long-fp32]
pass = "genai-build"
inputs = {{ base = ":gs-long-base" }}
params = {{ precision = "fp32" }}

[target.gs-l2]
pass = "graph-surgery"
inputs = {{ model = ":gs-fp32" }}
params = {{ steps = [ {{ surgeon = "SimplifiedLayerNormToL2Norm" }}, {{ surgeon = "RenameOutputDims", output_idx = 0, dim_idx = 1, dim_name = "tokens" }} ] }}

[target.gs-seqlen]
pass = "graph-surgery"
inputs = {{ model = ":gs-fp32" }}
params = {{ steps = [ {{ surgeon = "AttentionMaskToSequenceLengths" }} ] }}

[target.gs-rope-small]
pass = "graph-surgery"
inputs = {{ model = ":gs-long-fp32" }}
params = {{ steps = [ {{ surgeon = "RemoveRopeMultiCache" }} ] }}

[target.gs-rope-large]
pass = "graph-surgery"
inputs = {{ model = ":gs-long-fp32" }}
params = {{ steps = [ {{ surgeon = "removeropemulticache", use_large_cache = true }} ] }}

[target.gs-mask]
pass = "graph-surgery"
inputs = {{ model = ":tiny-onnx-fp32" }}
params = {{ steps = [ {{ surgeon = "ReplaceAttentionMaskValue" }} ] }}
"""
BUILT = ["gs-l2", "gs-seqlen", "gs-rope-small", "gs-rope-large", "gs-mask"]
RNG = np.random.default_rng(7)
SHORT = RNG.integers(5, 500, size=(1, 23)).astype(np.int64)
LONG = RNG.integers(5, 500, size=(1, 300)).astype(np.int64)  # past the LongRoPE model's 256


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("graph-surgery")
    project = new_project(root / "project")
    project.path("targets/graph_surgery.toml").write_text(TARGETS)
    result = project.doit(*BUILT)
    assert set(BUILT) <= result.executed
    return project


def folder(project, target):
    return project.path(f"build/{target}")


def load(project, target):
    return onnx.load(str(folder(project, target) / "model.onnx"))


def bundle_logits(path, ids, lengths=False):
    """Logits of a decoder (file path) for one whole sequence with an empty KV cache, fed the
    mask or, with ``lengths``, the equivalent past_seq_len / total_seq_len."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids}
    if lengths:
        feeds["past_seq_len"] = np.full((ids.shape[0], 1), ids.shape[1] - 1, dtype=np.int32)
        feeds["total_seq_len"] = np.array(ids.shape[1], dtype=np.int32)
    else:
        feeds["attention_mask"] = np.ones_like(ids)
    for value in session.get_inputs():
        if value.name.startswith("past_key_values."):
            feeds[value.name] = np.zeros((ids.shape[0], 4, 0, 32), dtype=np.float32)
    return session.run(["logits"], feeds)[0].astype(np.float64)


def ops(model):
    return [node.op_type for node in model.graph.node]


def test_l2norm_replaces_every_rmsnorm_and_equals_the_input_without_epsilon(built, tmp_path):
    model = load(built, "gs-l2")
    assert "SimplifiedLayerNormalization" not in ops(model) and "SkipSimplifiedLayerNormalization" not in ops(model)
    source = load(built, "gs-fp32")
    norms = sum(op in ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization") for op in ops(source))
    assert norms == 5 and ops(model).count("LpNormalization") == norms
    for node in source.graph.node:  # the reference, made here: the input with epsilon 0
        if node.op_type.endswith("SimplifiedLayerNormalization"):
            next(a for a in node.attribute if a.name == "epsilon").f = 0.0
    onnx.save_model(source, str(tmp_path / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    got = bundle_logits(folder(built, "gs-l2") / "model.onnx", SHORT)
    no_epsilon = bundle_logits(tmp_path / "model.onnx", SHORT)
    original = bundle_logits(folder(built, "gs-fp32") / "model.onnx", SHORT)
    assert np.abs(got - no_epsilon).max() <= 1e-5
    assert np.abs(got - original).max() > 1e-4  # the epsilon really went
    record = json.loads((folder(built, "gs-l2") / "graph_surgery.json").read_text())
    assert record["steps"][0]["replaced_nodes"] == norms and record["generated_tokens"]["(none)"] > 0


def test_rename_output_dims_renames_the_saved_dimension(built):
    dims = load(built, "gs-l2").graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch_size", "tokens", 512]


def test_sequence_lengths_replace_the_mask_with_the_same_logits(built):
    model = load(built, "gs-seqlen")
    inputs = {value.name: value.type.tensor_type.elem_type for value in model.graph.input}
    assert "attention_mask" not in inputs
    assert inputs["past_seq_len"] == inputs["total_seq_len"] == onnx.TensorProto.INT32
    assert not any("attn_mask" in node.name for node in model.graph.node)
    got = bundle_logits(folder(built, "gs-seqlen") / "model.onnx", SHORT, lengths=True)
    assert np.abs(got - bundle_logits(folder(built, "gs-fp32") / "model.onnx", SHORT)).max() <= 1e-6
    declared = json.loads((folder(built, "gs-seqlen") / "genai_config.json").read_text())["model"]["decoder"]["inputs"]
    assert "attention_mask" not in declared and declared["total_sequence_length"] == "total_seq_len"


def test_the_small_rope_cache_equals_the_input_within_the_original_context(built):
    model = load(built, "gs-rope-small")
    assert "If" not in ops(model) and "Greater" not in ops(model)
    before = folder(built, "gs-long-fp32") / "model.onnx"
    after = folder(built, "gs-rope-small") / "model.onnx"
    assert np.abs(bundle_logits(after, SHORT) - bundle_logits(before, SHORT)).max() <= 1e-6
    with pytest.raises(Exception, match="cos_cache dimension 0 shall not be less than total_sequence_length"):
        bundle_logits(after, LONG)  # the graph's context is the original 256 tokens now


def test_the_large_rope_cache_equals_the_input_past_the_original_context(built):
    model = load(built, "gs-rope-large")
    assert "If" not in ops(model) and "Greater" not in ops(model)
    before = folder(built, "gs-long-fp32") / "model.onnx"
    after = folder(built, "gs-rope-large") / "model.onnx"
    assert np.abs(bundle_logits(after, LONG) - bundle_logits(before, LONG)).max() <= 1e-6
    assert np.abs(bundle_logits(after, SHORT) - bundle_logits(before, SHORT)).max() > 1e-3  # short: the input took the small cache


def test_mask_value_is_replaced_and_logits_stay(built):
    model = load(built, "gs-mask")
    where = next(node for node in model.graph.node if node.op_type == "Where")
    values = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    assert float(values[where.input[2]]) == -1e4
    ids = RNG.integers(5, 500, size=(2, 19)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 12:] = 0  # a padded row: the mask is exercised
    outputs = []
    for target in ("tiny-onnx-fp32", "gs-mask"):
        session = ort.InferenceSession(str(folder(built, target) / "model.onnx"), providers=["CPUExecutionProvider"])
        outputs.append(session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0])
    assert np.abs(outputs[0][mask == 1] - outputs[1][mask == 1]).max() <= 1e-6


REFUSED = {
    "gemm": ('{ surgeon = "GemmToMatMulAdd" }', ":gs-fp32", "params.steps[0].surgeon: GemmToMatMulAdd: onnx-export and genai-build write Linear layers as MatMul"),
    "packed": ('{ surgeon = "PackedAttentionToLoopMHA" }', ":gs-fp32", "params.steps[0].surgeon: PackedAttentionToLoopMHA: it expands custom::PackedAttention"),
    "option": ('{ surgeon = "RemoveRopeMultiCache", use_big_cache = true }', ":gs-fp32", "params.steps[0].use_big_cache: RemoveRopeMultiCache has no option 'use_big_cache'"),
    "required": ('{ surgeon = "RenameOutputDims", output_idx = 0 }', ":gs-fp32", "params.steps[0].dim_idx: RenameOutputDims needs it"),
    # found when the pass reads the graph: the build fails (doit exits 1)
    "nothing": ('{ surgeon = "SimplifiedLayerNormToL2Norm" }', ":tiny-onnx-fp32", "params.steps[0]: SimplifiedLayerNormToL2Norm found nothing to change"),
    "order": ('{ surgeon = "AttentionMaskToSequenceLengths" }', ":gs-long-fp32", "run RemoveRopeMultiCache first"),
}
AT_BUILD = {"nothing", "order"}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_in_one_line(built, case):
    step, source, message = REFUSED[case]
    text = f'[target.gs-refused]\npass = "graph-surgery"\ninputs = {{ model = "{source}" }}\nparams = {{ steps = [ {step} ] }}\n'
    result = built.doit_with("targets/refused.toml", text, "gs-refused")
    assert result.returncode == (1 if case in AT_BUILD else 2), result.out[-2000:]
    assert "target 'gs-refused'" in result.out and message in result.out, result.out[-2000:]
    assert "Traceback" not in result.out
    assert not built.path("build/gs-refused").exists()
