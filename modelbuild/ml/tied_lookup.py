"""A tied model's embedding lookup read from its quantized LM head, as onnxruntime-genai's builder
emits it for int4 tied models (``make_embedding_lookup``):

    lm_head B [N, blocks, blob] --Reshape [N, blocks*blob]--> GatherBlockQuantized(ids) [--Slice to K]

with the head's ``bits``/``block_size``, ``gather_axis = 0``, ``quantize_axis = 1``. The contract
(onnxruntime 1.31, uint8 data): 2-D packed data in the MatMulNBits layout, scales ``[N, blocks]``,
zero points ``[N, ceil(blocks * bits / 8)]`` packed the same way, output dtype that of the scales,
last dimension ``blocks * block_size`` (sliced back to K when padded). Scales or zero points
stored 1-D get a Reshape, which onnxruntime constant-folds.

Used by the source_grid quantizer (modelbuild/ml/source_grid.py) and the tie-embeddings pass.
"""

from __future__ import annotations


def lookup_nodes(head, ids: str, prefix: str, output: str, scales_shape, zp_shape) -> tuple[list, list]:
    """(nodes, initializers) computing ``output`` = the rows ``ids`` of the MatMulNBits ``head``'s
    dequantized weight; ``scales_shape``/``zp_shape`` are the dims of its scales and zero points
    (``zp_shape`` None when it has none). Names start with ``prefix``."""
    import numpy as np
    from onnx import helper, numpy_helper

    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    n, k, bits, block_size = attrs["N"], attrs["K"], attrs.get("bits", 4), attrs["block_size"]
    blocks = -(-k // block_size)
    padded = blocks * block_size
    nodes, inits = [], []

    def reshape(source: str, shape: list[int], tag: str) -> str:
        const = f"{prefix}/{tag}/shape"
        inits.append(numpy_helper.from_array(np.array(shape, dtype=np.int64), const))
        out = f"{prefix}/{tag}/output_0"
        nodes.append(helper.make_node("Reshape", [source, const], [out], name=f"{prefix}/{tag}"))
        return out

    data = reshape(head.input[1], [n, padded * bits // 8], "Reshape")
    scales = head.input[2]
    if tuple(scales_shape) != (n, blocks):
        scales = reshape(scales, [n, blocks], "ScalesReshape")
    inputs = [data, ids, scales]
    if zp_shape is not None:
        zp_cols = -(-blocks // (8 // bits))
        zp = head.input[3]
        if tuple(zp_shape) != (n, zp_cols):
            zp = reshape(zp, [n, zp_cols], "ZeroPointsReshape")
        inputs.append(zp)
    gathered = output if padded == k else f"{prefix}/GatherBlockQuantized/output_0"
    nodes.append(helper.make_node(
        "GatherBlockQuantized", inputs, [gathered], name=f"{prefix}/GatherBlockQuantized", domain="com.microsoft",
        bits=bits, block_size=block_size, gather_axis=0, quantize_axis=1,
    ))
    if padded != k:
        consts = []
        for tag, value in (("starts", 0), ("ends", k), ("axes", -1)):
            name = f"{prefix}/Slice/{tag}"
            inits.append(numpy_helper.from_array(np.array([value], dtype=np.int64), name))
            consts.append(name)
        nodes.append(helper.make_node("Slice", [gathered, *consts], [output], name=f"{prefix}/Slice"))
    return nodes, inits
