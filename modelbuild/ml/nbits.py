"""The MatMulNBits weight layout, shared by every int4/int8 writer and reader: zero points packed
per column, neural_compressor's node maker with that packing, and a weight read back as float.

Below weight_only.py (onnxruntime's quantizer, the algorithm dispatch), gptq.py and source_grid.py,
which all write this layout: they import it from here, never from each other.
"""

from __future__ import annotations


def pack_zero_points(zero_points, columns: int):
    """uint8 zero points, one per block with each column's blocks contiguous -> MatMulNBits'
    int4 layout: per column, two blocks a byte (low nibble first), an odd last one padded with 8."""
    import numpy as np

    zp = np.asarray(zero_points).astype(np.uint8).reshape(columns, -1)
    if zp.shape[1] % 2:
        zp = np.concatenate([zp, np.full((columns, 1), 8, dtype=np.uint8)], axis=1)
    return (zp[:, 0::2] & 0x0F) | ((zp[:, 1::2] & 0x0F) << 4)


def matmul_nbits_node(make):
    """neural_compressor's MatMulNBits node maker, with zero points packed per column."""
    from onnx import numpy_helper

    def make_node(node, weight_shape, num_bits, group_size, k_blocks, q_weight, scale, zero_point, accuracy_level=0):
        new_node, initializers = make(node, weight_shape, num_bits, group_size, k_blocks, q_weight, scale, None,
                                      accuracy_level=accuracy_level)
        if zero_point is not None:
            packed = numpy_helper.from_array(pack_zero_points(zero_point, weight_shape[1]), node.input[1] + "_zp")
            new_node.input.append(packed.name)
            initializers.append(packed)
        return new_node, initializers

    return make_node


def dequantize_matmul_nbits(weight, scales, zero_points, bits: int, block_size: int, k: int):
    """A MatMulNBits weight ([N, blocks, blob] uint8 codes, [N, blocks] scales, packed zero points
    or None) as MatMulNBits and GatherBlockQuantized read it: [N, K] float, computed as their
    kernels do ((q - zero point) * scale, in the scales' dtype, one rounding). The inverse of
    pack_zero_points."""
    import numpy as np

    n, blocks, _ = weight.shape
    if bits == 4:
        codes = np.stack([weight & 0x0F, weight >> 4], axis=-1).reshape(n, blocks, block_size)
    else:
        codes = weight.reshape(n, blocks, block_size)
    if zero_points is None:
        zeros = np.full((n, blocks), 1 << (bits - 1), dtype=np.int32)
    elif bits == 4:
        zeros = np.stack([zero_points & 0x0F, zero_points >> 4], axis=-1).reshape(n, -1)[:, :blocks].astype(np.int32)
    else:
        zeros = zero_points.astype(np.int32)
    values = (codes.astype(np.int32) - zeros[:, :, None]).astype(np.float32) * scales.astype(np.float32)[:, :, None]
    return values.astype(scales.dtype).reshape(n, blocks * block_size)[:, :k]
