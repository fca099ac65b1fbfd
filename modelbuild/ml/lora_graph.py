"""Fewer ops per token for switchable LoRA: fuse the LoRA paths that share an input.

The onnxruntime-genai model builder gives every adapted Linear its own LoRA subgraph and, when
LoRA is on, stops packing q/k/v into one MatMul::

    x -> base MatMul(Nbits) ------------------+-> Add -> consumer        (q, k, v: 3 of these;
    x -> lora_A MatMul [K, r] -> lora_B MatMul [r, N] -+                  gate, up: 2)

Where a decode step of SmolLM2-135M int4 (rtn) goes, one thread, CPU time (bench/adapter_speed.py
and the ablations behind it): merged 12.2 ms; the LoRA graph with the LoRA paths removed (the
unpacked q/k/v MatMulNBits alone) 12.2 ms; with them 14.6 ms. So the extra ~2.4 ms are the 630
LoRA ops (420 MatMuls, 210 Adds): their per-op cost, and streaming 9.8 MB of fp32 LoRA weights
per token (~10 GB/s on one core here; in cache the same ops take a third of the time). Every group
of LoRA'd projections that reads the same input ``x`` becomes::

    x -> packed base MatMul(Nbits) [K, N1+N2+..] ---------------------------+-> Add -> packed
    x -> lora_A MatMul [K, r1+r2+..] -> lora_B MatMul [r1+.., N1+..] or [G, r, N] -+

and the packed output goes straight into GroupQueryAttention (packed QKV, as the builder makes it
without LoRA) or through one Split to the old consumers. B is one block-diagonal matrix where the
widths differ (q/k/v under GQA: its zero blocks are read too), else a stack [G, r, N] applied by
one batched MatMul between two Reshapes (gate/up: no zeros). A group whose bases cannot be
packed (different bit widths, e.g. k_quant_mixed's int8 v_proj) stays as it is: joining them by
a Concat measured slower than leaving them. The result is the same function: A's columns and B's
blocks are the old A's and B's.
SmolLM2: 630 LoRA ops -> 450, 211 MatMulNBits -> 121, LoRA weights 9.8 -> 11.6 MB per token.

The fused LoRA weights are graph initializers named like the builder's own
(``model.layers.0.attn.qkv_proj.lora_A.MatMul.weight``) under nodes whose names keep the
``/lora_A/`` and ``/lora_B/`` markers, so genai-build turns them into switchable graph inputs
and quantize-onnx keeps them float exactly as before. Any adapter's weights in this layout come
from running :func:`fuse_lora` on a build with that adapter (the same code, the same layout).
"""

from __future__ import annotations

from dataclasses import dataclass

from modelbuild.ml.graph import producers_and_consumers, topological_order

LORA_MARKERS = ("/lora_A/", "/lora_B/")
# MatMulNBits inputs: A, B, scales, zero_points, g_idx, bias. With equal attributes (but N) they
# pack along N: B, scales, zero points (each row's blocks are stored contiguously) and bias;
# g_idx cannot be packed.


@dataclass
class _Unit:
    """One adapted projection: base(x) + lora_B(lora_A(x))."""

    base: object  # the base MatMul / MatMulNBits node
    a: object
    b: object
    add: object
    width: int  # output features N
    rank: int

    @property
    def module(self) -> str:  # "/model/layers.0/attn/q_proj"
        return self.a.name.split("/lora_A/")[0]


def lora_op_count(model) -> int:
    """Nodes that exist only for LoRA: the lora_A/lora_B MatMuls, the Adds onto the base and the
    fused graph's Reshapes and Splits (all named .../lora_A/..., .../lora_B/... or .../lora/...)."""
    return sum(1 for n in model.graph.node if any(m in n.name for m in LORA_MARKERS) or "/lora/" in n.name)


