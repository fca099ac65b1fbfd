"""Olive's ``GraphSurgeries`` surgeons that apply to the graphs modelbuild builds, as rewrites of
an ``onnx.ModelProto`` in place (the ``graph-surgery`` pass runs them and checks the result).

Each follows Olive's own surgeon (olive/passes/onnx/graph_surgeries.py, microsoft/Olive at
ee6f40fb): the same nodes matched, the same replacement, the same option names and defaults.
Where Olive would skip silently or fail with an assertion, these raise a one-line ``UserError``
naming the step, and a step that finds nothing to change is an error too: a recipe that asks for
a surgery gets it or is told why not.

Which graphs they fit:

- ``SimplifiedLayerNormToL2Norm``: RMSNorm as the model builder (genai-build) and graph-optimize
  write it, ``(Skip)SimplifiedLayerNormalization``, becomes ``LpNormalization(p=2) * (sqrt(N) *
  weight)`` (a residual Add before it for the Skip form). ``x / ||x|| * sqrt(N)`` is
  ``x / sqrt(mean(x^2))``: RMSNorm without its epsilon, so logits move by the epsilon's share.
- ``ReplaceAttentionMaskValue``: the mask constant below ``threshold`` (float32 min in
  onnx-export's causal mask ``Where``) becomes ``replacement``; softmax gives those positions 0
  either way, so logits do not change.
- ``AttentionMaskToSequenceLengths``: the builder's ``attention_mask -> seqlens_k,
  total_sequence_length`` subgraph before GroupQueryAttention goes; the graph takes
  ``past_seq_len`` (int32 [batch, 1]) and ``total_seq_len`` (int32 scalar) instead (what NPU
  runtimes feed). Same logits for the equivalent lengths.
- ``RemoveRopeMultiCache``: a LongRoPE model's ``Greater -> If`` choosing between the short and
  the long cos/sin caches becomes one fixed cache (``use_large_cache``). Logits are unchanged at
  the lengths where the input graph picks that cache.
- ``RenameOutputDims``: one symbolic dimension name of one graph output.

Nothing here imports onnx at module level (pass modules import this when tasks load).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from modelbuild import UserError

REQUIRED = object()
# surgeon -> {option: (type, default)}; options and defaults as Olive's surgeon __init__ has them.
OPTIONS: dict[str, dict[str, tuple[type, object]]] = {
    "SimplifiedLayerNormToL2Norm": {},
    "ReplaceAttentionMaskValue": {"threshold": (float, -3e30), "replacement": (float, -1e4)},
    "AttentionMaskToSequenceLengths": {},
    "RemoveRopeMultiCache": {"use_large_cache": (bool, False)},
    "RenameOutputDims": {"output_idx": (int, REQUIRED), "dim_idx": (int, REQUIRED), "dim_name": (str, REQUIRED)},
}
# Olive surgeons asked for by the CPU/CUDA LLM recipes that cannot apply here, and why.
REFUSED = {
    "GemmToMatMulAdd": "onnx-export and genai-build write Linear layers as MatMul, never Gemm: there is nothing for it to rewrite "
                       "(Olive needs it after its TorchScript OnnxConversion)",
    "PackedAttentionToLoopMHA": "it expands custom::PackedAttention, an op only Olive's own vision-encoder exports contain; "
                                "onnx-export and genai-build write none",
    "TieWordEmbeddings": "it is a pass of its own here: tie-embeddings",
}
# Olive matches surgeon names case-insensitively.
CANONICAL = {name.lower(): name for name in (*OPTIONS, *REFUSED)}
MASK_CONSUMERS = {"Add", "Mul", "Expand", "Where", "Shape"}  # Olive's ReplaceAttentionMaskValue.ALLOWED_CONSUMER_OPS
NORMS = {"SimplifiedLayerNormalization": 2, "SkipSimplifiedLayerNormalization": 3}  # op -> inputs Olive rewrites
MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class Step:
    surgeon: str
    options: dict = field(default_factory=dict)


def parse_step(raw: object, where: str) -> Step:
    """A ``{surgeon = "...", option = value}`` table as a Step with every option typed and its
    default filled in; ValueError (``where``: "params.steps[0]") for anything else."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a table with a 'surgeon' key, got {raw!r}")
    name = raw.get("surgeon")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}.surgeon: missing (one of {', '.join(OPTIONS)})")
    surgeon = CANONICAL.get(name.lower())
    if surgeon in REFUSED:
        raise ValueError(f"{where}.surgeon: {surgeon}: {REFUSED[surgeon]}")
    if surgeon is None:
        raise ValueError(f"{where}.surgeon: unknown surgeon {name!r} (graph-surgery runs {', '.join(OPTIONS)})")
    spec = OPTIONS[surgeon]
    options = {}
    for key, value in raw.items():
        if key == "surgeon":
            continue
        if key not in spec:
            raise ValueError(f"{where}.{key}: {surgeon} has no option {key!r} (options: {', '.join(spec) or 'none'})")
        kind = spec[key][0]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"{where}.{key}: expected {kind.__name__}, got {value!r}")
        options[key] = value
    for key, (_, default) in spec.items():
        if key not in options:
            if default is REQUIRED:
                raise ValueError(f"{where}.{key}: {surgeon} needs it")
            options[key] = default
    if surgeon == "RenameOutputDims":
        if options["output_idx"] < 0 or options["dim_idx"] < 0:
            raise ValueError(f"{where}: output_idx and dim_idx must be >= 0")
        if not options["dim_name"].strip():
            raise ValueError(f"{where}.dim_name: empty")
    return Step(surgeon, options)


