"""Handlers of the ONNX graph passes the CPU/CUDA LLM recipes use after their model is built:
DynamicToFixedShape -> fixed-shape, MatMulNBitsToQDQ -> nbits-to-qdq, OnnxPeepholeOptimizer ->
onnx-peephole. Each carries Olive's
options as the pass's params and validates them with the pass's own typed config, so a bad
combination is one line at import, naming the JSON path, not a file ``doit`` then refuses.
"""

from __future__ import annotations

from typing import Any

from .chain import Chain, Options
from .model import STORAGE, Artifact, Target
from .workflow import PassEntry


def _layout_only(o: Options) -> None:
    """Olive's external-data options say how it lays out its files; modelbuild writes its own
    layout and the graph and weights are the same either way: known, nothing to carry."""
    o.known.update(STORAGE)


def _validated(chain: Chain, e: PassEntry, params_class: type, params: dict) -> None:
    try:
        params_class(**params)
    except ValueError as error:  # "params.<key>: why"
        key, _, why = str(error).partition(": ")
        raise chain.fail(f"{e.path}.{key.removeprefix('params.')}", why) from None


def dynamictofixedshape(chain: Chain, e: PassEntry, o: Options) -> None:
    from modelbuild.passes.fixed_shape import Params

    params: dict[str, Any] = {}
    for key, kinds in (("dim_param", (list,)), ("dim_value", (list,)), ("input_name", (list,)), ("input_shape", (list,))):
        value = o.get(key, kinds)
        if value:
            params[key] = value
    _layout_only(o)
    _validated(chain, e, Params, params)
    if not chain.need(e, "onnx", "bundle"):
        return
    source = chain.art
    art = chain.add(Target(chain.tname(e.key), "fixed-shape", params, {"model": source.ref}, doc=f"fixed shapes (Olive pass '{e.key}')"), e, o.finish())
    chain.art = Artifact(art.ref, source.kind, source.precision, art.target)


def matmulnbitstoqdq(chain: Chain, e: PassEntry, o: Options) -> None:
    from modelbuild.passes.nbits_to_qdq import Params

    params: dict[str, Any] = {}
    for key in ("use_transpose_op", "use_int4", "use_signed_int", "add_zero_point"):
        value = o.get(key, (bool,))
        if value is not None:
            params[key] = value
    exclude = o.get("nodes_to_exclude", (list,))
    if exclude:
        params["nodes_to_exclude"] = [str(x) for x in exclude]
    _layout_only(o)
    _validated(chain, e, Params, params)
    if not chain.need(e, "onnx", "bundle"):
        return
    source = chain.art
    if source.kind == "bundle" and source.precision not in ("int4", "int8"):
        return chain.unsupported(f"{e.path}.type", f"MatMulNBitsToQDQ converts MatMulNBits nodes; the chain's bundle is {source.precision}, which has none")
    art = chain.add(Target(chain.tname(e.key), "nbits-to-qdq", params, {"model": source.ref}, doc=f"MatMulNBits as DequantizeLinear + MatMul (Olive pass '{e.key}')"),
                    e, o.finish())
    chain.art = Artifact(art.ref, source.kind, "qdq", art.target)  # no MatMulNBits left for a pass that needs them


def onnxpeepholeoptimizer(chain: Chain, e: PassEntry, o: Options) -> None:
    from modelbuild.passes.onnx_peephole import Params

    params: dict[str, Any] = {}
    for key in ("onnxscript_optimize", "onnxoptimizer_optimize", "fuse_reshape_operations", "fix_com_microsoft_opset", "cast_chain_elimination"):
        value = o.get(key, (bool,))
        if value is not None:
            params[key] = value
    _layout_only(o)
    if params.get("cast_chain_elimination"):
        return chain.unsupported(o.path("cast_chain_elimination"), "onnx-peephole runs OnnxPeepholeOptimizer's other four stages, not the Cast round-trip collapse")
    _validated(chain, e, Params, params)
    if not chain.need(e, "onnx", "bundle"):
        return
    source = chain.art
    art = chain.add(Target(chain.tname(e.key), "onnx-peephole", params, {"model": source.ref}, doc=f"peephole-optimized graph (Olive pass '{e.key}')"),
                    e, o.finish())
    chain.art = Artifact(art.ref, source.kind, source.precision, art.target)
