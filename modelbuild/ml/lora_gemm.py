"""Two ops fewer per LoRA path: the decoder on 2-D tensors, each lora_B MatMul and its Add one Gemm.

After :func:`lora_graph.fuse_lora` a switchable LoRA path still costs three ops (A MatMul, B
MatMul, the Add onto the base output), and gate/up's stacked B two Reshapes more. On a decode
step every one of them is tiny, so their count is what costs: onnxruntime-genai spreads the int4
base MatMuls over its threads while these run on one, and SmolLM2-135M's switchable bundle spent
~10-15 % of the merged bundle's decode speed on them (``bench/adapter_overhead.py``).

ONNX's Gemm computes ``A @ B + C`` in one op, but only on 2-D tensors, and the builder's decoder
carries its hidden state as [batch, sequence, hidden]. Every op on that path except attention
works row by row on the last axis, so the decoder can carry it as [tokens, hidden] instead::

    embedding -> Flatten -> ... layer norms, MatMul(NBits), Gemm(a, B, C=base), Split, Mul ...
              -> Reshape [batch, seq, -1] -> GroupQueryAttention -> Flatten -> ...
              -> Reshape [batch, seq, -1] -> LM head -> logits (as before)

gate/up's stacked B [G, r, N] becomes one block-diagonal B [G*r, G*N] (its zeros are read, its
two Reshapes go). Per layer of a fused Llama-style decoder that is 4 ops fewer; the graph's
inputs, outputs and the LM head's node are unchanged, and the function is the same up to
summation order (the int4 MatMulNBits round their input to 8 bits per block, so a last-bit
difference can flip one rounding: logits match by correlation, ``tests/test_lora_gemm.py``).

The rewrite is all or nothing: it runs only where every op on the hidden path is one it knows to
be rank-free (:data:`ROW_OPS`), else it leaves the graph alone and says so.
"""

from __future__ import annotations

from modelbuild.ml.graph import producers_and_consumers, topological_order

# Ops that treat their input as rows of its last axis, so [tokens, hidden] works as [b, s, hidden].
ROW_OPS = {"SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
           "LayerNormalization", "MatMul", "MatMulNBits", "Add", "Sub", "Mul", "Div", "Sigmoid", "Tanh",
           "Relu", "Erf", "Gelu", "FastGelu", "QuickGelu", "Softplus", "Cast", "Split", "Concat"}
ELEMENTWISE = {"Add", "Sub", "Mul", "Div"}
LORA_RESHAPES = ("/lora/Reshape_in", "/lora/Reshape_out")
LAST_AXIS_ONLY = {"Split", "Concat", "LayerNormalization"}


