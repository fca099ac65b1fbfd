"""onnx-int8: int8 quantization of an ONNX model folder with onnxruntime's quantizer.

What Olive's ``OnnxDynamicQuantization`` / ``OnnxStaticQuantization`` run:

- ``dynamic`` (``quantize_dynamic``): the weights of the quantized ops are stored int8 (signed,
  one scale per tensor, or per output channel with ``per_channel``); at run time each activation
  is quantized to uint8 by ``DynamicQuantizeLinear`` and the product computed by
  ``MatMulInteger``. No data needed.
- ``static`` (``quantize_static``, QOperator format): the activation ranges are calibrated
  (MinMax) on ``inputs.calibration`` and frozen into ``QLinearMatMul`` nodes between
  ``QuantizeLinear`` / ``DequantizeLinear``. The calibration data is the project's own JSONL
  (``prompt``/``response`` records, or ``text``), rendered with the model's own chat template and
  tokenized with its own tokenizer (never a hub dataset); ``calibration_samples`` records spread
  evenly over the file, each cut to ``max_length`` tokens.

``op_types`` empty quantizes MatMul only, and only MatMuls whose weight is a constant
(``MatMulConstBOnly``): attention's activation-by-activation products stay float. A static
quantization without ``inputs.calibration`` (or a dynamic one with it) is refused when the
targets are loaded, before anything runs.

Checked before it counts as built: onnxruntime runs the input and the quantized model on the same
probe sequences; the top-1 token must agree on at least ``min_top1_agreement`` of the positions
and the logits' Pearson correlation must be at least ``min_correlation``. The defaults (50 %
and 0.9) separate a broken model from a usable one, not a good one from a mediocre one. int8
activations with one scale per tensor are coarse for LLMs with activation outliers: on
SmolLM2-135M (bench/onnx_passes_bench.py) plain dynamic int8 of every MatMul agrees on 19 % of the
probes' top-1 tokens (held-out perplexity +125 %) and fails the check, static int8 is worse
(+411 %), while per-channel dynamic int8 with the MLP down projections kept float
(``exclude = ["*mlp.down_proj"]``, whose inputs carry the outliers) agrees on 85 % and costs
+8.8 % perplexity for a 1.6x faster prefill at 0.56x the size. ``onnx_int8.json`` records the
figures. The same input, data and params give
byte-identical output.
"""

from __future__ import annotations

