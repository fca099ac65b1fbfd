"""How closely llama.cpp follows torch fp32 per GGUF precision: the figures behind gguf-export's BOUNDS.

For each built base folder given (e.g. build/smollm2-base build/tiny-base) and each precision
(f16, q8_0, q4_0, q4_1 with the source grid not kept, and q4_1 with it kept: what the default
target writes), writes the GGUF, runs the check prompt through
llama.cpp and records logit correlation, top-1 agreement and max |dlogit| against torch fp32, and
the file's size and write time. Prints a table and writes bench/results/gguf_bounds.json.

    .venv/bin/python bench/gguf_bounds.py build/smollm2-base build/tiny-base
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modelbuild.ml.genai import logit_agreement  # noqa: E402
from modelbuild.ml.gguf_write import PRECISIONS, write_base  # noqa: E402
from modelbuild.ml.hf import probe_ids, torch_logits  # noqa: E402
from modelbuild.ml.llama import Runner  # noqa: E402
from modelbuild.passes.gguf_export import Params  # noqa: E402

PROMPTS = (Params().check_prompt, "What should I pack for a week in Iceland?")


def measure(base: Path, precision: str, keep_source_grid: bool, scratch: Path, references: dict) -> dict:
    path = scratch / f"{base.name}-{precision}-{keep_source_grid}.gguf"
    start = time.perf_counter()
    written = write_base(base, path, precision, keep_source_grid)
    seconds = time.perf_counter() - start
    runner = Runner(path, threads=2)
    rows = []
    for prompt in PROMPTS:
        ids, expected = references[prompt]
        rows.append(logit_agreement(expected, runner.logits(ids)))
    runner.close()
    size = path.stat().st_size
    path.unlink()
    return {"model": base.name, "precision": precision, "keep_source_grid": keep_source_grid,
            "tensor_types": written["tensor_types"], "size_mb": round(size / 1e6, 2), "write_s": round(seconds, 1),
            "min_correlation": min(r["correlation"] for r in rows), "min_top1": min(r["top1_agreement"] for r in rows),
            "max_abs": max(r["max_abs"] for r in rows)}


def main(bases: list[str]) -> None:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for base in map(Path, bases):
            references = {prompt: (ids, torch_logits(base, ids)) for prompt in PROMPTS
                          for ids in [probe_ids(base, prompt)]}
            for precision, keep in [(p, False) for p in PRECISIONS] + [("q4_1", True)]:
                row = measure(base, precision, keep, Path(tmp), references)
                results.append(row)
                print(f"{row['model']:14} {precision:5} grid={'kept' if keep else 'off ':4}  corr {row['min_correlation']:.4f}"
                      f"  top1 {row['min_top1']:.0%}  max|d| {row['max_abs']:.3g}  {row['size_mb']} MB  {row['tensor_types']}",
                      flush=True)
    out = Path(__file__).resolve().parent / "results" / "gguf_bounds.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["build/smollm2-base", "build/tiny-base"])
