"""Benchmark device-aware parallel builds: two independent CPU stages serially vs `doit -n 2`,
and the schedule of a mixed graph on simulated GPUs, printed as a timeline.

Part 1 uses a fresh copy of the project whose upstream stages (base, adapter) are restored from
the repo's cache, then builds the two variants with the cache bypassed (MODELBUILD_FORCE=1),
first with -n 1 (one CPU slot, all threads), then with -n 2 (two slots, threads split). It also
compares the two builds' outputs byte for byte: thread counts must not change artifacts.

    .venv/bin/python bench/parallel_bench.py                          # SmolLM2 int8 + int4-rtn bundles
    .venv/bin/python bench/parallel_bench.py --model tiny             # seconds
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from modelbuild.core.stamp import STAMP_DIR, read_stamp  # noqa: E402

SIMULATED = """
[devices]
gpus = [0, 1]
simulated = true
cpu_slots = 2

[target."train-{s}"]
pass = "device-probe"
device = "cuda"
params = { seconds = "{s}" }
matrix = { s = [2.0, 2.1, 2.2] }

[target.export-gpu1]
pass = "device-probe"
device = "cuda:1"
params = { seconds = 1.5 }

[target."eval-{s}"]
pass = "device-probe"
params = { seconds = "{s}", size = 128 }
matrix = { s = [1.0, 1.1, 1.2, 1.3] }
"""


def doit(project: Path, *args: str, env: dict | None = None) -> float:
    full = dict(os.environ, **(env or {}))
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "doit", *args], cwd=project, env=full,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        sys.exit(f"doit {' '.join(args)} failed:\n{proc.stdout[-3000:]}")
    return time.perf_counter() - started


def fresh_project(root: Path, targets_text: str | None = None) -> Path:
    project = root / "project"
    project.mkdir(parents=True)
    shutil.copy(REPO / "dodo.py", project)
    if targets_text is None:
        shutil.copytree(REPO / "targets", project / "targets")
    else:
        (project / "targets").mkdir()
        (project / "targets" / "probe.toml").write_text(targets_text)
    return project


def same_tree(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and STAMP_DIR not in p.parts)
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and STAMP_DIR not in p.parts)
    return files_a == files_b and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files_a)


def serial_vs_parallel(model: str, cache: Path) -> dict:
    variants = [f"{model}-travel-cpu-int8", f"{model}-travel-cpu-int4-rtn"]
    with tempfile.TemporaryDirectory() as tmp:
        project = fresh_project(Path(tmp))
        env = {"MODELBUILD_CACHE": str(cache)}
        print(f"preparing: {model}-base and {model}-travel-adapter (restored from the cache or built once)")
        doit(project, f"{model}-travel-adapter", env=env)
        print(f"serial (-n 1): {' '.join(variants)}")
        serial = doit(project, "-n", "1", *variants, env={**env, "MODELBUILD_FORCE": "1"})
        kept = Path(tmp) / "serial"
        kept.mkdir()
        for name in variants:
            shutil.copytree(project / "build" / name, kept / name)
        doit(project, "forget", *variants, env=env)
        print(f"parallel (-n 2): {' '.join(variants)}")
        parallel = doit(project, "-n", "2", *variants, env={**env, "MODELBUILD_FORCE": "1"})
        runs = {name: read_stamp(project / "build" / name)["ran_on"] for name in variants}
        identical = {name: same_tree(kept / name, project / "build" / name) for name in variants}
    return {"variants": variants, "serial_s": round(serial, 2), "parallel_s": round(parallel, 2),
            "ratio": round(parallel / serial, 3), "parallel_runs": runs, "outputs_identical": identical}


def simulated_timeline() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        project = fresh_project(Path(tmp), SIMULATED)
        wall = doit(project, "-n", "4", env={"MODELBUILD_CACHE": str(Path(tmp) / "cache")})
        runs = {}
        for folder in sorted((project / "build").iterdir()):
            stamp = read_stamp(folder)
            if stamp and "ran_on" in stamp:
                runs[folder.name] = stamp["ran_on"]
    t0 = min(r["started"] for r in runs.values())
    end = max(r["ended"] for r in runs.values()) - t0
    width = 60
    print(f"\nsimulated: 2 GPUs + 2 CPU slots, doit -n 4, {len(runs)} stages, wall {wall:.1f} s")
    for slot in sorted({r["device"] for r in runs.values()}):
        for name, r in sorted(runs.items(), key=lambda item: item[1]["started"]):
            if r["device"] != slot:
                continue
            a = int((r["started"] - t0) / end * width)
            b = max(a + 1, int((r["ended"] - t0) / end * width))
            print(f"{slot:7} {name:12} |{' ' * a}{'#' * (b - a)}{' ' * (width - b)}| "
                  f"{r['started'] - t0:5.1f}-{r['ended'] - t0:5.1f} s")
    return {"wall_s": round(wall, 2), "runs": {n: {**r, "started": round(r["started"] - t0, 3),
                                                      "ended": round(r["ended"] - t0, 3)} for n, r in runs.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", choices=("smollm2", "tiny"))
    parser.add_argument("--cache", default=str(REPO / "cache"), help="cache with the upstream stages")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "parallel_bench.json"))
    args = parser.parse_args()

    result = serial_vs_parallel(args.model, Path(args.cache))
    print(f"\n{'build':34} {'wall s':>8}")
    print(f"{'serial   -n 1':34} {result['serial_s']:8.1f}")
    print(f"{'parallel -n 2':34} {result['parallel_s']:8.1f}")
    print(f"ratio parallel/serial: {result['ratio']:.3f} (target <= 0.65)")
    for name, run in result["parallel_runs"].items():
        print(f"  {name}: {run['device']}, {run['threads']} thread(s)")
    print(f"outputs byte-identical serial vs parallel: {result['outputs_identical']}")
    result["simulated"] = simulated_timeline()
    result["cores"] = len(os.sched_getaffinity(0))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
