"""Rebuild audit against the cold build: what ``cache audit`` costs a team (issue #24, item 4).

In a fresh copy of the project (dodo.py + targets/) with an empty cache folder (only the
sha256-pinned model downloads shared):

1. ``doit TARGET`` cold: every pass runs and fills the local cache (wall time);
2. ``python -m modelbuild cache audit TARGET``: every stage of its closure rebuilt in a scratch
   folder and compared with its cached entry (wall time; every stage must be reproducible, and
   build/ must be left as it was).

An audit runs each pass once more, so its goal is the cold build's time plus the keying (the
audit hashes its inputs anew, with a stat cache of its own): a ratio near 1.

Prints a line and updates bench/results/audit_cost.json (one entry per target).

    .venv/bin/python bench/audit_cost.py                                   # the tiny chain, a few minutes
    .venv/bin/python bench/audit_cost.py --target smollm2-travel-cpu-int4-smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(argv: list[str], project: Path, cache: Path) -> tuple[float, subprocess.CompletedProcess]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MODELBUILD_CACHE": str(cache), "MODELBUILD_REMOTE_CACHE": "off"}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], cwd=project, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    return time.perf_counter() - started, proc


def tree_times(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="tiny-travel-cpu-int4-smoke")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "audit_cost.json"))
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="modelbuild-audit-cost-"))
    try:
        project, cache = workdir / "project", workdir / "cache"
        project.mkdir()
        shutil.copy(REPO / "dodo.py", project)
        shutil.copytree(REPO / "targets", project / "targets")
        cache.mkdir()
        (cache / "downloads").symlink_to(REPO / "cache" / "downloads")

        cold_s, cold = run(["-m", "doit", args.target], project, cache)
        if cold.returncode != 0:
            sys.exit(f"doit {args.target} failed:\n{cold.stdout[-3000:]}")
        stages = sorted(re.findall(r"^\.  (\S+)$", cold.stdout, re.M))
        before = tree_times(project / "build")
        audit_s, audit = run(["-m", "modelbuild", "cache", "audit", args.target], project, cache)
        reproducible = sorted(re.findall(r"^'(\S+)': reproducible: ", audit.stdout, re.M))
        if audit.returncode != 0 or reproducible != stages:
            sys.exit(f"cache audit {args.target}: not every stage reproducible (exit {audit.returncode}):\n{audit.stdout[-3000:]}")
        untouched = tree_times(project / "build") == before
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    result = {
        "cold_build_s": round(cold_s, 2),
        "audit_s": round(audit_s, 2),
        "audit_vs_cold": round(audit_s / cold_s, 3),
        "stages": stages,
        "reproducible": reproducible,
        "build_dir_untouched": untouched,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_avg_1m": round(os.getloadavg()[0], 2)},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results[args.target] = result
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"{args.target}: cold build {cold_s:.1f} s, audit of its {len(stages)} stages {audit_s:.1f} s "
          f"({audit_s / cold_s:.2f} x), all reproducible, build/ untouched: {untouched}")


if __name__ == "__main__":
    main()
