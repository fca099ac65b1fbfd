"""Two ops fewer per LoRA path: the decoder on 2-D tensors, each lora_B MatMul and its Add one Gemm.

After :func:`lora_graph.fuse_lora` a switchable LoRA path still costs three ops per token (A
MatMul, B MatMul, the Add onto the base output), and gate/up's stacked B two Reshapes more.
What the switchable adapter costs a decode step is the fp32 LoRA weights it reads and these
tiny ops, which run on one thread while onnxruntime-genai spreads the int4 base MatMuls over
all of them (``bench/adapter_overhead.py`` measures both halves). This module cuts the ops.

ONNX's Gemm computes ``A @ B + C`` in one op, but only on 2-D tensors, and the builder's decoder
carries its hidden state as [batch, sequence, hidden]. Every op on that path except attention
works row by row on the last axis, so the decoder can carry it as [tokens, hidden] instead::

    embedding -> Flatten -> ... layer norms, MatMul(NBits), Gemm(a, B, C=base), Split, Mul ...
              -> Reshape [batch, seq, -1] -> GroupQueryAttention -> Flatten -> ...
              -> Reshape [batch, seq, -1] -> LM head -> logits (as before)

gate/up's stacked B [G, r, N] becomes one block-diagonal B [G*r, G*N]: its two Reshapes go and
its zeros are read (SmolLM2: 11.6 -> 14.6 MB of LoRA weights per token; a small net gain,
docs/benchmarks.md). Per layer of a fused Llama-style decoder that is 4 ops fewer. The graph's inputs and
outputs and the LM head node's name and op stay; without an adapter (B = 0) the logits are the
3-D graph's to the bit, with one the function is the same up to summation order (the int4
MatMulNBits round their input to 8 bits per block, so a last-bit difference can flip one
rounding: tests/test_lora_gemm.py, tests/test_lora_graph.py).

The rewrite is all or nothing: it runs only where every op on the hidden path is one it knows to
be row-wise (:data:`ROW_OPS`), every other operand of those ops a weight or a rank <= 1 constant
and no graph output a hidden state; else it leaves the graph alone and returns why
(genai-build records it in modelbuild.json).
"""

from __future__ import annotations

from modelbuild.ml.graph import producers_and_consumers, topological_order

# Ops that treat their input as rows of its last axis, so [tokens, hidden] works as [b, s, hidden].
ROW_OPS = {"SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
           "LayerNormalization", "MatMul", "MatMulNBits", "Add", "Sub", "Mul", "Div", "Sigmoid", "Tanh",
           "Relu", "Erf", "Gelu", "FastGelu", "QuickGelu", "Softplus", "Cast", "Split", "Concat"}
LAST_AXIS_ONLY = {"Split": 0, "Concat": None, "LayerNormalization": -1, "SimplifiedLayerNormalization": -1}  # default axis
LORA_RESHAPES = ("/lora/Reshape_in", "/lora/Reshape_out")


