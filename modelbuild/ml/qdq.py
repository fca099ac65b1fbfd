"""MatMulNBits -> DequantizeLinear + MatMul (Olive's ``MatMulNBitsToQDQ``,
olive/passes/onnx/mnb_to_qdq.py at microsoft/Olive ee6f40fb): the same int4/int8 codes, scales and
zero points in standard ONNX ops (blocked DequantizeLinear, opset 21) for runtimes and tools
without the com.microsoft contrib op. Same options and defaults as Olive: ``use_transpose_op``
(DQ on [N, K] then a Transpose, instead of the weight stored as [K, N]), ``use_int4`` /
``use_signed_int`` (int codes with the midpoint subtracted instead of uint), ``add_zero_point``
(keep an all-zero zero point with signed codes), ``nodes_to_exclude``.

Dequantization is exact in both forms ((q - zero point) * scale); what may differ is onnxruntime's
MatMulNBits kernel itself, which at ``accuracy_level`` 4 multiplies int8-quantized activations.
"""

from __future__ import annotations

from modelbuild import UserError

OPSET = 21  # blocked DequantizeLinear and int4 types
SUPPORTED_BITS = (4, 8)


def _unpack_rows(array, bits: int):
    """uint8 [rows, bytes] -> uint8 [rows, bytes * 8 / bits] codes, low bits first."""
    import numpy as np

    if bits == 8:
        return array
    shifts = np.arange(8 // bits, dtype=np.uint8) * bits
    codes = (array[:, :, None] >> shifts[None, None, :]) & ((1 << bits) - 1)
    return codes.reshape(array.shape[0], -1).astype(np.uint8)


def _packed_tensor(name: str, values, bits: int, signed: bool):
    """An int4/uint4/int8/uint8 TensorProto of ``values`` (ints in range), packed as ONNX stores it."""
    import numpy as np
    import onnx

    kind = {(4, True): onnx.TensorProto.INT4, (4, False): onnx.TensorProto.UINT4,
            (8, True): onnx.TensorProto.INT8, (8, False): onnx.TensorProto.UINT8}[(bits, signed)]
    flat = values.reshape(-1).astype(np.int16)
    if bits == 4:
        if flat.size % 2:
            flat = np.concatenate([flat, np.zeros(1, dtype=np.int16)])
        nibbles = (flat & 0x0F).astype(np.uint8)
        raw = (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()
    else:
        raw = flat.astype(np.int8 if signed else np.uint8).tobytes()
    return onnx.helper.make_tensor(name, kind, list(values.shape), raw, raw=True)


def convert(model, use_transpose_op: bool, signed: bool, add_zero_point: bool, exclude: set[str]) -> dict:
    """Rewrite every MatMulNBits of ``model``'s main graph with constant weights (in place); return
    the record: converted node names and those kept, each with why."""
    import math

    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    graph_inputs = {value.name for value in graph.input}
    converted, kept = [], {}
    replaced: dict[int, list] = {}
    new_initializers = []
    for index, node in enumerate(graph.node):
        if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
            continue
        if node.name in exclude:
            kept[node.name] = "params.nodes_to_exclude"
            continue
        inputs = list(node.input) + [""] * (6 - len(node.input))
        constants = [name for name in inputs[1:] if name]
        if not all(name in initializers and name not in graph_inputs for name in constants):
            kept[node.name] = "weights are not constant initializers"
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        k, n, block_size, bits = attrs["K"], attrs["N"], attrs["block_size"], attrs.get("bits", 4)
        if bits not in SUPPORTED_BITS:
            kept[node.name] = f"{bits}-bit (converted: {', '.join(map(str, SUPPORTED_BITS))})"
            continue
        blocks = math.ceil(k / block_size)
        per_axis = blocks == 1
        if inputs[4]:
            g_idx = numpy_helper.to_array(initializers[inputs[4]])
            if not np.array_equal(g_idx, np.arange(k, dtype=np.int32) // block_size):
                kept[node.name] = "act-order g_idx (DequantizeLinear has none)"
                continue
        midpoint = 1 << (bits - 1)
        base = next((node.name.replace(s, "{}") for s in ("MatMulNBits", "MatMul_Q4", "MatMul_Q8") if s in node.name), node.name + "_{}")
        dq_name = base.format("DequantizeLinear")

        def oriented(array):
            return array if use_transpose_op else array.T

        codes = _unpack_rows(numpy_helper.to_array(initializers[inputs[1]]).reshape(n, -1), bits)[:, :k]
        scales = numpy_helper.to_array(initializers[inputs[2]]).reshape(n, -1)
        dq_inputs = []
        values = oriented(codes).astype(np.int16) - (midpoint if signed else 0)
        weight = _packed_tensor(f"{dq_name}.qweight", values, bits, signed)
        scale = numpy_helper.from_array((scales.reshape(-1) if per_axis else oriented(scales)).copy(), f"{dq_name}.scales")
        new_initializers += [weight, scale]
        dq_inputs += [weight.name, scale.name]
        zero_points = None
        if inputs[3]:
            zp = numpy_helper.to_array(initializers[inputs[3]])
            if zp.dtype != np.uint8:
                kept[node.name] = f"{zp.dtype} zero points (hqq): DequantizeLinear takes integer zero points of the weight's type"
                new_initializers = new_initializers[:-2]
                continue
            zero_points = _unpack_rows(zp.reshape(n, -1), bits)[:, :blocks]
        else:
            zero_points = np.full((n, blocks), midpoint, dtype=np.uint8)  # MatMulNBits' default zero point
        zp_values = zero_points.astype(np.int16) - (midpoint if signed else 0)
        if not signed or add_zero_point or np.any(zp_values != 0):
            zp_tensor = _packed_tensor(f"{dq_name}.qzeros", zp_values.reshape(-1) if per_axis else oriented(zp_values), bits, signed)
            new_initializers.append(zp_tensor)
            dq_inputs.append(zp_tensor.name)
        dq_attrs = {"axis": (1 if use_transpose_op else 0) ^ (1 if per_axis else 0)}
        if not per_axis:
            dq_attrs["block_size"] = block_size
        nodes = [helper.make_node("DequantizeLinear", dq_inputs, [f"{dq_name}/output_0"], name=dq_name, **dq_attrs)]
        rhs = f"{dq_name}/output_0"
        if use_transpose_op:
            transpose = base.format("Transpose")
            nodes.append(helper.make_node("Transpose", [rhs], [f"{transpose}/output_0"], name=transpose, perm=[1, 0]))
            rhs = f"{transpose}/output_0"
        matmul = base.format("MatMul")
        if inputs[5]:
            nodes.append(helper.make_node("MatMul", [inputs[0], rhs], [f"{matmul}/output_0"], name=matmul))
            nodes.append(helper.make_node("Add", [f"{matmul}/output_0", inputs[5]], [node.output[0]], name=base.format("Add")))
        else:
            nodes.append(helper.make_node("MatMul", [inputs[0], rhs], [node.output[0]], name=matmul))
        replaced[index] = nodes
        converted.append(node.name)
    if not converted:
        why = "; ".join(f"{name}: {reason}" for name, reason in kept.items()) or "the graph has no MatMulNBits node"
        raise UserError(f"inputs.model: no MatMulNBits node to convert ({why})")
    rebuilt = []
    for index, node in enumerate(graph.node):
        rebuilt.extend(replaced.get(index, [node]))
    del graph.node[:]
    graph.node.extend(rebuilt)
    graph.initializer.extend(new_initializers)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    unused = [init for init in graph.initializer if init.name not in used]
    for init in unused:
        graph.initializer.remove(init)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < OPSET:
            opset.version = OPSET
    if not any(node.domain == "com.microsoft" for node in graph.node):
        kept_opsets = [o for o in model.opset_import if o.domain != "com.microsoft"]
        del model.opset_import[:]
        model.opset_import.extend(kept_opsets)
    return {"converted": converted, "kept": kept, "initializers_dropped": len(unused)}


def float_accumulation(model, names: set[str]) -> dict[str, int]:
    """Set the accuracy_level of the MatMulNBits ``names`` to 0 (float activations; in place);
    return the levels they had, by count: the reference the QDQ graph must match to float rounding."""
    from onnx import helper

    levels: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and node.name in names:
            level = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "accuracy_level"), 0)
            levels[str(level)] = levels.get(str(level), 0) + 1
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(kept + [helper.make_attribute("accuracy_level", 0)])
    return levels
