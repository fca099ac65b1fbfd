"""lora-finetune: LoRA (peft) on a JSONL file of records rendered through a text template.

Deterministic by construction: seeded LoRA init, dropout and data order, a plain training loop
(no Trainer state), sorted target_modules and no machine paths in adapter_config.json, so the
same inputs give byte-identical adapter files.

On a GPU (``device = "cuda"``, or a preference list such as ``["cuda", "cpu"]``) it trains the way
people train there: the base in fp32 on the GPU, forward and backward under bf16 autocast where
the GPU supports bf16 (fp32 otherwise), LoRA weights and optimizer state in fp32; deterministic
algorithms (``torch.use_deterministic_algorithms``, ``CUBLAS_WORKSPACE_CONFIG=:4096:8``), so the
same GPU model, driver and inputs give the same adapter. GPU and CPU adapters differ in their last
bits; the device is part of the action key, so each is cached as what it is.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

from modelbuild import UserError
from modelbuild.ml.records import load_records, right_pad, tokenize_record
from modelbuild.passdef import Input, PassDef, param, require

SEED_TEMPLATE = "<|user|>\n{prompt}<|end|>\n<|assistant|>\n{response}<|end|>"


@dataclass(frozen=True)
class Params:
    template: str = param(SEED_TEMPLATE, "text template with {prompt} and {response}, or 'chat' for the base model's own chat template")
    loss_on: str = param("response", "tokens that carry the loss: the response only, or all", choices=("response", "all"))
    rank: int = param(8, "LoRA rank r")
    alpha: float = param(16.0, "LoRA alpha (scale = alpha / r)")
    dropout: float = param(0.05, "LoRA dropout")
    target_modules: list[str] = param([], "module names to adapt; empty = every Linear of the decoder layers")
    max_steps: int = param(100, "optimizer steps")
    learning_rate: float = param(2e-4, "peak learning rate (linear warmup over 10% of steps, then linear decay)")
    batch_size: int = param(1, "records per step")
    max_length: int = param(512, "tokens per record; longer records are truncated")
    seed: int = param(0, "seed for LoRA init, dropout and data order")

    def __post_init__(self):
        # learning_rate = 0 trains nothing and ships an adapter whose every lora_B is zero.
        require(self.learning_rate > 0, "learning_rate", "positive", self.learning_rate)
        require(0 <= self.dropout < 1, "dropout", "in [0, 1)", self.dropout)
        require(self.alpha > 0, "alpha", "positive", self.alpha)
        for name in ("max_steps", "batch_size", "rank"):
            require(getattr(self, name) >= 1, name, "at least 1", getattr(self, name))
        require(self.max_length >= 2, "max_length", "at least 2 (a prompt token and a response token)", self.max_length)


def tokenize(records, params: Params, tokenizer, shown: str) -> list[tuple[list[int], list[int]]]:
    examples = []
    for number, record in enumerate(records, 1):
        ids, prompt_tokens = tokenize_record(record, params.template, tokenizer, params.max_length, f"{shown}: record {number}")
        labels = list(ids)
        if params.loss_on == "response":
            if prompt_tokens >= len(ids):
                raise UserError(
                    f"{shown}: record {number}: its prompt alone is {prompt_tokens} tokens, so no response token fits in "
                    f"params.max_length = {params.max_length}: shorten the record or raise max_length"
                )
            labels[:prompt_tokens] = [-100] * prompt_tokens
        examples.append((ids, labels))
    return examples


def decoder_linear_names(model) -> list[str]:
    import torch

    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in name
    }
    return sorted(names)


def run(params: Params, inputs: dict, out_dir: Path, ctx) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modelbuild.core.progress import step_progress

    data_path = inputs["data"]
    shown = ctx.input_names["data"]
    on_gpu = ctx.device == "cuda"
    if on_gpu:
        if not torch.cuda.is_available():
            raise UserError("device cuda: torch sees no CUDA device in this stage's process")
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    device = torch.device("cuda" if on_gpu else "cpu")
    bf16 = on_gpu and torch.cuda.is_bf16_supported()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    torch.manual_seed(params.seed)
    tokenizer = AutoTokenizer.from_pretrained(inputs["base"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = tokenize(load_records(data_path, shown), params, tokenizer, shown)

    model = AutoModelForCausalLM.from_pretrained(inputs["base"], dtype=torch.float32)
    model.config.use_cache = False
    available = decoder_linear_names(model)
    modules = sorted(params.target_modules) or available
    unknown = [m for m in modules if m not in available]
    if unknown:
        raise UserError(f"params.target_modules: {', '.join(unknown)} not in the model (has: {', '.join(available)})")
    lora = LoraConfig(
        r=params.rank, lora_alpha=params.alpha, lora_dropout=params.dropout,
        target_modules=modules, bias="none", task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora).to(device)
    model.train()

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=params.learning_rate, weight_decay=0.0)
    warmup = max(1, params.max_steps // 10)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (params.max_steps - step) / max(1, params.max_steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    order_rng = random.Random(params.seed)
    order: list[int] = []
    losses = []
    with step_progress("loss") as progress:
        bar = progress.add_task(f"lora r={params.rank} on {len(examples)} records", total=params.max_steps, loss="-")
        for step in range(params.max_steps):
            batch = []
            while len(batch) < params.batch_size:
                if not order:
                    order = list(range(len(examples)))
                    order_rng.shuffle(order)
                batch.append(examples[order.pop()])
            padded, mask = right_pad([ids for ids, _ in batch], pad_id)
            labels, _ = right_pad([lab for _, lab in batch], -100)  # padding carries no loss
            input_ids, labels, mask = (torch.tensor(rows, device=device) for rows in (padded, labels, mask))
            with autocast:
                loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            if not math.isfinite(loss.item()):
                raise UserError(f"training diverged at step {step + 1} (loss {loss.item()}): lower params.learning_rate")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(round(loss.item(), 6))
            progress.update(bar, advance=1, loss=f"{losses[-1]:.3f}")

    model.to("cpu").save_pretrained(out_dir)
    (out_dir / "README.md").unlink(missing_ok=True)  # peft's model card records machine paths
    config_path = out_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["target_modules"] = sorted(config["target_modules"])
    config["base_model_name_or_path"] = "base"  # the upstream target, not a path on this machine
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out_dir / "training.json").write_text(json.dumps({
        "records": len(examples),
        "tokens_with_loss": sum(sum(1 for v in lab if v != -100) for _, lab in examples),
        "target_modules": modules,
        "device": ctx.device,
        "autocast": "bf16" if bf16 else None,
        "losses": losses,
    }, indent=1) + "\n")
    for path in out_dir.iterdir():
        path.chmod(0o644)


PASS = PassDef(
    name="lora-finetune",
    version=1,
    doc="deterministic LoRA finetune (peft) of an HF model on prompt/response JSONL",
    params=Params,
    inputs={
        "base": Input("Hugging Face model folder (usually another target)"),
        "data": Input("JSONL training records", kind="file"),
    },
    run=run,
    libraries=("torch", "transformers", "peft", "tokenizers", "safetensors"),
    devices=("cpu", "cuda"),
)
