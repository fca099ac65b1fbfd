"""genai-build: HF model (+ LoRA adapters) -> onnxruntime-genai bundle with switchable adapters.

The base goes through the onnxruntime-genai model builder at the chosen precision. Adapters
stay switchable at run time instead of being baked in:

1. the base is built with the first adapter's LoRA subgraphs, and those LoRA MatMuls are
   excluded from quantization, so the base goes int4 and the LoRA weights stay float;
2. every LoRA weight becomes a graph input whose default initializer is zero: with no adapter
   active the bundle is exactly the base model;
3. in int4/int8 bundles (``fuse_lora``), before step 2, the LoRA paths that share an input
   (q/k/v, gate/up) are fused (modelbuild/ml/lora_graph.py): one A MatMul, one B MatMul and one
   packed base MatMul per group instead of one each per projection; then (``lora_gemm``) the
   decoder runs on [tokens, hidden] so that each B MatMul and its Add are one Gemm
   (modelbuild/ml/lora_gemm.py). What each costs SmolLM2-135M int4 against the merged bundle:
   bench/adapter_speed.py and bench/adapter_overhead.py, docs/benchmarks.md;
4. each adapter's LoRA weights, laid out exactly as the builder lays them out (packed QKV split,
   B pre-scaled by alpha/r) and then fused by the same code as the graph, are written as a named
   ``adapters/<name>.onnx_adapter`` that ``og.Adapters`` loads. The first adapter's weights come
   from step 1; each further adapter's from an fp32 build of base + that adapter, so the layout
   is the bundle's by construction.

Verified, not assumed: the pass loads the finished bundle in onnxruntime-genai and generates
with no adapter and with each adapter; a bundle that fails is never written.

Memory: the builder quantizes node by node (modelbuild/ml/builder.py), so a large base peaks at
its torch copy plus the quantized weights instead of ~4x its fp32 weights, and the torch fp32
reference logits are taken before the builder loads its own copy (bench/phi35_build.py).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from modelbuild import UserError
from modelbuild.ml.genai import (
    ADAPTER_DIR,
    ADAPTER_SUFFIX,
    bundle_logits,
    logit_agreement,
    verify_bundle,
    write_adapter,
)
from modelbuild.ml.hf import probe_ids, torch_logits
from modelbuild.ml.builder import run_builder
from modelbuild.ml.bundle import load_decoder_lazily, save_decoder_streaming
from modelbuild.ml.console import quiet_stdout
from modelbuild.ml.lora_gemm import lora_as_gemm
from modelbuild.ml.lora_graph import fuse_lora
from modelbuild.ml.shipping import check_adapter_names
from modelbuild.passdef import Input, PassDef, param, require

# What the built model must agree with torch fp32 on the check prompt (no adapter). Measured
# (docs/recipe.md, "genai-build checks what it built"): fp32 differs by 1e-4 on SmolLM2-135M; the lowest
# quantized agreement is SmolLM2's int4 RTN (correlation 0.85, top-1 56 %); the LM-head trap (a
# layer with vocab_size outputs taken for the head) on a tiny 2-layer Phi3 gives 0.68 in fp32
# (refused by the fp32 bound) and correlation 0.71 / top-1 31 % in int4 (refused here).
FP32_MAX_LOGIT_DIFF = 0.05
QUANT_MIN_CORRELATION = 0.75
QUANT_MIN_TOP1 = 0.25
INT4_ALGORITHMS = ("k_quant_mixed", "k_quant_last", "k_quant", "rtn", "rtn_last", "default", "source_grid")
# Ours, not the builder's: the builder makes fp32, then modelbuild.ml.source_grid quantizes.
OWN_INT4 = ("source_grid",)
# Module paths the builder gives decoder Linears (per architecture family); the LoRA MatMuls
# under them are excluded from quantization. Names that do not exist are ignored by the
# builder; the pass checks afterwards that no LoRA MatMul was quantized.
BUILDER_LINEAR_PATHS = (
    "attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj", "attn/qkv_proj", "attn/dense",
    "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj", "mlp/gate_up_proj", "mlp/fc1", "mlp/fc2",
)


@dataclass(frozen=True)
class Params:
    precision: str = param("int4", "weight precision", choices=("int4", "int8", "fp32", "fp16"))
    int4_algorithm: str = param(
        "k_quant_mixed", "int4 weight quantizer: the builder's (k_quant_mixed keeps SmolLM2 fluent where plain RTN "
        "loops), or source_grid: a base dequantized from a GGUF keeps its grid (modelbuild/ml/source_grid.py)",
        choices=INT4_ALGORITHMS,
    )
    block_size: int = param(32, "int4 quantization block size", choices=(16, 32, 64, 128, 256))
    accuracy_level: int = param(4, "MatMulNBits compute accuracy level (4 = int8 compute on CPU)", choices=(0, 1, 2, 3, 4))
    symmetric: bool = param(True, "symmetric int4 (asymmetric breaks tied-embedding models such as SmolLM2)")
    fuse_lora: str = param(
        "quantized", "one LoRA A/B MatMul pair and one packed base MatMul per group of projections sharing an input "
        "(q/k/v, gate/up; modelbuild/ml/lora_graph.py): 'quantized' in int4/int8 bundles (fp32/fp16 ones keep one "
        "MatMul per projection for quantize-onnx and precision-search, which choose per projection), or always, or never",
        choices=("quantized", "always", "never"))
    lora_gemm: bool = param(
        True, "with fused LoRA: the decoder runs on [tokens, hidden] so that each LoRA B MatMul and its Add are one "
        "Gemm (modelbuild/ml/lora_gemm.py: 4 ops fewer per layer; left 3-D where an op on the way is not row-wise)")
    extra_options: dict = param({}, "further model-builder extra_options, passed through as key=value strings")
    check_prompt: str = param("Hello! Who are you?", "prompt generated from, with and without each adapter, to verify the bundle")
    max_logit_diff: float = param(
        FP32_MAX_LOGIT_DIFF, "fp32/fp16: largest |logit| difference allowed vs torch fp32 on the check prompt (base model)")
    min_correlation: float = param(
        QUANT_MIN_CORRELATION, "int8/int4: smallest Pearson correlation of the logits with torch fp32 on the check prompt")
    min_top1: float = param(
        QUANT_MIN_TOP1, "int8/int4: smallest share of check-prompt positions whose top token agrees with torch fp32")

    def __post_init__(self):
        for key, value in self.extra_options.items():
            _check_extra_option(key, value)
        require(self.max_logit_diff > 0, "max_logit_diff", "positive", self.max_logit_diff)
        require(0 <= self.min_correlation <= 1, "min_correlation", "in [0, 1]", self.min_correlation)
        require(0 <= self.min_top1 <= 1, "min_top1", "in [0, 1]", self.min_top1)


# Builder options this pass sets from its own params: one source of truth each.
OWN_OPTIONS = {"accuracy_level": "accuracy_level", "algo_config": "int4_algorithm", "block_size": "block_size",
               "is_symmetric": "symmetric", "nodes_to_exclude": None}
# Builder options that read a file: an input the action key would not see (declare it as an input).
READS_FILES = ("adapter_path", "kv_cache_scale_file", "dflash2_path", "dspark_path")


def _check_extra_option(key: str, value) -> None:
    """A builder option that could write outside the output folder, read an undeclared file, or
    put a credential into the target file is refused when the targets load."""
    where = f"params.extra_options.{key}"
    if not isinstance(value, (str, int, float, bool)):
        raise ValueError(f"{where}: expected a string, number or boolean, got {type(value).__name__}")
    if key in OWN_OPTIONS:
        own = OWN_OPTIONS[key]
        raise ValueError(f"{where}: set by this pass" + (f"; use params.{own}" if own else " (LoRA nodes stay float)"))
    if key == "hf_token":
        raise ValueError(f"{where}: credentials never go into target files; huggingface_hub reads HF_TOKEN from the environment")
    if key in READS_FILES or key.endswith(("_path", "_file")):
        hint = "; use inputs.adapters" if key == "adapter_path" else ""
        raise ValueError(f"{where}: names a file the builder would read, which the action key cannot see{hint}")
    if key == "filename":
        name = str(value)
        if Path(name).name != name or name in ("", ".", "..") or not name.endswith(".onnx"):
            raise ValueError(f"{where}: {name!r} must be a plain file name ending in .onnx: the bundle is written "
                             "into the stage's own output folder, nowhere else")


def _builder_precision(params: Params) -> str:
    return "fp32" if params.precision == "int4" and params.int4_algorithm in OWN_INT4 else params.precision


def _builder_options(params: Params, precision: str) -> list[str]:
    options = [f"accuracy_level={params.accuracy_level}"]
    if precision == "int4":
        options += [
            f"algo_config={params.int4_algorithm}",
            f"block_size={params.block_size}",
            f"is_symmetric={str(params.symmetric).lower()}",
        ]
    options += [f"{key}={value}" for key, value in sorted(params.extra_options.items())]
    return options


def _lora_exclusions(base: Path) -> str:
    config = json.loads((base / "config.json").read_text())
    layers = config.get("num_hidden_layers") or config.get("n_layer")
    return ",".join(
        f"/model/layers.{layer}/{path}/{part}/MatMul"
        for layer in range(layers) for path in BUILDER_LINEAR_PATHS for part in ("lora_A", "lora_B")
    )


def _lora_weights(model, read) -> dict[str, object]:
    """LoRA MatMul weights by initializer name (the second input of every LoRA MatMul node), in memory."""
    import numpy as np

    initializers = {init.name: init for init in model.graph.initializer}
    weights = {}
    for node in model.graph.node:
        if "/lora_A/" in node.name or "/lora_B/" in node.name:
            if node.op_type not in ("MatMul", "Gemm") or node.input[1] not in initializers:
                raise UserError(f"LoRA node {node.name} was quantized or fused ({node.op_type}); cannot keep it switchable")
            weights[node.input[1]] = np.array(read(initializers[node.input[1]]))
    return weights


def _make_switchable(model_path: Path, fuse: bool, gemm: bool) -> tuple[dict[str, object], dict]:
    """Turn LoRA weights into graph inputs with zero defaults (after fusing the LoRA paths that
    share an input, if ``fuse``, and making each B and its Add one Gemm, if ``gemm`` too); return
    the original weights and the fusion counts."""
    import numpy as np
    from onnx import helper, numpy_helper

    model, read = load_decoder_lazily(model_path)
    fusion = fuse_lora(model, read=read) if fuse else {}
    if fuse and gemm:
        fusion["gemm"] = lora_as_gemm(model, read)  # {"left_3d": why} where the graph stays 3-D
    weights = _lora_weights(model, read)
    if not weights:
        raise UserError("the built model has no LoRA subgraph: was the adapter applied?")
    for init in model.graph.initializer:
        if init.name in weights:
            init.CopyFrom(numpy_helper.from_array(np.zeros_like(weights[init.name]), init.name))
    for name, array in sorted(weights.items()):
        elem = helper.np_dtype_to_tensor_dtype(array.dtype)
        model.graph.input.append(helper.make_tensor_value_info(name, elem, list(array.shape)))
    save_decoder_streaming(model, model_path, read)
    return weights, fusion


def _adapter_weights_fp32(base: Path, adapter: Path, device: str, scratch: Path, expected: dict, fused: list | None,
                          gemm: bool) -> dict:
    """An adapter's LoRA weights in the bundle's layout, from an fp32 build of base + adapter
    (with the bundle's ``fused`` LoRA groups fused, and its Gemm layout if ``gemm``, by the same code)."""
    out = scratch / "fp32-extract"
    shutil.rmtree(out, ignore_errors=True)
    run_builder(base, out, "fp32", device, [f"adapter_path={adapter}"], scratch)
    model, read = load_decoder_lazily(out / "model.onnx")
    if fused:
        fuse_lora(model, only=fused, read=read)
    if gemm:
        layout = lora_as_gemm(model, read)
        if "left_3d" in layout:
            raise UserError(f"adapter {adapter.name}: its fp32 build cannot take the bundle's Gemm layout ({layout['left_3d']})")
    weights = _lora_weights(model, read)
    del model, read  # the mapped data file, before it goes
    shutil.rmtree(out, ignore_errors=True)
    if set(weights) != set(expected) or any(weights[k].shape != expected[k].shape for k in weights):
        raise UserError(
            f"adapter {adapter.name}: LoRA layout (target modules / rank) differs from the first adapter's; "
            "switchable adapters of one bundle must share target modules and rank"
        )
    return {name: weights[name].astype(expected[name].dtype) for name in weights}


def run(params: Params, inputs: dict, out_dir: Path, ctx) -> None:
    base = inputs["base"]
    adapters: dict[str, Path] = inputs.get("adapters") or {}
    device = ctx.device.split(":")[0]
    from rich.console import Console

    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp, Console(stderr=True).status("") as status:
        scratch = Path(tmp)
        status.update("torch fp32 logits of the base, to check the build against")
        ids = probe_ids(base, params.check_prompt)
        expected = torch_logits(base, ids)  # before the build: never the torch model and the builder's at once
        precision = _builder_precision(params)
        options = _builder_options(params, precision)
        if adapters:
            first = next(iter(adapters.values()))
            options += [f"adapter_path={first}", f"nodes_to_exclude={_lora_exclusions(base)}"]
        status.update(f"genai builder: {params.precision} model for {device}"
                      + (f" ({params.int4_algorithm})" if params.precision == "int4" else ""))
        with quiet_stdout():
            run_builder(base, out_dir, precision, device, options, scratch,
                        progress=lambda done, total: status.update(f"genai builder: quantizing node {done}/{total}"))
        fusion = {}
        if adapters:
            names = iter(adapters.items())
            first_name, _ = next(names)
            status.update("making the LoRA weights switchable")
            fuse = params.fuse_lora == "always" or (params.fuse_lora == "quantized" and params.precision in ("int4", "int8"))
            first_weights, fusion = _make_switchable(out_dir / "model.onnx", fuse, params.lora_gemm)
            write_adapter(first_weights, out_dir / ADAPTER_DIR / f"{first_name}{ADAPTER_SUFFIX}")
            for name, path in names:
                status.update(f"adapter '{name}': fp32 build for its LoRA layout")
                with quiet_stdout():
                    weights = _adapter_weights_fp32(base, path, device, scratch, first_weights, fusion.get("modules"),
                                                    "gemms" in (fusion.get("gemm") or {}))
                write_adapter(weights, out_dir / ADAPTER_DIR / f"{name}{ADAPTER_SUFFIX}")
        grid = {}
        if precision != params.precision:
            status.update(f"{params.int4_algorithm} int4 of the fp32 build")
            grid = _quantize_source_grid(out_dir / "model.onnx", params)
        status.update("checking the built logits against torch fp32")
        agreement = _check_against_torch(out_dir, ids, expected, params)
        status.update("verifying: load in onnxruntime-genai, generate with and without each adapter")
        counts = verify_bundle(out_dir, params.check_prompt, "built bundle")
    (out_dir / "modelbuild.json").write_text(json.dumps({
        "precision": params.precision,
        "int4_algorithm": params.int4_algorithm if params.precision == "int4" else None,
        "source_grid": grid,
        "device": device,
        "adapters": sorted(adapters),
        "lora_fusion": {"groups": len(fusion["modules"]), "nodes": [fusion["nodes_before"], fusion["nodes_after"]],
                        "gemm": fusion.get("gemm")} if fusion else {},
        "verified_tokens": counts,
        "vs_torch_fp32": agreement,
    }, indent=1, sort_keys=True) + "\n")


def _quantize_source_grid(model_path: Path, params: Params) -> dict:
    """The fp32 build's MatMuls (not LoRA, not adapter-switched weights) -> MatMulNBits keeping
    the base's source grid; returns what it kept (blocks on their grid, bits per node)."""
    from modelbuild.ml.lora_graph import LORA_MARKERS
    from modelbuild.ml.precision import quantizable_matmuls
    from modelbuild.ml.source_grid import quantize_decoder

    model, read = load_decoder_lazily(model_path)
    record = quantize_decoder(model, quantizable_matmuls(model, LORA_MARKERS), block_size=params.block_size,
                              accuracy_level=params.accuracy_level, read=read)
    save_decoder_streaming(model, model_path, read)
    bits = list(record.pop("bits").values())
    return {**record, "int4_nodes": bits.count(4), "int8_nodes": bits.count(8)}


def _check_against_torch(bundle: Path, ids: list[int], expected, params: Params) -> dict:
    """The built decoder's logits on the check prompt vs torch fp32: a bundle that loads and
    generates can still be the wrong model, and must not count as built."""
    got = bundle_logits(bundle, ids)
    agreement = logit_agreement(expected, got)
    if params.precision in ("fp32", "fp16"):
        if not agreement["max_abs"] <= params.max_logit_diff:
            raise UserError(f"built {params.precision} model differs from torch fp32: max |dlogit| {agreement['max_abs']:.3g} > "
                            f"params.max_logit_diff {params.max_logit_diff:g} on the check prompt ({agreement})")
    elif not (agreement["correlation"] >= params.min_correlation and agreement["top1_agreement"] >= params.min_top1):
        raise UserError(f"built {params.precision} model does not follow torch fp32 on the check prompt: logit correlation "
                        f"{agreement['correlation']:.3f} (min {params.min_correlation:g}), top-1 agreement "
                        f"{agreement['top1_agreement']:.0%} (min {params.min_top1:.0%}); a builder mistake (e.g. a layer "
                        "with vocab_size outputs taken for the LM head) or a quantizer that breaks this model")
    return agreement


PASS = PassDef(
    name="genai-build",
    version=2,
    doc="onnxruntime-genai bundle (int4/int8/fp32) with named, run-time switchable LoRA adapters; verified to load",
    params=Params,
    inputs={
        "base": Input("Hugging Face model folder"),
        "adapters": Input("named LoRA adapter folders: { name = ':adapter-target' }", required=False, named=True),
    },
    run=run,
    libraries=("torch", "transformers", "peft", "onnx", "onnxruntime", "onnxruntime-genai"),
    devices=("cpu", "cuda"),
    check=check_adapter_names,
)
