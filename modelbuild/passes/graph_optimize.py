"""graph-optimize: onnxruntime's transformer optimizer on a plain ONNX model folder.

``onnxruntime.transformers.optimizer.optimize_model`` (what Olive's ``OrtTransformersOptimization``
runs) first lets onnxruntime's own graph optimizer simplify the graph (``opt_level`` 1: basic,
constant folding and redundant-node removal; 2: extended, onnxruntime's contrib-op fusions such as
QuickGelu; 99: all; 0: none), then pattern-matches subgraphs into fused contrib ops: attention,
LayerNormalization / SkipLayerNormalization, SimplifiedLayerNormalization and
SkipSimplifiedLayerNormalization (RMSNorm, alone and with the residual Add before it), Gelu /
FastGelu / BiasGelu, rotary embeddings. Which of them match depends on how the graph was exported:
on a torch.onnx dynamo export of a Llama/Phi-3 decoder (onnx-export) the RMSNorms fuse (every
one of them), SiLU becomes QuickGelu at opt_level >= 2, and attention does not (its decomposed
scaled-dot-product with the causal mask is not a pattern the optimizer knows).

Measured on SmolLM2-135M (bench/onnx_passes_bench.py): all 61 RMSNorms fuse (60 with their
residual Add), 2176 -> 1749 nodes, logits within 2e-4 of the export, and the 128-token prefill
is as fast as the export's (onnxruntime applies the same fusions itself when it loads a session).
One cost: with tied embeddings, onnxruntime's constant folding (``opt_level`` >= 1) stores the LM
head's transposed copy of the embedding as a second initializer (+109 MB on SmolLM2); ``opt_level``
0 gives the same fusions at the export's size.

``model_type`` picks the optimizer's fusion set; empty derives it from the model's config.json:
decoder LLMs (llama, mistral, qwen2, phi3, gemma, ...) use the ``gpt2`` set (as Olive's LLM
recipes do), BERT-like encoders ``bert``, and so on (``MODEL_TYPES`` below).

Checked before it counts as built: onnxruntime runs the input and the optimized model on the same
probe sequences and their logits agree to ``max_logit_diff``. ``graph_optimize.json`` records the
optimizer's fused-operator statistics, node counts before and after, and the check's figures.
The same input and params give byte-identical output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from modelbuild import UserError, say
from modelbuild.ml.console import quiet_onnxruntime
from modelbuild.ml.onnx_models import (
    compare,
    copy_source_files,
    load_graph,
    logits,
    model_path,
    op_counts,
    probe_ids,
    read_config,
    rounded,
    save_model,
    status,
    write_record,
)
from modelbuild.passdef import Input, PassDef, param

RECORD = "graph_optimize.json"
# onnxruntime 1.31's optimizer model types (onnxruntime.transformers.optimizer.MODEL_TYPES).
OPTIMIZER_TYPES = ("bart", "bert", "bert_keras", "bert_tf", "clip", "conformer", "gpt2", "gpt2_tf", "gpt_neox", "mmdit",
                   "phi", "qwen3", "sam2", "swin", "t5", "tnlr", "unet", "vae", "vit")
# config.json model_type -> optimizer model type.
_DECODERS = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "phi3", "phimoe", "gemma", "gemma2", "gemma3_text",
             "granite", "olmo", "olmo2", "starcoder2", "stablelm", "cohere", "smollm3", "gpt2",
             # the optimizer's own "phi" type expects phi-2's old dynamo export (local functions)
             # and fails on today's exports; the gpt2 set fuses its LayerNorms and Gelu.
             "phi")
_ENCODERS = ("bert", "roberta", "distilbert", "xlm-roberta", "electra", "camembert", "albert", "mpnet")
FROM_CONFIG = {
    **{name: "gpt2" for name in _DECODERS},
    **{name: "bert" for name in _ENCODERS},
    "gpt_neox": "gpt_neox", "qwen3": "qwen3", "bart": "bart", "t5": "t5", "mt5": "t5", "vit": "vit",
    "swin": "swin", "clip": "clip",
}


@dataclass(frozen=True)
class Params:
    model_type: str = param("", "optimizer model type (fusion set); empty: from config.json's model_type (llama, phi3, mistral, qwen2... -> gpt2)",
                            choices=("",) + OPTIMIZER_TYPES)
    opt_level: int = param(1, "onnxruntime graph optimization before the fusions: 0 none, 1 basic, 2 extended (contrib-op fusions, CPU-specific), 99 all",
                           choices=(0, 1, 2, 99))
    num_heads: int = param(0, "attention heads for the attention fusion; 0: config.json's num_attention_heads")
    hidden_size: int = param(0, "hidden size for the attention fusion; 0: config.json's hidden_size")
    only_onnxruntime: bool = param(False, "only onnxruntime's graph optimizer (opt_level 1, 2 or 99), none of the Python fusions")
    max_logit_diff: float = param(1e-3, "largest |logit| difference allowed between the input and the optimized model on the probes")

    def __post_init__(self):
        if self.num_heads < 0 or self.hidden_size < 0:
            key = "num_heads" if self.num_heads < 0 else "hidden_size"
            raise ValueError(f"params.{key}: must be 0 (from config.json) or positive, got {getattr(self, key)}")
        if self.only_onnxruntime and self.opt_level == 0:
            raise ValueError("params.only_onnxruntime: needs params.opt_level 1, 2 or 99 (opt_level 0 would do nothing)")
        if not self.max_logit_diff > 0:
            raise ValueError(f"params.max_logit_diff: must be positive, got {self.max_logit_diff}")


def resolve_model_type(params: Params, config: dict) -> tuple[str, str]:
    """(optimizer model type, where it came from)."""
    if params.model_type:
        return params.model_type, "params.model_type"
    hf_type = config.get("model_type")
    if not isinstance(hf_type, str):
        raise UserError("params.model_type: empty and the input has no config.json model_type to derive it from; set it "
                        f"(one of {', '.join(OPTIMIZER_TYPES)})")
    if hf_type not in FROM_CONFIG:
        raise UserError(f"params.model_type: config.json model_type '{hf_type}' has no known optimizer type; set "
                        f"params.model_type (decoder LLMs: gpt2; one of {', '.join(OPTIMIZER_TYPES)})")
    return FROM_CONFIG[hf_type], f"config.json model_type '{hf_type}'"


def _from_config(value: int, config: dict, keys: tuple[str, ...]) -> int:
    if value:
        return value
    for key in keys:
        if isinstance(config.get(key), int):
            return config[key]
    return 0  # the optimizer then reads it from the graph where it can


def run(params: Params, inputs: dict, out_dir: Path, ctx) -> None:
    source: Path = inputs["model"]
    source_file = model_path(source)
    config = read_config(source)
    model_type, type_from = resolve_model_type(params, config)
    num_heads = _from_config(params.num_heads, config, ("num_attention_heads", "n_head", "encoder_attention_heads"))
    hidden_size = _from_config(params.hidden_size, config, ("hidden_size", "n_embd", "d_model"))
    probes = probe_ids(source)

    with status() as line:
        line.update(f"graph-optimize: '{model_type}' fusions, opt_level {params.opt_level}"
                    + (" (onnxruntime only)" if params.only_onnxruntime else ""))
        before = op_counts(load_graph(source_file))
        with quiet_onnxruntime():
            from onnxruntime.transformers.optimizer import MODEL_TYPES, optimize_model

            if model_type not in MODEL_TYPES:
                raise UserError(f"params.model_type: '{model_type}' is not an optimizer type of this onnxruntime "
                                f"(known: {', '.join(sorted(MODEL_TYPES))})")
            try:
                optimizer = optimize_model(str(source_file), model_type=model_type, num_heads=num_heads,
                                           hidden_size=hidden_size, opt_level=params.opt_level, use_gpu=False,
                                           only_onnxruntime=params.only_onnxruntime)
            except Exception as error:  # the optimizer's fusions raise anything on graphs they did not expect
                first = (str(error).strip().splitlines() or [type(error).__name__])[0]
                raise UserError(f"onnxruntime's transformer optimizer failed (model_type '{model_type}'): "
                                f"{type(error).__name__}: {first}") from None
            fused = {k: int(v) for k, v in sorted(optimizer.get_fused_operator_statistics().items())}
            optimizer.topological_sort()
        after = op_counts(optimizer.model)
        line.update("saving the optimized model")
        out_file = save_model(optimizer.model, out_dir)
        del optimizer

        line.update("checking: onnxruntime logits of the input and the optimized model on the probes")
        reference = logits(source_file, probes, ctx.threads, "inputs.model")
        got = logits(out_file, probes, ctx.threads, "optimized model")
    stats = compare(reference, got)
    if not stats["finite"] or not stats["max_abs_diff"] <= params.max_logit_diff:
        raise UserError(f"optimized model's logits differ from the input's: max |dlogit| {stats['max_abs_diff']:.3g} "
                        f"> params.max_logit_diff {params.max_logit_diff:g}")
    done = {k: v for k, v in fused.items() if v}
    say(f"'{ctx.target}': fused {', '.join(f'{k} x{v}' for k, v in done.items()) or 'nothing'}; "
        f"{sum(before.values())} -> {sum(after.values())} nodes; logits match to max |dlogit| {stats['max_abs_diff']:.2g}")

    copy_source_files(source, out_dir)
    write_record(out_dir, RECORD, {
        "model_type": model_type,
        "model_type_from": type_from,
        "opt_level": params.opt_level,
        "only_onnxruntime": params.only_onnxruntime,
        "num_heads": num_heads,
        "hidden_size": hidden_size,
        "fused_operators": fused,
        "nodes_before": sum(before.values()),
        "nodes_after": sum(after.values()),
        "op_types_before": before,
        "op_types_after": after,
        "check": {**rounded(stats), "max_logit_diff": params.max_logit_diff, "probes": [len(p) for p in probes]},
    })


PASS = PassDef(
    name="graph-optimize",
    version=1,
    doc="onnxruntime transformer optimizer on an ONNX model folder (RMSNorm/LayerNorm, Gelu, attention fusions); checked against the input's logits",
    params=Params,
    inputs={"model": Input("ONNX model folder (model.onnx + model.onnx.data), e.g. an onnx-export target")},
    run=run,
    libraries=("onnx", "onnxruntime", "tokenizers", "numpy"),
)
