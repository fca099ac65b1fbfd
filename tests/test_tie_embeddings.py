"""tie-embeddings on a tiny tied model: real doit runs, real onnxruntime and onnxruntime-genai.

The repo's tiny random Phi3 is not tied, so this module builds one that is (random-init with
``tie_word_embeddings = true``; vocab 512 with no Linear of 512 outputs, so the builder's LM-head
trap cannot fire), its fp32 genai bundle with a switchable LoRA adapter, the int4 RTN
quantize-onnx bundle of that (int4 MatMulNBits head, float ``Transpose -> Gather`` embedding),
and the tied bundle. Checked as a graph (float table gone, GatherBlockQuantized over the head's
int4 weight), on disk (smaller by the fp32 table), as a bundle (onnxruntime-genai loads and
answers, the adapter switches) and numerically.

Tolerances: the surgery must change nothing but the embedding values, so its logits equal
(<= 1e-5, float rounding; measured 0.0) those of the input bundle with its float table
overwritten by the head's dequantized int4 weight (recomputed here from the raw blocks, not by
the pass). Against the untouched input bundle the logits move by the embedding's own int4
error: on this random model ~0.09 relative (the int4 rows are ~0.09 off the float ones), far
below what the adapter moves them (> 0.3) or what unrelated logits give (~1.4).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from conftest import new_project, ort_logits

TABLE_BYTES = 512 * 128 * 4  # the tied fp32 table: vocab x hidden x 4 bytes
TEMPLATE = "<|user|>\n{prompt}<|end|>\n<|assistant|>\n{response}<|end|>"

TARGETS = f"""
[target.tied-base]
pass = "random-init"
inputs = {{ corpus = "data/tokenizer_corpus.txt" }}
params = {{ seed = 0, config = {{ model_type = "phi3", vocab_size = 512, hidden_size = 128, intermediate_size = 384, num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 4, max_position_embeddings = 512, original_max_position_embeddings = 512, tie_word_embeddings = true }} }}

[target.tied-adapter]
pass = "lora-finetune"
inputs = {{ base = ":tied-base", data = "data/travel_train.jsonl" }}
params = {{ template = "{TEMPLATE.encode('unicode_escape').decode()}", max_steps = 12, batch_size = 4, max_length = 96, learning_rate = 3e-3, rank = 4 }}

[target.tied-fp32]
pass = "genai-build"
inputs = {{ base = ":tied-base", adapters = {{ travel = ":tied-adapter" }} }}
params = {{ precision = "fp32" }}

[target.tied-rtn]
pass = "quantize-onnx"
inputs = {{ bundle = ":tied-fp32" }}
params = {{ algorithm = "rtn" }}

[target.tied-rtn-tied]
pass = "tie-embeddings"
inputs = {{ bundle = ":tied-rtn" }}

[target.tied-kq]
pass = "quantize-onnx"
inputs = {{ bundle = ":tied-fp32" }}
params = {{ algorithm = "k_quant" }}

[target.tied-kq-tied]
pass = "tie-embeddings"
inputs = {{ bundle = ":tied-kq" }}
"""

REFUSED = {
    # an untied model: the tiny-base of the repo, int4 RTN
    "untied": ("""
[target.untied-fp32]
pass = "genai-build"
inputs = { base = ":tiny-base" }
params = { precision = "fp32" }

[target.untied-rtn]
pass = "quantize-onnx"
inputs = { bundle = ":untied-fp32" }
params = { algorithm = "rtn" }

[target.refused]
pass = "tie-embeddings"
inputs = { bundle = ":untied-rtn" }
""", "inputs.bundle: not tied: the float embedding model.embed_tokens.weight differs from the LM head's dequantized 4-bit weight by "),
    # the tied bundle again: its embedding already reads the head's int4 weight
    "already-tied": ("""
[target.refused]
pass = "tie-embeddings"
inputs = { bundle = ":tied-rtn-tied" }
""", "inputs.bundle: already tied: the embedding /model/embed_tokens/GatherBlockQuantized is a GatherBlockQuantized over the LM head's weight"),
    # an fp32 bundle: the head is a float MatMul
    "float-head": ("""
