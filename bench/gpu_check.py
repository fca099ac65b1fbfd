"""GPU check: the recipe's LoRA finetunes on CUDA (twice: same bytes?), torch evaluation tokens/s,
and a Phi-3.5-mini-shaped finetune step time. One script, sized for at most 8 minutes on one GPU
(an estimate: it has not run on a GPU yet; ``--device cpu --quick`` takes about 2 minutes on 2 cores).

What runs is the project's own code, stage by stage as doit runs it (each in a process of its
own through ``modelbuild.exec.worker``), with the travel recipe's own settings read from
``targets/``:

1. ``tiny-base`` (random-init) and ``tiny-travel-adapter`` (lora-finetune) twice; the same for
   ``smollm2-travel-adapter`` on SmolLM2's fp32 base. On cuda the pass trains under bf16 autocast
   where the GPU supports it, with deterministic algorithms; the two adapters' files are compared
   byte for byte.
2. Decode tokens/s and time to first token of each base + adapter through the evaluate pass's
   torch measurement (``modelbuild.ml.speed``, fp32 eager) on the device.
3. A random base of Phi-3.5-mini's shape (bench/phi35_build.py's config, bfloat16, 32 layers)
   and the phi35 recipe's finetune (lora-finetune's ``run``, in this process), 12 steps, each
   optimizer step timed by a step hook: the median step after the first.

The JSON goes to ``--out`` (gpu_check.json); a summary is printed.

On a GPU machine with torch, peft and transformers (no onnxruntime-genai, no network), copy:

- this checkout (``git archive --format=tar.gz -o modelbuild.tar.gz HEAD``; unpack it);
- ``build/smollm2-base/`` as built here by ``doit smollm2-base`` (the fp32 SmolLM2, 540 MB), to
  ``build/smollm2-base/`` in the checkout there (or give its place with ``--smollm2-base``);
- a wheel of ``rich`` (the passes' progress bars) if that machine lacks it:
  ``pip download --no-deps -d wheels "$(grep '^rich==' constraints.txt)"``, then
  ``pip install --no-deps wheels/rich-*.whl`` there.

Then, in the checkout there:

    PYTHONPATH=$PWD python bench/gpu_check.py --out bench/results/gpu

and copy back ``bench/results/gpu/gpu_check.json``. ``--device cpu --quick`` runs the same code
paths on the CPU in seconds (tiny model only, few steps, a narrowed Phi-3.5 shape): what
tests/test_gpu_check.py runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from phi35_build import PHI35_MINI  # noqa: E402

from modelbuild import UserError  # noqa: E402
from modelbuild.core import numerics  # noqa: E402
from modelbuild.exec.executor import load_here  # noqa: E402
from modelbuild.exec.worker import placed, quiet_libraries, run_worker, target_plan  # noqa: E402
from modelbuild.passes.evaluate import Params as EvaluateParams  # noqa: E402

# CPU smoke of the same code path: Phi-3.5's vocabulary, head size (96, which its LongRoPE factors
# need) and RoPE; 4 heads and one layer.
PHI_QUICK = {"hidden_size": 384, "intermediate_size": 768, "num_attention_heads": 4, "num_key_value_heads": 4,
             "num_hidden_layers": 1}


class Stages:
    """Runs project targets' passes the way the executor does, into a scratch folder."""

    def __init__(self, work: Path, device: str, threads: int):
        self.project = load_here(str(REPO))
        self.work, self.device, self.threads = work, device, threads
        self.branch = numerics.widest()
        self.env = {**os.environ, **numerics.environment(self.branch), "OMP_NUM_THREADS": str(threads),
                    "MODELBUILD_THREADS": str(threads)}

    def run(self, name: str, out_name: str, inputs: dict[str, Path], params: dict | None = None,
            device: str | None = None) -> tuple[Path, float]:
        target = self.project.targets[name]
        out_dir = self.work / out_name
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        device = device or self.device
        plan = target_plan(target, self.branch)
        plan["params"] = {**plan["params"], **(params or {})}
        plan = placed(plan, {key: str(path) for key, path in inputs.items()}, out_dir, device, device,
                      self.threads, self.project.cache_dir)
        stage_work = self.work / f".{out_name}-work"
        stage_work.mkdir(exist_ok=True)
        started = time.perf_counter()
        result = run_worker(plan, stage_work, self.env)
        seconds = time.perf_counter() - started
        if result.returncode != 0:
            raise UserError(f"{name} ({out_name}) failed on {device} (exit {result.returncode})")
        return out_dir, round(seconds, 2)


def file_digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def finetune_twice(stages: Stages, model: str, base: Path, overrides: dict) -> dict:
    data = REPO / "targets/data/travel_train.jsonl"
    runs = []
    for attempt in (1, 2):
        adapter, seconds = stages.run(f"{model}-travel-adapter", f"{model}-adapter-{attempt}",
                                      {"base": base, "data": data}, overrides)
        training = json.loads((adapter / "training.json").read_text())
        runs.append({"dir": adapter, "seconds": seconds, "digests": file_digests(adapter),
                     "autocast": training["autocast"], "final_loss": training["losses"][-1],
                     "steps": len(training["losses"])})
    first, second = runs
    differing = sorted(rel for rel in set(first["digests"]) | set(second["digests"])
                       if first["digests"].get(rel) != second["digests"].get(rel))
    return {"adapter": first["dir"], "result": {
        "steps": first["steps"], "seconds": [first["seconds"], second["seconds"]], "autocast": first["autocast"],
        "final_loss": first["final_loss"], "identical": not differing, "differing_files": differing,
        "adapter_sha256": first["digests"].get("adapter_model.safetensors")}}


