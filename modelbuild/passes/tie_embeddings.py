"""tie-embeddings: share a tied model's int4 LM head with its embedding lookup (Olive's
``GraphSurgeries`` surgeon ``TieWordEmbeddings``, for a bundle whose embedding is still float).
Longer than most passes: finding and rewiring the nodes is half of it, and the three proofs the
output must pass before it counts (every embedding row exact, the head's rows, logits with and
without each adapter) stay next to the surgery they check.

A model with tied word embeddings (config ``tie_word_embeddings``, e.g. SmolLM2) uses one
matrix twice: as the embedding table (``Gather``) and, transposed, as the LM head. Quantizing
only MatMuls (``quantize-onnx``, or the model builder with the embedding excluded) makes the
head a ``MatMulNBits`` over int4 blocks while the ``Gather`` keeps the float matrix (in
quantize-onnx bundles through ``Transpose(lm_head weight)``): the bundle stores the matrix twice,
once in fp32 (vocab x hidden x 4 bytes: 113 MB for SmolLM2).

The surgery replaces the float lookup with ``com.microsoft.GatherBlockQuantized`` reading the
head's own int4 (or int8) weight, scales and zero points, and drops the float copy: the nodes
onnxruntime-genai's builder emits for int4 tied models (modelbuild/ml/tied_lookup.py, shared
with the source_grid quantizer).

What changes: the head reads the same initializers as before, so its output is unchanged; the
embedding rows become the head's dequantized int4 rows instead of the float ones. Checked when
the pass runs, not assumed:

- the float embedding must equal the head's dequantized weight up to int4 rounding
  (``max_tie_error``, relative Frobenius norm): that is what "tied" means here; bundles carry no
  HF config.json, so an untied model is recognised by its numbers (~1.4 for independent rows);
- the new lookup, run by onnxruntime over every vocabulary id, returns exactly the numpy
  dequantization of the head's blocks; and the head (MatMulNBits over an identity) uses those
  same values (up to its accumulation rounding);
- logits on probe sequences equal, within ``logits_tolerance``, those of the input bundle with
  its float embedding overwritten by that dequantization (no adapter and each adapter): the
  surgery changes nothing else. The change against the untouched input bundle (the price of
  the int4 embedding) is measured and recorded, and the bundle's held-out perplexity is for an
  ``evaluate`` target to measure;
- the bundle loads in onnxruntime-genai and generates with no adapter and with each adapter;
  the graph inputs (and so the switchable LoRA weights) are unchanged.

Refused with one line: a head that is not MatMulNBits (float, fp32 bundles), float zero points
(HQQ: GatherBlockQuantized takes uint8 zero points only) or act-order ``g_idx``; an embedding that
is already a GatherBlockQuantized (already tied, e.g. the builder's int4 bundles); a float
embedding that does not match the head (an untied model).

Deterministic: the same bundle and params give byte-identical output. ``tie.json`` records what
was done, the sizes and the measured differences.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from modelbuild import UserError
from modelbuild.core import settings
from modelbuild.ml.genai import bundle_adapters, prefill_feeder, verify_bundle
from modelbuild.ml.bundle import copy_rest, decoder_of, external_data_files, files_size, save_decoder
from modelbuild.ml.nbits import dequantize_matmul_nbits
from modelbuild.ml.tied_lookup import lookup_nodes
from modelbuild.passdef import Input, PassDef, param

RECORD = "tie.json"
SUPPORTED_BITS = (4, 8)
PROBE_LENGTH = 32


@dataclass(frozen=True)
class Params:
    max_tie_error: float = param(
        0.5, "refuse unless the float embedding equals the head's dequantized weight within this relative error "
             "(int4 rounding leaves ~0.1; independent, untied rows give ~1.4)",
    )
    logits_tolerance: float = param(
        1e-4, "max |logit difference| allowed between the tied bundle and the input bundle with its embedding "
              "set to the head's dequantized weight (float rounding: the surgery must change nothing else)",
    )
    check_prompt: str = param("Hello! Who are you?", "prompt generated from (and probed), with and without each adapter, to verify the bundle")


# --- reading the bundle -------------------------------------------------------------------------

@dataclass
class Surgery:
    gather: object  # the float Gather NodeProto
    gather_index: int
    transpose: object | None  # Transpose feeding it (quantize-onnx bundles), else None
    table: str  # float initializer the lookup reads
    transposed: bool  # table is [hidden, vocab] (the head's MatMul layout) rather than [vocab, hidden]
    head: object  # MatMulNBits NodeProto
    bits: int
    block_size: int
    k: int  # hidden size (head input features)
    n: int  # vocab size (head output features)


def _find(model, decoder: dict) -> Surgery:
    """The float embedding lookup and the MatMulNBits LM head, or a one-line refusal."""
    import onnx

    graph = model.graph
    names = decoder.get("inputs", {})
    ids_name = names.get("input_ids", "input_ids")
    logits_name = decoder.get("outputs", {}).get("logits", "logits")
    initializers = {init.name: init for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    if ids_name not in {i.name for i in graph.input}:
        raise UserError(f"inputs.bundle: the decoder has no '{ids_name}' input (an embeddings-input model has no lookup to tie)")

    head = producers.get(logits_name)
    if head is None:
        raise UserError(f"inputs.bundle: no node produces '{logits_name}'")
    if not (head.op_type == "MatMulNBits" and head.domain == "com.microsoft"):
        raise UserError(
            f"inputs.bundle: the LM head {head.name} is a {head.op_type}, not an int4 MatMulNBits: "
            "tie an int4 bundle (quantize-onnx, or genai-build int4)"
        )
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in head.attribute}
    bits, block_size, k, n = attrs.get("bits", 4), attrs["block_size"], attrs["K"], attrs["N"]
    if bits not in SUPPORTED_BITS:
        raise UserError(f"inputs.bundle: the LM head {head.name} has {bits}-bit weights; GatherBlockQuantized takes {' or '.join(map(str, SUPPORTED_BITS))}")
    inputs = list(head.input) + [""] * (6 - len(head.input))
    for name in inputs[1:3]:
        if name not in initializers:
            raise UserError(f"inputs.bundle: the LM head's weight/scales {name or '(none)'} is not a constant initializer")
    if inputs[3]:
        zp = initializers.get(inputs[3])
        if zp is None:
            raise UserError(f"inputs.bundle: the LM head's zero points {inputs[3]} are not a constant initializer")
        if zp.data_type != onnx.TensorProto.UINT8:
            kind = onnx.helper.tensor_dtype_to_np_dtype(zp.data_type).name
            raise UserError(f"inputs.bundle: the LM head {head.name} has {kind} zero points (hqq?); GatherBlockQuantized takes uint8 zero points only")
    if inputs[4]:
        raise UserError(f"inputs.bundle: the LM head {head.name} has a g_idx (act-order); GatherBlockQuantized cannot follow it")
    if initializers[inputs[2]].data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
        raise UserError(f"inputs.bundle: the LM head's scales {inputs[2]} are neither float32 nor float16")

    lookups = [(i, node) for i, node in enumerate(graph.node) if ids_name in list(node.input)]
    quantized = [node for _, node in lookups if node.op_type == "GatherBlockQuantized"]
    if quantized:
        node = quantized[0]
        source = producers.get(node.input[0])
        data = source.input[0] if source is not None and source.op_type == "Reshape" else node.input[0]
        if data == head.input[1]:
            raise UserError(f"inputs.bundle: already tied: the embedding {node.name} is a GatherBlockQuantized over the LM head's weight {data}")
        raise UserError(f"inputs.bundle: the embedding {node.name} is already quantized (GatherBlockQuantized over {data}), not a float Gather")
    gathers = [(i, node) for i, node in lookups if node.op_type == "Gather" and node.input[1] == ids_name]
    if len(gathers) != 1:
        found = ", ".join(f"{node.op_type} {node.name}" for _, node in lookups) or "nothing"
        raise UserError(f"inputs.bundle: expected one float Gather embedding reading '{ids_name}', found {found}")
    index, gather = gathers[0]
    transpose, table, transposed = None, gather.input[0], False
    if table not in initializers:
        source = producers.get(table)
        perm = {a.name: list(onnx.helper.get_attribute_value(a)) for a in source.attribute}.get("perm") if source is not None else None
        if source is None or source.op_type != "Transpose" or source.input[0] not in initializers or perm != [1, 0]:
            raise UserError(f"inputs.bundle: the embedding {gather.name} reads {table}, neither a float initializer nor its Transpose")
        transpose, table, transposed = source, source.input[0], True
    init = initializers[table]
    if init.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
        kind = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).name
        raise UserError(f"inputs.bundle: the embedding table {table} is {kind}, not float")
    shape = tuple(init.dims)[::-1] if transposed else tuple(init.dims)
    if shape != (n, k):
        raise UserError(f"inputs.bundle: not tied: the embedding table {table} is {list(shape)} (vocab x hidden), the LM head {head.name} is [{n}, {k}]")
    return Surgery(gather, index, transpose, table, transposed, head, bits, block_size, k, n)


# --- int4 / int8 blocks -------------------------------------------------------------------------

def _head_arrays(model, s: Surgery) -> tuple:
    """(weight [N, blocks, blob] uint8, scales [N, blocks], zero points [N, packed] uint8 or None)."""
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    blocks = -(-s.k // s.block_size)
    weight = numpy_helper.to_array(initializers[s.head.input[1]])
    weight = weight.reshape(s.n, blocks, -1)
    scales = numpy_helper.to_array(initializers[s.head.input[2]]).reshape(s.n, blocks)
    zero_points = None
    if len(s.head.input) > 3 and s.head.input[3]:
        per_byte = 8 // s.bits
        zero_points = numpy_helper.to_array(initializers[s.head.input[3]]).reshape(s.n, -(-blocks // per_byte))
    return weight, scales, zero_points


# --- the surgery --------------------------------------------------------------------------------

def _tie(model, s: Surgery) -> dict:
    """Rewrite ``model`` in place; return what was removed."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    scales_shape = tuple(initializers[s.head.input[2]].dims)
    zp_shape = tuple(initializers[s.head.input[3]].dims) if len(s.head.input) > 3 and s.head.input[3] else None
    prefix = s.gather.name.rsplit("/", 1)[0] if "/" in s.gather.name else s.gather.name
    nodes, inits = lookup_nodes(s.head, s.gather.input[1], prefix, s.gather.output[0], scales_shape, zp_shape)
    taken = {n.name for n in graph.node} | set(initializers)
    clash = [n.name for n in nodes if n.name in taken] + [i.name for i in inits if i.name in taken]
    if clash:
        raise UserError(f"inputs.bundle: the graph already has a node or initializer named {clash[0]}")
    index = s.gather_index
    del graph.node[index]
    for offset, node in enumerate(nodes):  # same place: the graph stays topologically sorted
        graph.node.insert(index + offset, node)
    removed_nodes = [s.gather.name]
    readers = lambda name: [n for n in graph.node if name in n.input]  # noqa: E731
    if s.transpose is not None and not readers(s.transpose.output[0]):
        graph.node.remove(s.transpose)
        removed_nodes.append(s.transpose.name)
        for value in list(graph.value_info):
            if value.name == s.transpose.output[0]:
                graph.value_info.remove(value)
    if readers(s.table):
        raise UserError(f"inputs.bundle: the float table {s.table} has other readers; dropping it would break them")
    table = initializers[s.table]
    table_bytes = len(table.raw_data) or sum(1 for _ in table.float_data) * 4
    graph.initializer.remove(table)
    graph.initializer.extend(inits)
    return {"nodes_removed": removed_nodes, "nodes_added": [n.name for n in nodes],
            "initializer_removed": {"name": s.table, "shape": list(table.dims), "bytes": table_bytes}}


