"""The no-op build against its physical floor, doit itself, measured side by side in one run.

    .venv/bin/python bench/noop_floor.py [--target tiny-travel-cpu-int4-smoke] [--runs 7]

Builds ``--target`` once in a fresh copy of the project (empty cache; the tiny recipe takes
about a minute), then alternates two no-op runs ``--runs`` times and reports the median
whole-process CPU time (user + system, of doit and everything it starts) and wall time of each:

- modelbuild: ``doit TARGET`` in the built project (every target file loaded and validated,
  the target's closure checked by content through the stat cache);
- bare doit: a ``dodo.py`` with as many trivial tasks as the project has targets, each with a
  ``file_dep`` and a ``targets`` file, all up to date, run as ``doit`` with the same backend.

Both run with their modules' bytecode cached, as every installed or once-run Python package
does (``PYTHONPYCACHEPREFIX`` points at a scratch folder that the settling runs fill, for both
sides alike; nothing is written into the repo). The ratio under the caller's environment as it
is is reported too: where ``PYTHONDONTWRITEBYTECODE=1`` is set (this repo's sandboxes), every
modelbuild module, an editable install without ``__pycache__``, is compiled from source on each
run while doit's bytecode comes precompiled from site-packages, a cost no installed modelbuild has.

Prints a table and writes bench/results/noop_floor.json with the ratio (goal: <= 1.3, with
bytecode cached) and the ratio as invoked.
"""

from __future__ import annotations

import argparse
import json
import os
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
    from modelbuild.graph.loader import load_project

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
        cached = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
        cached["PYTHONPYCACHEPREFIX"] = str(scratch / "pycache")
        conditions = {"bytecode cached": cached, "as invoked": env}
        for condition in conditions.values():
            for _ in range(2):  # settle: first runs re-hash outputs once, write bytecode, warm the page cache
                timed(doit + [args.target], project, condition)
                timed(doit, bare, condition)
        samples = {name: {"modelbuild": [], "bare doit": []} for name in conditions}
        for _ in range(args.runs):
            for name, condition in conditions.items():
                samples[name]["modelbuild"].append(timed(doit + [args.target], project, condition))
                samples[name]["bare doit"].append(timed(doit, bare, condition))
    results = {}
    for name, by_side in samples.items():
        rows = {side: {"cpu_s": round(statistics.median(c for c, _ in runs), 4),
                       "wall_s": round(statistics.median(w for _, w in runs), 4)} for side, runs in by_side.items()}
        results[name] = {**rows, "cpu_ratio": round(rows["modelbuild"]["cpu_s"] / rows["bare doit"]["cpu_s"], 3)}
    headline = results["bytecode cached"]
    report = {"target": args.target, "tasks": targets, "runs": args.runs, **headline, "goal": 1.3,
              "as_invoked": {**results["as invoked"],
                             "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE", "")}}
    print(f"{'no-op of':<32} {'CPU s (median)':>15} {'wall s':>8}")
    for name, result in results.items():
        for side in ("modelbuild", "bare doit"):
            print(f"{side + ' (' + name + ')':<32} {result[side]['cpu_s']:>15.3f} {result[side]['wall_s']:>8.3f}")
    print(f"CPU ratio modelbuild / bare doit with {targets} tasks: {headline['cpu_ratio']} (goal <= 1.3); as invoked "
          f"(PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', '')!r}): {results['as invoked']['cpu_ratio']}")
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "noop_floor.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
