"""toy-sleep: write a few files slowly, or fail; for lock, kill and failure tests.

It writes ``parts`` files, sleeping ``seconds`` before each one, so a kill lands while the
output is half-written; ``fail`` raises after the files are written (a pass that breaks late).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from modelbuild import UserError
from modelbuild.passdef import Input, PassDef, param, require

from . import record_run


@dataclass(frozen=True)
class Params:
    seconds: float = param(0.5, "sleep before writing each part")
    parts: int = param(2, "how many files to write")
    text: str = param("zzz", "what each part holds")
    fail: bool = param(False, "fail after writing the parts")

    def __post_init__(self):
        require(self.seconds >= 0, "seconds", "0 or more", self.seconds)
        require(self.parts >= 1, "parts", "at least 1", self.parts)


def run(params: Params, inputs: dict, out_dir: Path, ctx) -> None:
    record_run(ctx.target, "toy-sleep")
    prefix = ""
    source = inputs.get("source")
    if source is not None and source.is_dir():
        prefix = "".join(p.read_text() for p in sorted(source.glob("*.txt")))
    elif source is not None:
        prefix = source.read_text()
    for index in range(params.parts):
        time.sleep(params.seconds)
        (out_dir / f"part{index}.txt").write_text(f"{prefix}{params.text} {index}\n")
    if params.fail:
        raise UserError("failing as asked (params.fail)")


PASS = PassDef(
    name="toy-sleep",
    version=1,
    doc="slow writes of a few files, or a failure (for tests)",
    params=Params,
    inputs={"source": Input("a text file, or another target's output folder (its *.txt)", kind="any", required=False)},
    run=run,
)
