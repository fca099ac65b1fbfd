"""The torch-side weight quantizers of an Olive workflow (gptq, rtn, AwqQuantizer,
SelectiveMixedPrecision). They decide how the next ModelBuilder quantizes, so except for AWQ
(a target of its own: HF -> HF scaling) they only record a pending quantization that
``modelbuilder`` (passes.py) writes as genai-build / quantize-onnx params. Handlers of mapping.py's
HANDLERS table, on the chain (chain.py)."""

from __future__ import annotations

from .chain import Chain, Options
from .model import BLOCK_SIZES, Artifact, Target, norm_type
from .workflow import PassEntry


def _torch_quant(chain: Chain, e: PassEntry, o: Options) -> bool:
    o.same("device", "save_format", "pack_model", "export_compatible")  # where it runs, how Olive stores its torch model
    o.note("desc_act", "damp_percent", "static_groups", "true_sequential", "dynamic", "modules_to_not_convert",
           "quant_config", "layers_block_name", "outside_layer_modules", "duo_scaling")
    return chain.need(e, "hf")


def _lm_head_overrides(chain: Chain, o: Options, bits: int) -> None:
    """rtn/gptq ``overrides`` that only restate lm_head / embed_tokens at the pass's own bits are
    what lm_head/embeds already say; anything else is left out."""
    overrides = o.get("overrides", (dict,), {}) or {}
    for module, spec in overrides.items():
        same = isinstance(spec, dict) and set(spec) <= {"bits"} and spec.get("bits") == bits and module in ("lm_head", "model.embed_tokens")
        if not same:
            chain.leave_out(f"{o.path('overrides')}.{module}", "per-module quantizer overrides have no quantize-onnx counterpart")


def _tie_follows(chain: Chain) -> bool:
    """A later GraphSurgeries TieWordEmbeddings: Olive's tied model shares one module as embedding
    and LM head, and tie-embeddings makes the embedding read the quantized head."""
    return any(norm_type(e.type) == "graphsurgeries" and any(isinstance(s, dict) and s.get("surgeon") == "TieWordEmbeddings"
                                                              for s in e.options.get("surgeries") or [])
               for e in chain.wf.passes[chain.index + 1:])


def _prose(chain: Chain, e: PassEntry) -> None:
    chain.pending_comments.append(f"Olive pass '{e.key}' ({e.type}) at {e.path}: no target of its own; it decides how the next ModelBuilder's model is quantized (that target's comment says how)")


def gptq(chain: Chain, e: PassEntry, o: Options) -> None:
    bits = o.get("bits", (int,), 4)
    group = o.get("group_size", (int,), 128)
    sym = o.get("sym", (bool,), False)
    lm_head = o.get("lm_head", (bool,), False)
    calibration = chain.calibration(o, e.path)
    if not _torch_quant(chain, e, o):
        return
    if bits != 4:
        return chain.unsupported(o.path("bits"), f"{bits}-bit gptq: modelbuild's gptq (quantize-onnx) is int4")
    if group not in BLOCK_SIZES:
        return chain.unsupported(o.path("group_size"), f"group_size {group}: quantize-onnx blocks are {', '.join(map(str, BLOCK_SIZES))}")
    _lm_head_overrides(chain, o, bits)
    pend = chain.pending
    pend.algorithm, pend.block_size, pend.symmetric = "gptq", group, sym
    pend.calibration = calibration
    pend.lm_head_quantized = lm_head
    pend.sources.append((e.path, f"gptq int4 (block {group}, {'symmetric' if sym else 'asymmetric'}; quantize-onnx gptq, calibrated on {calibration})"))
    _prose(chain, e)
    o.finish()


