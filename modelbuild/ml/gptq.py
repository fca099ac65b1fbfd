"""GPTQ (Frantar et al., 2022) on an ONNX graph, for MatMulNBits.

onnxruntime 1.31's GPTQ (neural_compressor.weight_only.gptq) propagates each row's rounding error
through the wrong triangle of the Cholesky factor (all zeros), so it returns plain RTN, and it
re-rounds the result onto a new grid. This is GPTQ as in the paper's reference code, on
onnxruntime's activations and its MatMulNBits node maker.
"""

from __future__ import annotations

from modelbuild import UserError
from modelbuild.ml.nbits import matmul_nbits_node

GPTQ_DAMP = 0.01  # fraction of the mean Hessian diagonal added to it, as in the reference code


def hessians(model, names: list[str], samples: list[dict], on_step) -> dict:
    """sum of X^T X over the calibration tokens, for each MatMul input X in ``names``."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    if model.ByteSize() >= 2**31:
        raise UserError("params.algorithm: gptq runs the decoder from memory, which protobuf limits to 2 GB; use rtn, k_quant or hqq")
    kept = len(model.graph.output)
    for name in names:
        model.graph.output.append(onnx.ValueInfoProto(name=name))
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    finally:
        del model.graph.output[kept:]
    hessians: dict = {}
    for step, feeds in enumerate(samples, 1):
        for name, value in zip(names, session.run(names, feeds), strict=True):
            x = value.reshape(-1, value.shape[-1]).astype(np.float64)
            if name in hessians:
                hessians[name] += x.T @ x
            else:
                hessians[name] = x.T @ x
        on_step(step, None)
    return hessians


def inverse_hessian_factor(h):
    """(U, dead): U upper triangular with U^T U = (H + damping)^-1; dead inputs never fire."""
    import numpy as np

    h = h.copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    damp = GPTQ_DAMP * float(np.mean(np.diag(h)))
    for _ in range(6):
        try:
            return np.linalg.cholesky(np.linalg.inv(h + damp * np.eye(len(h)))).T, dead
        except np.linalg.LinAlgError:
            damp *= 10
    raise UserError("gptq: the calibration Hessian stays singular; give more calibration_samples")


def block_params(rows, symmetric: bool):
    """Scale and zero point per column of one block of weight rows, as RTN computes them."""
    import numpy as np

    if symmetric:
        scale = np.maximum(np.abs(rows.min(axis=0)), np.abs(rows.max(axis=0))) * 2.0 / 15
        zero = np.full(rows.shape[1], 8.0)
    else:
        low, high = rows.min(axis=0), rows.max(axis=0)
        scale = (high - low) / 15
        zero = None
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32).astype(np.float64)  # stored as fp32
    if zero is None:
        zero = np.clip(np.round(-low / scale), 0, 15)
    return scale, zero


def gptq_weight(weight, factor, dead, block_size: int, symmetric: bool):
    """GPTQ of one (K, N) MatMul weight: int4 codes (K padded to whole blocks, N), scales and
    zero points (blocks, N). Rows (input channels) are quantized in order; each row's rounding
    error is spread over the rows not yet quantized, weighted by the inverse Hessian."""
    import numpy as np

    k, n = weight.shape
    w = weight.astype(np.float64)
    w[dead, :] = 0.0
    blocks = -(-k // block_size)
    codes = np.zeros((blocks * block_size, n), dtype=np.uint8)
    scales = np.zeros((blocks, n))
    zeros = np.zeros((blocks, n))
    chunk = block_size * max(1, 128 // block_size)  # lazy-update batch: whole quantization blocks
    for i1 in range(0, k, chunk):
        i2 = min(i1 + chunk, k)
        w1 = w[i1:i2].copy()
        errors = np.zeros_like(w1)
        u1 = factor[i1:i2, i1:i2]
        for i in range(i2 - i1):
            row = i1 + i
            if row % block_size == 0:
                block = row // block_size
                scale, zero = block_params(w1[i:i + block_size], symmetric)
                scales[block], zeros[block] = scale, zero
            code = np.clip(np.round(w1[i] / scale + zero), 0, 15)
            codes[row] = code
            error = (w1[i] - scale * (code - zero)) / u1[i, i]
            w1[i:] -= np.outer(u1[i, i:], error)
            errors[i] = error
        w[i2:] -= factor[i1:i2, i2:].T @ errors
    codes[k:] = zeros[-1].astype(np.uint8)  # padding rows dequantize to 0
    return codes, scales, zeros


def gptq_quantize(model, nodes: set[str], samples: list[dict], block_size: int, symmetric: bool,
                  accuracy_level: int, on_step, bits: int = 4):
    """GPTQ every MatMul named in ``nodes`` (constant 2-D float weights) in place, from the
    calibration feeds ``samples``; ``on_step(done, None)`` after each forward pass and weight."""
    import numpy as np
    from onnx import numpy_helper
    from onnxruntime.quantization.neural_compressor import weight_only

    graph = model.graph
    targets = [(i, n) for i, n in enumerate(graph.node) if n.name in nodes]
    names = sorted({n.input[0] for _, n in targets})
    grams = hessians(model, names, samples, on_step)
    make = matmul_nbits_node(weight_only.make_matmul_weight_only_node)
    initializers = {init.name: init for init in graph.initializer}
    done = len(samples)
    new_initializers = []
    for name in names:
        factor, dead = inverse_hessian_factor(grams.pop(name))
        for index, node in [(i, n) for i, n in targets if n.input[0] == name]:
            weight = numpy_helper.to_array(initializers[node.input[1]])
            codes, scales, zeros = gptq_weight(weight, factor, dead, block_size, symmetric)
            columns = weight.shape[1]
            new_node, added = make(
                node, weight.shape, bits, block_size, scales.shape[0],
                np.ascontiguousarray(codes.T).reshape(-1, block_size),
                scales.T.astype(weight.dtype),
                None if symmetric else zeros.T.reshape(columns, -1),
                accuracy_level=accuracy_level,
            )
            graph.node[index].CopyFrom(new_node)  # same place: the graph stays topologically sorted
            new_initializers.extend(added)
            done += 1
            on_step(done, None)
    graph.initializer.extend(new_initializers)
    used = {name for node in graph.node for name in node.input}
    for index in reversed(range(len(graph.initializer))):
        if graph.initializer[index].name not in used:
            del graph.initializer[index]
    return model
