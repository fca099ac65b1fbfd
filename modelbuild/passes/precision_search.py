"""precision-search: which MatMuls of an fp32 bundle deserve int8 when the rest goes int4, measured.

Olive searches pass parameters stochastically and keeps no explanation. Here the search is a build
step: deterministic in what it tries, its result (candidates.json) cached by content like any
output, and the budget left to precision-plan, so changing the budget re-runs only the cheap plan.

1. Sensitivity, a cheap proxy used only for ranking: each quantizable MatMul's relative output
   error ``||X (W - Q(W))|| / ||X W||`` when it alone is quantized, on its activations X over the
   calibration records (captured once, as GPTQ does: one onnxruntime run with every MatMul input as
   an output, kept as ``X^T X``). Q is the int4 weight the chosen algorithm really produces (the
   whole model quantized once through ``quantize_matmuls``, each node dequantized as MatMulNBits
   reads it); the int8 error (every node int8 as the candidates get theirs) is measured the same
   way, for the record. On a base dequantized from a GGUF, source_grid's int4 keeps the source grid
   and can beat int8 RTN, which re-rounds it.
2. Candidates: for each k of the ladder, the k most sensitive MatMuls in int8 (besides those
   ``int8_always`` names), the rest int4; each really quantized by ``quantize_matmuls`` (as
   quantize-onnx does: LoRA MatMuls and weights that adapters override stay float) and measured
   end to end, like the fp32 bundle in the same run so
   the ratios compare like with like: held-out perplexity (onnxruntime, the evaluate pass's code,
   with ``params.adapter`` active), model file size, and decode tokens/s (onnxruntime-genai,
   greedy, median over prompts and runs, in a fresh process). Timings follow the machine's load,
   so the fp32 bundle's speed is measured again right after each candidate and the candidate's
   speed ratio is taken against that neighbour (the fp32 figure reported is their median).

Calibration activations are captured with the adapters off (their zero defaults). Timings vary
from run to run; everything else is deterministic for rtn, k_quant and hqq.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from modelbuild import UserError
from modelbuild.ml.precision import CANDIDATES_FILE, matching_nodes
from modelbuild.ml.records import CHAT
from modelbuild.passdef import Input, PassDef, param, require

ALGORITHMS = ("source_grid", "rtn", "k_quant", "hqq", "gptq")  # those quantize_matmuls takes (ml/weight_only.py)
LORA_MARKERS = ("/lora_A/", "/lora_B/")  # as quantize-onnx: LoRA MatMuls stay float


def _algorithms() -> tuple[str, ...]:
    """quantize_matmuls' own list when ml/weight_only.py keeps one (it grows), else ours."""
    from modelbuild.ml import weight_only

    return tuple(getattr(weight_only, "ALGORITHMS", ALGORITHMS))


@dataclass(frozen=True)
class Params:
    algorithm: str = param("k_quant", "int4 weight quantizer passed to quantize_matmuls (source_grid, rtn, k_quant, hqq, gptq, ...), as quantize-onnx's")
    block_size: int = param(32, "weights per quantization block", choices=(16, 32, 64, 128, 256))
    symmetric: bool = param(True, "symmetric int4 for rtn and gptq (k_quant and hqq always fit a zero point)")
    accuracy_level: int = param(4, "MatMulNBits accuracy level (4: int8 activations on CPU)", choices=(0, 1, 2, 3, 4))
    ladder: list[int] = param([0, 2, 4, 8, 16, 32], "candidate counts of int8 MatMuls (most sensitive first), capped at the number of MatMuls")
    int8_always: list[str] = param(
        [], "MatMul node names (globs) int8 in every candidate besides the k most sensitive, e.g. [\"/lm_head/MatMul\"] "
            "(Olive's int4 recipes keep the LM head 8-bit)")
    adapter: str = param("", "bundle adapter active while perplexity and speed are measured; empty = none")
    template: str = param(CHAT, "record -> text: 'chat' (the bundle's chat template) or a text template with {prompt} and {response}")
    calibration_samples: int = param(8, "calibration records (spread over inputs.calibration) the activations come from")
    heldout_samples: int = param(0, "held-out records scored for perplexity (0 = all)")
    max_length: int = param(256, "tokens per record; longer ones are cut")
    prompts: list[str] = param(["What should I see in Chicago?", "Plan a rainy day in London."], "prompts decode speed is measured on")
    new_tokens: int = param(32, "tokens generated per prompt for the speed figure")
    speed_runs: int = param(3, "times each prompt is generated; the median tokens/s is kept")

    def __post_init__(self):
        known = _algorithms()
        require(self.algorithm in known, "algorithm", f"one of {', '.join(known)}", self.algorithm)
        require(bool(self.ladder) and all(k >= 0 for k in self.ladder), "ladder", "a non-empty list of counts >= 0", self.ladder)
        require(len(set(self.ladder)) == len(self.ladder), "ladder", "without repeats", self.ladder)
        for name in ("calibration_samples", "speed_runs"):
            require(getattr(self, name) >= 1, name, "at least 1", getattr(self, name))
        require(self.heldout_samples >= 0, "heldout_samples", "0 (all) or more", self.heldout_samples)
        require(self.max_length >= 2, "max_length", "at least 2", self.max_length)
        require(self.new_tokens >= 2, "new_tokens", "at least 2 (decode speed needs a second token)", self.new_tokens)
        require(bool(self.prompts), "prompts", "a non-empty list", self.prompts)


