"""Plain ONNX model folders (what onnx-export writes) for the passes that transform them:
graph-optimize, onnx-fp16 and onnx-int8.

A folder holds ``model.onnx`` with its weights in ``model.onnx.data`` (``input_ids,
attention_mask -> logits``, dynamic batch and sequence) beside the tokenizer and config files
of the model it came from. Each pass reads one such folder and writes another, so they chain
(onnx-export -> graph-optimize -> onnx-fp16, onnx-export -> onnx-int8).

Nothing here is imported at module level beyond the standard library: pass modules import this
on every ``doit`` call, and onnx, onnxruntime and numpy are imported inside the functions.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from modelbuild import UserError

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
# Copied through from the input folder, as onnx-export writes them.
SOURCE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                "generation_config.json", "config.json")
# Two probe sequences of different lengths (the dynamic dimensions are exercised), the same
# texts as onnx-export's check.
PROBES = ("What should I pack for a week in Iceland?", "Plan a rainy day in London, please, with museums and a good lunch.")
# An initializer this small stays inside model.onnx; every larger one goes to model.onnx.data.
EXTERNAL_THRESHOLD = 1024


def model_path(folder: Path, key: str = "model") -> Path:
    """``folder/model.onnx``, or a one-line error naming the input."""
    path = Path(folder) / MODEL_FILE
    if not path.is_file():
        raise UserError(f"inputs.{key}: no {MODEL_FILE}: not an ONNX model folder (use an onnx-export target)")
    return path


def read_config(folder: Path) -> dict:
    """The model's config.json (copied through by onnx-export), or {} when there is none."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except ValueError as error:
        raise UserError(f"inputs.model: config.json: not JSON ({error})") from None
    return config if isinstance(config, dict) else {}


def copy_source_files(source: Path, out_dir: Path) -> list[str]:
    """Copy the tokenizer and config files through; return their names."""
    copied = []
    for name in SOURCE_FILES:
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, out_dir / name)
            copied.append(name)
    return copied


def load_model(path: Path, key: str = "model"):
    """The ModelProto with its external data loaded."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=True)
    except Exception as error:  # protobuf DecodeError, missing data file, ...
        raise UserError(f"inputs.{key}: cannot load {Path(path).name}: {str(error).strip().splitlines()[0]}") from None


def load_graph(path: Path, key: str = "model"):
    """The ModelProto without its external data (names, ops, metadata: cheap for any size)."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as error:
        raise UserError(f"inputs.{key}: cannot load {Path(path).name}: {str(error).strip().splitlines()[0]}") from None


def save_model(model, out_dir: Path) -> Path:
    """``out_dir/model.onnx`` + ``model.onnx.data``: every initializer of at least 1 KiB goes to
    the one data file, in graph order (deterministic bytes for the same model)."""
    import onnx

    path = out_dir / MODEL_FILE
    for stale in (path, out_dir / DATA_FILE):
        stale.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=EXTERNAL_THRESHOLD, convert_attribute=False)
    for written in (path, out_dir / DATA_FILE):
        if written.exists():
            os.chmod(written, 0o644)  # onnx creates the data file 0600
    return path


def model_size(folder: Path) -> int:
    """Bytes of model.onnx and its data file."""
    return sum((Path(folder) / name).stat().st_size for name in (MODEL_FILE, DATA_FILE) if (Path(folder) / name).is_file())


def op_counts(model) -> dict[str, int]:
    """op type -> node count of the main graph, sorted by op type ("domain:op" outside ONNX's)."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        name = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op_type}"
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def initializer_types(model) -> dict[str, int]:
    """Element type name -> number of initializers (e.g. {"FLOAT16": 120, "INT64": 30})."""
    import onnx

    counts: dict[str, int] = {}
    for init in model.graph.initializer:
        name = onnx.TensorProto.DataType.Name(init.data_type)
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def probe_ids(folder: Path, texts: tuple[str, ...] = PROBES) -> list[list[int]]:
    """Token ids of the probe texts with the folder's tokenizer.json; without one, fixed
    pseudo-random ids below config.json's vocab_size (the same ids on every run)."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        probes = [tokenizer.encode(text, add_special_tokens=False).ids for text in texts]
        if all(probes):
            return probes
    vocab = read_config(folder).get("vocab_size")
    if not isinstance(vocab, int) or vocab < 2:
        raise UserError("inputs.model: no tokenizer.json and no vocab_size in config.json to make probe ids from")
    return [[(7919 * (i + 1) + 104729 * n) % vocab for i in range(length)] for n, length in enumerate((11, 17))]