def fuse_lora(model, only: list[str] | None = None, read=None) -> dict:
    """Fuse, in place, the LoRA paths of ``model`` (an onnx.ModelProto) that share an input and
    whose bases pack into one MatMul; with ``only``, just the groups of those fused module names
    (to lay another build out like a bundle). ``read(initializer)`` gives a weight's array
    (default: decoded from the loaded model; ``bundle.load_decoder_lazily`` maps it from disk).
    Returns the fused module names and the node counts before/after."""
    from onnx import numpy_helper

    read = read or numpy_helper.to_array
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer, consumers = producers_and_consumers(graph)

    def array(name):
        return read(inits[name])

    units = []
    for add in graph.node:
        unit = _match_unit(add, producer, consumers, inits, array)
        if unit is not None:
            units.append(unit)
    groups: dict[str, list[_Unit]] = {}
    for unit in units:
        groups.setdefault(unit.a.input[0], []).append(unit)

    before = len(graph.node)
    stats = {"modules": [], "nodes_before": before}
    order = {id(node): i for i, node in enumerate(graph.node)}
    new_nodes, removed, dead_tensors = {}, set(), set()
    for x, group in groups.items():
        if len(group) < 2 or not _packable([u.base for u in group], inits):
            continue  # measured: joining unpackable bases by a Concat is slower than leaving them
        if only is not None and _fused_module(group) not in only:
            continue
        group = _gqa_order(group, consumers) or sorted(group, key=lambda u: order[id(u.add)])
        nodes, dead = _fuse_group(x, group, consumers, inits, array, model)
        first = min(order[id(n)] for u in group for n in (u.base, u.a, u.b, u.add))
        new_nodes[first] = nodes
        removed |= {id(n) for u in group for n in (u.base, u.a, u.b, u.add)}
        dead_tensors |= dead
        stats["modules"].append(_fused_module(group))

    kept = []
    for i, node in enumerate(graph.node):
        kept.extend(new_nodes.get(i, []))
        if id(node) not in removed:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(topological_order(kept, {i.name for i in graph.input} | {i.name for i in graph.initializer}))
    still_read = {name for node in graph.node for name in node.input}
    for name in dead_tensors - still_read:
        if name in inits:
            graph.initializer.remove(inits.pop(name))
    for value in [v for v in graph.input if v.name in dead_tensors - still_read]:
        graph.input.remove(value)  # an already switchable model: its old LoRA weight inputs go
    live = still_read | {o for node in graph.node for o in node.output}
    stale = [v for v in graph.value_info if v.name not in live]
    for value in stale:
        graph.value_info.remove(value)
    stats["nodes_after"] = len(graph.node)
    if only is not None and sorted(stats["modules"]) != sorted(only):
        raise ValueError(f"fuse_lora: could not fuse {sorted(set(only) - set(stats['modules']))[:3]}")
    return stats


def _match_unit(add, producer, consumers, inits, array):
    if add.op_type != "Add" or len(add.input) != 2:
        return None
    for base_out, b_out in (add.input, add.input[::-1]):
        b, base = producer.get(b_out), producer.get(base_out)
        if b is None or base is None or b.op_type != "MatMul" or "/lora_B/" not in b.name:
            continue
        a = producer.get(b.input[0])
        if a is None or a.op_type != "MatMul" or "/lora_A/" not in a.name:
            continue
        if base.op_type not in ("MatMul", "MatMulNBits") or base.input[0] != a.input[0]:
            continue
        if a.input[1] not in inits or b.input[1] not in inits:
            continue  # already switchable (graph inputs) or quantized: not ours to rewrite
        if any(len(consumers.get(t, [])) != 1 for t in (a.output[0], b.output[0], base.output[0])):
            continue
        a_shape, b_shape = inits[a.input[1]].dims, inits[b.input[1]].dims
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != b_shape[0]:
            continue
        return _Unit(base=base, a=a, b=b, add=add, width=int(b_shape[1]), rank=int(a_shape[1]))
    return None


def _gqa_order(group, consumers):
    """q, k, v in the order a GroupQueryAttention reads them (its inputs 0, 1, 2), if one does."""
    by_out = {u.add.output[0]: u for u in group}
    for name in by_out:
        for node in consumers.get(name, []):
            if node.op_type == "GroupQueryAttention" and set(node.input[:3]) == set(by_out) and len(group) == 3:
                return [by_out[n] for n in node.input[:3]]
    return None


