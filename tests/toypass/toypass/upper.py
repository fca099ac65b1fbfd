"""toy-upper: a transformed copy of another target's output folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from modelbuild.passdef import Input, PassDef, param

from . import record_run


@dataclass(frozen=True)
class Params:
    suffix: str = param("", "appended to every line")
    upper: bool = param(True, "upper-case the text")


def run(params: Params, inputs: dict, out_dir: Path, ctx) -> None:
    record_run(ctx.target, "toy-upper")
    source = inputs["source"]
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if not path.is_file() or rel.parts[0] == ".modelbuild":
            continue
        text = path.read_text()
        if params.upper:
            text = text.upper()
        text = "".join(line + params.suffix + "\n" for line in text.splitlines())
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / rel).write_text(text)


PASS = PassDef(
    name="toy-upper",
    version=1,
    doc="an upper-cased copy of another target's output (for tests)",
    params=Params,
    inputs={"source": Input("another target's output folder")},
    run=run,
)
