"""Logits of a decoder graph, whichever inputs it takes: a plain ONNX export (input_ids,
attention_mask, position_ids), a genai bundle's decoder (with an empty KV cache) or one that
takes sequence lengths instead of a mask (past_seq_len, total_seq_len: graph-surgery's
AttentionMaskToSequenceLengths). The passes that rewrite a graph (graph-surgery, nbits-to-qdq)
compare input and output through it on the same probe ids.
"""

from __future__ import annotations

from pathlib import Path

from modelbuild import UserError
from modelbuild.ml.onnx_models import session

# The inputs AttentionMaskToSequenceLengths leaves in place of attention_mask.
LENGTH_INPUTS = ("past_seq_len", "total_seq_len")


def _feeds(names: list[str], ids, decoder: dict | None, past_shape: tuple) -> dict:
    """The input dict of either graph for one sequence with an empty KV cache, every token attended."""
    import numpy as np

    ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
    length = ids.shape[1]
    declared = (decoder or {}).get("inputs", {})
    out = {}
    for name in names:
        if name == declared.get("input_ids", "input_ids"):
            out[name] = ids
        elif name == declared.get("attention_mask", "attention_mask"):
            out[name] = np.ones_like(ids)
        elif name == declared.get("position_ids", "position_ids"):
            out[name] = np.arange(length, dtype=np.int64)[None, :]
        elif name == "past_seq_len":  # GroupQueryAttention's seqlens_k: total length - 1
            out[name] = np.array([[length - 1]], dtype=np.int32)
        elif name == "total_seq_len":
            out[name] = np.array(length, dtype=np.int32)
        elif decoder is not None and name.startswith(("past_key_values.", "past.")):
            out[name] = np.zeros(past_shape, dtype=np.float32)
        else:
            raise UserError(f"inputs.model: graph input '{name}' is none of input_ids, attention_mask, position_ids, "
                            f"{', '.join(LENGTH_INPUTS)} or the KV cache")
    return out


def graph_logits(path: Path, probes, decoder: dict | None, threads: int, what: str, optimize: bool = True) -> list:
    """float64 logits [sequence, vocab] of each probe; ``optimize`` False: the graph as written,
    none of onnxruntime's fusions (which would, e.g., fold DequantizeLinear + MatMul back into
    MatMulNBits)."""
    import numpy as np

    try:
        sess = session(path, threads, optimize)
    except Exception as error:  # onnxruntime: invalid graph, missing kernel
        raise UserError(f"{what}: onnxruntime cannot load it: {str(error).strip().splitlines()[0]}") from None
    names = [value.name for value in sess.get_inputs()]
    logits_name = (decoder or {}).get("outputs", {}).get("logits", "logits")
    float_type = {value.name: value.type for value in sess.get_inputs()}
    past = (1, (decoder or {}).get("num_key_value_heads", 1), 0, (decoder or {}).get("head_size", 1))
    result = []
    for ids in probes:
        fed = _feeds(names, ids, decoder, past)
        for name in fed:
            if float_type[name] == "tensor(float16)":
                fed[name] = fed[name].astype(np.float16)
        try:
            out = sess.run([logits_name], fed)[0]
        except Exception as error:
            raise UserError(f"{what}: onnxruntime cannot run it: {str(error).strip().splitlines()[0]}") from None
        result.append(np.asarray(out, dtype=np.float64).reshape(len(ids), -1))
    return result
