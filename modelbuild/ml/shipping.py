"""What the passes that ship a base with switchable adapters share (genai-build and gguf-export,
smoke and gguf-smoke): adapter names that become file names, and the answers a smoke pass writes."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from modelbuild import UserError
from modelbuild.passdef import param, require


def check_adapter_names(params: dict, inputs: dict) -> None:
    """A pass's load-time check (PassDef.check): each name in ``inputs.adapters`` becomes a file
    name and a runtime's adapter key."""
    for name in inputs.get("adapters") or {}:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise UserError(f"inputs.adapters.{name}: adapter names use letters, digits, '-' and '_'")


BASE = "(none)"  # the variant with no adapter, in the answers


@dataclass(frozen=True)
class SmokeParams:
    prompts: list[str] = param(
        ["What should I see in Chicago?", "Plan a rainy day in London.", "What should I pack for a week in Iceland?"],
        "prompts answered greedily, with each adapter off and on",
    )
    max_new_tokens: int = param(64, "tokens generated per answer")
    require_adapter_effect: bool = param(True, "fail when an adapter leaves every answer unchanged")

    def __post_init__(self):
        require(bool(self.prompts), "prompts", "a non-empty list", self.prompts)
        require(self.max_new_tokens >= 1, "max_new_tokens", "at least 1", self.max_new_tokens)


def write_answers(out_dir: Path, answers: dict[str, dict[str, str]]) -> None:
    """``answers.json`` (prompt -> variant -> text) and the same as ``answers.md``, for people."""
    (out_dir / "answers.json").write_text(json.dumps(answers, indent=1, ensure_ascii=False) + "\n")
    lines = []
    for prompt, by_variant in answers.items():
        lines.append(f"## {prompt}\n")
        lines.extend(f"- **{variant}**: {text}\n" for variant, text in by_variant.items())
        lines.append("")
    (out_dir / "answers.md").write_text("\n".join(lines))
