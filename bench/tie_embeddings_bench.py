"""Benchmark tie-embeddings on SmolLM2: size, decode speed and held-out perplexity, before/after.

1. builds (``doit``) the evaluate targets of the int4 bundle and of its tied version, with what
   they need (base import, travel adapter, fp32 bundle, quantize-onnx, tie-embeddings, the torch
   reference evaluation), reusing whatever is built or cached;
2. reads size, perplexity and its change vs torch fp32 from each ``metrics.json`` and what the
   surgery did from the tied bundle's ``tie.json``;
3. measures decode tokens/s, time to first token and peak RSS again, here, for both bundles one
   after another with all cores, in ``--rounds`` rounds of alternating order (the evaluate stages
   may have shared the cores), adapter active as in the evaluations.

The tie target is not in the committed target files yet: pass the names of yours.

    .venv/bin/python bench/tie_embeddings_bench.py \\
        --before smollm2-travel-cpu-int4-k_quant --after smollm2-travel-cpu-int4-k_quant-tied \\
        --before-eval smollm2-travel-cpu-int4-k_quant-tie-eval --after-eval smollm2-travel-cpu-int4-k_quant-tied-tie-eval

Prints a table and writes bench/results/tie_embeddings_bench.json.
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


def model_files_bytes(bundle: Path) -> int:
    config = json.loads((bundle / "genai_config.json").read_text())["model"]["decoder"]
    names = {config["filename"], config["filename"] + ".data"}
    return sum((bundle / n).stat().st_size for n in names if (bundle / n).is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", default=str(REPO), help="project root (dodo.py, targets/, build/)")
    parser.add_argument("--before", default="smollm2-travel-cpu-int4-k_quant")
    parser.add_argument("--after", default="smollm2-travel-cpu-int4-k_quant-tied")
    parser.add_argument("--before-eval", default="smollm2-travel-cpu-int4-k_quant-tie-eval")
    parser.add_argument("--after-eval", default="smollm2-travel-cpu-int4-k_quant-tied-tie-eval")
    parser.add_argument("--reference-eval", default="smollm2-travel-torch-eval",
                        help="torch fp32 evaluation the perplexity change is computed against where the evaluations carry none")
    parser.add_argument("--rounds", type=int, default=3, help="speed rounds over both bundles (alternating order)")
    parser.add_argument("--runs", type=int, default=2, help="generations per prompt per round")
    parser.add_argument("--no-build", action="store_true", help="use what is in build/ without running doit")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "tie_embeddings_bench.json"))
    args = parser.parse_args()
    root = Path(args.project).resolve()
    sys.path.insert(0, str(root if (root / "modelbuild").is_dir() else REPO))
    from modelbuild.ml import speed
    from modelbuild.passes.evaluate import Params as EvalParams

    build_s = None
    if not args.no_build:
        started = time.perf_counter()
        build = subprocess.run([sys.executable, "-m", "doit", args.before_eval, args.after_eval], cwd=root)
        build_s = round(time.perf_counter() - started, 1)
        if build.returncode != 0:
            sys.exit(f"doit {args.before_eval} {args.after_eval} failed ({build.returncode})")

    build_dir = root / "build"
    bundles = {"before": build_dir / args.before, "after": build_dir / args.after}
    metrics = {"before": json.loads((build_dir / args.before_eval / "metrics.json").read_text()),
               "after": json.loads((build_dir / args.after_eval / "metrics.json").read_text())}
    tie = json.loads((bundles["after"] / "tie.json").read_text())
    reference_file = build_dir / args.reference_eval / "metrics.json"
    reference_ppl = json.loads(reference_file.read_text())["perplexity"] if reference_file.is_file() else None
    load_before = os.getloadavg()[0]

    threads = len(os.sched_getaffinity(0))
    defaults = EvalParams()
    samples: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as scratch:
        for round_number in range(args.rounds):
            for key in (("before", "after") if round_number % 2 == 0 else ("after", "before")):
                request = {"kind": "genai", "model": str(bundles[key]), "adapter": metrics[key]["adapter"],
                           "adapter_dir": None, "prompts": defaults.prompts, "new_tokens": defaults.new_tokens,
                           "runs": args.runs, "threads": threads}
                result = speed.measure(request, Path(scratch))
                samples[key].append(result)
                print(f"round {round_number + 1}: {key}: {result['tokens_per_s']:.1f} tok/s, "
                      f"ttft {result['ttft_ms']:.0f} ms, peak RSS {result['peak_rss_mb']:.0f} MB")

    rows = {}
    for key in ("before", "after"):
        m = metrics[key]
        rows[key] = {
            "target": args.before if key == "before" else args.after,
            "model_files_bytes": model_files_bytes(bundles[key]),
            "size_mb": round(model_files_bytes(bundles[key]) / 1e6, 1),
            "tokens_per_s": round(statistics.median(s["tokens_per_s"] for s in samples[key]), 2),
            "ttft_ms": round(statistics.median(s["ttft_ms"] for s in samples[key]), 1),
            "peak_rss_mb": round(statistics.median(s["peak_rss_mb"] for s in samples[key]), 1),
            "perplexity": m["perplexity"],
            "perplexity_delta_pct_vs_torch_fp32": m["perplexity_delta_pct"] if m["perplexity_delta_pct"] is not None
            else (round((m["perplexity"] / reference_ppl - 1) * 100, 3) if reference_ppl else None),
            "eval_records": m["eval_records"], "eval_tokens": m["eval_tokens"],
            "evaluate_stage_tokens_per_s": m.get("tokens_per_s"),
        }
    before, after = rows["before"], rows["after"]
    summary = {
        "saved_mb": round((before["model_files_bytes"] - after["model_files_bytes"]) / 1e6, 1),
        "size_ratio": round(after["model_files_bytes"] / before["model_files_bytes"], 3),
        "tokens_per_s_ratio": round(after["tokens_per_s"] / before["tokens_per_s"], 3),
        "perplexity_change_pct": round((after["perplexity"] / before["perplexity"] - 1) * 100, 3),
    }
    print(f"\n{'bundle':40} {'MB':>7} {'tok/s':>7} {'ttft ms':>8} {'RSS MB':>7} {'ppl':>8} {'d ppl % vs torch':>17}")
    for r in rows.values():
        delta = r["perplexity_delta_pct_vs_torch_fp32"]  # None: the evaluation had no reference
        print(f"{r['target']:40} {r['size_mb']:7.1f} {r['tokens_per_s']:7.1f} {r['ttft_ms']:8.0f} {r['peak_rss_mb']:7.0f} "
              f"{r['perplexity']:8.3f} {'-' if delta is None else f'{delta:.2f}':>17}")
    print(f"saved {summary['saved_mb']} MB (size x{summary['size_ratio']}), tokens/s x{summary['tokens_per_s_ratio']}, "
          f"perplexity {summary['perplexity_change_pct']:+.2f} % (tied vs untied)")
    print(f"surgery: {tie['initializer_removed']['name']} {tie['initializer_removed']['shape']} dropped; embedding vs "
          f"int4 head rel error {tie['embedding_vs_head_rel_error']}; logits vs input with int4 embedding max "
          f"{max(v['vs_dequantized_reference_max_abs'] for v in tie['logits'].values()):.3g}")
    result = {
        "cores": threads, "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "torch_fp32_perplexity": reference_ppl, "rounds": args.rounds, "runs_per_prompt": args.runs, "new_tokens": defaults.new_tokens,
        "build_wall_s": build_s, "before": before, "after": after, "summary": summary,
        "tie": {k: tie[k] for k in ("lm_head", "bits", "block_size", "vocab_size", "hidden_size", "initializer_removed",
                                    "embedding_vs_head_rel_error", "head_vs_lookup_max_abs", "logits", "model_bytes")},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
