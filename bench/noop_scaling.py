"""No-op rebuild time vs artifact size: it must stay flat (the stat cache, not re-hashing).

    .venv/bin/python bench/noop_scaling.py [--sizes-mb 100 1000 5000]

For each size, a fresh project imports a synthetic model folder of that size (hf-import of a
local folder: config.json + one model.safetensors) and builds it; then no-op `doit` runs are
timed (median of 5). Writes bench/results/noop_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET = """
[target.big-import]
pass = "hf-import"
params = { model = "synthetic" }
inputs = { local = "../model" }
"""


def doit(project: Path) -> tuple[float, str]:
    env = dict(os.environ, MODELBUILD_CACHE=str(project.parent / "cache"))
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "doit", "big-import"], cwd=project, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        sys.exit(proc.stdout)
    return time.perf_counter() - started, proc.stdout


def measure(size_mb: int, runs: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="modelbuild-noop-"))
    try:
        project = work / "project"
        (project / "targets").mkdir(parents=True)
        shutil.copy(REPO / "dodo.py", project)
        (project / "targets" / "big.toml").write_text(TARGET)
        model = project / "model"
        model.mkdir()
        (model / "config.json").write_text('{"model_type": "synthetic"}\n')
        block = os.urandom(1 << 20)
        with open(model / "model.safetensors", "wb") as handle:
            for _ in range(size_mb):
                handle.write(block)
        cold, _ = doit(project)
        time.sleep(2.1)  # past the stat cache's same-tick window, as any real later run is
        first, _ = doit(project)
        noops = []
        for _ in range(runs):
            seconds, out = doit(project)
            assert "-- big-import" in out, out
            noops.append(seconds)
        return {"size_mb": size_mb, "cold_build_s": round(cold, 2), "first_noop_s": round(first, 3),
                "noop_s_median": round(statistics.median(noops), 3), "noop_s_all": [round(s, 3) for s in noops]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "noop_scaling.json"))
    args = parser.parse_args()
    rows = [measure(size, args.runs) for size in args.sizes_mb]
    print("| artifact size | cold build s | no-op s (median) |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row['size_mb']} MB (x3: input, output, cache) | {row['cold_build_s']} | {row['noop_s_median']} |")
    ratio = rows[-1]["noop_s_median"] / rows[0]["noop_s_median"]
    print(f"\nno-op at {rows[-1]['size_mb']} MB / at {rows[0]['size_mb']} MB: {ratio:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "largest_vs_smallest_noop": round(ratio, 3)}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
