"""Saving Hugging Face model folders so that the same model gives the same bytes."""

from __future__ import annotations

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
