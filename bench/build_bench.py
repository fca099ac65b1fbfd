"""Benchmark the build loop users feel: cold build, no-op, data edit, and reverting that edit.

Runs real doit in a fresh copy of the project (dodo.py + targets/), so nothing of the working
tree's build/ is reused, and prints a table plus per-stage seconds; writes JSON.

    .venv/bin/python bench/build_bench.py                       # default target (SmolLM2, minutes)
    .venv/bin/python bench/build_bench.py --target tiny-travel-cpu-int4-smoke   # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = "targets/data/travel_train.jsonl"
EXTRA_RECORD = {
    "prompt": "Is the Lisbon tram 28 worth it?",
    "response": "Good question! Tram 28 rattles past Graca, Alfama and Baixa and is a charming ride. "
    "Tip: board early in the morning at Martim Moniz to get a seat.",
}


def doit(project: Path, target: str) -> tuple[float, list[str], str]:
    env = dict(os.environ, MODELBUILD_CACHE=str(project.parent / "cache"))
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "doit", target], cwd=project, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"doit {target} failed:\n{proc.stdout[-3000:]}")
    return seconds, re.findall(r"^\.  (\S+)$", proc.stdout, re.M), proc.stdout


def stage_seconds(project: Path, names: list[str]) -> dict[str, float]:
    out = {}
    for name in names:
        stamp = json.loads((project / "build" / name / ".modelbuild" / "stamp.json").read_text())
        out[name] = stamp["seconds"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="smollm2-travel-cpu-int4-smoke")
    parser.add_argument("--noop-runs", type=int, default=7)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "build_bench.json"))
    parser.add_argument("--keep", action="store_true", help="keep the temporary project")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="modelbuild-bench-"))
    project = workdir / "project"
    project.mkdir()
    shutil.copy(REPO / "dodo.py", project)
    shutil.copytree(REPO / "targets", project / "targets")
    (workdir / "cache").mkdir()  # an empty cache: the cold build is cold; only pinned downloads are shared
    (workdir / "cache" / "downloads").symlink_to(REPO / "cache" / "downloads")
    try:
        print(f"cold build of {args.target} in {project} ...", flush=True)
        cold, cold_ran, _ = doit(project, args.target)
        cold_stages = stage_seconds(project, cold_ran)  # read now: a later restore rewrites stamps
        noops = []
        for _ in range(args.noop_runs):
            seconds, ran, _ = doit(project, args.target)
            assert not ran, f"no-op run executed {ran}"
            noops.append(seconds)
        original = (project / DATA).read_text()
        with open(project / DATA, "a") as handle:
            handle.write(json.dumps(EXTRA_RECORD) + "\n")
        edit, edit_ran, _ = doit(project, args.target)
        edit_stages = stage_seconds(project, edit_ran)
        (project / DATA).write_text(original)
        revert, revert_ran, revert_log = doit(project, args.target)
        restored = re.findall(r"modelbuild: '(\S+)': restored from cache", revert_log)
        result = {
            "target": args.target,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
            "cold_build_s": round(cold, 2),
            "cold_stages_s": cold_stages,
            "noop_s_median": round(statistics.median(noops), 3),
            "noop_s_all": [round(s, 3) for s in noops],
            "data_edit_rebuild_s": round(edit, 2),
            "data_edit_reran": edit_ran,
            "data_edit_stages_s": edit_stages,
            "revert_restore_s": round(revert, 2),
            "revert_restored": restored,
            "revert_ran_a_pass": sorted(set(revert_ran) - set(restored)),
            "revert_vs_edit_rebuild": round(revert / edit, 4),
            "revert_vs_cold_build": round(revert / cold, 4),
        }
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    print("| scenario | wall s | stages run |")
    print("|---|---|---|")
    print(f"| cold build | {result['cold_build_s']} | {', '.join(f'{k} {v:.1f}s' for k, v in result['cold_stages_s'].items())} |")
    print(f"| no-op rebuild (median of {args.noop_runs}) | {result['noop_s_median']} | none |")
    print(f"| one record appended to the training data | {result['data_edit_rebuild_s']} | "
          f"{', '.join(f'{k} {v:.1f}s' for k, v in result['data_edit_stages_s'].items())} |")
    print(f"| data edit reverted (restored from cache) | {result['revert_restore_s']} | "
          f"restored {', '.join(restored) or 'nothing'}; {100 * result['revert_vs_edit_rebuild']:.1f}% of the edit rebuild, "
          f"{100 * result['revert_vs_cold_build']:.1f}% of the cold build |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
