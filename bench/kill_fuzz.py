"""kill -9 fuzz: interrupt the tiny recipe's build at random moments, then check the damage.

    .venv/bin/python bench/kill_fuzz.py [--runs 50] [--seed 0]

Each run builds the tiny travel recipe in a fresh project (own empty cache) and sends SIGKILL to
the whole doit process group after a random delay. Then, before anything else runs, every stage
whose output *looks* complete (stamp present, key current, files matching its manifest) is
compared with a clean reference build: a mismatch is a corruption (must be 0). Finally doit runs
again and everything must end byte-identical to the reference. Writes bench/results/kill_fuzz.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
TARGET = "tiny-travel-cpu-int4-smoke"
STAGES = ["tiny-base", "tiny-travel-adapter", "tiny-travel-cpu-int4", TARGET]


def new_project(root: Path) -> tuple[Path, dict]:
    project = root / "project"
    project.mkdir(parents=True)
    shutil.copy(REPO / "dodo.py", project)
    shutil.copytree(REPO / "targets", project / "targets")
    (root / "cache").mkdir()
    env = dict(os.environ, MODELBUILD_CACHE=str(root / "cache"))
    return project, env


def manifests(project: Path) -> dict:
    out = {}
    for stage in STAGES:
        stamp_file = project / "build" / stage / ".modelbuild" / "stamp.json"
        if stamp_file.exists():
            out[stage] = json.loads(stamp_file.read_text())["manifest"]
    return out


def looks_complete(project: Path) -> list[str]:
    """Stages modelbuild would accept as up to date right now (key current, output intact)."""
    from modelbuild.graph.loader import load_project
    from modelbuild.engine.stage import is_up_to_date
    from modelbuild.core.stamp import read_stamp

    loaded = load_project(project)
    done = []
    for stage in STAGES:
        stamp = read_stamp(loaded.output_dir(stage))
        if stamp and is_up_to_date(loaded, loaded.targets[stage], {"action_key": stamp["action_key"]}):
            done.append(stage)
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-delay", type=float, default=16.0)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "kill_fuzz.json"))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="modelbuild-kill-"))
    try:
        ref_project, env = new_project(work / "reference")
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "doit", TARGET], cwd=ref_project, env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"reference build: {time.perf_counter() - started:.1f} s", flush=True)
        reference = manifests(ref_project)
        runs = []
        for index in range(args.runs):
            root = work / f"run{index}"
            project, env = new_project(root)
            delay = rng.uniform(0, args.max_delay)
            proc = subprocess.Popen([sys.executable, "-m", "doit", TARGET], cwd=project, env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            time.sleep(delay)
            finished_first = proc.poll() is not None
            if not finished_first:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            complete = looks_complete(project)
            current = manifests(project)
            corrupt = [stage for stage in complete if current.get(stage) != reference[stage]]
            rerun = subprocess.run([sys.executable, "-m", "doit", TARGET], cwd=project, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            final_ok = rerun.returncode == 0 and manifests(project) == reference
            runs.append({"delay_s": round(delay, 2), "killed": not finished_first, "complete_after_kill": complete,
                         "corrupt": corrupt, "rebuild_ok": final_ok})
            print(f"run {index:2d}: kill at {delay:5.2f}s, complete {len(complete)}/4, "
                  f"corrupt {len(corrupt)}, rebuild {'ok' if final_ok else 'FAILED'}", flush=True)
            shutil.rmtree(root, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {
        "runs": len(runs),
        "killed": sum(r["killed"] for r in runs),
        "corrupt_up_to_date_artifacts": sum(len(r["corrupt"]) for r in runs),
        "failed_rebuilds": sum(not r["rebuild_ok"] for r in runs),
        "kills_by_stages_complete": {n: sum(len(r["complete_after_kill"]) == n for r in runs if r["killed"]) for n in range(5)},
    }
    print(json.dumps(summary, indent=1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "runs": runs}, indent=1) + "\n")
    print(f"wrote {out}")
    sys.exit(1 if summary["corrupt_up_to_date_artifacts"] or summary["failed_rebuilds"] else 0)


if __name__ == "__main__":
    main()