import fnmatch
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from modelbuild import UserError, say
from modelbuild.ml.console import quiet_onnxruntime
from modelbuild.ml.onnx_models import (
    compare,
    copy_source_files,
    feeds,
    initializer_types,
    input_names,
    load_graph,
    load_model,
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

RECORD = "onnx_int8.json"
MODES = ("dynamic", "static")
QUANTIZED_OPS = ("MatMulInteger", "DynamicQuantizeLinear", "QLinearMatMul", "QuantizeLinear", "DequantizeLinear",
                 "ConvInteger", "QLinearConv", "QGemm", "QAttention", "com.microsoft:QGemm", "com.microsoft:QAttention")


@dataclass(frozen=True)
class Params:
    mode: str = param("dynamic", "dynamic (weights int8, activations quantized at run time) or static (activation ranges calibrated on inputs.calibration)",
                      choices=MODES)
    per_channel: bool = param(False, "one weight scale per output channel instead of per tensor")
    op_types: list[str] = param([], "op types to quantize (onnxruntime's names, e.g. MatMul, Gather, Gemm); empty: MatMul only")
    exclude: list[str] = param([], "nodes kept float: globs over node names and the torch module paths the dynamo exporter records, e.g. [\"*mlp.down_proj\"]")
    calibration_samples: int = param(16, "static: calibration records, spread evenly over inputs.calibration")
    max_length: int = param(128, "static: tokens per calibration record; longer records are cut")
    min_top1_agreement: float = param(0.5, "smallest fraction of probe positions whose top-1 token must match the input's")
    min_correlation: float = param(0.9, "smallest Pearson correlation allowed between the input's and the int8 model's logits")

    def __post_init__(self):
        if self.calibration_samples < 1:
            raise ValueError(f"params.calibration_samples: must be at least 1, got {self.calibration_samples}")
        if self.max_length < 1:
            raise ValueError(f"params.max_length: must be at least 1, got {self.max_length}")
        if not 0 <= self.min_top1_agreement <= 1:
            raise ValueError(f"params.min_top1_agreement: must be between 0 and 1, got {self.min_top1_agreement}")
        if not -1 <= self.min_correlation <= 1:
            raise ValueError(f"params.min_correlation: must be between -1 and 1, got {self.min_correlation}")
        for key in ("op_types", "exclude"):
            values = getattr(self, key)
            if len(set(values)) != len(values) or any(not v for v in values):
                raise ValueError(f"params.{key}: empty or repeated entry in {values}")


def check(params: dict, inputs: dict) -> None:
    """At load time: static needs calibration data (readable JSONL records), dynamic takes none."""
    if params["mode"] == "static" and isinstance(inputs.get("calibration"), Path):
        _records(inputs["calibration"])
    if params["mode"] == "static" and "calibration" not in inputs:
        raise UserError("inputs.calibration: mode 'static' needs calibration data: set inputs.calibration to a JSONL file "
                        "of prompt/response records (e.g. \"data/travel_train.jsonl\"), or use params.mode = \"dynamic\"")
    if params["mode"] == "dynamic" and "calibration" in inputs:
        raise UserError("inputs.calibration: mode 'dynamic' uses no calibration data; remove inputs.calibration "
                        "or set params.mode = \"static\"")


# --- calibration --------------------------------------------------------------------------------

def _records(path: Path) -> list[str | tuple[str, str]]:
    """A JSONL file's records: (prompt, response) pairs or plain texts."""
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"inputs.calibration: cannot read {path.name}: {error}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            raise UserError(f"inputs.calibration: {path.name}: line {number}: not JSON ({error})") from None
        if isinstance(record, dict) and isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
            records.append((record["prompt"], record["response"]))
        elif isinstance(record, dict) and isinstance(record.get("text"), str):
            records.append(record["text"])
        else:
            raise UserError(f"inputs.calibration: {path.name}: line {number}: expected an object with string "
                            "'prompt' and 'response' (or 'text')")
    if not records:
        raise UserError(f"inputs.calibration: {path.name}: no records")
    return records


def calibration_ids(model_dir: Path, data: Path, samples: int, max_length: int) -> tuple[list[list[int]], dict]:
    """Token ids of ``samples`` records spread evenly over ``data``, rendered with the model's chat
    template when it has one (what generation sees), and a record of what they are."""
    from transformers import AutoTokenizer

    records = _records(data)
    count = min(samples, len(records))
    picked = sorted({(i * len(records)) // count for i in range(count)})
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as error:
        raise UserError(f"inputs.model: cannot load the model's tokenizer for calibration: {str(error).strip().splitlines()[0]}") from None
    templated = bool(getattr(tokenizer, "chat_template", None))
    out, tokens = [], 0
    for index in picked:
        record = records[index]
        if isinstance(record, str):
            text = record
        elif templated:
            text = tokenizer.apply_chat_template([{"role": "user", "content": record[0]},
                                                  {"role": "assistant", "content": record[1]}], tokenize=False)
        else:
            text = f"{record[0]}\n{record[1]}"
        ids = tokenizer(text, add_special_tokens=not templated)["input_ids"][:max_length]
        if not ids:
            raise UserError(f"inputs.calibration: {data.name}: record {index + 1} renders to no tokens")
        out.append([int(t) for t in ids])
        tokens += len(ids)
    return out, {"file": data.name, "records": len(out), "tokens": tokens, "max_length": max_length,
                 "chat_template": templated}


# --- quantizing ---------------------------------------------------------------------------------

def _op_types(params: Params) -> list[str]:
    from onnxruntime.quantization.registry import IntegerOpsRegistry, QLinearOpsRegistry

    registry = IntegerOpsRegistry if params.mode == "dynamic" else QLinearOpsRegistry
    op_types = list(params.op_types) or ["MatMul"]
    for op in op_types:
        if op not in registry:
            raise UserError(f"params.op_types: onnxruntime's {params.mode} quantizer has no '{op}' "
                            f"(known: {', '.join(sorted(registry))})")
    return op_types


def _module_paths(node) -> list[str]:
    """The torch module paths torch.onnx's dynamo exporter records on a node (name_scopes)."""
    import ast

    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return []
            return [s for s in scopes if isinstance(s, str) and s]
    return []


def excluded_nodes(model, patterns: list[str], op_types: list[str]) -> list[str]:
    """Names of the ``op_types`` nodes that one of the globs matches (by node name or module path);
    every glob must match at least one."""
    candidates = [n for n in model.graph.node if n.op_type in op_types]
    matched: set[str] = set()
    for pattern in patterns:
        hits = [n.name for n in candidates
                if fnmatch.fnmatchcase(n.name, pattern) or any(fnmatch.fnmatchcase(p, pattern) for p in _module_paths(n))]
        if not hits:
            example = next((p for n in candidates for p in _module_paths(n)[-2:-1]), candidates[0].name if candidates else "none")
            raise UserError(f"params.exclude: '{pattern}' matches no {'/'.join(op_types)} node by name or module path "
                            f"(e.g. '{example}')")
        matched.update(hits)
    return sorted(matched)


def run(params: Params, inputs: dict, out_dir: Path, ctx) -> None:
    source: Path = inputs["model"]
    source_file = model_path(source)
    probes = probe_ids(source)
    op_types = _op_types(params)
    excluded = excluded_nodes(load_graph(source_file), params.exclude, op_types) if params.exclude else []
    calibration_record = None
    with status() as line, tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".onnx-int8-") as tmp:
        from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

        scratch = Path(tmp) / "model.onnx"
        options = {"MatMulConstBOnly": True}
        if params.mode == "dynamic":
            line.update(f"onnx-int8: dynamic quantization of {', '.join(op_types)}")
            with quiet_onnxruntime():
                quantize_dynamic(str(source_file), str(scratch), op_types_to_quantize=op_types, per_channel=params.per_channel,
                                 weight_type=QuantType.QInt8, nodes_to_exclude=excluded, use_external_data_format=True,
                                 extra_options=options)
        else:
            line.update(f"onnx-int8: tokenizing {params.calibration_samples} calibration records")
            samples, calibration_record = calibration_ids(source, inputs["calibration"], params.calibration_samples, params.max_length)
            names = input_names(load_graph(source_file))
            batches = [feeds(names, ids) for ids in samples]

            class Reader(CalibrationDataReader):
                def __init__(self):
                    self.pending = iter(batches)

                def get_next(self):
                    return next(self.pending, None)

            line.update(f"onnx-int8: calibrating activation ranges on {len(batches)} records ({calibration_record['tokens']} tokens), "
                        f"static quantization of {', '.join(op_types)}")
            with quiet_onnxruntime():
                quantize_static(str(source_file), str(scratch), Reader(), quant_format=QuantFormat.QOperator,
                                op_types_to_quantize=op_types, per_channel=params.per_channel,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                nodes_to_exclude=excluded, calibrate_method=CalibrationMethod.MinMax,
                                use_external_data_format=True,
                                extra_options=options)
        line.update("saving the int8 model")
        quantized = load_model(scratch, "quantized model")
        types, ops = initializer_types(quantized), op_counts(quantized)
        out_file = save_model(quantized, out_dir)
        del quantized

    with status() as line:
        line.update("checking: onnxruntime logits of the input and the int8 model on the probes")
        reference = logits(source_file, probes, ctx.threads, "inputs.model")
        got = logits(out_file, probes, ctx.threads, "int8 model")
    stats = compare(reference, got)
    quantized_ops = {op: n for op, n in ops.items() if op in QUANTIZED_OPS}
    if not quantized_ops:
        raise UserError(f"nothing was quantized: the model has no {'/'.join(op_types)} node with a constant weight")
    hint = ("; activation outliers defeat per-tensor int8: keep the worst layers float (e.g. params.exclude = "
            "[\"*mlp.down_proj\"]) or lower the threshold to build it anyway")
    if not stats["finite"] or stats["top1_agreement"] < params.min_top1_agreement:
        raise UserError(f"int8 model's top-1 tokens agree with the input's on {stats['top1_agreement']:.1%} of the probe "
                        f"positions < params.min_top1_agreement {params.min_top1_agreement:.1%}{hint}")
    if stats["correlation"] < params.min_correlation:
        raise UserError(f"int8 model's logits correlate with the input's at {stats['correlation']:.4f} "
                        f"< params.min_correlation {params.min_correlation:g}{hint}")
    size_in, size_out = model_size(source), model_size(out_dir)
    say(f"'{ctx.target}': {params.mode} int8: {', '.join(f'{k} x{v}' for k, v in quantized_ops.items())}; "
        f"{size_in / 1e6:.1f} -> {size_out / 1e6:.1f} MB; top-1 {stats['top1_agreement']:.1%}, correlation {stats['correlation']:.4f}")

    copy_source_files(source, out_dir)
    write_record(out_dir, RECORD, {
        "mode": params.mode,
        "per_channel": params.per_channel,
        "op_types": op_types,
        "exclude": sorted(params.exclude),
        "excluded_nodes": len(excluded),
        "weights_only_matmul": True,
        "format": "QOperator",
        "calibration": calibration_record,
        "quantized_ops": quantized_ops,
        "op_types_after": ops,
        "initializers": types,
        "bytes_before": size_in,
        "bytes_after": size_out,
        "check": {**rounded(stats), "min_top1_agreement": params.min_top1_agreement,
                  "min_correlation": params.min_correlation, "probes": [len(p) for p in probes]},
    })


PASS = PassDef(
    name="onnx-int8",
    version=1,
    doc="int8 ONNX model (onnxruntime quantize_dynamic, or quantize_static calibrated on the project's JSONL); checked against the input's logits",
    params=Params,
    inputs={
        "model": Input("ONNX model folder (model.onnx + model.onnx.data), e.g. an onnx-export target"),
        "calibration": Input("JSONL records (prompt/response or text) to calibrate activation ranges on; static mode only",
                             kind="file", required=False),
    },
    run=run,
    libraries=("onnx", "onnxruntime", "tokenizers", "transformers", "numpy"),
    check=check,
)
