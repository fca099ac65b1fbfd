"""Switchable-adapter decode speed against the merged bundle (issue #11), int4 (SmolLM2-135M by default).

Builds with genai-build (the pass itself, same int4 algorithm and block size for all three):

  merged     the merged model (travel adapter folded into the weights), no adapter input
  unfused    base + switchable travel adapter, ``fuse_lora = "never"`` (the builder's LoRA graph)
  fused_3d   base + switchable travel adapter, ``fuse_lora = "always"``, ``lora_gemm = false``
             (modelbuild/ml/lora_graph.py alone)
  fused      the same with ``lora_gemm = true``: int4's default bundle (modelbuild/ml/lora_gemm.py)

then, in ``--rounds`` rounds whose order rotates each round (the machine is shared: only numbers
from the same rounds are compared):

  tok/s      onnxruntime-genai decode speed, greedy, ``--tokens`` new tokens, og's default threads,
             adapter active for the switchable bundles (tokens after the first / their time);
  cpu ms     plain onnxruntime, one thread, process CPU time of one decode step (``--past``
             tokens of KV cache): less sensitive to other load than wall time.

Each ratio to the merged bundle is given twice: of the medians, and "paired" (the median of the
per-round ratios, which cancels the machine's drift between rounds). The bench then reports the graph (nodes, LoRA ops, MatMulNBits, the base's and the LoRA's weight
bytes read per token) and the logits with the adapter: fused vs unfused, vs merged, vs no adapter.

    PYTHONPATH=. .venv/bin/python bench/adapter_speed.py \\
        --base build/smollm2-base --adapter build/smollm2-travel-adapter --merged build/smollm2-travel-merged

(``doit smollm2-travel-adapter smollm2-travel-merged`` builds or restores the three folders.) A
Phi-3.5-shaped base and adapter: ``bench/phi35_build.py --layers 8 --work DIR --make-only``, then
``--base DIR/phi35-L8-base --adapter DIR/phi35-L8-adapter --merged DIR/phi35-L8-merged``: a
missing ``--merged`` folder is made by the lora-merge pass.
Prints a table and writes bench/results/adapter_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
PROMPT = "What should I pack for a week in Iceland?"


def build(name: str, base: Path, adapter: Path | None, work: Path, args, fuse: bool, gemm: bool = False) -> Path:
    """One bundle through genai-build (``args``: algorithm, block_size); reused when built
    before with the same settings and, for the fused ones, the same lora_graph.py and lora_gemm.py."""
    from modelbuild.ml.console import quiet_stdout
    from modelbuild.passes import genai_build

    out = work / name
    stamp = {"base": str(base.resolve()), "adapter": str(adapter.resolve()) if adapter else None, "fuse": fuse,
             "gemm": gemm, "algorithm": args.algorithm, "block_size": args.block_size,
             "code": [(REPO / f"modelbuild/ml/{m}.py").read_text() for m in ("lora_graph", "lora_gemm")] if fuse else None}
    stamp_file = work / f"{name}.stamp.json"
    if (out / "modelbuild.json").is_file() and stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    params = genai_build.Params(precision="int4", int4_algorithm=args.algorithm, block_size=args.block_size,
                                fuse_lora="always" if fuse else "never", lora_gemm=gemm, min_correlation=args.min_correlation,
                                min_top1=args.min_top1)
    started = time.time()
    with quiet_stdout():
        genai_build.run(params, {"base": base, "adapters": {"travel": adapter} if adapter else {}}, out, SimpleNamespace(device="cpu"))
    print(f"built {name} in {time.time() - started:.0f} s", file=sys.stderr)
    stamp_file.write_text(json.dumps(stamp))
    return out


def graph_stats(bundle: Path) -> dict:
    import numpy as np
    import onnx

    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    inputs = {i.name for i in model.graph.input}
    sizes = {i.name: int(np.prod(i.dims)) * onnx.helper.tensor_dtype_to_np_dtype(i.data_type).itemsize
             for i in model.graph.initializer}
    # the base weights every decode step reads in full: each MatMulNBits' codes, scales and zero
    # points (the embedding table is gathered, a row per token, and not counted)
    base = {name for n in model.graph.node if n.op_type == "MatMulNBits" for name in n.input[1:] if name in sizes}
    lora = [n for n in model.graph.node if "/lora_A/" in n.name or "/lora_B/" in n.name or "/lora/" in n.name]
    layers = json.loads((bundle / "genai_config.json").read_text())["model"]["decoder"]["num_hidden_layers"]
    return {
        "nodes": len(model.graph.node),
        "lora_ops": len(lora),
        "lora_ops_per_layer": len(lora) / layers,
        "matmulnbits": sum(n.op_type == "MatMulNBits" for n in model.graph.node),
        "lora_weight_mb_per_token": round(sum(sizes[n.input[1]] for n in lora if n.op_type in ("MatMul", "Gemm")
                                              and n.input[1] in inputs) / 1e6, 2),
        "base_weight_mb_per_token": round(sum(sizes[name] for name in base) / 1e6, 2),
    }


def decode_feeds(config: dict, past: int, rng) -> dict:
    """One decode step's inputs after ``past`` tokens of random KV cache (``config``: genai_config's decoder)."""
    import numpy as np

    feeds = {"input_ids": np.array([[42]], np.int64), "attention_mask": np.ones((1, past + 1), np.int64)}
    for layer in range(config["num_hidden_layers"]):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{layer}.{kind}"] = rng.standard_normal(
                (1, config["num_key_value_heads"], past, config["head_size"])).astype(np.float32)
    return feeds


class Decoder:
    """One bundle loaded in onnxruntime-genai (for tok/s) and in plain onnxruntime (for CPU ms)."""

    def __init__(self, bundle: Path, adapter: str | None, past: int):
        import numpy as np
        import onnxruntime as ort
        import onnxruntime_genai as og

        from modelbuild.ml.genai import bundle_adapters

        self.og, self.adapter = og, adapter
        self.model = og.Model(str(bundle))
        self.tokenizer = og.Tokenizer(self.model)
        self.adapters = og.Adapters(self.model)
        for name, path in bundle_adapters(bundle).items():
            self.adapters.load(str(path), name)
        self.ids = self.prompt_ids(bundle, self.tokenizer)
        config = json.loads((bundle / "genai_config.json").read_text())["model"]["decoder"]
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
        self.session = ort.InferenceSession(str(bundle / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self.run_options = ort.RunOptions()
        if adapter:
            self.lora = ort.LoraAdapter()
            self.lora.Load(str(bundle_adapters(bundle)[adapter]))
            self.run_options.add_active_adapter(self.lora)
        self.feeds = decode_feeds(config, past, np.random.default_rng(0))

    @staticmethod
    def prompt_ids(bundle: Path, tokenizer=None) -> list[int]:
        import onnxruntime_genai as og

        tokenizer = tokenizer or og.Tokenizer(og.Model(str(bundle)))
        text = tokenizer.apply_chat_template(json.dumps([{"role": "user", "content": PROMPT}]), add_generation_prompt=True)
        return [int(i) for i in tokenizer.encode(text)]

    def tokens_per_s(self, new_tokens: int) -> tuple[float, list[int]]:
        og = self.og
        params = og.GeneratorParams(self.model)
        total = len(self.ids) + new_tokens
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        generator = og.Generator(self.model, params)
        if self.adapter:
            generator.set_active_adapter(self.adapters, self.adapter)
        generator.append_tokens(self.ids)
        tokens, first = [], None
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
            if first is None:
                first = time.perf_counter()
        return (len(tokens) - 1) / (time.perf_counter() - first), tokens

    def cpu_ms_per_step(self, steps: int = 20) -> float:
        started = time.process_time()
        for _ in range(steps):
            self.session.run(["logits"], self.feeds, self.run_options)
        return (time.process_time() - started) / steps * 1e3


def logits(bundle: Path, ids, adapter: str | None):
    import numpy as np

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import ort_logits

    from modelbuild.ml.genai import bundle_adapters

    return ort_logits(bundle, np.asarray([ids], dtype=np.int64), bundle_adapters(bundle)[adapter] if adapter else None)[0]


def measure(algorithm: str, args) -> dict:
    """Build the three bundles with ``algorithm`` and measure them in alternating rounds."""
    from modelbuild.ml.genai import logit_agreement

    work = args.work / algorithm
    work.mkdir(parents=True, exist_ok=True)
    settings = SimpleNamespace(algorithm=algorithm, block_size=args.block_size, min_correlation=args.min_correlation,
                               min_top1=args.min_top1)
    bundles = {
        "merged": (build("merged", args.merged, None, work, settings, False), None),
        "unfused": (build("unfused", args.base, args.adapter, work, settings, False), "travel"),
        "fused_3d": (build("fused_3d", args.base, args.adapter, work, settings, True), "travel"),
        "fused": (build("fused", args.base, args.adapter, work, settings, True, gemm=True), "travel"),
    }
    load_before = os.getloadavg()
    decoders = {name: Decoder(path, adapter, args.past) for name, (path, adapter) in bundles.items()}
    names = list(decoders)
    speed, cpu, tokens = {name: [] for name in names}, {name: [] for name in names}, {}
    for decoder in decoders.values():  # warm-up
        decoder.tokens_per_s(8)
        decoder.cpu_ms_per_step(3)
    for round_ in range(args.rounds):
        order = names[round_ % len(names):] + names[: round_ % len(names)]
        for name in order:
            rate, tokens[name] = decoders[name].tokens_per_s(args.tokens)
            speed[name].append(round(rate, 2))
        for name in order:
            cpu[name].append(round(decoders[name].cpu_ms_per_step(), 3))
    load_after = os.getloadavg()
    del decoders

    ids = Decoder.prompt_ids(bundles["fused"][0])
    with_adapter = {name: logits(path, ids, adapter) for name, (path, adapter) in bundles.items()}
    fused_off = logits(bundles["fused"][0], ids, None)
    results = {}
    for name in names:
        results[name] = {
            "tokens_per_s_median": statistics.median(speed[name]), "tokens_per_s": speed[name],
            "cpu_ms_per_step_median": statistics.median(cpu[name]), "cpu_ms_per_step": cpu[name],
            **graph_stats(bundles[name][0]),
        }
    merged_speed, merged_cpu = results["merged"]["tokens_per_s_median"], results["merged"]["cpu_ms_per_step_median"]
    return {
        "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "bundles": results,
        "ratios_vs_merged": {name: {"tokens_per_s": round(results[name]["tokens_per_s_median"] / merged_speed, 3),
                                    "tokens_per_s_paired": paired(speed[name], speed["merged"]),
                                    "cpu_speed_1_thread": round(merged_cpu / results[name]["cpu_ms_per_step_median"], 3),
                                    "cpu_speed_1_thread_paired": paired(cpu["merged"], cpu[name])}
                             for name in ("unfused", "fused_3d", "fused")},
        "logits_with_adapter": {
            "fused_vs_unfused": logit_agreement(with_adapter["unfused"], with_adapter["fused"]),
            "fused_vs_fused_3d": logit_agreement(with_adapter["fused_3d"], with_adapter["fused"]),
            "fused_vs_merged": logit_agreement(with_adapter["merged"], with_adapter["fused"]),
            "unfused_vs_merged": logit_agreement(with_adapter["merged"], with_adapter["unfused"]),
            "fused_without_adapter_vs_with": logit_agreement(with_adapter["fused"], fused_off),
            "fused_vs_fused_3d_without_adapter": logit_agreement(logits(bundles["fused_3d"][0], ids, None), fused_off),
        },
        "same_greedy_tokens": {"fused_vs_unfused": tokens["fused"] == tokens["unfused"],
                               "fused_vs_merged": tokens["fused"] == tokens["merged"]},
    }


def paired(numerators: list[float], denominators: list[float]) -> float:
    """The median of the per-round ratios: the machine's speed drifts between rounds (here up to
    20 % over a run), and a ratio taken within one round cancels that drift where the ratio of
    the two medians does not."""
    return round(statistics.median(a / b for a, b in zip(numerators, denominators)), 3)


def genai_build_default(name: str) -> float:
    from modelbuild.passes import genai_build

    return getattr(genai_build.Params(), name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, default=REPO / "build/smollm2-base")
    parser.add_argument("--adapter", type=Path, default=REPO / "build/smollm2-travel-adapter")
    parser.add_argument("--merged", type=Path, default=REPO / "build/smollm2-travel-merged")
    parser.add_argument("--algorithms", default="rtn,k_quant_mixed",
                        help="int4 algorithms, each used for all three bundles (rtn: the merged target's; k_quant_mixed: travel.toml's)")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--work", type=Path, default=Path("/tmp/adapter_speed"))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--past", type=int, default=64)
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/adapter_speed.json")
    parser.add_argument("--min-correlation", type=float, default=genai_build_default("min_correlation"),
                        help="genai-build's logit check (lower it for a random base: int4 noise drowns its flat logits)")
    parser.add_argument("--min-top1", type=float, default=genai_build_default("min_top1"))
    args = parser.parse_args()

    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    if not args.merged.exists():  # e.g. a bench/phi35_build.py --make-only base: merge with the lora-merge pass
        from modelbuild.passes import lora_merge

        args.merged.mkdir(parents=True)
        lora_merge.run(lora_merge.Params(), {"base": args.base, "adapter": args.adapter}, args.merged,
                       SimpleNamespace(threads=os.cpu_count(), target=args.merged.name))
    by_algorithm = {algorithm: measure(algorithm, args) for algorithm in args.algorithms.split(",")}
    record = {
        "what": f"{args.base.name} int4 decode speed: switchable travel adapter (unfused / fused LoRA graph) vs the merged "
                "bundle, same int4 algorithm and block size",
        "command": "PYTHONPATH=. .venv/bin/python bench/adapter_speed.py " + " ".join(sys.argv[1:]),
        "settings": {"block_size": args.block_size, "rounds": args.rounds, "new_tokens": args.tokens,
                     "past_for_cpu_ms": args.past, "cpus": os.cpu_count()},
        "goal": "switchable >= 0.90 x merged decode speed",
        "by_algorithm": by_algorithm,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")

    for algorithm, result in by_algorithm.items():
        print(f"\nint4 {algorithm}, block {args.block_size} (load {result['load_average_before_after']})")
        print(f"{'bundle':10s} {'tok/s':>8s} {'ratio':>6s} {'paired':>6s} {'cpu ms':>7s} {'ratio':>6s} {'paired':>6s} "
              f"{'nodes':>6s} {'LoRA ops':>8s} {'NBits':>6s} {'base MB':>8s} {'LoRA MB':>8s}")
        merged = result["bundles"]["merged"]
        for name, r in result["bundles"].items():
            ratios = result["ratios_vs_merged"].get(name, {"tokens_per_s_paired": 1.0, "cpu_speed_1_thread_paired": 1.0})
            print(f"{name:10s} {r['tokens_per_s_median']:8.1f} {r['tokens_per_s_median'] / merged['tokens_per_s_median']:6.3f} "
                  f"{ratios['tokens_per_s_paired']:6.3f} {r['cpu_ms_per_step_median']:7.2f} "
                  f"{merged['cpu_ms_per_step_median'] / r['cpu_ms_per_step_median']:6.3f} {ratios['cpu_speed_1_thread_paired']:6.3f} "
                  f"{r['nodes']:6d} {r['lora_ops']:8d} {r['matmulnbits']:6d} {r['base_weight_mb_per_token']:8.2f} "
                  f"{r['lora_weight_mb_per_token']:8.2f}")
        for key, value in result["logits_with_adapter"].items():
            print(f"  {key:30s} {value}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
