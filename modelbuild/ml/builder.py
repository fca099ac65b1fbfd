"""The onnxruntime-genai model builder, run so that a quantized build of a large base fits in RAM.

The builder (0.18) makes a float graph whose weights are lazy views of the torch model; for
int4/int8 its ``to_nbits`` then converts the *whole* graph into one protobuf, every weight
materialized in fp32, and quantizes that. Measured on a Phi-3.5-mini-shaped model (2 of its 32
layers, bench/phi35_build.py): peak RSS 4.3x the fp32 weights, so Phi-3.5-mini (15.3 GB of fp32)
would need ~66 GB. ``run_builder`` swaps in ``_to_nbits_per_node``, which hands the builder's
own ``to_nbits`` one node at a time (the node and its weight as a one-node model, so the
builder's method, mixed-precision placement and CUDA prepacking all apply unchanged) and splices
the quantized node back. A wide MatMul goes in parts of ``columns`` output columns: k_quant
needs ~15x the fp32 bytes of what it quantizes as scratch (6 GB for Phi-3.5's LM head), and
every int4/int8 method quantizes each output column's blocks on their own, so the parts,
concatenated, are the whole. Peak: the torch model, the quantized weights and one fp32 weight.
The result has exactly the builder's quantized nodes and tensors (tests/test_builder_memory.py).
"""

from __future__ import annotations

import contextlib
import gc
import shutil
from collections.abc import Callable
from pathlib import Path

from modelbuild import UserError

Progress = Callable[[int, int], None]
# Output columns quantized at once: bounds k_quant's scratch to ~0.8 GB at Phi-3.5's width (3072).
COLUMNS_PER_PART = 4096


def run_builder(base: Path, out: Path, precision: str, device: str, options: list[str], scratch: Path,
                progress: Progress | None = None, columns: int = COLUMNS_PER_PART) -> None:
    """``create_model`` of the HF folder ``base`` into ``out``, quantizing node by node in parts
    of at most ``columns`` output columns; ``progress(done, total)`` as nodes are converted."""
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    cache = scratch / "builder-cache"
    try:
        opts = parse_extra_options(None, str(base), str(out), precision, device, str(cache), options)
        with _per_node_quantization(progress, columns):
            create_model(None, str(base), str(out), precision, device, str(cache), **opts)
        gc.collect()  # the builder's torch model and graph are reference cycles: gone before the caller goes on
    except (ValueError, NotImplementedError, KeyError) as error:
        raise UserError(f"onnxruntime-genai model builder rejected the model or options: {error}") from None
    finally:
        shutil.rmtree(cache, ignore_errors=True)


@contextlib.contextmanager
def _per_node_quantization(progress: Progress | None, columns: int):
    # builder.py imports its classes as the top-level package ``builders`` (not
    # onnxruntime_genai.models.builders): patch the class create_model instantiates.
    from onnxruntime_genai.models.builder import Model

    whole_graph = Model.to_nbits
    Model.to_nbits = lambda builder: _to_nbits_per_node(builder, whole_graph, progress, columns)
    try:
        yield
    finally:
        Model.to_nbits = whole_graph


def _weight_index(node) -> int:
    return 0 if node.op_type == "Gather" else 1


def _to_nbits_per_node(builder, whole_graph, progress: Progress | None, columns: int):
    model = builder.model
    excluded = set(builder.quant_attrs["nodes_to_exclude"])
    nodes = [node for node in model.graph
             if node.op_type in builder.quant_attrs["op_types_to_quantize"] and node.name not in excluded
             and len(node.inputs) > _weight_index(node) and node.inputs[_weight_index(node)].const_value is not None]
    overrides = (builder.exact_quant_override_names, builder.exact_quant_overrides)
    try:
        for done, node in enumerate(nodes):
            builder.exact_quant_override_names = overrides[0] & {node.name}
            builder.exact_quant_overrides = {k: v for k, v in overrides[1].items() if k == node.name}
            _splice(model.graph, node, _quantized(builder, whole_graph, node, model, columns))
            builder.model = None
            gc.collect()  # graphs are reference cycles: free each node's fp32 copies now, not at some later collection
            if progress:
                progress(done + 1, len(nodes))
    finally:
        builder.model = model
        builder.exact_quant_override_names, builder.exact_quant_overrides = overrides
    return model


