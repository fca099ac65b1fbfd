"""Calibration data for quantizers that run an ONNX decoder: the project's own prompt/response
records (never a hub dataset), rendered and tokenized the way the bundle generates."""

from __future__ import annotations

import json
from pathlib import Path

from modelbuild import UserError
from modelbuild.ml.records import load_records, render


class _TemplateTokenizer:
    """What lora_finetune.render needs of a tokenizer, served by the bundle's own (onnxruntime-genai)
    tokenizer: the same chat template generation applies."""

    def __init__(self, tokenizer, has_template: bool):
        self.tokenizer = tokenizer
        self.chat_template = has_template

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False):
        return self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=add_generation_prompt)


def _has_chat_template(bundle: Path) -> bool:
    if (bundle / "chat_template.jinja").is_file():
        return True
    try:
        return bool(json.loads((bundle / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False


def calibration_feeds(bundle: Path, path: Path, shown: str, template: str, samples: int, max_length: int,
                      feeds) -> tuple[list[dict], dict]:
    """Decoder input dicts for ``samples`` records spread evenly over the JSONL file at ``path``,
    rendered through ``template`` with the bundle's own tokenizer (what generation sees), each
    cut to ``max_length`` tokens; and a record of what they are."""
    import onnxruntime_genai as og

    records = load_records(path, shown)
    count = min(samples, len(records))
    picked = sorted({(i * len(records)) // count for i in range(count)})
    tokenizer = og.Tokenizer(og.Config(str(bundle)))
    shim = _TemplateTokenizer(tokenizer, _has_chat_template(bundle))
    out, tokens = [], 0
    for index in picked:
        _, text = render(records[index], template, shim, f"{shown}: record {index + 1}")
        ids = [int(t) for t in tokenizer.encode(text)][:max_length]
        if not ids:
            raise UserError(f"{shown}: record {index + 1}: renders to no tokens")
        out.append(feeds(ids))
        tokens += len(ids)
    return out, {"file": shown, "records": len(out), "tokens": tokens, "template": template, "max_length": max_length}