def apply(model, step: Step, where: str) -> dict:
    """Run one step on ``model`` (rewritten in place); return what it changed (for the record).
    A step that changes nothing is a UserError."""
    done = SURGEONS[step.surgeon](model, where, **step.options)
    why = done.pop("why", "no match")
    if not done.get("changed"):
        raise UserError(f"{where}: {step.surgeon} found nothing to change: {why}")
    return done


# --- helpers -----------------------------------------------------------------------------------

def _consumers(graph) -> dict[str, list]:
    """value name -> [(node, input index)] of the main graph."""
    uses: dict[str, list] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name:
                uses.setdefault(name, []).append((node, i))
    return uses


def _subgraph_reads(graph) -> set[str]:
    """Names read inside If/Loop/Scan bodies (outer-scope values a subgraph uses)."""
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                for inner in sub.node:
                    names.update(n for n in inner.input if n)
                names |= _subgraph_reads(sub)
    return names


def _replace_nodes(graph, replaced: dict[int, list]) -> None:
    """Rebuild graph.node with node index i replaced by the list ``replaced[i]`` (topological
    order kept: the new nodes read what the old one read)."""
    nodes = []
    for i, node in enumerate(graph.node):
        if i in replaced:
            nodes.extend(replaced[i])
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def prune_constants(model) -> list[str]:
    """Drop the Constant nodes and initializers that nothing (node, subgraph, graph output) reads
    any more; return their names."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    dropped = []
    while True:
        read = {name for node in graph.node for name in node.input} | _subgraph_reads(graph) | outputs
        dead = [node for node in graph.node if node.op_type == "Constant" and not set(node.output) & read]
        if not dead:
            break
        dropped += [node.output[0] for node in dead]
        kept = [node for node in graph.node if not (node.op_type == "Constant" and not set(node.output) & read)]
        del graph.node[:]
        graph.node.extend(kept)
    used = {name for node in graph.node for name in node.input} | _subgraph_reads(graph) | {o.name for o in graph.output}
    unused = [init.name for init in graph.initializer if init.name not in used]
    dropped += unused
    if unused:
        keep = [init for init in graph.initializer if init.name in used]
        del graph.initializer[:]
        graph.initializer.extend(keep)
        inputs = [value for value in graph.input if value.name not in set(unused)]
        del graph.input[:]
        graph.input.extend(inputs)
    return dropped


# --- the surgeons ------------------------------------------------------------------------------

def simplified_layernorm_to_l2norm(model, where: str) -> dict:
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    scaled: dict[str, str] = {}  # weight initializer -> its sqrt(N)-scaled copy
    replaced: dict[int, list] = {}
    skipped = []
    for index, node in enumerate(graph.node):
        if node.op_type not in NORMS or node.domain not in ("", "ai.onnx", MS_DOMAIN):
            continue
        skip = node.op_type == "SkipSimplifiedLayerNormalization"
        inputs = [name for name in node.input]
        outputs = list(node.output) + [""] * (4 - len(node.output))
        # Olive rewrites (input, [skip,] weight) with the output and, for Skip, input_skip_bias_sum only.
        if len(inputs) != NORMS[node.op_type] or any(outputs[1:3]) or (not skip and outputs[3]):
            skipped.append(f"{node.name} (bias, mean or inv_std_var)")
            continue
        weight = inputs[-1]
        if weight not in initializers:
            skipped.append(f"{node.name} (weight {weight} is not an initializer)")
            continue
        if weight not in scaled:
            array = numpy_helper.to_array(initializers[weight])
            sqrt_n = np.sqrt(array.shape[-1]).astype(array.dtype)
            if np.all(array == 1):  # Olive: a rotated (QuaRot) model's all-ones weight becomes one number
                array = np.array([1], dtype=array.dtype)
            name = f"{weight}_l2norm"
            graph.initializer.append(numpy_helper.from_array((sqrt_n * array).astype(array.dtype), name))
            scaled[weight] = name
        base = node.name or outputs[0]
        new = []
        source = inputs[0]
        if skip:
            source = outputs[3] or f"{base}/Add/output_0"
            new.append(helper.make_node("Add", inputs[:2], [source], name=f"{base}/Add"))
        normed = f"{base}/L2Norm/output_0"
        new.append(helper.make_node("LpNormalization", [source], [normed], name=f"{base}/L2Norm", axis=-1, p=2))
        new.append(helper.make_node("Mul", [normed, scaled[weight]], [outputs[0]], name=f"{base}/Mul"))
        replaced[index] = new
    _replace_nodes(graph, replaced)
    dropped = prune_constants(model)
    return {"changed": len(replaced), "replaced_nodes": len(replaced), "skipped": skipped, "constants_dropped": len(dropped),
            "why": "no (Skip)SimplifiedLayerNormalization node (onnx-export's RMSNorm is decomposed: graph-optimize fuses it first)"}


def replace_attention_mask_value(model, where: str, threshold: float, replacement: float) -> dict:
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    uses = _consumers(graph)
    graph_inputs = {value.name for value in graph.input}

    def allowed(name: str) -> bool:
        return all(node.op_type in MASK_CONSUMERS for node, _ in uses.get(name, []))

    def lowered(array):
        if array.size and np.any(array < threshold):
            array = array.copy()
            array[array < threshold] = replacement
            return array
        return None

    changed = []
    for node in graph.node:
        if node.op_type not in ("Constant", "ConstantOfShape"):
            continue
        for attr in node.attribute:
            if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == onnx.TensorProto.FLOAT \
                    and allowed(node.output[0]):
                new = lowered(numpy_helper.to_array(attr.t))
                if new is not None:
                    attr.t.CopyFrom(numpy_helper.from_array(new.astype(np.float32), attr.t.name))
                    changed.append(node.output[0])
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or init.name in graph_inputs or not allowed(init.name):
            continue
        new = lowered(numpy_helper.to_array(init))
        if new is not None:
            init.CopyFrom(numpy_helper.from_array(new.astype(np.float32), init.name))
            changed.append(init.name)
    return {"changed": len(changed), "values": changed,
            "why": f"no float constant below {threshold:g} read only by {', '.join(sorted(MASK_CONSUMERS))}"}


def attention_mask_to_sequence_lengths(model, where: str) -> dict:
    import onnx
    from onnx import helper

    graph = model.graph
    gqa = [node for node in graph.node if node.op_type == "GroupQueryAttention"]
    if not gqa:
        return {"changed": 0, "why": "no GroupQueryAttention node (a genai-build bundle has them; onnx-export's attention is decomposed)"}
    first = list(gqa[0].input)
    seqlens = {"past_seq_len": first[5], "total_seq_len": first[6]}
    inputs = {value.name: value for value in graph.input}
    if any(name in inputs for name in seqlens.values()):
        return {"changed": 0, "why": "the sequence lengths are graph inputs already"}
    if "attention_mask" not in inputs:
        return {"changed": 0, "why": "no attention_mask input"}
    # Olive: batch 1 unless input_ids has a fixed batch dimension.
    ids = inputs.get("input_ids")
    dims = ids.type.tensor_type.shape.dim if ids is not None else []
    batch = dims[0].dim_value if len(dims) and dims[0].HasField("dim_value") else 1
    new_inputs = [helper.make_tensor_value_info("total_seq_len", onnx.TensorProto.INT32, []),
                  helper.make_tensor_value_info("past_seq_len", onnx.TensorProto.INT32, [batch, 1])]
    rename = {old: new for new, old in seqlens.items()}
    # The mask subgraph: everything downstream of attention_mask up to the GQA nodes' lengths.
    uses = _consumers(graph)
    outputs = {value.name for value in graph.output}
    removed, queue = set(), [node for node, _ in uses.get("attention_mask", [])]
    while queue:
        node = queue.pop(0)
        if id(node) in removed:
            continue
        removed.add(id(node))
        for out in node.output:
            if out in outputs:
                raise UserError(f"{where}: AttentionMaskToSequenceLengths: {node.name} computes graph output {out} from attention_mask")
            for consumer, position in uses.get(out, []):
                if consumer.op_type == "GroupQueryAttention":
                    if position not in (5, 6):
                        raise UserError(f"{where}: AttentionMaskToSequenceLengths: attention_mask reaches {consumer.name} input {position}, "
                                        "not its sequence lengths (a rope multi-cache? run RemoveRopeMultiCache first)")
                    continue
                if consumer.op_type == "If":
                    raise UserError(f"{where}: AttentionMaskToSequenceLengths: attention_mask feeds {consumer.name} (the LongRoPE cache "
                                    "choice); run RemoveRopeMultiCache first")
                queue.append(consumer)
    if _subgraph_reads(graph) & {out for node in graph.node if id(node) in removed for out in node.output}:
        raise UserError(f"{where}: AttentionMaskToSequenceLengths: a subgraph reads the attention-mask subgraph")
    kept = [node for node in graph.node if id(node) not in removed]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del graph.node[:]
    graph.node.extend(kept)
    rest = [value for value in graph.input if value.name != "attention_mask"]
    del graph.input[:]
    graph.input.extend(new_inputs + rest)  # Olive inserts both at the front
    dropped = prune_constants(model)
    return {"changed": len(removed), "nodes_removed": len(removed), "constants_dropped": len(dropped),
            "inputs_added": ["total_seq_len", "past_seq_len"], "input_removed": "attention_mask", "past_seq_len_batch": batch}


def remove_rope_multi_cache(model, where: str, use_large_cache: bool) -> dict:
    from onnx import numpy_helper

    graph = model.graph
    first = next((node for node in graph.node if node.op_type in ("GroupQueryAttention", "RotaryEmbedding")), None)
    if first is None:
        return {"changed": 0, "why": "no GroupQueryAttention or RotaryEmbedding node"}
    if first.op_type != "GroupQueryAttention" or len(first.input) < 9:
        return {"changed": 0, "why": f"{first.name} has no cos_cache/sin_cache inputs (Olive reads them from a GroupQueryAttention's inputs 7 and 8)"}
    producers = {out: node for node in graph.node for out in node.output}
    caches = {"cos_cache": first.input[7], "sin_cache": first.input[8]}
    if_node = producers.get(caches["cos_cache"])
    if if_node is None or if_node.op_type != "If" or producers.get(caches["sin_cache"]) is not if_node:
        return {"changed": 0, "why": "the cos/sin caches do not come from an If (one cache only: not a LongRoPE model)"}
    constants = {}
    for attr in if_node.attribute:
        for node in (attr.g.node if attr.HasField("g") else []):
            for sub in node.attribute:
                if node.op_type == "Constant" and sub.name == "value":
                    constants[node.output[0]] = sub.t
    names = {}
    for key in caches:
        wanted = f"{key}_large" if use_large_cache else f"{key}_small"
        if wanted not in constants:
            raise UserError(f"{where}: RemoveRopeMultiCache: {if_node.name} has no constant {wanted} (found {', '.join(sorted(constants)) or 'none'})")
        single = f"{key}_single"
        graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(constants[wanted]).copy(), single))
        names[caches[key]] = single
    condition = if_node.input[0]
    kept = [node for node in graph.node if node is not if_node]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in names:
                node.input[i] = names[name]
    greater = producers.get(condition)
    threshold = None
    if greater is not None and greater.op_type == "Greater" and not any(condition in node.input for node in kept):
        threshold = _constant_int(graph, producers, greater.input[1])
        kept = [node for node in kept if node is not greater]
    del graph.node[:]
    graph.node.extend(kept)
    dropped = prune_constants(model)
    return {"changed": 1, "kept_cache": "large" if use_large_cache else "small", "if_removed": if_node.name,
            "greater_removed": threshold is not None, "original_max_length": threshold, "constants_dropped": len(dropped)}


def _constant_int(graph, producers: dict, name: str) -> int | None:
    """The integer a one-element initializer or Constant node holds, else None."""
    from onnx import numpy_helper

    tensor = next((init for init in graph.initializer if init.name == name), None)
    node = producers.get(name)
    if tensor is None and node is not None and node.op_type == "Constant":
        tensor = next((attr.t for attr in node.attribute if attr.name == "value"), None)
    if tensor is None:
        return None
    array = numpy_helper.to_array(tensor).reshape(-1)
    return int(array[0]) if array.size == 1 else None


def without_epsilon(model) -> int:
    """Set every (Skip)SimplifiedLayerNormalization's epsilon to 0 (in place); return how many:
    the graph SimplifiedLayerNormToL2Norm must equal, since an L2 norm has no epsilon."""
    from onnx import helper

    count = 0
    for node in model.graph.node:
        if node.op_type in NORMS:
            kept = [attr for attr in node.attribute if attr.name != "epsilon"]
            del node.attribute[:]
            node.attribute.extend(kept + [helper.make_attribute("epsilon", 0.0)])
            count += 1
    return count


def rename_output_dims(model, where: str, output_idx: int, dim_idx: int, dim_name: str) -> dict:
    outputs = model.graph.output
    if output_idx >= len(outputs):
        raise UserError(f"{where}.output_idx: {output_idx} is out of range: the graph has {len(outputs)} outputs")
    value = outputs[output_idx]
    if not value.type.tensor_type.HasField("shape"):
        raise UserError(f"{where}: output {value.name} has no shape information")
    dims = value.type.tensor_type.shape.dim
    if dim_idx >= len(dims):
        raise UserError(f"{where}.dim_idx: {dim_idx} is out of range: output {value.name} has {len(dims)} dimensions")
    dim = dims[dim_idx]
    before = dim.dim_param if dim.HasField("dim_param") else dim.dim_value
    dim.dim_param = dim_name  # the dim oneof: sets the name, clears a fixed size (as Olive's ir.Shape does)
    return {"changed": int(before != dim_name), "output": value.name, "dim": dim_idx, "before": before, "after": dim_name,
            "why": f"dimension {dim_idx} of {value.name} is already named {dim_name!r}"}


SURGEONS = {
    "SimplifiedLayerNormToL2Norm": simplified_layernorm_to_l2norm,
    "ReplaceAttentionMaskValue": replace_attention_mask_value,
    "AttentionMaskToSequenceLengths": attention_mask_to_sequence_lengths,
    "RemoveRopeMultiCache": remove_rope_multi_cache,
    "RenameOutputDims": rename_output_dims,
}
