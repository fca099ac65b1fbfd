"""The stages of Olive's ``OnnxPeepholeOptimizer`` (olive/passes/onnx/peephole_optimizer.py at
microsoft/Olive ee6f40fb), in Olive's order, each on an ``onnx.ModelProto`` and returning the
model it leaves (the optimizers return new protos):

1. ``onnxscript_optimize``: onnxscript's optimizer (constant folding, dead code, its rewrite
   rules); rerun without ONNX shape inference when that fails on a type error, as Olive does.
2. ``onnxoptimizer_optimize``: the onnxoptimizer package's default passes.
3. ``fuse_reshape_operations``: ``Reshape(Reshape(x, s), [-1])`` -> ``Reshape(x, [-1])`` where the
   inner Reshape feeds only the outer one.
4. ``fix_com_microsoft_opset``: declare com.microsoft v1 on the model and every function.

Olive's fifth stage, ``cast_chain_elimination`` (off by default), is not here: onnx-peephole
refuses it at load rather than run the pass without it.
"""

from __future__ import annotations


def onnxscript_optimize(model):
    import onnxscript

    try:
        return onnxscript.optimizer.optimize(model)
    except Exception as error:  # onnx's shape inference raises its own error types
        if "TypeInferenceError" not in str(error):
            raise
        return onnxscript.optimizer.optimize(model, onnx_shape_inference=False)


def onnxoptimizer_optimize(model):
    import onnxoptimizer

    return onnxoptimizer.optimize(model)


def _constant(graph, name: str):
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and name in node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
    return None


def fuse_reshape_operations(model):
    import numpy as np

    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    changed = 0
    for node in graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        previous = producers.get(node.input[0])
        shape = _constant(graph, node.input[1])
        if previous is None or previous.op_type != "Reshape" or shape is None or not np.array_equal(shape, np.array([-1])):
            continue
        if uses.get(node.input[0], 0) != 1 or node.input[0] in outputs:
            continue
        node.input[0] = previous.input[0]
        changed += 1
    if changed:  # drop the inner Reshapes nothing reads now
        read = {name for node in graph.node for name in node.input} | outputs
        kept = [node for node in graph.node if node.op_type != "Reshape" or any(out in read for out in node.output)]
        del graph.node[:]
        graph.node.extend(kept)
    return model


def fix_com_microsoft_opset(model):
    from onnx import helper

    if "com.microsoft" not in {o.domain for o in model.opset_import}:
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    for function in model.functions:
        if "com.microsoft" not in {o.domain for o in function.opset_import}:
            function.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


STAGES = {
    "onnxscript_optimize": onnxscript_optimize,
    "onnxoptimizer_optimize": onnxoptimizer_optimize,
    "fuse_reshape_operations": fuse_reshape_operations,
    "fix_com_microsoft_opset": fix_com_microsoft_opset,
}
