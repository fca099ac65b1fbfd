"""Phi-3.5-mini-shaped int4 genai-build on this machine: wall time, peak RSS, disk.

    .venv/bin/python bench/phi35_build.py [--layers 32] [--algorithm k_quant_mixed] [--bare] [--work DIR]

The hub is out of reach here, so the base is made by the random-init pass with Phi-3.5-mini-
instruct's config (hidden 3072, intermediate 8192, 32 heads, vocabulary 32064, LongRoPE; ``--layers``
of its 32 decoder layers) in bfloat16, as the hub ships it, plus a random rank-8 LoRA adapter on
every decoder Linear (what lora-finetune makes by default; training one would take hours here). A scratch project builds it with the travel recipe's genai-build settings
(int4, switchable adapter 'travel', the torch logit check and onnxruntime-genai verification),
measured as one child process tree (peak RSS from getrusage). The torch logit check's bounds are
lowered for this target (correlation 0.5, top-1 0): they are measured on real weights, and int4
noise drowns a random model's nearly flat logits (32 random layers: correlation 0.74, top-1 14 %);
the agreement is reported. ``--bare`` also measures the
builder's own int4 (``create_model`` of the base, no adapter, the whole-graph quantizer) on
the same base; at 32 layers that needs ~66 GB, so only use it with a few layers.

Writes bench/results/phi35_build[-L<layers>][-<algorithm>].json (no suffix: 32 layers, k_quant_mixed).
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

from genai_memory import peak_of  # noqa: E402
from scratch import scratch_project  # noqa: E402

PHI35_MINI = dict(  # microsoft/Phi-3.5-mini-instruct's config.json (LongRoPE factors: 48 each, values made up)
    model_type="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_attention_heads=32,
    num_key_value_heads=32, max_position_embeddings=131072, original_max_position_embeddings=4096, rms_norm_eps=1e-5,
    sliding_window=262144, tie_word_embeddings=False, hidden_act="silu", rope_theta=10000.0,
    rope_scaling={"type": "longrope", "long_factor": [1.0 + i / 48 for i in range(48)], "short_factor": [1.0] * 48},
)
MAKE = """
import sys, torch
from pathlib import Path
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
sys.path.insert(0, {repo!r})
from modelbuild.passes import random_init
base, adapter, layers, config = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), {config!r}
params = random_init.Params(config={{**config, "num_hidden_layers": layers}}, seed=0, dtype="bfloat16")
base.mkdir(parents=True)
random_init.run(params, {{"corpus": Path({corpus!r})}}, base, None)  # the pass itself, outside a project cache
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
lora = LoraConfig(r=8, lora_alpha=16.0, target_modules=["down_proj", "gate_up_proj", "o_proj", "qkv_proj"],
                  init_lora_weights=False, task_type="CAUSAL_LM")
get_peft_model(model, lora).save_pretrained(adapter)
"""
TARGETS = """
[target.phi35-travel-cpu-int4]
doc = "Phi-3.5-mini-shaped random base ({layers} layers), the travel recipe's genai-build settings"
pass = "genai-build"
inputs = {{ base = {base!r}, adapters = {{ travel = {adapter!r} }} }}
params = {{ precision = "int4", int4_algorithm = {algorithm!r}, block_size = 32, min_correlation = 0.5, min_top1 = 0.0 }}
"""
BARE = """
import sys
from onnxruntime_genai.models.builder import create_model, parse_extra_options
base, out, cache, algorithm = sys.argv[1:5]
options = ["accuracy_level=4", f"algo_config={algorithm}", "block_size=32", "is_symmetric=true"]
opts = parse_extra_options(None, base, out, "int4", "cpu", cache, options)
create_model(None, base, out, "int4", "cpu", cache, **opts)
"""


def size_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--algorithm", default="k_quant_mixed", help="genai-build int4_algorithm (the recipe's default)")
    parser.add_argument("--bare", action="store_true", help="also the builder's own whole-graph int4 (few layers only)")
    parser.add_argument("--work", help="keep the random base here (reused when present) instead of a temporary folder")
    parser.add_argument("--make-only", action="store_true", help="only make the base and adapter in --work (for adapter_speed.py)")
    args = parser.parse_args()
    if args.make_only and not args.work:
        parser.error("--make-only needs --work")
    if args.bare and args.algorithm == "source_grid":
        parser.error("--bare runs the builder's own int4, which has no source_grid")
    with tempfile.TemporaryDirectory(prefix="phi35-build-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        base, adapter = work / f"phi35-L{args.layers}-base", work / f"phi35-L{args.layers}-adapter"
        if not (adapter / "adapter_config.json").is_file():
            print(f"random Phi-3.5-mini-shaped base, {args.layers} layers (bf16) + LoRA adapter ...", flush=True)
            code = MAKE.format(repo=str(REPO), config=PHI35_MINI, corpus=str(REPO / "targets/data/tokenizer_corpus.txt"))
            subprocess.run([sys.executable, "-c", code, str(base), str(adapter), str(args.layers)], check=True)
        if args.make_only:
            print(f"made {base} and {adapter}")
            return 0
        project, env = scratch_project(Path(tmp) / "scratch")
        (project / "targets").joinpath("phi35_bench.toml").write_text(TARGETS.format(
            layers=args.layers, base=str(base), adapter=str(adapter), algorithm=args.algorithm))
        for name in ("travel.toml", "variants.toml", "precision.toml"):  # only the bench target is needed
            (project / "targets" / name).unlink()
        print("doit phi35-travel-cpu-int4 ...", flush=True)
        peak, seconds = peak_of([sys.executable, "-m", "doit", "phi35-travel-cpu-int4"], project, env)
        bundle = project / "build" / "phi35-travel-cpu-int4"
        built = json.loads((bundle / "modelbuild.json").read_text())
        weights = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 1e6
        report = {
            "layers": args.layers, "algorithm": args.algorithm, "parameters_b": round(weights / 2e3, 2),
            "base_bf16_mb": round(weights, 1), "fp32_weights_mb": round(2 * weights, 1),
            "genai_build": {"peak_rss_mb": peak, "peak_over_fp32_weights": round(peak / (2 * weights), 2),
                            "seconds": seconds, "bundle_mb": size_mb(bundle), "cache_mb": size_mb(Path(env["MODELBUILD_CACHE"]))},
            "vs_torch_fp32": built["vs_torch_fp32"],
        }
        print(json.dumps(report["genai_build"]), flush=True)
        if args.bare:
            bare_peak, bare_s = peak_of([sys.executable, "-c", BARE, str(base), str(Path(tmp) / "bare"),
                                         str(Path(tmp) / "bare-cache"), args.algorithm], project, env)
            report["bare_builder"] = {"peak_rss_mb": bare_peak, "peak_over_fp32_weights": round(bare_peak / (2 * weights), 2),
                                      "seconds": bare_s}
            report["peak_ratio"] = round(peak / bare_peak, 3)
    print(json.dumps(report, indent=1))
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    name = "phi35_build" + ("" if args.layers == 32 else f"-L{args.layers}")
    name += "" if args.algorithm == "k_quant_mixed" else f"-{args.algorithm}"
    name += ".json"
    (out / name).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
