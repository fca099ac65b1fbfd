"""Weights that already lie on a block quantization grid, re-expressed as MatMulNBits.

A base imported from a quantized GGUF (e.g. the embedded SmolLM2, Q4_1 with a Q8_0 embedding)
arrives as fp32 weights that sit exactly on the source's grid: per block of 32 input columns,
``w = d * q + m`` with ``q`` in 0..15 (Q4_1, Q4_K's sub-blocks) or ``w = d * q`` with ``|q| <= 127``
(Q8_0). Re-quantizing such weights from scratch (RTN, k-quant, GPTQ) lands on a *different*
grid and stacks a second rounding error on the first. ``fit_grid`` recognises the grid per
block instead and keeps its codes:

- 8-bit symmetric grids (Q8_0) are stored exactly: MatMulNBits 8-bit, zero point 128, scale d.
- 4-bit grids keep their codes and step; MatMulNBits' fast kernels take only integer zero
  points, so ``-m / d`` is rounded to an integer zero point. What that leaves is one constant per
  block (up to d/2): ``with_block_offsets`` restores it from the input's block sums (the default,
  ``quantize_decoder(block_offsets=True)``). Without offsets the scale is refitted per block by
  least squares instead, weighted by the mean square of each input column's activations when
  given (GPTQ's Hessian diagonal). On SmolLM2 + the travel adapter (held-out perplexity through
  onnxruntime): integer zero point only +29.5 %, refitted +19.6 %, with block offsets +0.23 %.

Blocks that are not on a grid (a float model, a block whose values take more levels than the
bits allow) are quantized by asymmetric RTN (0 in range, as MLAS), then refitted or offset the
same way; the record says how many blocks kept their source grid.
"""

from __future__ import annotations

from dataclasses import dataclass

from modelbuild.ml.graph import topological_order

# Weights fitted at a time (output columns x K): each float64 work array of a chunk is 32 MB, and
# the ~15 of them a fit holds stay near 0.5 GB for any K up to 4M (Phi-3.5's down_proj has 8192).
ELEMENTS_PER_FIT = 1 << 22
GRID_TOLERANCE = 1e-3  # |w/d - integer| in units of the step: fp16 scales give ~1e-6
SOURCE_SHARE = 0.99  # a weight whose blocks are this much on an 8-bit grid (and not a 4-bit one) stays 8-bit


@dataclass
class Encoded:
    """One weight as MatMulNBits inputs (N = output columns, B = blocks along K)."""

    codes: object  # uint8 [N, B, block_size]: unsigned codes, 0..2**bits-1
    scales: object  # float32 [N, B]
    zero_points: object  # uint8 [N, B], or None (symmetric 8-bit: 128)
    bits: int
    on_grid: int  # blocks whose source grid was kept
    blocks: int


def _blocks(weight_kn, block_size: int):
    """ONNX MatMul weight [K, N] -> [N, B, block_size] float64 (K zero-padded to whole blocks)."""
    import numpy as np

    w = np.asarray(weight_kn, dtype=np.float64).T
    pad = -w.shape[1] % block_size
    if pad:
        w = np.pad(w, ((0, 0), (0, pad)))
    return w.reshape(w.shape[0], -1, block_size)


def _steps(blocks):
    """Each block's grid step: its smallest gap between distinct values (0 for a constant block)."""
    import numpy as np

    ordered = np.sort(blocks, axis=-1)
    gaps = np.diff(ordered, axis=-1)
    gaps = np.where(gaps > 1e-12 * np.maximum(1.0, np.abs(ordered[..., 1:])), gaps, np.inf)
    step = gaps.min(axis=-1)
    return np.where(np.isfinite(step), step, 0.0)


def _symmetric8(blocks):
    """(codes, scales, mask) for blocks that are a Q8_0-style grid: w = d * q, |q| <= 127."""
    import numpy as np

    amax = np.abs(blocks).max(axis=-1)
    d = amax / 127.0
    safe = np.where(d > 0, d, 1.0)
    q = blocks / safe[..., None]
    mask = (np.abs(q - np.rint(q)).max(axis=-1) < GRID_TOLERANCE) & (d > 0)
    codes = (np.clip(np.rint(q), -127, 127) + 128).astype(np.uint8)
    return codes, d, mask


