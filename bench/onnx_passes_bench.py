"""What graph-optimize, onnx-fp16 and onnx-int8 do to a real model (SmolLM2-135M by default).

Builds, with real doit in a fresh copy of the project (dodo.py + targets/ + one bench target
file), the fp32 ONNX export and the pass outputs below, then measures every artifact in one run
of this script, so the ratios compare like with like:

- size on disk (model.onnx + model.onnx.data) and node count;
- the fused operators graph-optimize recorded (graph_optimize.json);
- full-sequence forward latency: one onnxruntime CPU session per artifact, all with the same
  thread count, a ``--tokens``-token prefill (the start of the held-out travel records), median of
  ``--runs`` runs after one warm-up, the artifacts' runs interleaved round by round so that load
  from other processes on the machine hits them alike;
- agreement with the fp32 export on that sequence: max |logit difference|, top-1 agreement over
  its positions, Pearson correlation; and the perplexity of the held-out records' response
  tokens (rendered with the chat template), with its change vs the export.

    .venv/bin/python bench/onnx_passes_bench.py                      # SmolLM2 (builds the export if needed)
    .venv/bin/python bench/onnx_passes_bench.py --model tiny --runs 3   # seconds

The project's cache (``cache/``, or ``--cache``) is used, so the export and the pass outputs are
restored, not rebuilt, when they are already there. Prints a table and writes
bench/results/onnx_passes_bench.json.
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
sys.path.insert(0, str(REPO))

# (name suffix, pass, input suffix, params, what it is)
VARIANTS = [
    ("onnx-fp32", None, None, None, "fp32 export (onnx-export)"),
    ("onnx-opt", "graph-optimize", "onnx-fp32", {}, "graph-optimize (gpt2 fusions, opt_level 1)"),
    ("onnx-opt2", "graph-optimize", "onnx-fp32", {"opt_level": 2}, "graph-optimize, opt_level 2"),
    ("onnx-fp16", "onnx-fp16", "onnx-fp32", {}, "onnx-fp16 of the export"),
    ("onnx-opt-fp16", "onnx-fp16", "onnx-opt", {}, "onnx-fp16 of graph-optimize"),
    ("onnx-int8", "onnx-int8", "onnx-fp32", {"min_top1_agreement": 0.0, "min_correlation": 0.0},
     "onnx-int8 dynamic (MatMul, per tensor)"),
    ("onnx-int8-pc", "onnx-int8", "onnx-fp32", {"per_channel": True, "min_top1_agreement": 0.0, "min_correlation": 0.0},
     "onnx-int8 dynamic, per channel"),
    ("onnx-int8-nodown", "onnx-int8", "onnx-fp32",
     {"per_channel": True, "exclude": ["*mlp.down_proj"], "min_top1_agreement": 0.0, "min_correlation": 0.0},
     "onnx-int8 dynamic, per channel, MLP down_proj kept float"),
    ("onnx-int8-static", "onnx-int8", "onnx-fp32",
     {"mode": "static", "per_channel": True, "min_top1_agreement": 0.0, "min_correlation": 0.0},
     "onnx-int8 static (MinMax on 16 travel_train records), per channel"),
]


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def bench_targets(model: str, variants: list) -> str:
    lines = []
    for suffix, pass_name, source, params, _ in variants:
        if pass_name is None:
            continue
        inputs = f'model = ":{model}-{source}"'
        if params.get("mode") == "static":
            inputs += ', calibration = "data/travel_train.jsonl"'
        lines += [f'[target."{model}-{suffix}"]', f'pass = "{pass_name}"', f"inputs = {{ {inputs} }}"]
        if params:
            lines.append("params = { " + ", ".join(f"{k} = {toml_value(v)}" for k, v in params.items()) + " }")
        lines.append("")
    return "\n".join(lines)


def build(project: Path, cache: Path, names: list[str]) -> dict[str, float]:
    env = dict(os.environ, MODELBUILD_CACHE=str(cache), HF_HUB_OFFLINE="1")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "doit", *names], cwd=project, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        sys.exit(f"doit failed:\n{proc.stdout[-4000:]}")
    print(f"built in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    for line in proc.stdout.splitlines():
        if line.startswith("modelbuild: '") and ("fused" in line or "int8" in line or "float16" in line):
            print("  " + line, file=sys.stderr)
    seconds = {}
    for name in names:
        stamp = json.loads((project / "build" / name / ".modelbuild" / "stamp.json").read_text())
        seconds[name] = stamp.get("seconds")
    return seconds


def eval_sequences(model_dir: Path, tokens: int, records: int):
    """(a --tokens prefill sequence, [(ids, first scored position)] of held-out records)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    rows = [json.loads(line) for line in (REPO / "targets/data/travel_eval.jsonl").read_text().splitlines() if line.strip()]
    scored = []
    for row in rows[:records]:
        messages = [{"role": "user", "content": row["prompt"]}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": row["response"]}], tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        scored.append((ids, len(prompt_ids)))
    stream = [t for ids, _ in scored for t in ids]
    while len(stream) < tokens:
        stream += stream
    return stream[:tokens], scored


def perplexity(sess, names, scored) -> float:
    import numpy as np

    from modelbuild.ml.onnx_models import feeds

    total, count = 0.0, 0
    for ids, start in scored:
        logits = sess.run(["logits"], feeds(names, ids))[0][0].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        targets = np.asarray(ids[start:])
        total -= float(logp[np.arange(start - 1, len(ids) - 1), targets].sum())
        count += len(targets)
    return float(np.exp(total / count))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="recipe model name: smollm2 or tiny")
    parser.add_argument("--tokens", type=int, default=128, help="prefill length timed")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per artifact (median)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="onnxruntime intra-op threads, every session")
    parser.add_argument("--records", type=int, default=16, help="held-out records for perplexity")
    parser.add_argument("--cache", default=str(REPO / "cache"), help="modelbuild cache (restores what is already built)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "onnx_passes_bench.json"))
    parser.add_argument("--keep", action="store_true", help="keep the temporary project")
    args = parser.parse_args()

    import numpy as np

    from modelbuild.ml.onnx_models import compare, feeds, load_graph, model_size, op_counts, session

    work = Path(tempfile.mkdtemp(prefix="onnx-passes-bench-"))
    project = work / "project"
    project.mkdir()
    shutil.copy(REPO / "dodo.py", project / "dodo.py")
    shutil.copytree(REPO / "targets", project / "targets")
    (project / "targets" / "onnx_bench.toml").write_text(bench_targets(args.model, VARIANTS))
    names = [f"{args.model}-{v[0]}" for v in VARIANTS]
    try:
        build_seconds = build(project, Path(args.cache), names)
        reference_dir = project / "build" / names[0]
        prefill, scored = eval_sequences(reference_dir, args.tokens, args.records)

        rows = []
        sessions = {}
        for (suffix, pass_name, _, params, what), name in zip(VARIANTS, names):
            folder = project / "build" / name
            graph = load_graph(folder / "model.onnx")
            record = {}
            for record_name in ("graph_optimize.json", "onnx_fp16.json", "onnx_int8.json"):
                if (folder / record_name).is_file():
                    record = json.loads((folder / record_name).read_text())
            started = time.perf_counter()
            sess = session(folder / "model.onnx", args.threads)
            load_s = time.perf_counter() - started
            input_names = [i.name for i in sess.get_inputs()]
            sessions[name] = (sess, input_names)
            rows.append({
                "target": name, "what": what, "pass": pass_name, "params": params,
                "bytes": model_size(folder), "nodes": len(graph.graph.node),
                "fused_operators": {k: v for k, v in record.get("fused_operators", {}).items() if v},
                "quantized_ops": record.get("quantized_ops"),
                "session_load_s": round(load_s, 3),
                "build_s": build_seconds.get(name),
                "op_types": op_counts(graph),
            })
            del graph

        # Latency: warm up each, then interleave the timed runs.
        fed = {name: feeds(sessions[name][1], prefill) for name in names}
        outputs = {}
        for name in names:
            outputs[name] = sessions[name][0].run(["logits"], fed[name])[0].astype(np.float64)[0]
        times = {name: [] for name in names}
        for _ in range(args.runs):
            for name in names:
                started = time.perf_counter()
                sessions[name][0].run(["logits"], fed[name])
                times[name].append(time.perf_counter() - started)

        reference = outputs[names[0]]
        base_ppl = None
        for row, name in zip(rows, names):
            row["prefill_ms_median"] = round(1000 * statistics.median(times[name]), 2)
            row["prefill_ms_min"] = round(1000 * min(times[name]), 2)
            row["prefill_ms_runs"] = [round(1000 * t, 2) for t in times[name]]
            stats = compare([reference], [outputs[name]])
            row["vs_fp32"] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in stats.items()}
            ppl = perplexity(sessions[name][0], sessions[name][1], scored)
            base_ppl = base_ppl or ppl
            row["perplexity"] = round(ppl, 4)
            row["perplexity_delta_pct"] = round(100 * (ppl / base_ppl - 1), 3)
        base = rows[0]
        for row in rows:
            row["size_ratio"] = round(row["bytes"] / base["bytes"], 4)
            row["speedup"] = round(base["prefill_ms_median"] / row["prefill_ms_median"], 3)
            row["speedup_min"] = round(base["prefill_ms_min"] / row["prefill_ms_min"], 3)
    finally:
        if args.keep:
            print(f"project kept in {project}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    import onnxruntime

    result = {
        "model": args.model,
        "tokens": args.tokens,
        "runs": args.runs,
        "threads": args.threads,
        "perplexity_records": len(scored),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
                    "processor": _cpu_name()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")

    print(f"\n{args.model}: {args.tokens}-token prefill, median of {args.runs} runs, {args.threads} onnxruntime threads; "
          f"perplexity on {len(scored)} held-out records")
    header = ("artifact", "MB", "size", "nodes", "prefill ms (min)", "speedup (min)", "max|dlogit|", "top-1", "corr", "ppl", "dppl %")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        vs = row["vs_fp32"]
        print(f"| {row['target']} | {row['bytes'] / 1e6:.1f} | {row['size_ratio']:.2f} | {row['nodes']} | "
              f"{row['prefill_ms_median']:.1f} ({row['prefill_ms_min']:.1f}) | {row['speedup']:.2f} ({row['speedup_min']:.2f}) | "
              f"{vs['max_abs_diff']:.3g} | "
              f"{vs['top1_agreement']:.1%} | {vs['correlation']:.4f} | {row['perplexity']:.3f} | {row['perplexity_delta_pct']:+.2f} |")
    for row in rows:
        if row["fused_operators"]:
            print(f"{row['target']} fused: " + ", ".join(f"{k} x{v}" for k, v in row["fused_operators"].items()))
    print(f"wrote {out}")


def _cpu_name() -> str:
    try:
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        return match.group(1).strip() if match else platform.processor()
    except OSError:
        return platform.processor()


if __name__ == "__main__":
    main()
