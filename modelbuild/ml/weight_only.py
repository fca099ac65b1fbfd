"""onnxruntime's weight-only (MatMulNBits) quantizer, patched where it needs it, for one run at a time.

The patches are process-wide (module attributes of onnxruntime.quantization.neural_compressor),
so ``library_hooks`` installs them only for the duration of a ``with`` block and restores them.
"""

from __future__ import annotations

import contextlib
import warnings

from modelbuild.ml.console import quiet_stdout
from modelbuild.ml.nbits import matmul_nbits_node


@contextlib.contextmanager
def library_hooks(quantizer, on_step):
    """Patch onnxruntime's weight-only quantizer for the duration of one run.

    - progress: RTN and k-quant report through neural_compressor's ``simple_progress_bar``;
      HQQ quantizes node by node through its node quantizer;
    - zero points: neural_compressor packs the int4 zero points of all columns as one run of
      nibbles, which breaks when a column has an odd number of blocks (e.g. K=576, block 64);
      they are packed per column, as MatMulNBits reads them (identical bytes otherwise).
    """
    from onnxruntime.quantization.neural_compressor import weight_only

    saved = {name: getattr(weight_only, name) for name in ("simple_progress_bar", "make_matmul_weight_only_node")}
    weight_only.simple_progress_bar = lambda total, i: on_step(i, total)
    weight_only.make_matmul_weight_only_node = matmul_nbits_node(saved["make_matmul_weight_only_node"])
    node_quantizer = quantizer.node_quantizer
    if node_quantizer is not None:
        original_quantize = node_quantizer.quantize
        done = [0]

        def quantize(node, graph_stack):
            out = original_quantize(node, graph_stack)
            done[0] += 1
            on_step(done[0], None)
            return out

        node_quantizer.quantize = quantize
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(weight_only, name, value)
        if node_quantizer is not None:
            node_quantizer.quantize = original_quantize


def quantize_matmuls(model, algorithm: str, *, block_size: int, symmetric: bool, accuracy_level: int,
                     exclude: list[str], int8: list[str], weights: dict[str, str], samples=None, on_step=lambda done, total: None,
                     bits: int = 4, block_offsets: bool = True):
    """Every MatMul with a constant weight (``weights``: node -> initializer) except ``exclude``
    -> MatMulNBits: ``int8`` nodes as symmetric 8-bit RTN, the rest ``bits``-bit by
    ``algorithm`` (rtn, k_quant, hqq or gptq; gptq calibrates on ``samples``; source_grid keeps
    a grid the weights already lie on, see modelbuild.ml.source_grid, with ``block_offsets``)."""
    if algorithm == "source_grid":
        from modelbuild.ml.source_grid import quantize_decoder

        chosen = {name: weight for name, weight in weights.items() if name not in set(exclude)}
        quantize_decoder(model, chosen, int8=int8, block_size=block_size, accuracy_level=accuracy_level,
                         block_offsets=block_offsets, on_step=on_step)
        return model
    if algorithm == "gptq":
        from modelbuild.ml.gptq import gptq_quantize

        nodes = set(weights) - set(exclude) - set(int8)
        result = gptq_quantize(model, nodes, samples, block_size, symmetric, accuracy_level, on_step, bits)
    else:
        from onnxruntime.quantization import matmul_nbits_quantizer as mnq

        if algorithm == "rtn":
            config = mnq.RTNWeightOnlyQuantConfig()
        elif algorithm == "k_quant":
            config = mnq.KQuantWeightOnlyQuantConfig()
        else:
            config = mnq.HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits)
        quantizer = mnq.MatMulNBitsQuantizer(
            model, bits=bits, block_size=block_size, is_symmetric=symmetric,
            accuracy_level=accuracy_level or None, nodes_to_exclude=list(exclude) + list(int8), algo_config=config,
        )
        with library_hooks(quantizer, on_step), quiet_stdout(), warnings.catch_warnings():
            # HQQ hands torch a read-only numpy view of each weight; it only reads it.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            quantizer.process()
        result = quantizer.model.model
    if int8:
        result = _quantize_int8(result, int8, block_size, accuracy_level)
    if accuracy_level:
        # HQQ writes no accuracy_level; set it on every node that lacks it.
        import onnx

        for node in result.graph.node:
            if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
                node.attribute.append(onnx.helper.make_attribute("accuracy_level", accuracy_level))
    return result


def _quantize_int8(model, nodes: list[str], block_size: int, accuracy_level: int):
    """``nodes``, quantized after the int4 pass: symmetric RTN MatMulNBits with 8 bits."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    # nodes_to_include does not restrict the quantizer to those nodes: exclude every other MatMul.
    others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in set(nodes)]
    config = mnq.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True,
                                             accuracy_level=accuracy_level or None, bits=8)
    quantizer = mnq.MatMulNBitsQuantizer(model, bits=8, block_size=block_size, is_symmetric=True,
                                         accuracy_level=accuracy_level or None, nodes_to_exclude=others,
                                         algo_config=config)
    with quiet_stdout():
        quantizer.process()
    return quantizer.model.model
