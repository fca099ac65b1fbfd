"""Mixed int4/int8 precision: the measurement behind precision-search and the plan that
precision-plan writes and quantize-onnx follows.

A plan says how to quantize an fp32 bundle: the int4 algorithm and its block size, symmetry and
accuracy level, and which MatMuls go int8 instead. It is a build output (plan.json), so the choice
is cached, explained (plan.md) and reproducible; ``read_plan`` is the one reader, so every consumer
refuses a malformed plan with the same one-line error.

Sensitivity: how much a MatMul's output moves when only its weight is quantized, measured on the
project's own calibration activations X: ``||X (W - Q(W))|| / ||X W||``. Storing the Gram matrix
``H = X^T X`` instead of X makes it exact at a fixed cost: ``||X E||^2 = sum(E * (H @ E))``.
"""

from __future__ import annotations

import json
from pathlib import Path

from modelbuild import UserError

PLAN_FILE = "plan.json"
CANDIDATES_FILE = "candidates.json"
SCHEMA = 1
# plan.json key -> type; the keys are quantize-onnx's param names, so a plan overrides them as is.
PLAN_FIELDS = {"algorithm": str, "block_size": int, "symmetric": bool, "accuracy_level": int, "int8_nodes": list}


def read_plan(path: Path) -> dict:
    """{algorithm, block_size, symmetric, accuracy_level, int8_nodes} of a plan.json (or of the
    precision-plan output folder holding one); a malformed plan is a one-line UserError."""
    path = Path(path)
    file = path / PLAN_FILE if path.is_dir() else path
    shown = f"inputs.plan: {file.name}"
    try:
        plan = json.loads(file.read_text(encoding="utf-8"))
    except OSError:
        raise UserError(f"inputs.plan: no {PLAN_FILE} (use a precision-plan target)") from None
    except ValueError as error:
        raise UserError(f"{shown}: not JSON ({error})") from None
    if not isinstance(plan, dict) or plan.get("schema") != SCHEMA:
        raise UserError(f"{shown}: not a schema-{SCHEMA} precision plan (use a precision-plan target)")
    out = {}
    for key, kind in PLAN_FIELDS.items():
        value = plan.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise UserError(f"{shown}: '{key}' must be a {kind.__name__}, got {value!r:.60}")
        out[key] = value
    if not all(isinstance(n, str) and n for n in out["int8_nodes"]) or len(set(out["int8_nodes"])) != len(out["int8_nodes"]):
        raise UserError(f"{shown}: 'int8_nodes' must be distinct MatMul node names")
    if out["block_size"] < 16 or out["block_size"] & (out["block_size"] - 1):
        raise UserError(f"{shown}: 'block_size' must be a power of two >= 16, got {out['block_size']}")
    if not 0 <= out["accuracy_level"] <= 4:
        raise UserError(f"{shown}: 'accuracy_level' must be 0 to 4, got {out['accuracy_level']}")
    return out


def matmul_weights(model) -> tuple[list[str], dict[str, str]]:
    """(every MatMul node name in graph order, MatMul -> its weight initializer for those with a
    constant 2-D weight) of an fp32 model; one-line refusals for a quantized model, non-fp32
    weights and MatMuls without unique names (nodes are chosen by name)."""
    import onnx

    graph = model.graph
    quantized = sum(n.domain == "com.microsoft" and n.op_type == "MatMulNBits" for n in graph.node)
    if quantized:
        raise UserError(f"inputs.bundle: already quantized ({quantized} MatMulNBits nodes); "
                        'give an fp32 bundle (genai-build with params.precision = "fp32")')
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    names = [n.name for n in matmuls]
    if any(not name for name in names) or len(set(names)) != len(names):
        raise UserError("inputs.bundle: MatMul nodes without unique names; nodes are chosen by name")
    initializers = {init.name: init for init in graph.initializer}
    weights = {}
    for node in matmuls:
        init = initializers.get(node.input[1])
        if init is None or len(init.dims) != 2:
            continue
        if init.data_type != onnx.TensorProto.FLOAT:
            kind = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).name
            raise UserError(f'inputs.bundle: {node.name} has {kind} weights; give an fp32 bundle '
                            '(genai-build with params.precision = "fp32")')
        weights[node.name] = node.input[1]
    return names, weights


