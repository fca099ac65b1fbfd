"""evaluate: measure a built model; its numbers are a build output (metrics.json) like any other.

The model is an onnxruntime-genai bundle (any genai-build or quantize-onnx target) or an HF
folder (the torch fp32 reference). Measured:

- perplexity of the held-out split's responses given their prompts (the loss the adapter was
  trained on), through onnxruntime on the bundle's own model.onnx, or through torch for an HF
  folder; with the named adapter active when one is given;
- time to first token and decode tokens/s, greedy, a fixed number of new tokens per prompt,
  through onnxruntime-genai (or torch eager), in a fresh process whose peak RSS is reported;
- size on disk of the model files (adapters and tokenizer excluded).

With a ``reference`` (another evaluate target, usually the fp32 one) it adds the perplexity
change in percent, the number quality gates usually limit. Timings vary run to run: an
evaluation is not reproducible byte for byte, and `verify` says so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from modelbuild import UserError
from modelbuild.ml import speed
from modelbuild.core.gates import METRICS_FILE
from modelbuild.passdef import Input, PassDef, param, require
from modelbuild.ml.perplexity import nll as _nll, onnx_perplexity, scored_examples
from modelbuild.ml.records import CHAT

METRICS = ("perplexity", "perplexity_delta_pct", "tokens_per_s", "ttft_ms", "peak_rss_mb", "size_bytes", "size_mb",
           "speed_ratio", "size_ratio")
MODEL_FILE_SUFFIXES = (".onnx", ".onnx.data", ".data", ".safetensors", ".bin")


@dataclass(frozen=True)
class Params:
    variant: str = param("", "label shown in reports (e.g. 'int4-rtn'); empty = the model target's name")
    adapter: str = param("", "bundle adapter to activate while measuring (e.g. 'travel'; for an HF model, the label of inputs.adapter); empty = the base model")
    template: str = param(CHAT, "how records are rendered: 'chat' (the model's chat template) or a text template with {prompt} and {response}")
    samples: int = param(0, "held-out records scored (0 = all)")
    max_length: int = param(256, "tokens per record; longer records are truncated")
    prompts: list[str] = param(
        ["What should I see in Chicago?", "Plan a rainy day in London.", "What should I pack for a week in Iceland?"],
        "prompts the speed is measured on",
    )
    new_tokens: int = param(64, "tokens generated per prompt for the speed figures")
    speed_runs: int = param(2, "times each prompt is generated (the median is reported)")

    def __post_init__(self):
        require(self.new_tokens >= 2, "new_tokens", "at least 2 (decode speed needs a second token)", self.new_tokens)
        require(self.speed_runs >= 1, "speed_runs", "at least 1", self.speed_runs)
        require(bool(self.prompts), "prompts", "a non-empty list", self.prompts)
        require(self.samples >= 0, "samples", "0 (all) or more", self.samples)
        require(self.max_length >= 2, "max_length", "at least 2", self.max_length)


def _model_kind(model: Path) -> str:
    if (model / "genai_config.json").is_file():
        return "genai"
    if (model / "config.json").is_file():
        return "hf"
    raise UserError("inputs.model: neither an onnxruntime-genai bundle (genai_config.json) nor an HF folder (config.json)")


def model_size(model: Path) -> int:
    """Bytes of the weights and graph: what a device downloads, without tokenizer and adapters."""
    return sum(
        p.stat().st_size for p in sorted(model.rglob("*"))
        if p.is_file() and p.name.endswith(MODEL_FILE_SUFFIXES) and "adapters" not in p.relative_to(model).parts
        and ".modelbuild" not in p.relative_to(model).parts
    )


def _examples(params: Params, data: Path, tokenizer, shown: str) -> list[tuple[list[int], int]]:
    """(token ids, index of the first response token) per scored record."""
    return scored_examples(data, shown, tokenizer, params.template, params.samples, params.max_length)


def _torch_perplexity(model_dir: Path, adapter_dir: Path | None, examples, threads: int, device: str, progress, bar) -> tuple[float, int]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.to(device).eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for ids, start in examples:
            logits = model(input_ids=torch.tensor([ids], device=device)).logits.float().cpu().numpy()
            nll, n = _nll(logits, ids, start)
            total, count = total + nll, count + n
            progress.advance(bar)
    return math.exp(total / count), count


def run(params: Params, inputs: dict, out_dir: Path, ctx) -> None:
    import tempfile

    from transformers import AutoTokenizer

    from modelbuild.ml.genai import bundle_adapters
    from modelbuild.core.progress import step_progress

    model: Path = inputs["model"]
    kind = _model_kind(model)
    adapter_file = adapter_dir = None
    if kind == "genai":
        if "adapter" in inputs:
            raise UserError("inputs.adapter: only for HF models; a bundle's adapters are chosen with params.adapter")
        if params.adapter:
            adapters = bundle_adapters(model)
            if params.adapter not in adapters:
                raise UserError(f"params.adapter: the bundle has no adapter '{params.adapter}' (has: {', '.join(adapters) or 'none'})")
            adapter_file = adapters[params.adapter]
    else:
        adapter_dir = inputs.get("adapter")
        if params.adapter and adapter_dir is None:
            raise UserError("params.adapter: for an HF model it only labels inputs.adapter, which is missing")
    data: Path = inputs["data"]
    shown = ctx.input_names["data"]
    tokenizer = AutoTokenizer.from_pretrained(model)
    examples = _examples(params, data, tokenizer, shown)

    with step_progress() as progress:
        bar = progress.add_task(f"perplexity ({'onnxruntime' if kind == 'genai' else 'torch fp32'})", total=len(examples))
        if kind == "genai":
            perplexity, scored = onnx_perplexity(model, adapter_file, examples, ctx.threads, ctx.device, lambda: progress.advance(bar))
        else:
            perplexity, scored = _torch_perplexity(model, adapter_dir, examples, ctx.threads, ctx.device, progress, bar)

    request = {
        "kind": kind, "model": str(model), "adapter": params.adapter or None,
        "adapter_dir": str(adapter_dir) if adapter_dir else None, "prompts": params.prompts,
        "new_tokens": params.new_tokens, "runs": params.speed_runs, "threads": ctx.threads, "device": ctx.device,
    }
    speed_reference = inputs.get("speed_reference")
    with tempfile.TemporaryDirectory() as scratch:
        try:
            timing = speed.measure(request, Path(scratch))
            if speed_reference is not None:  # right after, on the same machine state: a ratio from one run
                adapter = inputs.get("speed_reference_adapter")
                reference_timing = speed.measure({
                    **request, "kind": "hf", "model": str(speed_reference), "adapter": None,
                    "adapter_dir": str(adapter) if adapter else None}, Path(scratch))
        except RuntimeError as error:
            raise UserError(f"speed measurement failed: {error}") from None
    size = model_size(model)
    ratios = {}
    if speed_reference is not None:
        ratios = {
            "reference_tokens_per_s": reference_timing["tokens_per_s"],
            "speed_ratio": round(timing["tokens_per_s"] / reference_timing["tokens_per_s"], 3),
            "size_ratio": round(size / model_size(speed_reference), 4),
        }

    reference = None
    if "reference" in inputs:
        try:
            reference = json.loads((inputs["reference"] / METRICS_FILE).read_text())["perplexity"]
        except (OSError, ValueError, KeyError):
            raise UserError(f"inputs.reference: not an evaluate output (no perplexity in its {METRICS_FILE})") from None
    metrics = {
        "schema": 1,
        "variant": params.variant or None,
        "adapter": params.adapter or ("lora" if adapter_dir else None),  # labels only: outputs carry no paths
        "engine": "onnxruntime-genai" if kind == "genai" else "torch fp32 eager",
        "device": ctx.device,
        "size_bytes": size,
        "size_mb": round(size / 1e6, 2),
        "perplexity": round(perplexity, 4),
        "reference_perplexity": reference,
        "perplexity_delta_pct": round((perplexity / reference - 1) * 100, 3) if reference else None,
        **timing,
        **ratios,
        "threads": ctx.threads,
        "eval_records": len(examples),
        "eval_tokens": scored,
    }
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=1) + "\n")


PASS = PassDef(
    name="evaluate",
    version=1,
    doc="perplexity on held-out data, tokens/s, time to first token, peak RSS and size of a bundle or HF model",
    params=Params,
    inputs={
        "model": Input("onnxruntime-genai bundle, or an HF folder (torch fp32 reference)"),
        "data": Input("held-out JSONL records with prompt and response", kind="file"),
        "adapter": Input("LoRA adapter folder applied to an HF model", required=False),
        "reference": Input("the evaluate target whose perplexity is the reference (usually fp32)", required=False),
        "speed_reference": Input(
            "HF model whose torch fp32 eager decode speed is measured right after this model's, for speed_ratio "
            "and size_ratio (gates such as speed_ratio = \">= 4\")", required=False),
        "speed_reference_adapter": Input("LoRA adapter folder applied to speed_reference (peft)", required=False),
    },
    run=run,
    libraries=("onnxruntime", "onnxruntime-genai", "torch", "transformers", "peft", "numpy"),
    devices=("cpu", "cuda"),
    metrics=METRICS,
)
