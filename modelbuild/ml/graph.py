"""ONNX graph edits shared by the rewrites in modelbuild/ml (lora_graph, lora_gemm, source_grid)."""

from __future__ import annotations


def producers_and_consumers(graph) -> tuple[dict, dict]:
    """(tensor -> the node that writes it, tensor -> the nodes that read it)."""
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return producer, consumers


def topological_order(nodes, available: set) -> list:
    """The nodes in an order where each comes after the producers of its inputs (stable: the
    given order wherever it is already valid). ``available``: tensors no node produces (graph
    inputs and initializers)."""
    ready = set(available) | {""}
    pending, done = list(nodes), []
    while pending:
        waiting = []
        for node in pending:
            if all(name in ready for name in node.input):
                done.append(node)
                ready.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            raise ValueError(f"graph has a cycle or an unproduced input at {waiting[0].name}")
        pending = waiting
    return done
