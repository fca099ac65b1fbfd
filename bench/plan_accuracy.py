"""How close ``python -m modelbuild plan``'s time estimate comes to the build it predicts.

    .venv/bin/python bench/plan_accuracy.py [--rounds 2]        the tiny chain (tiny-travel-cpu-int4-smoke)
    .venv/bin/python bench/plan_accuracy.py --default           the default targets (the SmolLM2 chain; ~10 min cold)

In a fresh copy of the project (empty cache): build the chain once cold, which records each
stage's seconds. Then, ``--rounds`` times: delete build/ (outputs, stat cache and doit's
database), ask ``MODELBUILD_FORCE=1 python -m modelbuild plan --json`` for its prediction (every
stage "run", with the estimate from the seconds recorded so far), and time the forced rebuild
``MODELBUILD_FORCE=1 doit`` as a whole process. Compares the predicted total with the measured
wall time (goal: within +/- 25 %) and, per stage, with the seconds the rebuild recorded.

Prints a table and writes bench/results/plan_accuracy.json (plan_accuracy_default.json with --default).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from scratch import scratch_project  # noqa: E402

TINY = "tiny-travel-cpu-int4-smoke"
GOAL = 0.25


def run(argv: list[str], cwd: Path, env: dict) -> tuple[str, float]:
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return proc.stdout, wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--default", action="store_true", help="the default targets (SmolLM2) instead of the tiny chain")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    names = [] if args.default else [TINY]
    doit = [sys.executable, "-m", "doit", *names]
    plan = [sys.executable, "-m", "modelbuild", "plan", "--json", *names]
    rounds = []
    with tempfile.TemporaryDirectory(prefix="plan-accuracy-") as scratch:
        project, env = scratch_project(Path(scratch))
        forced = {**env, "MODELBUILD_FORCE": "1"}
        print(f"building {' '.join(names) or 'the default targets'} cold ...", flush=True)
        _, cold = run(doit, project, env)
        for number in range(1, args.rounds + 1):
            shutil.rmtree(project / "build")
            out, plan_wall = run(plan, project, forced)
            predicted = json.loads(out)
            steps = predicted["stages"]
            assert all(s["action"] == "run" for s in steps), [(s["name"], s["action"]) for s in steps]
            _, measured = run(doit, project, forced)
            stamps = {s["name"]: json.loads((project / "build" / s["name"] / ".modelbuild" / "stamp.json").read_text())
                      for s in steps}
            assert all(stamp["origin"] == "built" for stamp in stamps.values())
            total = predicted["total"]["run_estimate_s"]
            rounds.append({
                "round": number,
                "predicted_s": total,
                "measured_wall_s": round(measured, 3),
                "measured_stage_sum_s": round(sum(st["seconds"] for st in stamps.values()), 3),
                "error_vs_wall": round(total / measured - 1, 4),
                "plan_wall_s": round(plan_wall, 3),
                "without_estimate": predicted["total"]["runs_without_estimate"],
                "stages": [{"name": s["name"], "predicted_s": s["estimate_s"], "from": s["estimate_from"],
                            "measured_s": stamps[s["name"]]["seconds"]} for s in steps],
            })
            r = rounds[-1]
            print(f"round {number}: predicted {total:.1f} s, measured {measured:.1f} s wall "
                  f"({r['measured_stage_sum_s']:.1f} s in the passes): {r['error_vs_wall']:+.1%}", flush=True)
    print(f"\n{'stage':<36} " + " ".join(f"{'r' + str(r['round']) + ' pred':>9} {'meas':>7}" for r in rounds))
    for i, stage in enumerate(rounds[0]["stages"]):
        cells = " ".join(f"{r['stages'][i]['predicted_s'] or float('nan'):>9.2f} {r['stages'][i]['measured_s']:>7.2f}"
                         for r in rounds)
        print(f"{stage['name']:<36} {cells}")
    print(f"{'total (doit wall)':<36} " + " ".join(f"{r['predicted_s']:>9.2f} {r['measured_wall_s']:>7.2f}" for r in rounds))
    worst = max(abs(r["error_vs_wall"]) for r in rounds)
    print(f"worst error vs wall time: {worst:.1%} (goal: within {GOAL:.0%})")
    report = {"targets": names or "default", "cold_build_wall_s": round(cold, 3), "rounds": rounds,
              "worst_abs_error_vs_wall": worst, "goal_abs_error": GOAL, "within_goal": worst <= GOAL,
              "rule": "per stage: median of the seconds recorded for that target on this machine (stamps + local "
                      "cache entries), else of its pass on other targets; total = their serial sum"}
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    name = "plan_accuracy_default.json" if args.default else "plan_accuracy.json"
    (out / name).write_text(json.dumps(report, indent=1) + "\n")
    return 0 if worst <= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
