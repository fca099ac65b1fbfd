"""The torch-side weight quantizers of an Olive workflow (gptq, rtn, AwqQuantizer,
SelectiveMixedPrecision). They decide how the next ModelBuilder quantizes, so except for AWQ
(a target of its own: HF -> HF scaling) they only record a pending quantization that
``modelbuilder`` (passes.py) writes as genai-build / quantize-onnx params. Handlers of mapping.py's
HANDLERS table, on the chain (chain.py)."""

from __future__ import annotations

import json

from .chain import Chain, Options
from .model import BLOCK_SIZES, Artifact, Target
from .workflow import PassEntry


def _torch_quant(chain: Chain, e: PassEntry, o: Options) -> bool:
    o.note("device", "overrides", "desc_act", "damp_percent", "static_groups", "true_sequential", "dynamic", "modules_to_not_convert",
           "quant_config", "layers_block_name", "outside_layer_modules", "export_compatible", "duo_scaling", "pack_model", "save_format")
    return chain.need(e, "hf")


def gptq(chain: Chain, e: PassEntry, o: Options) -> None:
    bits = o.get("bits", (int,), 4)
    group = o.get("group_size", (int,), 128)
    sym = o.get("sym", (bool,), False)
    o.get("lm_head", (bool,), False)
    calibration = chain.calibration(o, e.path)
    if not _torch_quant(chain, e, o):
        return
    if bits != 4:
        return chain.unsupported(o.path("bits"), f"{bits}-bit gptq: modelbuild's gptq (quantize-onnx) is int4")
    if group not in BLOCK_SIZES:
        return chain.unsupported(o.path("group_size"), f"group_size {group}: quantize-onnx blocks are {', '.join(map(str, BLOCK_SIZES))}")
    chain.pending.algorithm, chain.pending.block_size, chain.pending.symmetric = "gptq", group, sym
    chain.pending.calibration = calibration
    chain.pending.sources.append((e.path, f"gptq int4 (block {group}, {'symmetric' if sym else 'asymmetric'}; quantize-onnx gptq, calibrated on {calibration})"))
    chain.pending_comments += [f"Olive pass '{e.key}' ({e.type}) at {e.path}: {json.dumps(e.options, sort_keys=True)}", "  -> quantize-onnx algorithm gptq at the next ModelBuilder"] + [f"  {n}" for n in o.finish()]


def rtn(chain: Chain, e: PassEntry, o: Options) -> None:
    bits = o.get("bits", (int,), 4)
    group = o.get("group_size", (int,), 128)
    sym = o.get("sym", (bool,), False)
    lm_head = o.get("lm_head", (bool,), False)
    embeds = o.get("embeds", (bool,), False)
    if not _torch_quant(chain, e, o):
        return
    pend = chain.pending
    if bits == 8 and (pend.algorithm or pend.mixed):
        if lm_head:
            pend.int8_nodes.append("/lm_head/MatMul")
        text = "rtn int8 on the LM head (quantize-onnx int8_nodes)" + ("; the embedding stays float (quantize-onnx quantizes MatMuls only)" if embeds else "")
        if pend.mixed:  # builder route: k_quant_mixed already puts the LM head in int8
            text = "rtn int8 on the LM head: int4_algorithm k_quant_mixed already keeps it int8"
            pend.int8_nodes = []
    elif bits == 8:
        pend.precision = "int8"
        text = "rtn int8 (genai-build precision int8)"
    elif bits == 4:
        if group not in BLOCK_SIZES:
            return chain.unsupported(o.path("group_size"), f"group_size {group}: int4 blocks are {', '.join(map(str, BLOCK_SIZES))}")
        if not pend.algorithm:
            pend.algorithm, pend.block_size, pend.symmetric = "rtn", group, sym
        text = f"rtn int4 (block {group}; genai-build int4_algorithm rtn)"
    else:
        return chain.unsupported(o.path("bits"), f"{bits}-bit rtn: modelbuild quantizes to int4 or int8")
    pend.sources.append((e.path, text))
    chain.pending_comments += [f"Olive pass '{e.key}' ({e.type}) at {e.path}: {json.dumps(e.options, sort_keys=True)}", f"  -> {text}"] + [f"  {n}" for n in o.finish()]


def awq(chain: Chain, e: PassEntry, o: Options) -> None:
    bits = o.get("bits", (int,)) or o.get("w_bit", (int,), 4)
    group = o.get("group_size", (int,)) or o.get("q_group_size", (int,), 128)
    zero_point = o.get("zero_point", (bool,), True)
    sym = o.get("sym", (bool,))
    symmetric = sym if sym is not None else not zero_point
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


def selectivemixedprecision(chain: Chain, e: PassEntry, o: Options) -> None:
    algorithm = o.get("algorithm", (str,), "k_quant_mixed")
    o.note("bits", "high_bits", "ratio", "sym", "group_size", "data_config", "batch_size", "max_seq_len")
    if not chain.need(e, "hf"):
        return
    if algorithm == "k_quant_last":
        chain.pending.int8_nodes.append("/lm_head/MatMul")
        text = "k_quant_last: the LM head in int8 (quantize-onnx int8_nodes)"
    elif algorithm == "k_quant_mixed":
        chain.pending.mixed = "k_quant_mixed"
        text = "k_quant_mixed (genai-build int4_algorithm k_quant_mixed)"
    else:
        return chain.unsupported(o.path("algorithm"), f"SelectiveMixedPrecision {algorithm!r} has no counterpart (modelbuild: k_quant_mixed via the builder, k_quant_last via quantize-onnx int8_nodes)")
    chain.pending.sources.append((e.path, f"SelectiveMixedPrecision {text}"))
    chain.pending_comments += [f"Olive pass '{e.key}' ({e.type}) at {e.path}: {json.dumps(e.options, sort_keys=True)}", f"  -> {text}"] + [f"  {n}" for n in o.finish()]
