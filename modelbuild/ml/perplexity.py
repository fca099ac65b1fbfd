"""Held-out perplexity of a prompt/response data set: the number evaluate reports and the
precision search ranks candidates by, computed by one piece of code so the two agree.

Only the response tokens are scored (the loss an adapter is trained on), each record given its
prompt; the negative log-likelihood is summed in float64 over every scored token of every record.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from modelbuild import UserError
from modelbuild.ml.records import load_records, tokenize_record


def scored_examples(data: Path, shown: str, tokenizer, template: str, samples: int, max_length: int) -> list[tuple[list[int], int]]:
    """(token ids, index of the first response token) per scored record: the first ``samples``
    records (0 = all) of the JSONL file, rendered through ``template``, cut to ``max_length``."""
    records = load_records(data, shown)
    if samples:
        records = records[:samples]
    examples = []
    for number, record in enumerate(records, 1):
        ids, start = tokenize_record(record, template, tokenizer, max_length, f"{shown}: record {number}")
        if start < len(ids):
            examples.append((ids, max(start, 1)))
    if not examples:
        raise UserError(f"{shown}: no record has response tokens within max_length={max_length}")
    return examples


def nll(logits, ids: list[int], start: int) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[start:] (logits[t] predicts ids[t+1]), in float64."""
    import numpy as np

    logits = np.asarray(logits, dtype=np.float64)[0]
    targets = np.asarray(ids[start:])
    rows = logits[start - 1: len(ids) - 1]
    peak = rows.max(axis=-1, keepdims=True)
    log_z = peak[:, 0] + np.log(np.exp(rows - peak).sum(axis=-1))
    return float((log_z - rows[np.arange(len(targets)), targets]).sum()), len(targets)


def onnx_perplexity(model: Path, adapter_file: Path | None, examples, threads: int, device: str = "cpu",
                    on_example=lambda: None) -> tuple[float, int]:
    """(perplexity, scored tokens) of a genai bundle's decoder through plain onnxruntime, whole
    sequences with an empty KV cache, with ``adapter_file`` (an .onnx_adapter) active if given."""
    import onnx
    import onnxruntime as ort

    from modelbuild.ml.genai import prefill_feeder

    decoder = json.loads((model / "genai_config.json").read_text())["model"]["decoder"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    providers = ["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(model / decoder["filename"]), options, providers=providers)
    feeds = prefill_feeder(onnx.load(str(model / decoder["filename"]), load_external_data=False), decoder, "inputs.model")
    run_options = ort.RunOptions()
    if adapter_file is not None:
        lora = ort.LoraAdapter()
        lora.Load(str(adapter_file))
        run_options.add_active_adapter(lora)
    total, count = 0.0, 0
    for ids, start in examples:
        logits = session.run(["logits"], feeds(ids), run_options)[0]
        value, n = nll(logits, ids, start)
        total, count = total + value, count + n
        on_example()
    return math.exp(total / count), count