def lora_as_gemm(model, read) -> dict:
    """Rewrite ``model`` (an onnx.ModelProto whose LoRA weights are still initializers) in place
    to run on [tokens, hidden]; ``read(initializer)`` gives a weight's array. Returns what it did
    ({"gemms", "nodes_before", "nodes_after"}) or, with the graph unchanged, why it did not
    ({"left_3d": the first node on the hidden path it cannot vouch for})."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer, consumers = producers_and_consumers(graph)
    embeddings = [n for n in graph.node if n.op_type in ("Gather", "GatherBlockQuantized")
                  and len(n.input) > 1 and n.input[1] == "input_ids"]
    head = producer.get("logits")
    if len(embeddings) != 1 or head is None or head.op_type not in ("MatMul", "MatMulNBits"):
        return {"left_3d": "no single input_ids embedding, or no MatMul(NBits) LM head writing 'logits'"}
    walk = _hidden_path(embeddings[0].output[0], head, consumers)
    if isinstance(walk, str):
        return {"left_3d": walk}
    attention, on_path, hidden = walk
    reason = _foreign_operand(graph, on_path, hidden, inits) or _graph_output_on_path(graph, hidden)
    if reason:
        return {"left_3d": reason}
    plans = []  # every lora_B MatMul and what it becomes, found before anything changes
    for node in graph.node:
        if node.op_type == "MatMul" and "/lora_B/" in node.name and node.input[1] in inits:
            plan = _gemm_plan(node, producer, consumers) if id(node) in on_path else None
            if plan is None:
                return {"left_3d": f"{node.name}: its product does not go straight into one Add on the hidden path"}
            plans.append(plan)
    planned = {id(r) for plan in plans for r in plan[4]}
    stray = [n.name for n in graph.node if id(n) in on_path and n.op_type == "Reshape" and id(n) not in planned]
    if stray:
        return {"left_3d": f"{stray[0]}: a LoRA Reshape that no Gemm replaces"}

    before = len(graph.node)
    dropped, replaced, new_weights = set(), {}, {}
    for node, a, add, base, reshapes in plans:
        weight = inits[node.input[1]]
        if len(weight.dims) == 3:  # gate/up's stacked B -> block-diagonal
            new_weights[weight.name] = block_diagonal(np.asarray(read(weight)))
        name = node.name.replace("/lora_B/MatMul", "/lora_B/Gemm")
        replaced[id(add)] = helper.make_node("Gemm", [a, node.input[1], base], list(add.output), name=name)
        dropped |= {id(node)} | {id(r) for r in reshapes}
    nodes = [helper.make_node("Shape", ["input_ids"], ["/lora_gemm/batch_seq"], name="/lora_gemm/Shape"),
             helper.make_node("Concat", ["/lora_gemm/batch_seq", "/lora_gemm/minus_one"], ["/lora_gemm/shape_3d"],
                              name="/lora_gemm/Concat", axis=0)]
    rename, flatten_after = {}, {id(embeddings[0])} | {id(n) for n in attention}
    for node in graph.node:
        if id(node) in dropped:
            continue
        node = replaced.get(id(node), node)
        node.input[:] = [rename.get(x, x) for x in node.input]
        if node.op_type in LAST_AXIS_ONLY and id(node) in on_path:
            _set_axis_last(node)
        if node.op_type == "GroupQueryAttention" or node is head:
            for slot in range(3) if node is not head else range(1):
                if slot < len(node.input) and node.input[slot]:
                    three_d = f"{node.name}/input_{slot}/3d"
                    nodes.append(helper.make_node("Reshape", [node.input[slot], "/lora_gemm/shape_3d"], [three_d],
                                                  name=f"{node.name}/input_{slot}/Reshape_3d"))
                    node.input[slot] = three_d
        nodes.append(node)
        if id(node) in flatten_after:
            flat = f"{node.output[0]}/2d"
            nodes.append(helper.make_node("Flatten", [node.output[0]], [flat], name=f"{node.name}/Flatten_2d", axis=2))
            rename[node.output[0]] = flat
    known = {i.name for i in graph.input} | set(inits) | {"/lora_gemm/minus_one"}
    ordered = topological_order(nodes, known)  # before the graph changes: a failure leaves it whole
    graph.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), "/lora_gemm/minus_one"))
    for name, value in new_weights.items():
        inits[name].CopyFrom(numpy_helper.from_array(value, name))
    del graph.node[:]
    graph.node.extend(ordered)
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


def _hidden_path(start: str, head, consumers: dict):
    """(the attention nodes, ids of every node on the hidden path from the embedding to the LM
    head, the hidden tensors) or, where a node on it is not a row op, why not."""
    attention, on_path, seen = [], set(), set()
    frontier = [start]
    while frontier:
        tensor = frontier.pop()
        if not tensor or tensor in seen:
            continue  # "": an omitted optional output
        seen.add(tensor)
        for node in consumers.get(tensor, []):
            if node is head or id(node) in on_path:
                continue
            on_path.add(id(node))
            if node.op_type == "GroupQueryAttention":
                attention.append(node)
                frontier.append(node.output[0])  # its present key/value outputs are 4-D and stay
                continue
            lora_reshape = node.op_type == "Reshape" and node.name.endswith(LORA_RESHAPES)  # the Gemm plan drops it
            if not lora_reshape and (node.op_type not in ROW_OPS or not _last_axis(node)):
                return f"{node.name}: {node.op_type} is not an op that works row by row on the last axis"
            frontier.extend(node.output)
    return attention, on_path, seen


def _last_axis(node) -> bool:
    if node.op_type not in LAST_AXIS_ONLY:
        return True
    axis = next((a.i for a in node.attribute if a.name == "axis"), LAST_AXIS_ONLY[node.op_type])
    return axis in (-1, 2)


def _foreign_operand(graph, on_path: set, hidden: set, inits: dict) -> str | None:
    """Every operand of a row op on the path must be a hidden tensor, a constant that broadcasts
    the same against [b, s, h] and [t, h] (rank <= 1), or a weight (a MatMul's second input, a
    MatMulNBits' packed blocks): anything else (a 3-D tensor made off the path) would not fit."""
    for node in graph.node:
        if id(node) not in on_path or node.op_type == "GroupQueryAttention":
            continue
        for slot, name in enumerate(node.input):
            if not name or name in hidden:
                continue
            weight = (node.op_type == "MatMul" and slot == 1) or node.op_type == "MatMulNBits" or (
                node.op_type == "Reshape" and slot == 1)
            if name in inits and (weight or len(inits[name].dims) <= 1):
                continue
            return f"{node.name}: input {name} is neither on the hidden path nor a rank <= 1 constant"
    return None


def _graph_output_on_path(graph, hidden: set) -> str | None:
    """A graph output on the path (e.g. the builder's hidden_states) would come out 2-D."""
    for value in graph.output:
        if value.name in hidden:
            return f"graph output {value.name} is a hidden state"
    return None


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