def _quantize(fp32, params: Params, weights: dict, exclude: list[str], int8: list[str], samples, algorithm=None):
    """A quantized copy of the fp32 decoder (the fp32 ModelProto is left as it is)."""
    import onnx

    from modelbuild.ml.console import quiet_stdout
    from modelbuild.ml.weight_only import quantize_matmuls

    model = onnx.ModelProto()
    model.CopyFrom(fp32)
    with quiet_stdout():
        return quantize_matmuls(model, algorithm or params.algorithm, block_size=params.block_size, symmetric=params.symmetric,
                                accuracy_level=params.accuracy_level, exclude=exclude, int8=int8, weights=weights, samples=samples)


def _sensitivity(fp32, params, weights, exclude, samples, int4_model) -> list[dict]:
    """Per quantizable MatMul, its int4 and int8 relative output errors, most sensitive first."""
    from onnx import numpy_helper

    from modelbuild.ml.gptq import hessians
    from modelbuild.ml.precision import dequantized_weights, output_error

    nodes = {n.name: n for n in fp32.graph.node}
    grams = hessians(fp32, sorted({nodes[name].input[0] for name in weights}), samples, lambda done, total: None)
    # Every node int8, the way the candidates get their int8 nodes (gptq: no int4 node left to calibrate).
    int8_model = _quantize(fp32, params, weights, exclude, sorted(weights), samples,
                           algorithm="rtn" if params.algorithm == "gptq" else None)
    initializers = {init.name: init for init in fp32.graph.initializer}
    shapes = {name: tuple(initializers[weight].dims) for name, weight in weights.items()}
    q4 = dequantized_weights(int4_model, shapes, "int4")
    q8 = dequantized_weights(int8_model, shapes, "int8")
    rows = []
    for name, weight_name in weights.items():
        w, gram = numpy_helper.to_array(initializers[weight_name]), grams[nodes[name].input[0]]
        rows.append({"node": name, "int4_error": round(output_error(w, q4[name], gram), 6),
                     "int8_error": round(output_error(w, q8[name], gram), 6)})
    rows.sort(key=lambda row: (-row["int4_error"], row["node"]))
    return [{"rank": i, **row} for i, row in enumerate(rows, 1)]


def _speed(folder: Path, params: Params, ctx) -> float:
    """Decode tokens/s of one bundle (median over prompts and runs), in a fresh process."""
    import tempfile

    from modelbuild.ml import speed

    request = {"kind": "genai", "model": str(folder), "adapter": params.adapter or None, "prompts": params.prompts,
               "new_tokens": params.new_tokens, "runs": params.speed_runs, "threads": ctx.threads, "device": "cpu"}
    with tempfile.TemporaryDirectory() as scratch:
        try:
            return speed.measure(request, Path(scratch))["tokens_per_s"]
        except RuntimeError as error:
            raise UserError(f"speed measurement failed: {error}") from None


def _measure(folder: Path, model_files, adapter_file, examples, params: Params, ctx) -> dict:
    """Held-out perplexity, model file size and decode tokens/s of one bundle folder."""
    from modelbuild.ml.bundle import files_size
    from modelbuild.ml.perplexity import onnx_perplexity

    perplexity, _ = onnx_perplexity(folder, adapter_file, examples, ctx.threads)
    return {"perplexity": round(perplexity, 4), "size_bytes": files_size(folder, sorted(model_files)),
            "tokens_per_s": _speed(folder, params, ctx)}


