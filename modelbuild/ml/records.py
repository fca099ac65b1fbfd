"""Prompt/response records: the project's JSONL data, read and rendered the same way by every pass
that trains on it, calibrates on it or measures perplexity on it.

A record is a JSON object per line with string fields (``prompt`` and ``response`` at least when
the base model's chat template renders it). Bad data is a ``UserError`` naming the file and the
line: not UTF-8, not JSON, not an object, a field that is not a string.
"""

from __future__ import annotations

import json
from pathlib import Path

from modelbuild import UserError

CHAT = "chat"  # params.template value: the base model's own chat template


def load_records(path: Path, shown: str) -> list[dict]:
    """Every non-blank line of a JSONL file as a dict; ``shown`` names the file in errors."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise UserError(f"{shown}: line {line}: not UTF-8 text (byte {error.start}: {data[error.start:error.start + 1]!r}); "
                        "data files are UTF-8 JSON Lines") from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            raise UserError(f"{shown}: line {number}: not JSON ({error})") from None
        if not isinstance(record, dict):
            raise UserError(f"{shown}: line {number}: expected a JSON object")
        for key, value in record.items():
            if not isinstance(value, str):
                raise UserError(f"{shown}: line {number}: field '{key}' must be a string, got {type(value).__name__} {value!r:.40}")
        records.append(record)
    if not records:
        raise UserError(f"{shown}: no records")
    return records


def render(record: dict, template: str, tokenizer, where: str) -> tuple[str, str]:
    """(prompt part, full text): the loss can skip the prompt part.

    ``template`` is ``"chat"`` (the tokenizer's chat template: user prompt, assistant response)
    or a text template with ``{prompt}`` and ``{response}`` (any field of the record may appear).
    """
    for key in ("prompt", "response") if template == CHAT else ():
        if not isinstance(record.get(key), str):
            raise UserError(f"{where}: missing string field '{key}'")
    if template == CHAT:
        if not tokenizer.chat_template:
            raise UserError("params.template: 'chat', but the base model has no chat template")
        user = [{"role": "user", "content": record["prompt"]}]
        prefix = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": record["response"]}], tokenize=False)
        return prefix, full
    try:
        full = template.format_map(record)
        cut = template.index("{response}")
        prefix = template[:cut].format_map(record)
    except KeyError as error:
        raise UserError(f"{where}: template field {error} is not in the record") from None
    except ValueError:
        raise UserError("params.template: must contain {response} (and usually {prompt})") from None
    return prefix, full


def tokenize_record(record: dict, template: str, tokenizer, max_length: int, where: str) -> tuple[list[int], int]:
    """(token ids of the rendered record, cut to ``max_length``; how many of them the prompt part
    takes): the tokens that carry a loss or a perplexity are ``ids[prompt:]``."""
    prefix, full = render(record, template, tokenizer, where)
    ids = tokenizer(full, add_special_tokens=False)["input_ids"][:max_length]
    return ids, len(tokenizer(prefix, add_special_tokens=False)["input_ids"])


def right_pad(rows: list[list[int]], value: int) -> tuple[list[list[int]], list[list[int]]]:
    """(rows padded on the right with ``value`` to the longest, attention masks: 1 real, 0 padding)."""
    width = max(len(row) for row in rows)
    return ([row + [value] * (width - len(row)) for row in rows],
            [[1] * len(row) + [0] * (width - len(row)) for row in rows])

