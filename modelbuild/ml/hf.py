"""Saving Hugging Face model folders so that the same model gives the same bytes."""

from __future__ import annotations

import gc
import json
from pathlib import Path


def save_model_folder(model, tokenizer, out_dir: Path) -> None:
    """Save model (safetensors) + tokenizer + chat template, with no machine-specific paths."""
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    for name in ("config.json", "tokenizer_config.json"):
        path = out_dir / name
        if path.exists():
            data = json.loads(path.read_text())
            data.pop("_name_or_path", None)
            data.pop("name_or_path", None)
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    for path in out_dir.iterdir():
        path.chmod(0o644)


def linear_out_features(model) -> dict[str, int]:
    """out_features of every Linear except the LM head (for the genai builder's LM-head trap)."""
    import torch

    return {
        name: module.out_features
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
    }


def probe_ids(model_dir: Path, prompt: str) -> list[int]:
    """Token ids of ``prompt`` as generation sees it: through the model's chat template if it has one."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
    else:
        text = prompt
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def torch_logits(model_dir: Path, ids: list[int]):
    """fp32 logits [tokens, vocab] of an HF causal LM for one sequence (numpy, float64). The model
    is freed on return: callers that build another copy of it (the genai builder) never hold both."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double().numpy()
    del model
    gc.collect()  # torch modules hold reference cycles: free the fp32 copy before the caller builds another
    return logits