def _quantized(builder, whole_graph, node, model, columns: int):
    """The builder's quantization of ``node`` (a one-node graph), in parts of ``columns`` output
    columns for a wide MatMul (MatMulNBits tensors are laid out column-major: parts concatenate)."""
    import numpy as np
    import onnx_ir as ir

    weight = node.inputs[_weight_index(node)].const_value
    width = weight.shape[-1]
    if node.op_type != "MatMul" or builder.quant_attrs["use_qdq"] or width <= columns:
        builder.model = _one_node_model(node, model)
        return whole_graph(builder).graph
    full = weight.numpy()
    parts = []
    for start in range(0, width, columns):
        part = ir.tensor(np.ascontiguousarray(full[:, start:start + columns]), name=weight.name)
        builder.model = _one_node_model(node, model, part)
        parts.append(whole_graph(builder).graph)
    del full
    first = parts[0]
    for name, value in first.initializers.items():
        value.const_value = ir.tensor(np.concatenate([p.initializers[name].const_value.numpy() for p in parts]), name=name)
    for q in first:
        if q.op_type == "MatMulNBits":
            q.attributes["N"] = ir.Attr("N", ir.AttributeType.INT, width)
    return first


def _one_node_model(node, model, weight_tensor=None):
    """``node`` alone: its activation inputs as graph inputs, its weight (or ``weight_tensor``,
    part of it) as the only initializer."""
    import onnx_ir as ir

    weight = node.inputs[_weight_index(node)]
    inputs, initializer = [], None
    for value in node.inputs:
        if value is None:
            inputs.append(None)
            continue
        if value is weight:
            tensor = value.const_value if weight_tensor is None else weight_tensor
            copy = ir.Value(name=value.name, type=value.type, shape=ir.Shape(tensor.shape), const_value=tensor)
        else:
            copy = ir.Value(name=value.name, type=value.type, shape=value.shape)
        initializer = copy if value is weight else initializer
        inputs.append(copy)
    outputs = [ir.Value(name=value.name, type=value.type, shape=value.shape) for value in node.outputs]
    one = ir.Node(node.domain, node.op_type, inputs, attributes=[_copy_attr(a) for a in node.attributes.values()],
                  outputs=outputs, name=node.name)
    graph = ir.Graph([v for v in inputs if v is not None and v is not initializer], outputs, nodes=[one],
                     initializers=[initializer], opset_imports=dict(model.graph.opset_imports))
    return ir.Model(graph, ir_version=model.ir_version)


def _splice(graph, node, quantized) -> None:
    """Replace ``node`` in ``graph`` by the nodes of the one-node graph ``quantized``."""
    import onnx_ir as ir

    by_name = {value.name: value for value in node.inputs if value is not None}
    for name, value in quantized.initializers.items():
        by_name[name] = ir.Value(name=name, type=value.type, shape=value.shape, const_value=value.const_value)
        graph.register_initializer(by_name[name])
    finals = {value.name: value for value in node.outputs}
    new_nodes, renames = [], []
    for q in quantized:
        outputs = [ir.Value(name=f"{v.name}/per-node", type=v.type, shape=v.shape) for v in q.outputs]
        new_nodes.append(ir.Node(q.domain, q.op_type, [by_name[v.name] if v is not None else None for v in q.inputs],
                                 attributes=[_copy_attr(a) for a in q.attributes.values()], outputs=outputs, name=q.name))
        for old, new in zip(q.outputs, outputs):
            by_name[old.name] = new
            renames.append((new, old.name))
    graph.insert_before(node, new_nodes)
    for name, old in finals.items():
        ir.convenience.replace_all_uses_with(old, by_name[name], replace_graph_outputs=True)
    weight = node.inputs[_weight_index(node)]
    graph.remove(node, safe=True)
    if not weight.uses():
        graph.initializers.pop(weight.name)
    for value, name in renames:
        value.name = name
    for domain, version in quantized.opset_imports.items():
        graph.opset_imports.setdefault(domain, version)


def _copy_attr(attr):
    import onnx_ir as ir

    return ir.Attr(attr.name, attr.type, attr.value)