def torch_speed(base: Path, adapter: Path, device: str, threads: int, quick: bool) -> dict:
    from modelbuild.ml import speed

    defaults = EvaluateParams()
    request = {"kind": "hf", "model": str(base), "adapter": None, "adapter_dir": str(adapter),
               "prompts": defaults.prompts, "new_tokens": 8 if quick else defaults.new_tokens,
               "runs": 1 if quick else defaults.speed_runs, "threads": threads, "device": device}
    with tempfile.TemporaryDirectory() as scratch:
        return speed.measure(request, Path(scratch))


def phi_step_time(stages: Stages, quick: bool) -> dict:
    """The pass's own training loop on a Phi-3.5-mini-shaped base, each optimizer step timed by
    a global step hook (after a CUDA sync): the median step after the first (warm-up)."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from modelbuild.exec.worker import StageContext
    from modelbuild.passes import lora_finetune

    config = {**PHI35_MINI, "num_hidden_layers": 32, **(PHI_QUICK if quick else {})}
    base, init_seconds = stages.run("tiny-base", "phi35-shaped-base",
                                    {"corpus": REPO / "targets/data/tokenizer_corpus.txt"},
                                    {"config": config, "dtype": "bfloat16"}, device="cpu")
    target = stages.project.targets["phi35-travel-adapter"]
    recipe = {**target.params, "max_steps": 4 if quick else 12, **({"max_length": 64} if quick else {})}
    ctx = StageContext(target=target.name, device=stages.device, assigned_device=stages.device,
                       threads=stages.threads, cache_dir=stages.project.cache_dir,
                       input_names={key: str(ref) for key, ref in target.inputs.items()})
    ends: list[float] = []

    def after_step(optimizer, args, kwargs):
        if stages.device == "cuda":
            torch.cuda.synchronize()
        ends.append(time.perf_counter())

    torch.set_num_threads(stages.threads)
    hook = register_optimizer_step_post_hook(after_step)
    out_dir = stages.work / "phi35-adapter"
    out_dir.mkdir()
    started = time.perf_counter()
    try:
        lora_finetune.run(lora_finetune.Params(**recipe), {"base": base, "data": REPO / "targets/data/travel_train.jsonl"},
                          out_dir, ctx)
    finally:
        hook.remove()
    steps = [round(b - a, 4) for a, b in zip(ends, ends[1:])]
    return {"config": {k: config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                              "num_attention_heads", "vocab_size")},
            "base_dtype": "bfloat16 on disk, fp32 in training (the pass's choice)", "init_seconds": init_seconds,
            "batch_size": recipe["batch_size"], "max_length": recipe["max_length"], "rank": recipe["rank"],
            "autocast": json.loads((out_dir / "training.json").read_text())["autocast"],
            "run_seconds": round(time.perf_counter() - started, 2), "step_seconds_each": steps,
            "step_seconds": statistics.median(steps),
            "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if stages.device == "cuda" else None}


def machine(device: str) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "device": device,
            "cpu_count": os.cpu_count()}
    if device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda, bf16=torch.cuda.is_bf16_supported())
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true",
                        help="seconds, not minutes: tiny model only, 4 steps, a narrowed Phi-3.5 shape")
    parser.add_argument("--smollm2-base", default=str(REPO / "build/smollm2-base"),
                        help="SmolLM2's fp32 HF folder (doit smollm2-base); not needed with --quick")
    parser.add_argument("--work", help="scratch folder (default: a temporary one, removed)")
    args = parser.parse_args()
    quiet_libraries()  # the Phi-3.5 finetune runs in this process: as quiet as a stage's

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device (use --device cpu --quick to check the script itself)", file=sys.stderr)
        return 2
    smollm2_base = Path(args.smollm2_base)
    if not args.quick and not (smollm2_base / "config.json").is_file():
        print(f"gpu_check: {smollm2_base}: no SmolLM2 fp32 folder (build it with `doit smollm2-base` and copy it, "
              "or give --smollm2-base)", file=sys.stderr)
        return 2
    threads = max(1, min(8, os.cpu_count() or 1))
    started = time.perf_counter()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        stages = Stages(work, args.device, threads)
        report = {"machine": machine(args.device), "quick": args.quick, "finetune": {}, "torch_eval": {}}
        tiny_base, _ = stages.run("tiny-base", "tiny-base", {"corpus": REPO / "targets/data/tokenizer_corpus.txt"},
                                  device="cpu")
        models = [("tiny", tiny_base, {"max_steps": 4} if args.quick else {})]
        if not args.quick:
            models.append(("smollm2", smollm2_base, {}))
        for model, base, overrides in models:
            done = finetune_twice(stages, model, base, overrides)
            report["finetune"][model] = done["result"]
            report["torch_eval"][model] = torch_speed(base, done["adapter"], args.device, threads, args.quick)
            print(f"{model}: finetune {done['result']['seconds']} s, identical={done['result']['identical']}, "
                  f"torch eval {report['torch_eval'][model]['tokens_per_s']} tok/s", flush=True)
        report["phi35_shaped_finetune"] = phi_step_time(stages, args.quick)
        print(f"phi35-shaped: {report['phi35_shaped_finetune']['step_seconds']} s/step", flush=True)
    except UserError as error:
        print(f"gpu_check: {error}", file=sys.stderr)
        return 2
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"gpu_check: {report['total_seconds']} s; {out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
