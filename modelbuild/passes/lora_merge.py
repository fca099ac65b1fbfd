"""lora-merge: HF base + one LoRA adapter -> one HF model with the adapter folded into its weights.

The single-adapter way to ship: ``W' = W + (alpha / r) * B @ A`` for every adapted Linear
(peft's ``merge_and_unload``), computed in float32 and saved as a plain HF folder. A
genai-build of the result needs no adapter inputs and no ``.onnx_adapter``: the bundle is one
model, one graph, and the int4 quantizer sees the merged weights (where the switchable route
keeps the LoRA path float beside the int4 base). What is lost is switching: the adapter is
always on. Compare both routes in targets/variants.toml.

Checked before anything is written: the merged model's logits equal the base + adapter's
logits (peft, unmerged) on a probe prompt to ``max_logit_diff``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from modelbuild import UserError, say
from modelbuild.passdef import Input, PassDef, param, require

PROBE = "Plan a weekend in Lisbon with a small budget."


@dataclass(frozen=True)
class Params:
    max_logit_diff: float = param(1e-3, "largest |logit| difference allowed between merged and unmerged model on the probe prompt")

    def __post_init__(self):
        require(self.max_logit_diff > 0, "max_logit_diff", "positive", self.max_logit_diff)


def run(params: Params, inputs: dict, out_dir: Path, ctx) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modelbuild.ml.hf import save_model_folder

    torch.set_num_threads(ctx.threads)
    base_dir, adapter_dir = inputs["base"], inputs["adapter"]
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError("inputs.adapter: no adapter_config.json: not a LoRA adapter (use a lora-finetune target)")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    try:
        peft_model = PeftModel.from_pretrained(model, adapter_dir)
    except (ValueError, KeyError, RuntimeError) as error:
        raise UserError(f"inputs.adapter: does not fit inputs.base ({str(error).splitlines()[0]})") from None
    peft_model.eval()
    probe = tokenizer(PROBE, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        expected = peft_model(input_ids=probe).logits
        merged = peft_model.merge_and_unload()
        got = merged(input_ids=probe).logits
    diff = float((expected - got).abs().max())
    if not diff <= params.max_logit_diff:
        raise UserError(f"merged model differs from base + adapter: max |dlogit| {diff:.3g} > params.max_logit_diff {params.max_logit_diff:g}")
    # Said, not written: the last bits of a float difference may vary with the thread count.
    say(f"'{ctx.target}': merged model matches base + adapter to max |dlogit| {diff:.2g}")
    save_model_folder(merged, tokenizer, out_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    (out_dir / "lora_merge.json").write_text(json.dumps({
        "rank": config.get("r"), "alpha": config.get("lora_alpha"),
        "target_modules": sorted(config.get("target_modules") or []),
    }, indent=1, sort_keys=True) + "\n")


PASS = PassDef(
    name="lora-merge",
    version=1,
    doc="HF base + LoRA adapter -> HF model with the adapter merged into its weights (single-adapter shipping)",
    params=Params,
    inputs={
        "base": Input("Hugging Face model folder the adapter was trained on"),
        "adapter": Input("LoRA adapter folder (a lora-finetune target)"),
    },
    run=run,
    libraries=("torch", "transformers", "peft", "safetensors"),
)
