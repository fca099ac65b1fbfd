"""onnx-fp16: float16 weights and compute for an ONNX model folder, keeping what must stay fp32.

``onnxruntime.transformers.float16.convert_float_to_float16`` (what Olive's ``OnnxFloatToFloat16``
runs) turns every float32 initializer, value and op into float16, except:

- the ops of its default block list (no float16 kernels anywhere: Range, CumSum, Min, Max, TopK,
  the ML ops, ...) plus ``op_block_list``: they keep fp32, with Casts around them;
- with ``keep_io_types`` the graph's float inputs and outputs (the logits) stay fp32, with a Cast
  after the inputs and before the outputs, so callers feed and read what they did before;
- values that would overflow or underflow float16 are clamped to its range.

Shapes are inferred on the graph without its weights first (so models past protobuf's 2 GiB limit
convert too). The model files halve. On CPU, onnxruntime runs float16 MatMul and most
element-wise ops natively, and inserts its own Casts around the ops it has no float16 kernel for:
the model loads and runs, but no faster than fp32 (fp16 is for GPUs; measured on SmolLM2-135M,
bench/onnx_passes_bench.py: 128-token prefill 0.96x the export's speed at 0.50x its size,
held-out perplexity +0.01 %).

Checked before it counts as built: onnxruntime runs the input and the converted model on the same
probe sequences; the largest logit difference must stay within ``max_logit_diff`` and the top-1
token must agree on at least ``min_top1_agreement`` of the positions. The defaults (1.0 and 90 %)
catch a broken conversion (overflow, a wrong cast) while leaving room for float16 rounding through
a deep model: SmolLM2's logits (up to ~30) moved by at most 0.035 converted straight from the
export and 0.30 after graph-optimize (its fused RMSNorms then run in float16), top-1 100 %. ``onnx_fp16.json`` records the
initializer types, op counts, sizes and the check's figures. The same input and params give
byte-identical output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from modelbuild import UserError, say
from modelbuild.ml.onnx_models import (
    compare,
    copy_source_files,
    initializer_types,
    logits,
    model_path,
    model_size,
    op_counts,
    probe_ids,
    rounded,
    save_model,
    status,
    write_record,
)
from modelbuild.passdef import Input, PassDef, param

RECORD = "onnx_fp16.json"


@dataclass(frozen=True)
class Params:
    keep_io_types: bool = param(True, "keep the graph's float inputs and outputs (logits) fp32, with Casts inside the graph")
    op_block_list: list[str] = param([], "op types kept fp32 in addition to onnxruntime's default block list (ops without float16 kernels)")
    node_block_list: list[str] = param([], "node names kept fp32")
    max_logit_diff: float = param(1.0, "largest |logit| difference allowed between the input and the fp16 model on the probes")
    min_top1_agreement: float = param(0.9, "smallest fraction of probe positions whose top-1 token must match the input's")

    def __post_init__(self):
        if not self.max_logit_diff > 0:
            raise ValueError(f"params.max_logit_diff: must be positive, got {self.max_logit_diff}")
        if not 0 <= self.min_top1_agreement <= 1:
            raise ValueError(f"params.min_top1_agreement: must be between 0 and 1, got {self.min_top1_agreement}")
        for key in ("op_block_list", "node_block_list"):
            if any(not name for name in getattr(self, key)):
                raise ValueError(f"params.{key}: empty name")


def run(params: Params, inputs: dict, out_dir: Path, ctx) -> None:
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    source: Path = inputs["model"]
    source_file = model_path(source)
    probes = probe_ids(source)
    with status() as line:
        line.update("onnx-fp16: shape inference")
        try:
            model = onnx.load(str(source_file), load_external_data=False)
            model = onnx.shape_inference.infer_shapes(model)
            load_external_data_for_model(model, str(source))
        except Exception as error:
            raise UserError(f"inputs.model: cannot load {source_file.name}: {str(error).strip().splitlines()[0]}") from None
        before_types = initializer_types(model)
        if "FLOAT" not in before_types:
            raise UserError("inputs.model: the model has no float32 initializers to convert")
        names = {node.name for node in model.graph.node}
        unknown = [n for n in params.node_block_list if n not in names]
        if unknown:
            raise UserError(f"params.node_block_list: no node named '{unknown[0]}' in the model")

        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

        block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(params.op_block_list))
        line.update(f"onnx-fp16: converting ({len(block)} op types kept fp32)")
        try:
            converted = convert_float_to_float16(model, keep_io_types=params.keep_io_types, op_block_list=block,
                                                 node_block_list=list(params.node_block_list) or None,
                                                 disable_shape_infer=True)
        except Exception as error:
            raise UserError(f"float16 conversion failed: {type(error).__name__}: {str(error).strip().splitlines()[0]}") from None
        del model
        after_types, ops = initializer_types(converted), op_counts(converted)
        line.update("saving the fp16 model")
        out_file = save_model(converted, out_dir)
        del converted

        line.update("checking: onnxruntime logits of the input and the fp16 model on the probes")
        reference = logits(source_file, probes, ctx.threads, "inputs.model")
        got = logits(out_file, probes, ctx.threads, "fp16 model")
    stats = compare(reference, got)
    if not stats["finite"] or not stats["max_abs_diff"] <= params.max_logit_diff:
        raise UserError(f"fp16 model's logits differ from the input's: max |dlogit| {stats['max_abs_diff']:.3g} "
                        f"> params.max_logit_diff {params.max_logit_diff:g}")
    if stats["top1_agreement"] < params.min_top1_agreement:
        raise UserError(f"fp16 model's top-1 tokens agree with the input's on {stats['top1_agreement']:.1%} of the probe "
                        f"positions < params.min_top1_agreement {params.min_top1_agreement:.1%}")
    size_in, size_out = model_size(source), model_size(out_dir)
    say(f"'{ctx.target}': {after_types.get('FLOAT16', 0)} float16 initializers; {size_in / 1e6:.1f} -> {size_out / 1e6:.1f} MB; "
        f"logits match to max |dlogit| {stats['max_abs_diff']:.2g}, top-1 {stats['top1_agreement']:.1%}")

    copy_source_files(source, out_dir)
    write_record(out_dir, RECORD, {
        "keep_io_types": params.keep_io_types,
        "op_block_list": block,
        "node_block_list": sorted(params.node_block_list),
        "initializers_before": before_types,
        "initializers_after": after_types,
        "casts": ops.get("Cast", 0),
        "op_types": ops,
        "bytes_before": size_in,
        "bytes_after": size_out,
        "check": {**rounded(stats), "max_logit_diff": params.max_logit_diff,
                  "min_top1_agreement": params.min_top1_agreement, "probes": [len(p) for p in probes]},
    })


PASS = PassDef(
    name="onnx-fp16",
    version=1,
    doc="float16 ONNX model from an fp32 one (onnxruntime's converter; ops without fp16 kernels and, by default, the graph's inputs/outputs stay fp32); checked against the input's logits",
    params=Params,
    inputs={"model": Input("ONNX model folder (model.onnx + model.onnx.data), e.g. an onnx-export or graph-optimize target")},
    run=run,
    libraries=("onnx", "onnxruntime", "tokenizers", "numpy"),
)
