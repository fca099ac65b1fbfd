"""Benchmark the variant matrix: every evaluated variant against torch fp32 eager, in one run.

1. builds the model's variant group (``doit -n 2 -c <model>-variants``: every bundle and its
   evaluate target; -c keeps going past a variant that fails its gate) in this project, reusing
   whatever is already built or cached;
2. takes perplexity, its change vs the torch fp32 reference and size from each variant's
   metrics.json (build outputs);
3. measures decode tokens/s and time to first token again, here, for every variant and the
   torch fp32 reference, one after another with all cores and nothing else running, in
   ``--rounds`` rounds of alternating order: the evaluate stages may have run two at a time
   under ``-n 2``, so only these figures are compared with each other.

    .venv/bin/python bench/variants_bench.py                  # SmolLM2-135M (long: builds ~20 stages)
    .venv/bin/python bench/variants_bench.py --model tiny     # seconds

Prints a table and writes bench/results/variants_bench.json.
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

from modelbuild.ml import speed  # noqa: E402
from modelbuild.passes.evaluate import Params as EvalParams  # noqa: E402
from modelbuild.graph.loader import load_project  # noqa: E402
from modelbuild.cli.report import evaluation_state, select_targets  # noqa: E402

TARGETS = {"int4_speedup_x": 4.0, "int4_ppl_increase_pct": 5.0, "int4_size_ratio": 0.30}


def speed_request(project, name: str, threads: int, runs: int) -> dict:
    """What the evaluate target measured, as a modelbuild.ml.speed request."""
    target = project.targets[name]
    model = project.output_dir(target.inputs["model"].value)
    adapter = target.inputs.get("adapter")
    defaults = EvalParams()
    return {
        "kind": "genai" if (model / "genai_config.json").is_file() else "hf",
        "model": str(model),
        "adapter": target.params.get("adapter") or None,
        "adapter_dir": str(project.output_dir(adapter.value)) if adapter else None,
        "prompts": target.params.get("prompts", defaults.prompts),
        "new_tokens": target.params.get("new_tokens", defaults.new_tokens),
        "runs": runs,
        "threads": threads,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--rounds", type=int, default=2, help="speed rounds over all variants (alternating order)")
    parser.add_argument("--runs", type=int, default=2, help="generations per prompt per round")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "variants_bench.json"))
    args = parser.parse_args()

    started = time.perf_counter()
    build = subprocess.run([sys.executable, "-m", "doit", "-n", "2", "-c", f"{args.model}-variants"], cwd=REPO)
    build_s = time.perf_counter() - started
    project = load_project(REPO)
    evals = select_targets(project, [f"{args.model}-*-eval"])
    reference = f"{args.model}-travel-torch-eval"
    metrics, failed_gates = {}, set()
    for name in evals:
        state, measured, note = evaluation_state(project, name)
        if state in ("current", "measured"):
            metrics[name] = measured
            if state == "measured":  # failed its gate: the numbers come from the cache
                failed_gates.add(name)
        else:
            print(f"{name}: {state} ({note}); left out")
    if reference not in metrics:
        sys.exit(f"{reference} was not built: no reference to compare with")

    threads = len(os.sched_getaffinity(0))
    measured = [name for name in metrics if name != f"{args.model}-base-torch-eval"]
    rates: dict[str, list[float]] = {n: [] for n in measured}
    ttfts: dict[str, list[float]] = {n: [] for n in measured}
    with tempfile.TemporaryDirectory() as scratch:
        for round_number in range(args.rounds):
            order = measured if round_number % 2 == 0 else measured[::-1]
            for name in order:
                result = speed.measure(speed_request(project, name, threads, args.runs), Path(scratch))
                rates[name].append(result["tokens_per_s"])
                ttfts[name].append(result["ttft_ms"])
                print(f"round {round_number + 1}: {name}: {result['tokens_per_s']:.1f} tok/s, ttft {result['ttft_ms']:.0f} ms")

    torch_rate = statistics.median(rates[reference])
    fp32_size = metrics[reference]["size_bytes"]
    rows = []
    for name in measured:
        m = metrics[name]
        rate = statistics.median(rates[name])
        rows.append({
            "target": name, "variant": m["variant"], "adapter": m["adapter"],
            "tokens_per_s": round(rate, 2), "speedup_vs_torch_fp32": round(rate / torch_rate, 2),
            "ttft_ms": round(statistics.median(ttfts[name]), 1),
            "perplexity": m["perplexity"], "perplexity_delta_pct": m["perplexity_delta_pct"],
            "size_mb": round(m["size_bytes"] / 1e6, 1), "size_ratio_vs_fp32": round(m["size_bytes"] / fp32_size, 3),
            "peak_rss_mb": m["peak_rss_mb"], "gate": "failed" if name in failed_gates else "passed",
        })

    print(f"\n{'variant':20} {'tok/s':>7} {'x torch':>8} {'ttft ms':>8} {'ppl':>8} {'d ppl %':>8} {'MB':>7} {'size':>6}  gate")
    for r in rows:
        delta = "" if r["perplexity_delta_pct"] is None else f"{r['perplexity_delta_pct']:8.2f}"
        print(f"{r['variant']:20} {r['tokens_per_s']:7.1f} {r['speedup_vs_torch_fp32']:8.2f} {r['ttft_ms']:8.0f} "
              f"{r['perplexity']:8.3f} {delta:>8} {r['size_mb']:7.1f} {r['size_ratio_vs_fp32']:6.3f}  {r['gate']}")

    int4 = [r for r in rows if "int4" in r["variant"]]
    meets = [r for r in int4 if r["speedup_vs_torch_fp32"] >= TARGETS["int4_speedup_x"]
             and r["perplexity_delta_pct"] <= TARGETS["int4_ppl_increase_pct"]
             and r["size_ratio_vs_fp32"] <= TARGETS["int4_size_ratio"]]
    best = min(int4, key=lambda r: r["perplexity_delta_pct"]) if int4 else None
    by_variant = {r["variant"]: r for r in rows}
    awq, rtn = by_variant.get("merged-int4-awq"), by_variant.get("merged-int4-rtn")
    awq_vs_rtn = None
    if awq and rtn:
        awq_vs_rtn = {"awq_perplexity": awq["perplexity"], "rtn_perplexity": rtn["perplexity"],
                      "awq_size_mb": awq["size_mb"], "rtn_size_mb": rtn["size_mb"],
                      "awq_better": awq["perplexity"] < rtn["perplexity"]}
        print(f"\nAWQ vs RTN (merged, int4 RTN block 32): perplexity {awq['perplexity']} vs {rtn['perplexity']} "
              f"at {awq['size_mb']} vs {rtn['size_mb']} MB: AWQ {'better' if awq_vs_rtn['awq_better'] else 'NOT better'}")
    print(f"int4 variants meeting all targets (>= {TARGETS['int4_speedup_x']}x torch tok/s, ppl +<= "
          f"{TARGETS['int4_ppl_increase_pct']} %, size <= {TARGETS['int4_size_ratio']:.0%}): "
          f"{', '.join(r['variant'] for r in meets) or 'none'}")
    result = {
        "model": args.model, "cores": threads, "build_wall_s": round(build_s, 1), "doit_exit": build.returncode,
        "rounds": args.rounds, "runs_per_prompt": args.runs, "torch_fp32_tokens_per_s": round(torch_rate, 2),
        "rows": rows, "targets": TARGETS, "int4_meeting_all_targets": [r["variant"] for r in meets],
        "best_int4_by_perplexity": best and best["variant"], "awq_vs_rtn": awq_vs_rtn,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
