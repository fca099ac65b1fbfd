"""What pinning the CPU code branch costs: the lora-finetune pass on each branch this CPU has.

Every stage runs with MKL's and torch's kernels pinned to one branch (modelbuild/core/numerics.py);
the default is the widest this CPU has, ``MODELBUILD_CPU_NUMERICS=avx2`` lets a team that mixes
AVX-512 and AVX2 machines share a cache. This measures the price of that choice on the pass
that spends most of its time in MKL: LoRA steps on SmolLM2 (the default recipe's settings),
branches interleaved round by round so machine load hits them alike.

    .venv/bin/python bench/numerics_cost.py --base build/smollm2-base --steps 10 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from modelbuild.exec.devices import stage_environment  # noqa: E402
from modelbuild.core.numerics import BRANCHES, missing, widest  # noqa: E402

PARAMS = {"template": "chat", "batch_size": 4, "max_length": 256, "learning_rate": 1e-3, "rank": 8, "alpha": 16.0,
          "seed": 0}


def finetune(base: Path, branch: str, steps: int, threads: int, work: Path) -> tuple[float, float]:
    """(wall seconds, last loss) of one lora-finetune run in its own process, as a stage runs it."""
    out = Path(tempfile.mkdtemp(dir=work))
    plan = {"target": "bench", "file": "bench", "pass": "lora-finetune", "params": {**PARAMS, "max_steps": steps},
            "inputs": {"base": str(base), "data": str(REPO / "targets/data/travel_train.jsonl")},
            "input_names": {"base": ":base", "data": "data/travel_train.jsonl"}, "output_dir": str(out / "out"),
            "device": "cpu", "threads": threads, "cache_dir": str(work), "cpu_numerics": branch}
    (out / "out").mkdir()
    (out / "plan.json").write_text(json.dumps(plan))
    env = {**os.environ, **stage_environment("cpu", threads, "", branch)}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "modelbuild.exec.worker", str(out / "plan.json")], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    return seconds, json.loads((out / "out/training.json").read_text())["losses"][-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=REPO / "build/smollm2-base")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/numerics_cost.json")
    args = parser.parse_args()
    if not (args.base / "config.json").exists():
        sys.exit(f"{args.base}: no model (build it first: doit smollm2-base)")
    branches = [name for name in BRANCHES if name != "compatible" and not missing(name)]
    times: dict[str, list[float]] = {name: [] for name in branches}
    losses: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as work:
        for round_ in range(args.rounds):
            for name in branches:
                seconds, losses[name] = finetune(args.base, name, args.steps, args.threads, Path(work))
                times[name].append(seconds)
                print(f"round {round_ + 1}: {name:7s} {seconds:6.1f} s  last loss {losses[name]}", flush=True)
    fastest = {name: min(values) for name, values in times.items()}
    result = {
        "base": str(args.base), "steps": args.steps, "threads": args.threads, "default_branch": widest(),
        "seconds": times, "best_seconds": fastest, "median_seconds": {k: statistics.median(v) for k, v in times.items()},
        "last_loss": losses,
        "relative_to_default": {name: round(s / fastest[widest()], 3) for name, s in fastest.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["relative_to_default"]), "->", args.out)


if __name__ == "__main__":
    main()