def rtn(chain: Chain, e: PassEntry, o: Options) -> None:
    bits = o.get("bits", (int,), 4)
    group = o.get("group_size", (int,), 128)
    sym = o.get("sym", (bool,), False)
    lm_head = o.get("lm_head", (bool,), False)
    embeds = o.get("embeds", (bool,), False)
    if not _torch_quant(chain, e, o):
        return
    _lm_head_overrides(chain, o, bits)
    pend = chain.pending
    if embeds and lm_head and _tie_follows(chain):
        chain.untied_embedding = (o.path("embeds"), bits)  # the tie makes the embedding the quantized LM head's; if it maps
    elif embeds:
        chain.leave_out(o.path("embeds"), f"the {bits}-bit embedding: quantize-onnx quantizes MatMuls, the embedding (a Gather) stays float")
    if pend.algorithm or pend.mixed:
        # after gptq / SelectiveMixedPrecision, rtn quantizes only what they left float: the LM head
        if not lm_head:
            text = "rtn on what the earlier quantizer left float: nothing but the embedding and LM head, and lm_head is false"
        elif bits == 8:
            if "/lm_head/MatMul" not in pend.int8_nodes:
                pend.int8_nodes.append("/lm_head/MatMul")
            pend.lm_head_quantized = True
            if not sym:
                chain.leave_out(o.path("sym"), "quantize-onnx's int8 LM head (int8_nodes) is symmetric", False)
            if pend.block_size and group != pend.block_size:
                chain.leave_out(o.path("group_size"), f"quantize-onnx's int8 LM head uses the int4 block ({pend.block_size})")
            text = "rtn int8 on the LM head (quantize-onnx int8_nodes)"
        elif bits == 4 and pend.algorithm == "gptq":
            pend.lm_head_quantized = True
            chain.leave_out(o.path("lm_head"), f"the LM head in {bits}-bit RTN: quantize-onnx's gptq rounds it with GPTQ (int4, block {pend.block_size})")
            text = "the LM head int4 with the rest (quantize-onnx gptq)"
        else:
            return chain.unsupported(o.path("bits"), f"{bits}-bit rtn on the LM head: quantize-onnx writes it int4 or int8")
    elif bits == 8:
        pend.precision = "int8"
        if not lm_head:
            chain.leave_out(o.path("lm_head"), "the LM head float: genai-build int8 quantizes it with the rest")
        text = "rtn int8 (genai-build precision int8)"
    elif bits == 4:
        if group not in BLOCK_SIZES:
            return chain.unsupported(o.path("group_size"), f"group_size {group}: int4 blocks are {', '.join(map(str, BLOCK_SIZES))}")
        pend.algorithm, pend.block_size, pend.symmetric = "rtn", group, sym
        text = f"rtn int4 (block {group}; genai-build int4_algorithm rtn)"
    else:
        return chain.unsupported(o.path("bits"), f"{bits}-bit rtn: modelbuild quantizes to int4 or int8")
    pend.sources.append((e.path, text))
    _prose(chain, e)
    o.finish()


def awq(chain: Chain, e: PassEntry, o: Options) -> None:
    bits = o.get("bits", (int,)) or o.get("w_bit", (int,), 4)
    group = o.get("group_size", (int,)) or o.get("q_group_size", (int,), 128)
    zero_point = o.get("zero_point", (bool,), True)
    sym = o.get("sym", (bool,))
    symmetric = sym if sym is not None else not zero_point
    o.note("lm_head", "embeds", "overrides")
    calibration = chain.calibration(o, e.path)
    if not _torch_quant(chain, e, o):
        return
    if bits != 4 or group not in BLOCK_SIZES:
        return chain.unsupported(o.path("bits" if bits != 4 else "group_size"), "awq: modelbuild scales for int4 blocks of 16 to 256")
    params = {"block_size": group, "symmetric": symmetric}
    art = chain.add(Target(chain.tname(e.key), "awq", params, {"base": chain.art.ref, "data": calibration}, chain.device,
                          doc=f"AWQ-scaled model (Olive pass '{e.key}'); a later ModelBuilder int4 rounds it with RTN"),
                   e, ["modelbuild's awq scales the weights (HF -> HF); the int4 rounding happens in the next ModelBuilder (int4_algorithm rtn)"] + o.finish())
    chain.art = Artifact(art.ref, "hf", target=art.target)
    chain.pending.algorithm, chain.pending.block_size, chain.pending.symmetric = "awq", group, symmetric
    chain.pending.sources.append((e.path, "AWQ"))


# SelectiveMixedPrecision k_quant_mixed: Olive keeps in high_bits the LM head and, in the first and last
# eighth of the layers and every third layer between, the attention inputs (q/k/v) and the MLP
# output (down_proj) -- the layer count is only known once the model is there, so quantize-onnx's
# int8_nodes (names) can carry the LM head but not the layers.
def selectivemixedprecision(chain: Chain, e: PassEntry, o: Options) -> None:
    algorithm = o.get("algorithm", (str,), "k_quant_mixed")
    bits = o.get("bits", (int,), 4)
    high = o.get("high_bits", (int,), 8)
    # the k_quant algorithms read only bits and high_bits; the rest ranks layers for the scored ones (refused below)
    o.same("sym", "group_size", "ratio", "high_group_size", "high_sym", "kld_memory_mode", "data_config", "batch_size", "max_seq_len")
    if not chain.need(e, "hf"):
        return
    if bits != 4 or high != 8:
        return chain.unsupported(o.path("bits" if bits != 4 else "high_bits"), f"SelectiveMixedPrecision {bits}/{high} bits: modelbuild mixes int4 with int8")
    if algorithm == "k_quant_last":
        chain.pending.int8_nodes.append("/lm_head/MatMul")
        chain.pending.lm_head_quantized = True
        text = "k_quant_last: the LM head in int8 (quantize-onnx int8_nodes)"
    elif algorithm == "k_quant_mixed":
        chain.pending.mixed = "k_quant_mixed"
        chain.pending.lm_head_quantized = True
        text = "k_quant_mixed (genai-build int4_algorithm k_quant_mixed)"
    else:
        return chain.unsupported(o.path("algorithm"), f"SelectiveMixedPrecision {algorithm!r} has no counterpart (modelbuild: k_quant_mixed via the builder, k_quant_last via quantize-onnx int8_nodes)")
    chain.pending.sources.append((e.path, f"SelectiveMixedPrecision {text}"))
    chain.pending.mixed_path = e.path
    _prose(chain, e)
    o.finish()
