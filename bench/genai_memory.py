"""Peak memory of genai-build against the bare onnxruntime-genai model builder on the same base.

    .venv/bin/python bench/genai_memory.py [--model smollm2] [--cache DIR]

Builds ``{model}-base`` and ``{model}-travel-adapter`` in a fresh copy of the project (a warm
``--cache`` restores them), then measures, each in a process of its own (peak RSS of that
process tree from getrusage):

- bare builder: ``python -m onnxruntime_genai.models.builder``-equivalent ``create_model`` of the
  base at int4 (the default target's options, no adapter);
- genai-build: the pass exactly as ``doit {model}-travel-cpu-int4`` runs it (switchable travel
  adapter, torch logits check, onnxruntime-genai verification), forced.

Prints a table and writes bench/results/genai_memory.json with the ratio (goal: <= 1.0).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from scratch import scratch_project  # noqa: E402

BARE = """
import sys
from onnxruntime_genai.models.builder import create_model, parse_extra_options
base, out, cache = sys.argv[1:4]
options = ["accuracy_level=4", "algo_config=k_quant_mixed", "block_size=32", "is_symmetric=true"]
opts = parse_extra_options(None, base, out, "int4", "cpu", cache, options)
create_model(None, base, out, "int4", "cpu", cache, **opts)
"""


def peak_of(argv: list[str], cwd: Path, env: dict) -> tuple[float, float]:
    """(peak RSS in MB of the child process tree, wall seconds): one fresh child per measurement."""
    code = ("import resource, subprocess, sys, json, time; t = time.perf_counter(); "
            "rc = subprocess.run(sys.argv[1:]).returncode; "
            "print(json.dumps({'rc': rc, 'kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
            "'s': time.perf_counter() - t}))")
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=cwd, env=env, capture_output=True, text=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return round(result["kb"] / 1024, 1), round(result["s"], 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--cache", help="a modelbuild cache to restore the base and adapter from")
    args = parser.parse_args()
    target = f"{args.model}-travel-cpu-int4"
    with tempfile.TemporaryDirectory(prefix="genai-memory-") as scratch:
        scratch = Path(scratch)
        project, env = scratch_project(scratch, args.cache)
        print(f"upstream of {target} ...", flush=True)
        subprocess.run([sys.executable, "-m", "doit", f"{args.model}-travel-adapter"], cwd=project, env=env, check=True)
        base = project / "build" / f"{args.model}-base"
        bare_peak, bare_s = peak_of([sys.executable, "-c", BARE, str(base), str(scratch / "bare"), str(scratch / "bc")],
                                    project, env)
        print(f"bare builder: {bare_peak} MB in {bare_s} s", flush=True)
        pass_peak, pass_s = peak_of([sys.executable, "-m", "doit", "forget", target], project, env)
        pass_peak, pass_s = peak_of([sys.executable, "-m", "doit", target], project, {**env, "MODELBUILD_FORCE": "1"})
        print(f"genai-build: {pass_peak} MB in {pass_s} s", flush=True)
        weights = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 1e6
    report = {"model": args.model, "fp32_weights_mb": round(weights, 1),
              "bare_builder": {"peak_rss_mb": bare_peak, "seconds": bare_s},
              "genai_build": {"peak_rss_mb": pass_peak, "seconds": pass_s},
              "ratio": round(pass_peak / bare_peak, 3), "goal": 1.0}
    print(json.dumps(report, indent=1))
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "genai_memory.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
