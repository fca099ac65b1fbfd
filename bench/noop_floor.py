"""The no-op build against its physical floor, doit itself, measured side by side in one run.

    .venv/bin/python bench/noop_floor.py [--target tiny-travel-cpu-int4-smoke] [--runs 7]

Builds ``--target`` once in a fresh copy of the project (empty cache; the tiny recipe takes
about a minute), then alternates two no-op runs ``--runs`` times and reports the median
whole-process CPU time (user + system, of doit and everything it starts) and wall time of each:

- modelbuild: ``doit TARGET`` in the built project (every target file loaded and validated,
  the target's closure checked by content through the stat cache);
- bare doit: a ``dodo.py`` with as many trivial tasks as the project has targets, each with a
  ``file_dep`` and a ``targets`` file, all up to date, run as ``doit`` with the same backend.

Prints a table and writes bench/results/noop_floor.json with the ratio (goal: <= 1.3).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from scratch import scratch_project  # noqa: E402

BARE_DODO = '''
from pathlib import Path
DOIT_CONFIG = {"backend": "sqlite3", "dep_file": "state.sqlite3", "verbosity": 2}
N = %d

def task_t():
    for i in range(N):
        yield {"name": str(i), "actions": ["touch out/%%d" %% i], "file_dep": ["in/%%d" %% i],
               "targets": ["out/%%d" %% i]}
'''


def timed(argv: list[str], cwd: Path, env: dict) -> tuple[float, float]:
    """(CPU seconds of the child and its children, wall seconds)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0 or "\n.  " in "\n" + proc.stdout:
        raise SystemExit(f"{' '.join(argv)} in {cwd} was not a no-op:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="tiny-travel-cpu-int4-smoke")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    from modelbuild.project import load_project

    targets = len(load_project(REPO).targets)
    with tempfile.TemporaryDirectory(prefix="noop-floor-") as scratch:
        scratch = Path(scratch)
        project, env = scratch_project(scratch)
        bare = scratch / "bare"
        doit = [sys.executable, "-m", "doit"]
        print(f"building {args.target} once ...", flush=True)
        subprocess.run(doit + [args.target], cwd=project, env=env, check=True, capture_output=True)
        (bare / "in").mkdir(parents=True)
        (bare / "out").mkdir()
        for i in range(targets):
            (bare / "in" / str(i)).write_text(str(i))
        (bare / "dodo.py").write_text(BARE_DODO % targets)
        subprocess.run(doit, cwd=bare, env=env, check=True, capture_output=True)
        time.sleep(2.5)  # past the stat cache's same-tick guard: the no-ops below hash nothing
        for _ in range(2):  # settle: first runs re-hash outputs once and warm the page cache
            timed(doit + [args.target], project, env)
            timed(doit, bare, env)
        samples: dict[str, list[tuple[float, float]]] = {"modelbuild": [], "bare doit": []}
        for _ in range(args.runs):
            samples["modelbuild"].append(timed(doit + [args.target], project, env))
            samples["bare doit"].append(timed(doit, bare, env))
    rows = {name: {"cpu_s": round(statistics.median(c for c, _ in runs), 4),
                   "wall_s": round(statistics.median(w for _, w in runs), 4)} for name, runs in samples.items()}
    ratio = round(rows["modelbuild"]["cpu_s"] / rows["bare doit"]["cpu_s"], 3)
    report = {"target": args.target, "tasks": targets, "runs": args.runs, **rows, "cpu_ratio": ratio, "goal": 1.3}
    print(f"{'no-op of':<14} {'CPU s (median)':>15} {'wall s':>8}")
    for name, row in rows.items():
        print(f"{name:<14} {row['cpu_s']:>15.3f} {row['wall_s']:>8.3f}")
    print(f"CPU ratio modelbuild / bare doit with {targets} tasks: {ratio} (goal <= 1.3)")
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "noop_floor.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