def _weighted_scale(blocks, centred, weights):
    """Least-squares scale s minimising sum(h * (s * centred - w)^2) per block (h = weights)."""
    import numpy as np

    den = (weights * centred * centred).sum(axis=-1)
    num = (weights * centred * blocks).sum(axis=-1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def fit_grid(weight_kn, block_size: int = 32, activation_sq=None, bits: int = 4, refit: bool = True) -> Encoded:
    """Encode one MatMul weight ([K, N], as in the ONNX graph) for MatMulNBits.

    ``activation_sq``: the mean square of each of the K input columns on calibration data
    (None: every column weighs the same). ``refit=False`` keeps a grid block's own step as its
    scale (so what is left is one constant per block, see ``with_block_offsets``). ``bits=8`` keeps an 8-bit symmetric grid exactly and
    quantizes anything else by symmetric 8-bit RTN; ``bits=4`` as the module docstring says.
    """
    import numpy as np

    blocks = _blocks(weight_kn, block_size)
    n, b, _ = blocks.shape
    k = np.asarray(weight_kn).shape[0]
    if activation_sq is None:
        h = np.ones((1, b, block_size))
    else:
        h = np.pad(np.asarray(activation_sq, dtype=np.float64), (0, b * block_size - k)).reshape(1, b, block_size)
        h = np.maximum(h, 1e-12 * max(float(h.max()), 1e-30))
    if bits == 8:
        codes, scales, mask = _symmetric8(blocks)
        # not on a grid: symmetric 8-bit RTN (the same formula; only the codes round)
        return Encoded(codes, scales.astype(np.float32), None, 8, int(mask.sum()), n * b)
    levels = 2 ** bits - 1
    lo, hi = blocks.min(axis=-1), blocks.max(axis=-1)
    step = _steps(blocks)
    span = np.where(step > 0, (hi - lo) / np.where(step > 0, step, 1.0), 0.0)
    relative = (blocks - lo[..., None]) / np.where(step > 0, step, 1.0)[..., None]
    mask = ((step > 0) & (span <= levels + GRID_TOLERANCE) & (lo <= 0) & (hi >= 0)
            & (np.abs(relative - np.rint(relative)).max(axis=-1) < GRID_TOLERANCE))
    # On a grid (and straddling 0, so the zero point is within range): its own step and codes.
    # Otherwise RTN's asymmetric range with 0 included, as MLAS quantizes.
    rtn_lo, rtn_hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    d = np.where(mask, step, (rtn_hi - rtn_lo) / levels)
    safe = np.where(d > 0, d, 1.0)
    grid_codes = np.clip(np.rint(relative), 0, levels)
    best = None
    for rounding in (np.floor, np.ceil):  # the zero point below and above -min/d; keep the better
        zp = np.clip(rounding(-np.where(mask, lo, rtn_lo) / safe), 0, levels)
        rtn_codes = np.clip(np.rint(blocks / safe[..., None] + zp[..., None]), 0, levels)
        codes = np.where(mask[..., None], grid_codes, rtn_codes)
        centred = codes - zp[..., None]
        fitted = _weighted_scale(blocks, centred, h) if refit else d
        scale = np.where(d > 0, np.where(mask | refit, fitted, _weighted_scale(blocks, centred, h)), 0.0)
        error = (h * (scale[..., None] * centred - blocks) ** 2).sum(axis=-1)
        if best is None:
            best = [codes, scale, zp, error]
        else:
            better = error < best[3]
            best = [np.where(better[..., None], codes, best[0]), np.where(better, scale, best[1]),
                    np.where(better, zp, best[2]), np.where(better, error, best[3])]
    codes, scale, zp, _ = best
    return Encoded(codes.astype(np.uint8), scale.astype(np.float32), zp.astype(np.uint8), bits, int(mask.sum()), n * b)


def fit_columns(weight_kn, block_size: int = 32, activation_sq=None, bits: int = 4, refit: bool = True,
                block_offsets: bool = False) -> Encoded:
    """``fit_grid`` (and ``with_block_offsets``, if asked) over chunks of output columns of about
    ``ELEMENTS_PER_FIT`` weights: every column is fitted on its own, so the result is the same,
    with the peak memory of one chunk instead of several float64 copies of the whole weight."""
    import numpy as np

    k, n = np.asarray(weight_kn).shape
    columns = max(1, ELEMENTS_PER_FIT // k)
    parts = []
    for start in range(0, n, columns):
        chunk = weight_kn[:, start:start + columns]
        part = fit_grid(chunk, block_size, activation_sq, bits, refit)
        parts.append(with_block_offsets(part, chunk, block_size) if block_offsets else part)
    if len(parts) == 1:
        return parts[0]
    zero_points = None if parts[0].zero_points is None else np.concatenate([p.zero_points for p in parts])
    return Encoded(np.concatenate([p.codes for p in parts]), np.concatenate([p.scales for p in parts]), zero_points,
                   bits, sum(p.on_grid for p in parts), sum(p.blocks for p in parts))


def dequantize(encoded: Encoded, k: int):
    """The [K, N] float32 weight MatMulNBits computes with (for checks and measurements)."""
    import numpy as np

    zp = 128.0 if encoded.zero_points is None else encoded.zero_points.astype(np.float32)[..., None]
    w = (encoded.codes.astype(np.float32) - zp) * encoded.scales[..., None]
    return w.reshape(w.shape[0], -1)[:, :k].T


def matmul_nbits(node, encoded: Encoded, k: int, block_size: int, accuracy_level: int):
    """(MatMulNBits node, its initializers) replacing MatMul ``node`` (weight input 1)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from modelbuild.ml.nbits import pack_zero_points

    n, blocks, _ = encoded.codes.shape
    if encoded.bits == 4:
        packed = (encoded.codes[..., 0::2] & 0x0F) | ((encoded.codes[..., 1::2] & 0x0F) << 4)
    else:
        packed = encoded.codes
    weight = node.input[1]
    initializers = [
        numpy_helper.from_array(np.ascontiguousarray(packed, dtype=np.uint8), f"{weight}_Q{encoded.bits}G{block_size}"),
        numpy_helper.from_array(encoded.scales.reshape(-1).astype(np.float32), f"{weight}_scales"),
    ]
    if encoded.zero_points is not None:
        zp = encoded.zero_points.reshape(-1) if encoded.bits == 8 else pack_zero_points(encoded.zero_points, n).reshape(-1)
        initializers.append(numpy_helper.from_array(np.ascontiguousarray(zp, dtype=np.uint8), f"{weight}_zp"))
    attributes = {"K": k, "N": n, "bits": encoded.bits, "block_size": block_size}
    if accuracy_level:
        attributes["accuracy_level"] = accuracy_level
    new_node = onnx.helper.make_node(
        "MatMulNBits", [node.input[0]] + [init.name for init in initializers], list(node.output),
        name=f"{node.name}_Q{encoded.bits}", domain="com.microsoft", **attributes,
    )
    return new_node, initializers


def block_sum_columns(k: int, block_size: int):
    """[K, B] float32 indicator: x @ it = each block's input sum (what a block offset multiplies)."""
    import numpy as np

    blocks = -(-k // block_size)
    indicator = np.zeros((k, blocks), dtype=np.float32)
    indicator[np.arange(k), np.arange(k) // block_size] = 1.0
    return indicator


def with_block_offsets(encoded: Encoded, weight_kn, block_size: int) -> Encoded:
    """``encoded`` plus the part of its error that is constant over each block, as extra blocks.

    The residual ``w - dequantize(encoded)`` of a source-grid block is one constant per block
    (the zero point's rounding): that constant times the block's input sum restores the weight.
    Appended as input columns ``K .. K+B-1`` (quantized by the same 4-bit rule), the node reads
    ``concat(x, x @ block_sum_columns)``: one MatMulNBits still, exact up to the offsets'
    own 4-bit rounding (about 1/16 of the error it removes)."""
    import numpy as np

    k = np.asarray(weight_kn).shape[0]
    residual = _blocks(weight_kn, block_size) - _blocks(dequantize(encoded, k), block_size)
    offsets = residual.mean(axis=-1)  # [N, B]
    n, blocks = offsets.shape
    extra = -(-blocks // block_size)
    columns = np.zeros((n, extra * block_size))
    columns[:, :blocks] = offsets
    tail = fit_grid(columns.T, block_size, None, encoded.bits)
    return Encoded(
        np.concatenate([encoded.codes, tail.codes], axis=1), np.concatenate([encoded.scales, tail.scales], axis=1),
        np.concatenate([encoded.zero_points, tail.zero_points], axis=1), encoded.bits, encoded.on_grid, encoded.blocks,
    )


def quantize_decoder(model, weights: dict[str, str], *, int8=(), block_size: int = 32, accuracy_level: int = 4,
                     block_offsets: bool = True, activation_sq: dict | None = None, on_step=lambda done, total: None,
                     read=None) -> dict:
    """Replace the MatMuls ``weights`` (node name -> its constant [K, N] weight) of ``model`` in
    place by MatMulNBits: ``int8`` nodes and weights on an 8-bit source grid (not a 4-bit one)
    8-bit, the rest 4-bit, each keeping its source grid
    (see the module docstring); with ``block_offsets`` every 4-bit node also corrects its blocks'
    zero-point rounding from its input's block sums (one MatMul + Concat per distinct input,
    shared by the nodes reading it). ``activation_sq``: input name -> mean square per input
    column, for the scale refit. A float lookup of a tied LM head (Transpose(head weight) ->
    Gather) is re-pointed at the quantized head (GatherBlockQuantized), so the float copy goes.
    ``read(initializer)`` gives a weight's array (default: decoded from the loaded model;
    ``bundle.load_decoder_lazily`` maps it from disk, one weight at a time).
    Returns a record: blocks kept on their source grid, nodes with offsets, bits per node."""
    import onnx
    from onnx import numpy_helper

    read = read or numpy_helper.to_array
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    int8 = set(int8)
    sums: dict[str, str] = {}  # input -> its extended (x, block sums) tensor
    indicators: dict[int, str] = {}  # K -> block-sum indicator initializer
    replaced: dict[str, object] = {}  # node name -> MatMulNBits node
    added, record = [], {"grid_blocks": 0, "blocks": 0, "offset_nodes": 0, "bits": {}}
    for done, node in enumerate([n for n in graph.node if n.name in weights], 1):
        weight = read(initializers[weights[node.name]])
        k = weight.shape[0]
        bits = 8 if node.name in int8 else 4
        squares = None if activation_sq is None else activation_sq.get(node.input[0])
        offsets = bits == 4 and block_offsets and k % block_size == 0
        encoded = fit_columns(weight, block_size, squares, bits, refit=not offsets, block_offsets=offsets)
        if bits == 4 and encoded.on_grid < SOURCE_SHARE * encoded.blocks:
            wider = fit_columns(weight, block_size, squares, 8)
            if wider.on_grid >= SOURCE_SHARE * wider.blocks:  # an 8-bit source grid (Q8_0): keep it, exactly
                encoded, bits, offsets = wider, 8, False
        record["grid_blocks"] += encoded.on_grid
        record["blocks"] += encoded.blocks
        record["bits"][node.name] = bits
        source, width = node.input[0], k
        if offsets:
            if k not in indicators:
                indicators[k] = f"block_sums_K{k}_B{block_size}"
                added.append(numpy_helper.from_array(block_sum_columns(k, block_size), indicators[k]))
            if source not in sums:
                sums[source] = f"{source}/block_sums/extended"
                added.append(onnx.helper.make_node("MatMul", [source, indicators[k]], [f"{source}/block_sums"], name=f"{source}/block_sums/MatMul"))
                added.append(onnx.helper.make_node("Concat", [source, f"{source}/block_sums"], [sums[source]], name=f"{source}/block_sums/Concat", axis=-1))
            source, width = sums[source], k + k // block_size
            record["offset_nodes"] += 1
        new_node, new_initializers = matmul_nbits(node, encoded, width, block_size, accuracy_level)
        new_node.input[0] = source
        replaced[node.name] = new_node
        added.extend(new_initializers)
        on_step(done, len(weights))
    plain = {name: node for name, node in replaced.items() if node.input[0] not in sums.values()}
    tied = _tie_lookup(graph, weights, plain, added)
    nodes = [replaced.get(node.name, node) for node in graph.node if node.name not in tied]
    nodes += [item for item in added if isinstance(item, onnx.NodeProto)]
    new_initializers = [item for item in added if not isinstance(item, onnx.NodeProto)]
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {i.name for i in new_initializers}
    del graph.node[:]
    graph.node.extend(topological_order(nodes, available))
    still_read = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in still_read]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_initializers)
    record["tied_lookup"] = bool(tied)
    return record


def _tie_lookup(graph, weights, replaced, added) -> set[str]:
    """Names of the Transpose and Gather nodes a tied float lookup used, after adding its
    GatherBlockQuantized over the quantized head (modelbuild/ml/tied_lookup.py; nothing when the
    model is not tied that way). ``replaced``: the quantized heads that read their input as is (a
    head with block offsets reads extra columns the lookup would return too: its lookup stays
    float); ``added``: the new nodes and initializers, the lookup's appended."""
    import onnx

    from modelbuild.ml.tied_lookup import lookup_nodes

    readers = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    dims = {item.name: tuple(item.dims) for item in added if isinstance(item, onnx.TensorProto)}
    for head_name, weight in weights.items():
        transposes = [n for n in readers.get(weight, []) if n.op_type == "Transpose"]
        if not transposes or head_name not in replaced:
            continue
        transpose = transposes[0]
        gathers = [n for n in readers.get(transpose.output[0], []) if n.op_type == "Gather"]
        if len(gathers) != 1 or len(readers[transpose.output[0]]) != 1:
            continue
        head, gather = replaced[head_name], gathers[0]
        zp_shape = dims[head.input[3]] if len(head.input) > 3 and head.input[3] else None
        nodes, inits = lookup_nodes(head, gather.input[1], gather.name.rsplit("/", 1)[0], gather.output[0],
                                    dims[head.input[2]], zp_shape)
        added.extend(nodes + inits)
        return {transpose.name, gather.name}
    return set()