# --- checks -------------------------------------------------------------------------------------

def _session(model_or_path, threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    source = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _check_lookup(model, s: Surgery, expected, threads) -> float:
    """Run the new lookup over every vocabulary id and the head over an identity; return the
    head's largest difference from the lookup's rows. The lookup must equal ``expected`` exactly."""
    import numpy as np
    import onnx
    from onnx import helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    needed, todo = [], [s.gather.output[0]]
    while todo:
        node = producers.get(todo.pop())
        if node is None or node in needed:
            continue
        needed.append(node)
        todo.extend(node.input)
    needed.reverse()
    ids = s.gather.input[1]
    used = {name for node in needed for name in node.input}
    head_attrs = {a.name: a for a in s.head.attribute}
    eye_head = helper.make_node("MatMulNBits", ["eye", *s.head.input[1:]], ["head_rows"], domain="com.microsoft",
                                **{k: helper.get_attribute_value(v) for k, v in head_attrs.items()})
    used |= set(s.head.input[1:])
    dtype = helper.tensor_dtype_to_np_dtype(initializers[s.head.input[2]].data_type)
    elem = initializers[s.head.input[2]].data_type
    mini = helper.make_graph(
        [*needed, eye_head], "tie-check",
        [helper.make_tensor_value_info(ids, onnx.TensorProto.INT64, [1, s.n]),
         helper.make_tensor_value_info("eye", elem, [s.k, s.k])],
        [helper.make_tensor_value_info(s.gather.output[0], elem, None),
         helper.make_tensor_value_info("head_rows", elem, None)],
        [initializers[name] for name in sorted(used) if name in initializers],
    )
    check = helper.make_model(mini, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    rows, head = _session(check, threads).run(None, {ids: np.arange(s.n, dtype=np.int64)[None, :],
                                                     "eye": np.eye(s.k, dtype=dtype)})
    if not np.array_equal(rows[0], expected):
        worst = float(np.max(np.abs(rows[0].astype(np.float64) - expected)))
        raise UserError(f"the GatherBlockQuantized lookup differs from the head's dequantized int4 rows (max {worst:.3g}); not writing it")
    return float(np.max(np.abs(head.T.astype(np.float64) - expected)))


def _probe_ids(bundle: Path, prompt: str, vocab: int) -> list[list[int]]:
    """The check prompt, chat-rendered as generation sees it, and ids spread over the vocabulary."""
    import onnxruntime_genai as og

    tokenizer = og.Tokenizer(og.Config(str(bundle)))
    try:
        text = tokenizer.apply_chat_template(json.dumps([{"role": "user", "content": prompt}]), add_generation_prompt=True)
    except Exception:  # no chat template: the plain prompt
        text = prompt
    rendered = [int(t) for t in tokenizer.encode(text)]
    spread = [(i * vocab) // PROBE_LENGTH + (i % 7) for i in range(PROBE_LENGTH)]
    return [ids for ids in (rendered, [min(i, vocab - 1) for i in spread]) if ids]


def _logits(session, feeds, adapter: Path | None, name: str):
    import numpy as np
    import onnxruntime as ort

    options = ort.RunOptions()
    if adapter is not None:
        lora = ort.LoraAdapter()
        lora.Load(str(adapter))
        options.add_active_adapter(lora)
    return session.run([name], feeds, options)[0].astype(np.float64)


def _compare_logits(tied, reference, original, feeder, probes, adapters: dict, logits_name: str) -> dict:
    """Per adapter (None first): tied vs reference (must be float rounding) and vs the input bundle."""
    import numpy as np

    out = {}
    for name, adapter in [("(none)", None), *sorted(adapters.items())]:
        worst_ref, worst, num, den, agree, total = 0.0, 0.0, 0.0, 0.0, 0, 0
        for ids in probes:
            feeds = feeder(ids)
            a = _logits(tied, feeds, adapter, logits_name)
            worst_ref = max(worst_ref, float(np.max(np.abs(a - _logits(reference, feeds, adapter, logits_name)))))
            b = _logits(original, feeds, adapter, logits_name)
            worst = max(worst, float(np.max(np.abs(a - b))))
            num, den = num + float(np.sum((a - b) ** 2)), den + float(np.sum(b ** 2))
            agree += int(np.sum(a.argmax(-1) == b.argmax(-1)))
            total += a.shape[1]
        out[name] = {"vs_dequantized_reference_max_abs": worst_ref, "vs_input_max_abs": worst,
                     "vs_input_rel": (num / den) ** 0.5 if den else 0.0, "vs_input_top1_agreement": agree / total}
    return out


# --- writing ------------------------------------------------------------------------------------

def run(params: Params, inputs: dict, out_dir: Path, ctx) -> None:
    bundle: Path = inputs["bundle"]
    if params.max_tie_error <= 0 or params.logits_tolerance < 0:
        raise UserError("params.max_tie_error must be > 0 and params.logits_tolerance >= 0")
    decoder, filename = decoder_of(bundle, "a genai-build or quantize-onnx target")

    import numpy as np
    import onnx
    import onnxruntime
    from onnx import numpy_helper
    from rich.console import Console

    onnxruntime.set_default_logger_severity(3)  # one warning per overridable (LoRA) initializer
    threads = settings.current().threads or None
    console = Console(stderr=True)
    with console.status("reading the bundle") as status:
        model = onnx.load(str(bundle / filename))
        data_files = external_data_files(onnx.load(str(bundle / filename), load_external_data=False))
        s = _find(model, decoder)
        weight, scales, zero_points = _head_arrays(model, s)
        rows = dequantize_matmul_nbits(weight, scales, zero_points, s.bits, s.block_size, s.k)
        table_init = next(i for i in model.graph.initializer if i.name == s.table)
        table = numpy_helper.to_array(table_init)
        table = table.T if s.transposed else table
        tie_error = float(np.linalg.norm(table.astype(np.float64) - rows) / max(np.linalg.norm(table.astype(np.float64)), 1e-30))
        if tie_error > params.max_tie_error:
            raise UserError(
                f"inputs.bundle: not tied: the float embedding {s.table} differs from the LM head's dequantized "
                f"{s.bits}-bit weight by {tie_error:.0%} (relative; tied weights differ by rounding only, params.max_tie_error = {params.max_tie_error:.0%})"
            )
        graph_inputs = [(i.name, i.type.SerializeToString()) for i in model.graph.input]

        # The reference: the input bundle with its float embedding set to the head's int4 rows.
        reference = onnx.ModelProto()
        reference.CopyFrom(model)
        ref_table = next(i for i in reference.graph.initializer if i.name == s.table)
        ref_table.CopyFrom(numpy_helper.from_array((rows.T if s.transposed else rows).astype(table.dtype), s.table))

        status.update("tying the embedding to the LM head's int4 weight")
        changes = _tie(model, s)
        if [(i.name, i.type.SerializeToString()) for i in model.graph.input] != graph_inputs:
            raise UserError("the surgery changed the graph inputs; switchable adapters would break")
        status.update("checking the lookup over the whole vocabulary against the head")
        head_vs_lookup = _check_lookup(model, s, rows, threads)

        data_name = data_files[0] if len(data_files) == 1 else f"{Path(filename).name}.data"
        model_files = {filename, *data_files}
        status.update("writing the tied bundle")
        save_decoder(model, out_dir / filename, data_name)
        del model
        copy_rest(bundle, out_dir, model_files)

        status.update("comparing logits on probe ids, with and without each adapter")
        with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
            ref_path = Path(tmp) / "reference.onnx"
            save_decoder(reference, ref_path, "reference.onnx.data")
            del reference
            feeder = prefill_feeder(onnx.load(str(out_dir / filename), load_external_data=False), decoder, "inputs.bundle")
            probes = _probe_ids(bundle, params.check_prompt, s.n)
            logits = _compare_logits(_session(out_dir / filename, threads), _session(ref_path, threads),
                                     _session(bundle / filename, threads), feeder, probes, bundle_adapters(out_dir),
                                     decoder.get("outputs", {}).get("logits", "logits"))
        worst = max(v["vs_dequantized_reference_max_abs"] for v in logits.values())
        if worst > params.logits_tolerance:
            raise UserError(
                f"the tied bundle's logits differ from the input bundle with a dequantized embedding by {worst:.3g} "
                f"(params.logits_tolerance = {params.logits_tolerance:g}); the surgery changed more than the embedding"
            )
        status.update("verifying: load in onnxruntime-genai, generate with and without each adapter")
        counts = verify_bundle(out_dir, params.check_prompt, "tied bundle")

    before = files_size(bundle, sorted(model_files))
    after = files_size(out_dir, sorted({filename, data_name}))
    record = {
        "lm_head": s.head.name,
        "head_initializers": [name for name in list(s.head.input)[1:] if name],
        "bits": s.bits,
        "block_size": s.block_size,
        "vocab_size": s.n,
        "hidden_size": s.k,
        **changes,
        "embedding_vs_head_rel_error": round(tie_error, 6),
        "head_vs_lookup_max_abs": head_vs_lookup,
        "probe_sequences": [len(p) for p in probes],
        "logits": logits,
        "model_bytes": {"before": before, "after": after, "saved": before - after, "ratio": round(after / before, 4)},
        "adapters": sorted(bundle_adapters(out_dir)),
        "verified_tokens": counts,
    }
    (out_dir / RECORD).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    console.print(f"tied {s.table} {list(changes['initializer_removed']['shape'])} to {s.head.name}: "
                  f"model files {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB")


PASS = PassDef(
    name="tie-embeddings",
    version=1,
    doc="tied-embedding int4 bundle: the float embedding lookup becomes a GatherBlockQuantized over the LM head's int4 weight (Olive's TieWordEmbeddings); float copy dropped",
    params=Params,
    inputs={
        "bundle": Input("int4 onnxruntime-genai bundle of a tied-embedding model whose LM head is MatMulNBits and embedding a float Gather (e.g. a quantize-onnx target)"),
    },
    run=run,
    libraries=("onnx", "onnxruntime", "onnxruntime-genai", "numpy"),
    devices=("cpu",),
)
