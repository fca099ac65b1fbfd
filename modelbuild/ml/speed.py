"""Generation speed and memory of one model, measured in a process of its own.

``python -m modelbuild.ml.speed request.json`` loads the model (an onnxruntime-genai bundle, or an
HF folder in torch fp32 eager as the reference), generates greedily from each prompt a fixed
number of new tokens, and prints one JSON line: time to first token, decode tokens/s and the
process's peak RSS. A fresh process makes the peak RSS the model's own (not the perplexity
run's, nor the evaluator's imports), and keeps runs independent of each other.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _genai_runner(model_dir: Path, adapter: str | None):
    from modelbuild.ml.genai import Chat

    chat = Chat(model_dir)
    og = chat.og

    def generate(prompt: str, new_tokens: int) -> tuple[float, float, int]:
        ids = chat.prompt_ids(prompt)
        params = og.GeneratorParams(chat.model)
        length = len(ids) + new_tokens
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        generator = og.Generator(chat.model, params)
        if adapter:
            generator.set_active_adapter(chat.adapters, adapter)
        started = time.perf_counter()
        generator.append_tokens(ids)
        generator.generate_next_token()
        first = time.perf_counter()
        count = 1
        while not generator.is_done():
            generator.generate_next_token()
            count += 1
        return first - started, time.perf_counter() - first, count

    return generate


def _torch_runner(model_dir: Path, adapter_dir: str | None, threads: int, device: str):
    """Torch fp32 eager on the stage's device (``cuda`` runs on the GPU the scheduler made visible)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    target = torch.device("cuda" if device.startswith("cuda") else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.to(target).eval()

    def generate(prompt: str, new_tokens: int) -> tuple[float, float, int]:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(target)
        with torch.inference_mode():
            past = None
            started = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            past = out.past_key_values
            if target.type == "cuda":
                torch.cuda.synchronize()
            first = time.perf_counter()
            for _ in range(new_tokens - 1):
                out = model(input_ids=token, past_key_values=past, use_cache=True)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                past = out.past_key_values
            if target.type == "cuda":
                torch.cuda.synchronize()  # kernels run asynchronously: time what really ran
        return first - started, time.perf_counter() - first, new_tokens

    return generate


def main(request_file: str) -> int:
    request = json.loads(Path(request_file).read_text())
    model_dir = Path(request["model"])
    if request["kind"] == "genai":
        generate = _genai_runner(model_dir, request.get("adapter"))
    else:
        generate = _torch_runner(model_dir, request.get("adapter_dir"), request["threads"], request.get("device", "cpu"))
    generate(request["prompts"][0], 4)  # warm-up: first-run allocations and kernel selection
    ttfts, rates = [], []
    for _ in range(request["runs"]):
        for prompt in request["prompts"]:
            ttft, decode_s, count = generate(prompt, request["new_tokens"])
            ttfts.append(ttft)
            rates.append((count - 1) / decode_s)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({
        "ttft_ms": round(statistics.median(ttfts) * 1000, 2),
        "tokens_per_s": round(statistics.median(rates), 2),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "speed_samples": len(rates),
    }))
    return 0


def measure(request: dict, scratch: Path) -> dict:
    """Run the measurement in a child process; raises RuntimeError with its stderr on failure."""
    request_file = scratch / "speed-request.json"
    request_file.write_text(json.dumps(request))
    env = {**os.environ, "MODELBUILD_THREADS": str(request["threads"]), "OMP_NUM_THREADS": str(request["threads"])}
    proc = subprocess.run([sys.executable, "-m", "modelbuild.ml.speed", str(request_file)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    from modelbuild.exec.worker import quiet_libraries

    quiet_libraries()
    sys.exit(main(sys.argv[1]))