def session(path: Path, threads: int, optimize: bool = True):
    """A CPU onnxruntime session limited to the stage's thread share."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, int(threads))
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def input_names(model) -> list[str]:
    """The graph inputs a caller feeds (initializers listed as inputs excluded) of a ModelProto."""
    initializers = {init.name for init in model.graph.initializer}
    return [value.name for value in model.graph.input if value.name not in initializers]


def feeds(names: list[str], ids, key: str = "model") -> dict:
    """The whole input dict of a logits graph (its input ``names``) for a batch of one sequence,
    every token attended."""
    import numpy as np

    ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
    out = {}
    for name in names:
        if name == "input_ids":
            out[name] = ids
        elif name == "attention_mask":
            out[name] = np.ones_like(ids)
        elif name == "position_ids":
            out[name] = np.arange(ids.shape[1], dtype=np.int64)[None, :]
        else:
            raise UserError(f"inputs.{key}: model input '{name}' is none of input_ids, attention_mask, position_ids "
                            "(a KV-cache graph? use an onnx-export target)")
    if "input_ids" not in out:
        raise UserError(f"inputs.{key}: the model has no input_ids input")
    return out


def logits(path: Path, probes: list[list[int]], threads: int, key: str = "model") -> list:
    """float64 logits [sequence, vocab] of each probe, through onnxruntime on CPU."""
    import numpy as np

    try:
        sess = session(path, threads)
    except Exception as error:  # onnxruntime: missing kernel, invalid graph...
        raise UserError(f"{key}: onnxruntime cannot load it: {str(error).strip().splitlines()[0]}") from None
    outputs = [o.name for o in sess.get_outputs()]
    name = "logits" if "logits" in outputs else outputs[0]
    names = [value.name for value in sess.get_inputs()]
    result = []
    for ids in probes:
        fed = feeds(names, ids, key)
        try:
            out = sess.run([name], fed)[0]
        except Exception as error:
            raise UserError(f"{key}: onnxruntime cannot run it: {str(error).strip().splitlines()[0]}") from None
        result.append(np.asarray(out, dtype=np.float64).reshape(len(ids), -1))
    return result


def compare(reference: list, candidate: list) -> dict:
    """How far the candidate's logits are from the reference's, over all probe positions:
    max and mean |difference|, the largest |reference logit| (the scale), top-1 agreement
    (fraction of positions whose argmax token is the same) and the Pearson correlation."""
    import numpy as np

    ref = np.concatenate([r.reshape(-1, r.shape[-1]) for r in reference])
    got = np.concatenate([c.reshape(-1, c.shape[-1]) for c in candidate])
    if ref.shape != got.shape:
        raise UserError(f"logits have shape {got.shape}, the input model's {ref.shape}")
    if not np.isfinite(got).all():
        return {"max_abs_diff": float("inf"), "mean_abs_diff": float("inf"), "reference_max_abs": float(np.abs(ref).max()),
                "top1_agreement": 0.0, "correlation": 0.0, "positions": int(ref.shape[0]), "finite": False}
    diff = np.abs(got - ref)
    correlation = float(np.corrcoef(ref.ravel(), got.ravel())[0, 1]) if ref.std() > 0 and got.std() > 0 else 0.0
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "reference_max_abs": float(np.abs(ref).max()),
        "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).mean()),
        "correlation": correlation,
        "positions": int(ref.shape[0]),
        "finite": True,
    }


def rounded(stats: dict, digits: int = 4) -> dict:
    """The comparison as it goes into a record file: floats to ``digits`` significant digits."""
    return {k: (float(f"{v:.{digits}g}") if isinstance(v, float) else v) for k, v in stats.items()}


def write_record(out_dir: Path, name: str, record: dict) -> None:
    (out_dir / name).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def status():
    """A rich status line on stderr (``with status() as s: s.update("...")``), as genai-build shows."""
    from rich.console import Console

    return Console(stderr=True).status("")
