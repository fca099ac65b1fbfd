"""GraphSurgeries surgeons -> steps of a ``graph-surgery`` target (modelbuild/ml/surgeons.py has
the surgeons). Consecutive surgeons of one GraphSurgeries pass become one target whose ``steps``
follow Olive's order; TieWordEmbeddings stays its own pass (tie-embeddings, passes.py).

GemmToMatMulAdd needs no step where the chain's graph is modelbuild's own (onnx-export and
genai-build write Linear as MatMul: what the surgeon makes of Olive's TorchScript export), and is
refused on an ONNX file given as the input model, which may hold Gemm nodes. PackedAttentionToLoopMHA
is refused: its op exists only in Olive's vision exports.
"""

from __future__ import annotations

from modelbuild.ml.surgeons import OPTIONS, REFUSED, parse_step

from .chain import Chain
from .model import Artifact, Target
from .workflow import PassEntry

STEPS = set(OPTIONS) | {"GemmToMatMulAdd", "PackedAttentionToLoopMHA"}


def surgery_step(chain: Chain, e: PassEntry, index: int, path: str, surgery: dict, notes: list[str]) -> None:
    """Map one surgeon (``surgery``, the pass's ``index``-th, at JSON ``path``) of pass ``e``."""
    surgeon = surgery["surgeon"]
    if surgeon == "PackedAttentionToLoopMHA":
        return chain.unsupported(f"{path}.surgeon", f"{surgeon}: {REFUSED[surgeon]}")
    if chain.art.kind not in ("onnx", "bundle"):
        return chain.unsupported(f"{path}.surgeon", f"{surgeon} rewrites an ONNX graph, but the chain holds a Hugging Face model here")
    if surgeon == "GemmToMatMulAdd":
        if chain.art.target is None:
            return chain.unsupported(f"{path}.surgeon", f"{surgeon}: the input ONNX model may hold Gemm nodes, and graph-surgery has no Gemm rewrite")
        chain.pending_comments.append(f"Olive pass '{e.key}' at {path}: GemmToMatMulAdd needs no step: {chain.art.target.name} "
                                      f"({chain.art.target.pass_name}) writes Linear layers as MatMul already")
        return
    try:
        step = parse_step(surgery, path)
    except ValueError as error:  # "<json path>: why", the path at or under ``path``
        where, _, why = str(error).partition(": ")
        return chain.unsupported(where, why)
    written = {"surgeon": step.surgeon, **{k: v for k, v in surgery.items() if k != "surgeon"}}
    name = chain.tname(e.key)
    if any(t.name == name for t in chain.targets):  # surgeries split by a TieWordEmbeddings: the later ones by index
        name = chain.tname(f"{e.key}-{index}")
    last = chain.art.target
    if last is not None and last.pass_name == "graph-surgery" and last.doc.endswith(f"(Olive pass '{e.key}', GraphSurgeries)"):
        last.params["steps"].append(written)  # the next surgeon of the same pass: one more step
        return
    target = Target(name, "graph-surgery", {"steps": [written]}, {"model": chain.art.ref},
                    doc=f"graph surgeries (Olive pass '{e.key}', GraphSurgeries)")
    art = chain.add(target, e, notes)
    chain.art = Artifact(art.ref, chain.art.kind, chain.art.precision, art.target)