[target.refused]
pass = "tie-embeddings"
inputs = { bundle = ":tied-fp32" }
""", "inputs.bundle: the LM head /lm_head/MatMul is a MatMul, not an int4 MatMulNBits"),
}


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    project = new_project(tmp_path_factory.mktemp("tie") / "project")
    project.path("targets/tied.toml").write_text(TARGETS)
    result = project.doit("tied-rtn-tied", "tied-kq-tied")
    assert {"tied-rtn-tied", "tied-kq-tied"} <= result.executed
    return project


def _model(bundle):
    import onnx

    return onnx.load(str(bundle / "model.onnx"), load_external_data=False)


def _model_bytes(bundle) -> int:
    return sum((bundle / name).stat().st_size for name in ("model.onnx", "model.onnx.data"))


def _record(bundle) -> dict:
    return json.loads((bundle / "tie.json").read_text())


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _eval_ids(bundle, count=3):
    """Held-out travel records, chat-rendered as generation sees them."""
    import onnxruntime_genai as og

    tokenizer = og.Tokenizer(og.Config(str(bundle)))
    lines = [json.loads(line) for line in (bundle.parents[1] / "targets/data/travel_eval.jsonl").read_text().splitlines() if line.strip()]
    out = []
    for record in lines[:count]:
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
        text = tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=False)
        out.append(np.asarray(tokenizer.encode(text), dtype=np.int64)[None, :96])
    return out


def _dequantized_head(bundle):
    """The int4 LM head's weight [vocab, hidden], unpacked here from its MatMulNBits blocks."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(bundle / "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    head = next(n for n in model.graph.node if "logits" in n.output)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in head.attribute}
    n, k, block = attrs["N"], attrs["K"], attrs["block_size"]
    packed = numpy_helper.to_array(inits[head.input[1]]).reshape(n, -1)
    codes = np.stack([packed & 15, packed >> 4], axis=-1).reshape(n, -1, block).astype(np.int32)
    scales = numpy_helper.to_array(inits[head.input[2]]).reshape(n, -1)
    zeros = np.full(scales.shape, 8, dtype=np.int32)
    if len(head.input) > 3 and head.input[3]:
        zp = numpy_helper.to_array(inits[head.input[3]]).reshape(n, -1)
        zeros = np.stack([zp & 15, zp >> 4], axis=-1).reshape(n, -1)[:, : scales.shape[1]].astype(np.int32)
    return ((codes - zeros[:, :, None]).astype(np.float32) * scales[:, :, None]).reshape(n, -1)[:, :k]


def _reference_bundle(source, tmp_path):
    """The input bundle with its float table overwritten by the head's dequantized int4 weight."""
    import shutil

    import onnx
    from onnx import numpy_helper

    folder = tmp_path / "reference"
    shutil.copytree(source, folder)
    model = onnx.load(str(folder / "model.onnx"))
    rows = _dequantized_head(source)
    table = next(i for i in model.graph.initializer if i.name == "lm_head.MatMul.weight")
    assert tuple(table.dims) == (128, 512)  # [hidden, vocab], read through Transpose by the Gather
    table.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(rows.T), table.name))
    (folder / "model.onnx.data").unlink()
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    return folder


@pytest.mark.parametrize("name", ["tied-rtn", "tied-kq"])
def test_float_table_is_gone_and_the_lookup_reads_the_int4_head(tied, name):
    import onnx

    before, after = _model(tied.path(f"build/{name}")), _model(tied.path(f"build/{name}-tied"))
    floats = lambda m: {i.name: tuple(i.dims) for i in m.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}  # noqa: E731
    assert floats(before)["lm_head.MatMul.weight"] == (128, 512)
    assert not [dims for dims in floats(after).values() if sorted(dims) == [128, 512]]  # no float table left
    nodes = {n.name: n for n in after.graph.node}
    head = next(n for n in after.graph.node if "logits" in n.output)
    assert head.op_type == "MatMulNBits" and list(head.input) == list(next(n for n in before.graph.node if "logits" in n.output).input)
    lookups = [n for n in after.graph.node if "input_ids" in n.input]
    assert [n.op_type for n in lookups] == ["GatherBlockQuantized"] and lookups[0].domain == "com.microsoft"
    gbq = lookups[0]
    reshape = next(n for n in after.graph.node if gbq.input[0] in n.output)
    assert reshape.op_type == "Reshape" and reshape.input[0] == head.input[1]  # the head's own int4 blocks
    assert gbq.input[2] == head.input[2] and list(gbq.input[3:]) == list(head.input[3:4])  # its scales (and zero points)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gbq.attribute}
    assert attrs == {"bits": 4, "block_size": 32, "gather_axis": 0, "quantize_axis": 1}
    assert gbq.output[0] == "/model/embed_tokens/Gather/output_0"  # consumers untouched
    assert "/model/embed_tokens/Transpose" not in nodes and "/model/embed_tokens/Gather" not in nodes
    # graph inputs (LoRA weights included) are exactly the input bundle's
    assert [i.SerializeToString() for i in after.graph.input] == [i.SerializeToString() for i in before.graph.input]