def lora_as_gemm(model, read) -> dict | None:
    """Rewrite ``model`` (an onnx.ModelProto whose LoRA weights are still initializers) in place
    to run on [tokens, hidden]; ``read(initializer)`` gives a weight's array. Returns what it did,
    or None (graph unchanged) where the hidden path holds an op it cannot vouch for."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer, consumers = producers_and_consumers(graph)
    embeddings = [n for n in graph.node if n.op_type in ("Gather", "GatherBlockQuantized")
                  and len(n.input) > 1 and n.input[1] == "input_ids"]
    head = producer.get("logits")
    if len(embeddings) != 1 or head is None or head.op_type not in ("MatMul", "MatMulNBits"):
        return None
    path = _hidden_path(embeddings[0].output[0], head, consumers, inits)
    if path is None:
        return None
    attention, on_path = path
    before = len(graph.node)

    plans = []  # every lora_B MatMul and what it becomes, found before anything changes
    for node in graph.node:
        if node.op_type != "MatMul" or "/lora_B/" not in node.name or node.input[1] not in inits:
            continue
        plan = _gemm_plan(node, producer, consumers)
        if plan is None:
            return None
        plans.append(plan)
    planned = {id(r) for plan in plans for r in plan[4]}
    if any(n.op_type == "Reshape" and n.name.endswith(LORA_RESHAPES) and id(n) not in planned
           for n in graph.node if id(n) in on_path):
        return None  # a LoRA Reshape that no Gemm replaces would still expect 3-D
    dropped, replaced = set(), {}
    for node, a, add, base, reshapes in plans:
        weight = inits[node.input[1]]  # gate/up's stacked B -> block-diagonal
        if len(weight.dims) == 3:
            weight.CopyFrom(numpy_helper.from_array(block_diagonal(np.asarray(read(weight))), weight.name))
        name = node.name.replace("/lora_B/MatMul", "/lora_B/Gemm")
        replaced[id(add)] = helper.make_node("Gemm", [a, node.input[1], base], list(add.output), name=name)
        dropped |= {id(node)} | {id(r) for r in reshapes}

    nodes = [helper.make_node("Shape", ["input_ids"], ["/lora_gemm/batch_seq"], name="/lora_gemm/Shape"),
             helper.make_node("Concat", ["/lora_gemm/batch_seq", "/lora_gemm/minus_one"], ["/lora_gemm/shape_3d"],
                              name="/lora_gemm/Concat", axis=0)]
    graph.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), "/lora_gemm/minus_one"))
    rename = {}
    for node in graph.node:
        if id(node) in dropped:
            continue
        node = replaced.get(id(node), node)
        node.input[:] = [rename.get(x, x) for x in node.input]
        if node.op_type in LAST_AXIS_ONLY and id(node) in on_path:
            _set_axis_last(node)
        if node.op_type == "GroupQueryAttention" or node is head:
            slots = range(3) if node is not head else range(1)
            for slot in slots:
                if slot < len(node.input) and node.input[slot]:
                    three_d = f"{node.input[slot]}/3d"
                    nodes.append(helper.make_node("Reshape", [node.input[slot], "/lora_gemm/shape_3d"], [three_d],
                                                  name=f"{node.name}/input_{slot}/Reshape_3d"))
                    node.input[slot] = three_d
        nodes.append(node)
        if node is embeddings[0] or any(node is n for n in attention):
            flat = f"{node.output[0]}/2d"
            nodes.append(helper.make_node("Flatten", [node.output[0]], [flat], name=f"{node.name}/Flatten_2d", axis=2))
            rename[node.output[0]] = flat
    del graph.node[:]
    graph.node.extend(topological_order(nodes, {i.name for i in graph.input} | {i.name for i in graph.initializer}))
    still_read = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name.endswith((".lora.shape_in", ".lora.shape_out"))]:
        if init.name not in still_read:
            graph.initializer.remove(init)
    del graph.value_info[:]  # 3-D shapes recorded for what is now 2-D
    return {"gemms": len(plans), "nodes_before": before, "nodes_after": len(graph.node)}


def _gemm_plan(node, producer: dict, consumers: dict):
    """(lora_B node, its 2-D input, the Add it feeds, the base output added, the Reshapes around
    a stacked B) or None where its product does not go straight into one Add."""
    a, reshapes = node.input[0], []
    reshape_in = producer.get(a)
    if reshape_in is not None and reshape_in.name.endswith(LORA_RESHAPES[0]):
        a = reshape_in.input[0]
        reshapes.append(reshape_in)
    out = node.output[0]
    after = consumers.get(out, [])
    if len(after) == 1 and after[0].name.endswith(LORA_RESHAPES[1]):
        reshapes.append(after[0])
        out = after[0].output[0]
        after = consumers.get(out, [])
    if len(after) != 1 or after[0].op_type != "Add" or len(after[0].input) != 2:
        return None
    add = after[0]
    return node, a, add, add.input[1] if add.input[0] == out else add.input[0], reshapes


def _hidden_path(start: str, head, consumers: dict, inits: dict):
    """(the attention nodes, ids of every node on the hidden path from the embedding to the LM
    head) or None if one of them is not a row op with rank-free other inputs."""
    attention, on_path, seen = [], set(), set()
    frontier = [start]
    while frontier:
        tensor = frontier.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        for node in consumers.get(tensor, []):
            if node is head or id(node) in on_path:
                continue
            on_path.add(id(node))
            if node.op_type == "GroupQueryAttention":
                attention.append(node)
                frontier.append(node.output[0])  # its present key/value outputs are 4-D and stay
                continue
            if node.op_type == "Reshape" and node.name.endswith(LORA_RESHAPES):
                frontier.extend(node.output)  # gate/up's stacked-B Reshapes: the Gemm plan drops them
                continue
            if node.op_type not in ROW_OPS or not _rank_free(node, inits):
                return None
            frontier.extend(node.output)
    return attention, on_path


def _rank_free(node, inits: dict) -> bool:
    """An elementwise op's constant operands must broadcast the same against [b, s, h] and [t, h]
    (rank <= 1); a Split / Concat / LayerNormalization must work on the last axis."""
    if node.op_type in ELEMENTWISE:
        return all(name not in inits or len(inits[name].dims) <= 1 for name in node.input)
    if node.op_type in LAST_AXIS_ONLY:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0 if node.op_type != "LayerNormalization" else -1)
        return axis in (-1, 2)
    return True


def _set_axis_last(node) -> None:
    for attribute in node.attribute:
        if attribute.name == "axis":
            attribute.i = -1


def block_diagonal(stacked):
    """[G, r, N] -> [G*r, G*N] with the G blocks on the diagonal."""
    import numpy as np

    groups, rank, width = stacked.shape
    out = np.zeros((groups * rank, groups * width), stacked.dtype)
    for g in range(groups):
        out[g * rank:(g + 1) * rank, g * width:(g + 1) * width] = stacked[g]
    return out