def _rank(graph, name: str):
    """The rank the graph declares for a tensor, or None."""
    for value in list(graph.value_info) + list(graph.input) + list(graph.output):
        if value.name == name and value.type.tensor_type.HasField("shape"):
            return len(value.type.tensor_type.shape.dim)
    return None


def _fused_module(group) -> str:
    """'/model/layers.0/attn/q_proj' + k_proj + v_proj -> '/model/layers.0/attn/qkv_proj'."""
    parents = {u.module.rsplit("/", 1)[0] for u in group}
    leaves = [u.module.rsplit("/", 1)[1] for u in group]
    short = [leaf[: -len("_proj")] if leaf.endswith("_proj") else leaf for leaf in leaves]
    joined = "".join(short) if all(len(s) == 1 for s in short) else "_".join(short)
    parent = parents.pop() if len(parents) == 1 else "/".join(group[0].module.split("/")[:-1])
    return f"{parent}/{joined}_proj"


def _fuse_group(x, group, consumers, inits, array, model):
    """New nodes for one group and the tensors the old ones leave dead."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    module = _fused_module(group)
    stem = module.lstrip("/").replace("/", ".")
    widths, ranks = [u.width for u in group], [u.rank for u in group]
    a_arrays = [array(u.a.input[1]) for u in group]
    b_arrays = [array(u.b.input[1]) for u in group]
    a_cat = np.concatenate(a_arrays, axis=1)
    # Equal widths and ranks (gate/up; q/k/v without GQA): B as a stack [G, r, N] applied by one
    # batched MatMul, so no zero is stored or read. Otherwise one block-diagonal B [sum r, sum N].
    stacked = len(set(widths)) == 1 and len(set(ranks)) == 1 and _rank(graph, x) == 3
    if stacked:
        b_value = np.stack(b_arrays)
    else:
        b_value = np.zeros((sum(ranks), sum(widths)), dtype=b_arrays[0].dtype)
        r0 = n0 = 0
        for b in b_arrays:
            b_value[r0: r0 + b.shape[0], n0: n0 + b.shape[1]] = b
            r0, n0 = r0 + b.shape[0], n0 + b.shape[1]
    a_name, b_name = f"{stem}.lora_A.MatMul.weight", f"{stem}.lora_B.MatMul.weight"
    for name, value in ((a_name, a_cat), (b_name, b_value)):
        if name in inits:
            raise ValueError(f"fuse_lora: initializer {name} already exists")
        inits[name] = numpy_helper.from_array(value, name)
        graph.initializer.append(inits[name])
    dead = {u.a.input[1] for u in group} | {u.b.input[1] for u in group}
    dead |= {t for u in group for t in (u.a.output[0], u.b.output[0], u.base.output[0], u.add.output[0])}

    nodes = []
    a_node = f"{module}/lora_A/MatMul"
    b_node = f"{module}/lora_B/MatMul"
    nodes.append(helper.make_node("MatMul", [x, a_name], [f"{a_node}/output_0"], name=a_node))
    b_in, delta = f"{a_node}/output_0", f"{b_node}/output_0"
    if stacked:  # [b, s, G*r] -> [b, s, G, 1, r] @ [G, r, N] -> [b, s, G, 1, N] -> [b, s, G*N]
        count, rank, width = len(group), ranks[0], widths[0]
        for name, shape in ((f"{stem}.lora.shape_in", [0, 0, count, 1, rank]), (f"{stem}.lora.shape_out", [0, 0, count * width])):
            graph.initializer.append(numpy_helper.from_array(np.array(shape, dtype=np.int64), name))
        reshape_in, reshape_out = f"{module}/lora/Reshape_in", f"{module}/lora/Reshape_out"
        nodes.append(helper.make_node("Reshape", [b_in, f"{stem}.lora.shape_in"], [f"{reshape_in}/output_0"], name=reshape_in))
        b_in, delta = f"{reshape_in}/output_0", f"{reshape_out}/output_0"
    nodes.append(helper.make_node("MatMul", [b_in, b_name], [f"{b_node}/output_0"], name=b_node))
    if stacked:
        nodes.append(helper.make_node("Reshape", [f"{b_node}/output_0", f"{stem}.lora.shape_out"], [delta], name=reshape_out))

    base_nodes, base_out = _pack_bases(group, module, stem, inits, array, graph)
    dead |= {t for u in group for t in u.base.input[1:] if t}
    nodes.extend(base_nodes)
    add_name = f"{module}/lora/Add"
    out = f"{add_name}/output_0"
    nodes.append(helper.make_node("Add", [base_out, delta], [out], name=add_name))

    old_outs = [u.add.output[0] for u in group]
    gqa = [n for n in consumers.get(old_outs[0], []) if n.op_type == "GroupQueryAttention"]
    if gqa and len(group) == 3 and list(gqa[0].input[:3]) == old_outs:
        gqa[0].input[0], gqa[0].input[1], gqa[0].input[2] = out, "", ""
    else:
        split_name = f"{module}/lora/Split"
        sizes = f"{stem}.lora.split_sizes"
        graph.initializer.append(numpy_helper.from_array(np.array(widths, dtype=np.int64), sizes))
        outs = [f"{split_name}/output_{i}" for i in range(len(group))]
        nodes.append(helper.make_node("Split", [out, sizes], outs, name=split_name, axis=-1))
        renamed = dict(zip(old_outs, outs))
        for old_out in old_outs:
            for node in consumers.get(old_out, []):
                for slot, name in enumerate(node.input):
                    if name in renamed:
                        node.input[slot] = renamed[name]
        for value in graph.output:
            if value.name in renamed:
                raise ValueError(f"fuse_lora: {value.name} is a graph output")
    return nodes, dead


def _pack_bases(group, module, stem, inits, array, graph):
    """One base MatMul(NBits) for the group, its weights concatenated along N."""
    import numpy as np
    from onnx import helper, numpy_helper

    bases = [u.base for u in group]
    x = bases[0].input[0]
    if all(b.op_type == "MatMul" and b.input[1] in inits for b in bases):
        name = f"{stem}.MatMul.weight"
        weight = np.concatenate([array(b.input[1]) for b in bases], axis=1)
        graph.initializer.append(numpy_helper.from_array(weight, name))
        node = f"{module}/MatMul"
        return [helper.make_node("MatMul", [x, name], [f"{node}/output_0"], name=node)], f"{node}/output_0"
    attrs = {a.name: helper.get_attribute_value(a) for a in bases[0].attribute}
    attrs["N"] = sum(u.width for u in group)
    inputs = [x]
    for slot in range(1, len(bases[0].input)):
        if not bases[0].input[slot]:
            inputs.append("")
            continue
        name = f"{stem}.MatMul.{bases[0].input[slot].rsplit('.', 1)[-1]}"
        name = name if name not in inits and name not in inputs else f"{name}_{slot}"
        value = np.concatenate([array(b.input[slot]) for b in bases], axis=0)
        graph.initializer.append(numpy_helper.from_array(value, name))
        inputs.append(name)
    node = f"{module}/{bases[0].name.rsplit('/', 1)[-1]}"
    out = f"{module}/MatMul/output_0"
    return [helper.make_node("MatMulNBits", inputs, [out], name=node, domain="com.microsoft", **attrs)], out


def _packable(bases, inits) -> bool:
    """Float MatMuls with initializer weights, or MatMulNBits that differ in N only."""
    from onnx import helper

    if all(b.op_type == "MatMul" and b.input[1] in inits for b in bases):
        return True
    if not all(b.op_type == "MatMulNBits" for b in bases):
        return False
    attrs = [{a.name: helper.get_attribute_value(a) for a in b.attribute} for b in bases]
    if any({k: v for k, v in a.items() if k != "N"} != {k: v for k, v in attrs[0].items() if k != "N"} for a in attrs):
        return False
    arity = [tuple(bool(name) for name in b.input) for b in bases]
    if len(set(arity)) != 1 or len(bases[0].input) > 4 and bases[0].input[4]:
        return False  # g_idx: rows reordered per base, cannot pack
    if len(set(b.input[0] for b in bases)) != 1:
        return False
    return all(name in inits for b in bases for name in b.input[1:] if name)
