"""nbits-to-qdq: a MatMulNBits (int4/int8) model in standard ONNX ops, DequantizeLinear + MatMul
(Olive's ``MatMulNBitsToQDQ``; modelbuild/ml/qdq.py does the rewrite, with Olive's options), on an
onnxruntime-genai bundle (quantize-onnx, genai-build int4/int8) or an ONNX model folder.

Checked before it counts as built: the codes, scales and zero points are the same numbers, so the
QDQ graph, run as written (no onnxruntime fusions, which fold DequantizeLinear + MatMul back into
MatMulNBits), must give the logits of the input with every converted MatMulNBits at ``accuracy_level`` 0
(float accumulation) within ``max_logit_diff``. The input as it is may differ by more: at
``accuracy_level`` 4 (quantize-onnx's and the builder's default) its kernel multiplies
int8-quantized activations (0.0099 on the tiny model); that difference, and the one between
both graphs as onnxruntime runs them (0 on CPU: it re-fuses), are recorded too. A bundle must still load
and generate in onnxruntime-genai. ``qdq.json`` records the converted and the kept nodes (with
why: excluded, act-order g_idx, float zero points, non-constant weights).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from modelbuild import UserError, say
from modelbuild.ml.bundle import onnx_input, save_decoder, save_like_input
from modelbuild.ml.graph_logits import graph_logits
from modelbuild.ml.onnx_models import compare, load_model, probe_ids, rounded, status, write_record
from modelbuild.ml.qdq import convert, float_accumulation
from modelbuild.passdef import Input, PassDef, param

RECORD = "qdq.json"


@dataclass(frozen=True)
class Params:
    use_transpose_op: bool = param(False, "DequantizeLinear on [N, K] then a Transpose (Olive: may be faster on DirectML), instead of storing the weight as [K, N]")
    use_int4: bool = param(False, "int4 (signed) codes for 4-bit weights; Olive keeps it, superseded by use_signed_int")
    use_signed_int: bool = param(False, "signed int4/int8 codes (the midpoint subtracted) instead of uint4/uint8")
    add_zero_point: bool = param(False, "write the all-zero zero point of signed symmetric codes anyway")
    nodes_to_exclude: list[str] = param([], "MatMulNBits node names kept as they are")
    max_logit_diff: float = param(1e-4, "largest |logit| difference allowed between the QDQ graph and the MatMulNBits input at "
                                        "accuracy_level 0 (float accumulation), both run as written")
    check_prompt: str = param("Hello! Who are you?", "prompt a bundle output must generate from in onnxruntime-genai")

    def __post_init__(self):
        if not self.max_logit_diff > 0:
            raise ValueError(f"params.max_logit_diff: must be positive, got {self.max_logit_diff}")


def run(params: Params, inputs: dict, out_dir: Path, ctx) -> None:
    source: Path = inputs["model"]
    decoder, source_file, filename = onnx_input(source, "an int4 or int8 genai bundle (quantize-onnx, genai-build)")
    is_bundle = decoder is not None
    with status() as line:
        line.update(f"nbits-to-qdq: {source_file.name}")
        model = load_model(source_file)
        record = convert(model, params.use_transpose_op, params.use_signed_int or params.use_int4, params.add_zero_point,
                         set(params.nodes_to_exclude))
        line.update("saving the QDQ graph")
        save_like_input(model, source, source_file, filename, is_bundle, out_dir)
        del model
        probes = probe_ids(source)
        line.update("checking: onnxruntime logits of the MatMulNBits input and the QDQ graph")
        as_run = compare(graph_logits(source_file, probes, decoder, ctx.threads, "inputs.model"),
                         graph_logits(out_dir / filename, probes, decoder, ctx.threads, "QDQ graph"))
        with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
            exact = load_model(source_file)
            levels = float_accumulation(exact, set(record["converted"]))
            save_decoder(exact, Path(tmp) / filename, f"{filename}.data")
            del exact
            reference = graph_logits(Path(tmp) / filename, probes, decoder, ctx.threads, "inputs.model at accuracy_level 0", optimize=False)
        got = graph_logits(out_dir / filename, probes, decoder, ctx.threads, "QDQ graph", optimize=False)
    stats = compare(reference, got)
    if not stats["finite"] or not stats["max_abs_diff"] <= params.max_logit_diff:
        raise UserError(f"the QDQ graph's logits differ from the MatMulNBits input's: max |dlogit| {stats['max_abs_diff']:.3g} "
                        f"> params.max_logit_diff {params.max_logit_diff:g}")
    generated = None
    if is_bundle:
        from modelbuild.ml.genai import verify_bundle

        generated = verify_bundle(out_dir, params.check_prompt, "QDQ bundle")
    say(f"'{ctx.target}': {len(record['converted'])} MatMulNBits -> DequantizeLinear + MatMul ({len(record['kept'])} kept); "
        f"logits match to max |dlogit| {stats['max_abs_diff']:.2g}")
    write_record(out_dir, RECORD, {
        **record,
        "check": {**rounded(stats), "max_logit_diff": params.max_logit_diff, "probes": [len(p) for p in probes],
                  "reference": "the input with every converted MatMulNBits at accuracy_level 0, both graphs unoptimized",
                  "input_accuracy_levels": levels},
        "as_onnxruntime_runs_them": rounded(as_run),
        "generated_tokens": generated,
    })


PASS = PassDef(
    name="nbits-to-qdq",
    version=1,
    doc="MatMulNBits -> DequantizeLinear + MatMul (Olive's MatMulNBitsToQDQ) on a genai bundle or ONNX folder; checked against the MatMulNBits logits",
    params=Params,
    inputs={"model": Input("int4/int8 onnxruntime-genai bundle (quantize-onnx, genai-build) or ONNX folder with MatMulNBits nodes")},
    run=run,
    libraries=("onnx", "onnxruntime", "onnxruntime-genai", "tokenizers", "numpy"),
)