def run(params: Params, inputs: dict, out_dir: Path, ctx) -> None:
    import shutil
    import statistics
    import tempfile

    bundle: Path = inputs["bundle"]
    from modelbuild.ml.genai import bundle_adapters, prefill_feeder
    from modelbuild.ml.bundle import copy_rest, decoder_of, external_data_files, save_decoder
    from modelbuild.ml.precision import quantizable_matmuls

    decoder, filename = decoder_of(bundle, "a genai-build target with precision fp32")
    adapter_file = None
    if params.adapter:
        adapters = bundle_adapters(bundle)
        if params.adapter not in adapters:
            raise UserError(f"params.adapter: the bundle has no adapter '{params.adapter}' (has: {', '.join(adapters) or 'none'})")
        adapter_file = adapters[params.adapter]

    import onnx
    import onnxruntime
    from rich.console import Console
    from transformers import AutoTokenizer

    from modelbuild.ml.calibration import calibration_feeds
    from modelbuild.ml.perplexity import scored_examples

    onnxruntime.set_default_logger_severity(3)  # one warning per overridable (LoRA) initializer
    console = Console(stderr=True)
    with console.status("reading the bundle and the data") as status:
        data_files = external_data_files(onnx.load(str(bundle / filename), load_external_data=False))
        fp32 = onnx.load(str(bundle / filename))
        weights = quantizable_matmuls(fp32, LORA_MARKERS)
        exclude = sorted(n.name for n in fp32.graph.node if n.op_type == "MatMul" and n.name not in weights)
        samples, calibration = calibration_feeds(
            bundle, inputs["calibration"], ctx.input_names["calibration"], params.template, params.calibration_samples,
            params.max_length, prefill_feeder(fp32, decoder, "inputs.bundle"))
        examples = scored_examples(inputs["heldout"], ctx.input_names["heldout"], AutoTokenizer.from_pretrained(bundle),
                                   params.template, params.heldout_samples, params.max_length)
        status.update(f"fp32 reference: perplexity, size, tokens/s ({len(examples)} held-out records)")
        reference = _measure(bundle, {filename, *data_files}, adapter_file, examples, params, ctx)
        status.update(f"{params.algorithm} int4 of all {len(weights)} MatMuls")
        int4_model = _quantize(fp32, params, weights, exclude, [], samples)
        status.update("sensitivity: each MatMul's output error on the calibration activations")
        sensitivity = _sensitivity(fp32, params, weights, exclude, samples, int4_model)

    forced = sorted(matching_nodes(params.int8_always, weights, "int8_always"))
    ranked = [row["node"] for row in sensitivity if row["node"] not in forced]
    ladder = sorted({min(k, len(ranked)) for k in params.ladder})
    data_name = data_files[0] if len(data_files) == 1 else f"{Path(filename).name}.data"
    candidates, fp32_speeds = [], [reference["tokens_per_s"]]
    with tempfile.TemporaryDirectory(prefix="precision-search-") as scratch:
        for k in ladder:
            int8 = forced + ranked[:k]
            with console.status(f"candidate {len(candidates) + 1}/{len(ladder)}: {len(int8)} int8 MatMuls, the rest int4"):
                model = int4_model if not int8 else _quantize(fp32, params, weights, exclude, int8, samples)
                folder = Path(scratch) / f"int8x{len(int8)}"
                save_decoder(model, folder / filename, data_name)
                del model
                copy_rest(bundle, folder, {filename, *data_files})
                adapter = folder / adapter_file.relative_to(bundle) if adapter_file else None
                measured = _measure(folder, {filename, data_name}, adapter, examples, params, ctx)
                shutil.rmtree(folder)
                fp32_speeds.append(_speed(bundle, params, ctx))  # right after: the same machine load
            candidates.append({
                "name": f"int8x{len(int8)}", "int8_count": len(int8), "int8_nodes": int8, **measured,
                "perplexity_delta_pct": round((measured["perplexity"] / reference["perplexity"] - 1) * 100, 3),
                "size_ratio": round(measured["size_bytes"] / reference["size_bytes"], 4),
                "fp32_tokens_per_s": fp32_speeds[-1],
                "speed_ratio": round(measured["tokens_per_s"] / fp32_speeds[-1], 3),
            })
            console.print(f"  {candidates[-1]['name']}: perplexity {candidates[-1]['perplexity_delta_pct']:+.2f} %, size {candidates[-1]['size_ratio']:.3f}, "
                          f"speed {candidates[-1]['speed_ratio']:.2f}x of fp32", highlight=False)

    reference["tokens_per_s"] = statistics.median(fp32_speeds)
    reference["tokens_per_s_runs"] = fp32_speeds
    result = {
        "schema": 1,
        "quantization": {"algorithm": params.algorithm, "block_size": params.block_size, "symmetric": params.symmetric,
                         "accuracy_level": params.accuracy_level},
        "adapter": params.adapter or None,
        "heldout": {"file": ctx.input_names["heldout"], "records": len(examples)},
        "calibration": calibration,
        "speed": {"prompts": len(params.prompts), "new_tokens": params.new_tokens, "runs": params.speed_runs, "threads": ctx.threads},
        "fp32": reference,
        "kept_float": exclude,
        "sensitivity": sensitivity,
        "candidates": candidates,
    }
    (out_dir / CANDIDATES_FILE).write_text(json.dumps(result, indent=1) + "\n")


PASS = PassDef(
    name="precision-search",
    version=1,
    doc="per-MatMul int4 sensitivity, then int4 candidates with the k most sensitive MatMuls int8, each measured (perplexity, size, tokens/s)",
    params=Params,
    inputs={
        "bundle": Input("fp32 onnxruntime-genai bundle (genai-build with params.precision = \"fp32\"), adapters allowed"),
        "calibration": Input("JSONL prompt/response records the activations for the sensitivities come from", kind="file"),
        "heldout": Input("held-out JSONL prompt/response records for perplexity", kind="file"),
    },
    run=run,
    libraries=("onnx", "onnxruntime", "onnxruntime-genai", "torch", "transformers", "numpy"),
    devices=("cpu",),
)
