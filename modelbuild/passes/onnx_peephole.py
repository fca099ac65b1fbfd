"""onnx-peephole: Olive's ``OnnxPeepholeOptimizer`` on an ONNX model folder or a genai bundle:
onnxscript's optimizer, onnxoptimizer's default passes, the Reshape fusion and the com.microsoft
opset fix-up, each switched by Olive's option of the same name with Olive's default
(modelbuild/ml/peephole.py). ``cast_chain_elimination`` (Olive's off-by-default fifth stage) is
refused at load.

Not graph-optimize: that pass runs onnxruntime's transformer optimizer (fusions into contrib
ops, Olive's OrtTransformersOptimization); this one simplifies in standard ONNX (constant
folding, dead nodes, identity and no-op elimination, consecutive-op fusions).

Checked before it counts as built: onnxruntime runs the input and the optimized graph on the same
probes and the logits agree within ``max_logit_diff``; a bundle must still load and generate in
onnxruntime-genai. ``peephole.json`` records the node count after each stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from modelbuild import UserError, say
from modelbuild.ml.bundle import onnx_input, save_like_input
from modelbuild.ml.graph_logits import graph_logits
from modelbuild.ml.onnx_models import compare, load_model, op_counts, probe_ids, rounded, status, write_record
from modelbuild.ml.peephole import STAGES
from modelbuild.passdef import Input, PassDef, param

RECORD = "peephole.json"


@dataclass(frozen=True)
class Params:
    onnxscript_optimize: bool = param(True, "onnxscript's optimizer (constant folding, dead code, rewrite rules)")
    onnxoptimizer_optimize: bool = param(True, "onnxoptimizer's default passes (identity/no-op elimination, consecutive-op fusions)")
    fuse_reshape_operations: bool = param(True, "Reshape(Reshape(x, s), [-1]) -> Reshape(x, [-1]) where the inner one feeds only the outer")
    fix_com_microsoft_opset: bool = param(False, "declare the com.microsoft opset on the model and every function")
    cast_chain_elimination: bool = param(False, "Olive's round-trip Cast collapse: not implemented here, refused when true")
    max_logit_diff: float = param(1e-4, "largest |logit| difference allowed between the input and the optimized graph on the probes")
    check_prompt: str = param("Hello! Who are you?", "prompt a bundle output must generate from in onnxruntime-genai")

    def __post_init__(self):
        if self.cast_chain_elimination:
            raise ValueError("params.cast_chain_elimination: not implemented: onnx-peephole runs Olive's other four stages only")
        if not any(getattr(self, stage) for stage in STAGES):
            raise ValueError(f"params: every stage is off ({', '.join(STAGES)}): nothing to do")
        if not self.max_logit_diff > 0:
            raise ValueError(f"params.max_logit_diff: must be positive, got {self.max_logit_diff}")


def run(params: Params, inputs: dict, out_dir: Path, ctx) -> None:
    source: Path = inputs["model"]
    decoder, source_file, filename = onnx_input(source, "a genai-build or quantize-onnx target")
    is_bundle = decoder is not None
    with status() as line:
        model = load_model(source_file)
        nodes = {"input": sum(op_counts(model).values())}
        for stage, optimize in STAGES.items():
            if not getattr(params, stage):
                continue
            line.update(f"onnx-peephole: {stage}")
            try:
                model = optimize(model)
            except Exception as error:  # the optimizers raise anything on graphs they do not handle
                first = (str(error).strip().splitlines() or [type(error).__name__])[0]
                raise UserError(f"params.{stage}: failed on this graph: {type(error).__name__}: {first[:200]}") from None
            nodes[stage] = sum(op_counts(model).values())
        line.update("saving the optimized graph")
        save_like_input(model, source, source_file, filename, is_bundle, out_dir)
        after = op_counts(model)
        del model
        probes = probe_ids(source)
        line.update("checking: onnxruntime logits of the input and the optimized graph")
        stats = compare(graph_logits(source_file, probes, decoder, ctx.threads, "inputs.model"),
                        graph_logits(out_dir / filename, probes, decoder, ctx.threads, "optimized graph"))
    if not stats["finite"] or not stats["max_abs_diff"] <= params.max_logit_diff:
        raise UserError(f"the optimized graph's logits differ from the input's: max |dlogit| {stats['max_abs_diff']:.3g} "
                        f"> params.max_logit_diff {params.max_logit_diff:g}")
    generated = None
    if is_bundle:
        from modelbuild.ml.genai import verify_bundle

        generated = verify_bundle(out_dir, params.check_prompt, "optimized bundle")
    say(f"'{ctx.target}': {' -> '.join(str(n) for n in nodes.values())} nodes; logits match to max |dlogit| {stats['max_abs_diff']:.2g}")
    write_record(out_dir, RECORD, {"nodes": nodes, "op_types_after": after, "generated_tokens": generated,
                                   "check": {**rounded(stats), "max_logit_diff": params.max_logit_diff, "probes": [len(p) for p in probes]}})


PASS = PassDef(
    name="onnx-peephole",
    version=1,
    doc="Olive's OnnxPeepholeOptimizer (onnxscript optimizer, onnxoptimizer, Reshape fusion, com.microsoft opset) on an ONNX folder or genai bundle; checked against the input's logits",
    params=Params,
    inputs={"model": Input("ONNX model folder (onnx-export, graph-optimize) or onnxruntime-genai bundle")},
    run=run,
    libraries=("onnx", "onnxscript", "onnxoptimizer", "onnxruntime", "onnxruntime-genai", "tokenizers", "numpy"),
)
