"""toy-words: count the words of a text file (case-folded, whitespace-normalised)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from modelbuild import UserError
from modelbuild.passdef import Input, PassDef, param, require

from . import record_run


@dataclass(frozen=True)
class Params:
    min_count: int = param(1, "words seen fewer times are left out")
    label: str = param("", "a note recorded nowhere in the output (changes the key, never the bytes)")

    def __post_init__(self):
        require(self.min_count >= 1, "min_count", "at least 1", self.min_count)


def run(params: Params, inputs: dict, out_dir: Path, ctx) -> None:
    record_run(ctx.target, "toy-words")
    try:
        text = inputs["text"].read_text()
    except UnicodeDecodeError:
        raise UserError(f"{ctx.input_names['text']}: not UTF-8 text") from None
    counts: dict[str, int] = {}
    for word in text.lower().split():  # blank lines and spacing do not change the output
        counts[word] = counts.get(word, 0) + 1
    kept = {word: n for word, n in sorted(counts.items()) if n >= params.min_count}
    (out_dir / "counts.json").write_text(json.dumps(kept, indent=1, sort_keys=True) + "\n")
    (out_dir / "total.txt").write_text(f"{sum(kept.values())}\n")


PASS = PassDef(
    name="toy-words",
    version=1,
    doc="word counts of a text file (for tests)",
    params=Params,
    inputs={"text": Input("a text file", kind="file")},
    run=run,
)