def quantizable_matmuls(model, lora_markers: tuple[str, ...]) -> dict[str, str]:
    """MatMul node -> its weight initializer, for every MatMul that int4/int8 may replace: a
    constant 2-D fp32 weight, not a LoRA MatMul, not a weight an adapter overrides (graph input)."""
    graph_inputs = {i.name for i in model.graph.input}
    found = {name: weight for name, weight in matmul_weights(model)[1].items()
             if weight not in graph_inputs and not any(m in name for m in lora_markers)}
    if not found:
        raise UserError("inputs.bundle: no MatMul with a constant fp32 weight to quantize")
    return found


def matching_nodes(patterns: list[str], weights: dict, key: str) -> set[str]:
    """MatMuls with a constant weight whose names match the globs of params.<key>; each glob must match."""
    import fnmatch

    matched: set[str] = set()
    for pattern in patterns:
        hits = fnmatch.filter(weights, pattern)
        if not hits:
            raise UserError(f"params.{key}: '{pattern}' matches no MatMul with a constant weight (e.g. {next(iter(weights), 'none')})")
        matched.update(hits)
    return matched


def dequantized_weights(model, shapes: dict[str, tuple], bits_hint: str) -> dict:
    """MatMul name -> the weight [K, N] (float64) its MatMulNBits node in a quantized model
    computes with: what the kernel multiplies by, to measure the error of. ``shapes``: name ->
    the fp32 weight's (K, N). The node is ``{name}_Q4`` or ``{name}_Q8`` (a quantizer may keep a
    weight 8-bit); one that reads ``concat(x, block sums of x)`` (source_grid's block offsets)
    has K + K/block rows, the extra row of each block added to that block's rows."""
    import numpy as np
    from onnx import numpy_helper

    from modelbuild.ml.nbits import dequantize_matmul_nbits

    nodes = {n.name: n for n in model.graph.node if n.op_type == "MatMulNBits"}
    initializers = {init.name: init for init in model.graph.initializer}
    out = {}
    for name, (k, _) in shapes.items():
        node = nodes.get(f"{name}_Q4") or nodes.get(f"{name}_Q8")
        if node is None:
            raise UserError(f"the quantizer left {name} unquantized ({bits_hint} expected)")
        attrs = {a.name: a.i for a in node.attribute}
        rows, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
        blocks = -(-rows // block)
        weight = numpy_helper.to_array(initializers[node.input[1]]).reshape(n, blocks, -1)
        scales = numpy_helper.to_array(initializers[node.input[2]]).reshape(n, blocks)
        zeros = numpy_helper.to_array(initializers[node.input[3]]) if len(node.input) > 3 and node.input[3] else None
        if zeros is not None and zeros.dtype != np.uint8:  # float zero points (HQQ): (q - zero) * scale
            # the codes alone: unit scales with the symmetric zero point, shifted back
            codes = dequantize_matmul_nbits(weight, np.ones_like(scales), None, bits, block, blocks * block)
            codes = codes.astype(np.float64) + (1 << (bits - 1))
            values = (codes.reshape(n, blocks, block) - zeros.reshape(n, blocks)[:, :, None]) * scales.astype(np.float64)[:, :, None]
            full = values.reshape(n, -1)[:, :rows].T
        else:
            full = dequantize_matmul_nbits(weight, scales, None if zeros is None else zeros.reshape(n, -1), bits, block, rows).astype(np.float64).T
        if rows > k:  # block offsets: row k + b multiplies the sum of block b's inputs
            full = full[:k] + full[k:][np.arange(k) // block]
        out[name] = full
    return out


def output_error(weight, quantized, gram) -> float:
    """``||X (W - Q)|| / ||X W||`` for the activations X whose Gram matrix ``X^T X`` is ``gram``."""
    import numpy as np

    w = np.asarray(weight, dtype=np.float64)
    e = w - quantized
    num, den = float((e * (gram @ e)).sum()), float((w * (gram @ w)).sum())
    return (max(num, 0.0) / den) ** 0.5 if den > 0 else 0.0