@pytest.mark.parametrize("name", ["tied-rtn", "tied-kq"])
def test_model_files_shrink_by_the_fp32_table(tied, name):
    before, after = _model_bytes(tied.path(f"build/{name}")), _model_bytes(tied.path(f"build/{name}-tied"))
    saved = before - after
    assert TABLE_BYTES - 1024 < saved <= TABLE_BYTES, saved  # the table, less a few new node/const bytes
    record = _record(tied.path(f"build/{name}-tied"))
    assert record["model_bytes"] == {"before": before, "after": after, "saved": saved, "ratio": round(after / before, 4)}
    assert record["initializer_removed"] == {"name": "lm_head.MatMul.weight", "shape": [128, 512], "bytes": TABLE_BYTES}


def test_bundle_loads_answers_and_the_adapter_switches(tied):
    from modelbuild.ml.genai import Chat

    bundle = tied.path("build/tied-rtn-tied")
    chat = Chat(bundle)
    assert chat.adapter_names == ["travel"]
    base = chat.generate("What should I see in Chicago?", None, 12)
    tuned = chat.generate("What should I see in Chicago?", "travel", 12)
    assert len(base) == 12 and len(tuned) == 12
    assert _record(bundle)["verified_tokens"] == {"(none)": 8, "travel": 8}
    source = tied.path("build/tied-rtn")
    for name in ["genai_config.json", "tokenizer.json", "chat_template.jinja", "adapters/travel.onnx_adapter", "quantization.json"]:
        assert (bundle / name).read_bytes() == (source / name).read_bytes(), name


@pytest.mark.parametrize("name", ["tied-rtn", "tied-kq"])
def test_logits_equal_the_input_with_an_int4_embedding_and_move_only_by_its_rounding(tied, name, tmp_path):
    source, bundle = tied.path(f"build/{name}"), tied.path(f"build/{name}-tied")
    reference = _reference_bundle(source, tmp_path)
    for ids in _eval_ids(source):
        for adapter in (None, "adapters/travel.onnx_adapter"):
            tied_logits = ort_logits(bundle, ids, bundle / adapter if adapter else None)
            expected = ort_logits(reference, ids, reference / adapter if adapter else None)
            assert np.max(np.abs(tied_logits - expected)) <= 1e-5  # float rounding at most
            original = ort_logits(source, ids, source / adapter if adapter else None)
            assert _rel(tied_logits, original) < 0.2  # the int4 embedding's own rounding
            assert np.mean(tied_logits.argmax(-1) == original.argmax(-1)) >= 0.8
        base, tuned = ort_logits(bundle, ids), ort_logits(bundle, ids, bundle / "adapters/travel.onnx_adapter")
        assert _rel(tuned, base) > 3 * _rel(base, ort_logits(source, ids))  # the adapter still moves them, far more
    record = _record(bundle)
    assert set(record["logits"]) == {"(none)", "travel"}
    assert all(v["vs_dequantized_reference_max_abs"] <= 1e-5 for v in record["logits"].values())
    assert 0.01 < record["embedding_vs_head_rel_error"] < 0.2


def test_rebuild_is_byte_identical(tied):
    bundle = tied.path("build/tied-rtn-tied")
    digests = lambda: {p.relative_to(bundle).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
                       for p in sorted(bundle.rglob("*")) if p.is_file() and ".modelbuild" not in p.parts}
    first = digests()
    tied.doit("forget", "tied-rtn-tied")
    result = tied.doit("tied-rtn-tied", env={"MODELBUILD_FORCE": "1"})
    assert result.executed == {"tied-rtn-tied"}
    assert json.loads((bundle / ".modelbuild/stamp.json").read_text())["origin"] == "built"
    assert digests() == first


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_in_one_line(tied, case):
    text, message = REFUSED[case]
    result = tied.doit_with("targets/refused.toml", text, "refused")
    assert result.returncode != 0
    line = next(line for line in result.out.splitlines() if "target 'refused'" in line)
    assert line.startswith("modelbuild: targets/refused.toml: target 'refused': ") and message in line, result.out[-2000:]
    assert "Traceback" not in result.out
    assert not tied.path("build/refused").exists()
