"""The Olive pass handlers of the ONNX-side, builder, LoRA, adapter and surgery passes (torch-side
quantizers: quantizers.py): one function per pass family, ``(chain, entry, options)``, called
through mapping.py's HANDLERS table.

Each reads the pass's options through ``Options`` (typed; unknown options are errors; options that
modelbuild cannot carry are left out: a ``# left out:`` comment, a stderr line, a count), checks
what the chain holds (``need``) and adds targets, or refuses with ``unsupported``.
"""

from __future__ import annotations

import json
from typing import Any

from . import surgery as surgery_steps
from .chain import Chain, Options
from .model import BLOCK_SIZES, NAME_SAFE, STORAGE, SURGEONS, Artifact, Pending, Target, norm_type
from .workflow import PassEntry, expect


def modelbuilder(chain: Chain, e: PassEntry, o: Options) -> None:
    precision = o.get("precision", (str,), "fp32")
    if o.get("metadata_only", (bool,), False):
        return chain.unsupported(o.path("metadata_only"), "ModelBuilder metadata_only (genai_config for an ONNX model exported elsewhere) has no counterpart: genai-build builds the whole bundle")
    if precision not in ("fp32", "fp16", "int8", "int4"):
        return chain.unsupported(o.path("precision"), f"precision {precision!r}: genai-build builds fp32, fp16, int8 or int4")
    if not chain.need(e, "hf"):
        return
    params: dict[str, Any] = {}
    notes: list[str] = []
    extra = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (o.get("extra_options", (dict,), {}) or {}).items()}
    for key in ("enable_cuda_graph", "exclude_embeds", "exclude_lm_head", "use_qdq", "use_8bits_moe", "use_webgpu_fp32", "include_hidden_states"):
        value = o.get(key, (bool,))
        if value is not None:
            extra[key] = "true" if value else "false"
    op_types = o.get("int4_op_types_to_quantize", (list,))
    if op_types:
        extra["int4_op_types_to_quantize"] = "/".join(map(str, op_types))
    exclude = o.get("int4_nodes_to_exclude", (list,))
    if exclude:
        extra["int4_nodes_to_exclude"] = ",".join(map(str, exclude))
    block = o.get("int4_block_size", (int,), None, BLOCK_SIZES)
    level = o.get("int4_accuracy_level", (int,), None, (0, 1, 2, 3, 4))
    sym = o.get("int4_is_symmetric", (bool,))
    algo = o.get("int4_algo_config", (str,))
    o.same(*STORAGE)
    o.note("search", "use_dynamo_exporter", "int4_tied_embeddings")
    if o.get("use_ort_genai", (bool,)) is False:
        o.note("use_ort_genai", why="genai-build always writes an onnxruntime-genai bundle")
    pend = chain.pending
    if pend.precision == "int8" and precision == "int4":
        precision = "int8"
        notes.append(f"params.precision = \"int8\": {pend.sources[0][0]} quantized the torch model to 8 bits")
    quantize_after = precision == "int4" and (pend.algorithm == "gptq" or pend.int8_nodes)
    if pend.mixed and quantize_after:
        # quantize-onnx carries k_quant_mixed's 8-bit LM head by name; its 8-bit layers need the layer count
        if "/lm_head/MatMul" not in pend.int8_nodes:
            pend.int8_nodes.append("/lm_head/MatMul")
        pend.sources = [(path, "SelectiveMixedPrecision k_quant_mixed: the LM head in int8 (quantize-onnx int8_nodes)") if path == pend.mixed_path else (path, text)
                        for path, text in pend.sources]
        chain.leave_out(pend.mixed_path, "its 8-bit q/k/v and down_proj in the first and last eighth of the layers and every third between: "
                        "quantize-onnx's int8_nodes carries the LM head; those layers stay int4", pend.mixed)
        pend.mixed = ""
    if (pend.algorithm or pend.int8_nodes or pend.mixed) and precision != "int4":
        path, text = pend.sources[0]
        chain.unsupported(path, f"{text} quantizes to int4, but ModelBuilder {e.path} builds {precision}")
        chain.pending = pend = Pending()
    if quantize_after:  # the builder makes fp32 here; its int4 options would do nothing in silence
        for key in ("int4_op_types_to_quantize", "int4_nodes_to_exclude"):
            if key in extra and extra.pop(key) != "MatMul":
                chain.leave_out(o.path(key), "quantize-onnx quantizes the MatMuls of the fp32 build (the embedding Gather stays float; no per-node exclusions)")
        if block is not None and block != pend.block_size:
            chain.leave_out(o.path("int4_block_size"), f"quantize-onnx quantizes every MatMul at the torch quantizer's block ({pend.block_size or 32})")
        if pend.algorithm == "gptq" and not pend.lm_head_quantized:
            path = next(p for p, t in pend.sources if t.startswith("gptq"))
            chain.leave_out(f"{path}.lm_head", "the LM head as Olive's ModelBuilder rounds it (its own int4 default): quantize-onnx's gptq rounds it with the rest", False)
    params["precision"] = "fp32" if quantize_after else precision
    if precision == "int4" and not quantize_after:
        if pend.algorithm in ("rtn", "awq"):
            params["int4_algorithm"] = "rtn"
            block = pend.block_size or block
            sym = pend.symmetric if pend.symmetric is not None else sym
            notes.append(f"params.int4_algorithm = \"rtn\": the int4 grid of {', '.join(p for p, _ in pend.sources)}")
        elif pend.mixed:
            params["int4_algorithm"] = pend.mixed
            notes.append(f"params.int4_algorithm = \"{pend.mixed}\": from {pend.sources[0][0]}")
        else:
            params["int4_algorithm"] = {"rtn_last": "rtn_last", "k_quant_mixed": "k_quant_mixed", "k_quant_last": "k_quant_last",
                                        "k_quant": "k_quant", "rtn": "rtn"}.get((algo or "default").lower(), None) or "default"
            if algo and algo.lower() not in ("rtn_last", "k_quant_mixed", "k_quant_last", "k_quant", "rtn", "default"):
                return chain.unsupported(o.path("int4_algo_config"), f"{algo!r}: genai-build int4_algorithm is one of default, rtn, rtn_last, k_quant, k_quant_last, k_quant_mixed")
            if not algo:
                notes.append("params.int4_algorithm = \"default\": Olive's ModelBuilder default (modelbuild's own default is k_quant_mixed)")
        if block is not None:
            params["block_size"] = block
        if level is not None:
            params["accuracy_level"] = level
        if sym is not None:
            params["symmetric"] = sym
    if extra:
        params["extra_options"] = extra
    inputs: dict[str, Any] = {"base": chain.art.ref}
    if chain.adapters:
        inputs["adapters"] = dict(chain.adapters)
        notes.append(f"adapters {', '.join(chain.adapters)}: kept switchable (.onnx_adapter), as ExtractAdapters makes them")
    device = chain.device
    name = chain.tname(e.key)
    if quantize_after:
        fp32 = Target(f"{name}-fp32", "genai-build", params, inputs, device, doc=f"fp32 bundle for {name} (Olive pass '{e.key}')")
        chain.add(fp32, e, notes + [f"params.precision = \"fp32\": int4 in {name} (quantize-onnx: {', '.join(t for _, t in pend.sources)})"] + o.finish())
        q_params: dict[str, Any] = {"algorithm": "gptq" if pend.algorithm == "gptq" else "rtn"}
        q_params["block_size"] = pend.block_size or block or 32
        if pend.symmetric is not None:
            q_params["symmetric"] = pend.symmetric
        if level is not None:
            q_params["accuracy_level"] = level
        if pend.int8_nodes:
            q_params["int8_nodes"] = list(pend.int8_nodes)
        q_inputs = {"bundle": f":{fp32.name}"}
        if pend.algorithm == "gptq":
            q_inputs["calibration"] = pend.calibration
        quant = Target(name, "quantize-onnx", q_params, q_inputs, "cpu", doc=f"int4 bundle (Olive pass '{e.key}' after {', '.join(p for p, _ in pend.sources)})")
        if device != "cpu":
            quant.comments.append(f"runs on cpu (quantize-onnx is a CPU pass); the bundle keeps {fp32.name}'s device ({device})")
        quant.comments.append("int4 as Olive's torch-side quantizers chose it:")
        quant.comments += [f"  {p}: {t}" for p, t in pend.sources]
        if "int8_nodes" in q_params:
            quant.comments.append(f"  params.int8_nodes = {json.dumps(q_params['int8_nodes'])}: the 8-bit LM head")
        art = chain.add(quant, None, [])
    else:
        art = chain.add(Target(name, "genai-build", params, inputs, device, doc=f"onnxruntime-genai bundle (Olive pass '{e.key}')"), e, notes + o.finish())
    chain.art = Artifact(art.ref, "bundle", precision, art.target)
    chain.pending = Pending()


def onnxconversion(chain: Chain, e: PassEntry, o: Options) -> None:
    opset = o.get("target_opset", (int,))
    dtype = o.get("torch_dtype", (str,))
    o.same(*STORAGE, "use_dynamo_exporter", "torch_dtype")  # onnx-export is the dynamo exporter; torch_dtype: below
    # Olive's defaults are what onnx-export does (on the CPU, the HF past_key_values, no genai metadata); other values are left out
    for key, default in (("device", "cpu"), ("past_key_value_name", "past_key_values"), ("save_metadata_for_token_generation", False),
                         ("use_ort_genai", False)):
        if o.get(key, (str, bool), default) == default:
            o.same(key)
        else:
            o.note(key)
    o.note("dynamic", "use_device", "optimize", "merge_adapter_weights")
    if not chain.need(e, "hf"):
        return
    if chain.pending.sources:
        path, text = chain.pending.sources[0]
        chain.unsupported(path, f"{text} writes a quantized torch model for OnnxConversion: modelbuild quantizes the ONNX model instead (ModelBuilder + quantize-onnx)")
        chain.pending = Pending()
    notes = []
    if chain.adapters:
        merged = Target(f"{chain.tname(e.key)}-merged", "lora-merge", {}, {"base": chain.art.ref, "adapter": next(iter(chain.adapters.values()))},
                        doc="the LoRA adapter merged into the base, for OnnxConversion")
        chain.art = chain.add(merged, None, ["OnnxConversion exports the model with its adapter merged (lora-merge)"])
        chain.adapters = {}
    params = {}
    if opset is not None:
        params["opset"] = min(max(opset, 18), 23)
        if params["opset"] != opset:
            chain.leave_out(o.path("target_opset"), f"torch.onnx's dynamo exporter writes opset 18 to 23: onnx-export writes {params['opset']}")
    if dtype and dtype not in ("float32", "fp32"):
        chain.leave_out(o.path("torch_dtype"), "onnx-export exports in float32 (an OnnxFloatToFloat16 pass gives fp16)")
    art = chain.add(Target(chain.tname(e.key), "onnx-export", params, {"model": chain.art.ref}, doc=f"ONNX export (Olive pass '{e.key}')"), e, notes + o.finish())
    chain.art = Artifact(art.ref, "onnx", "fp32", art.target)


def orttransformersoptimization(chain: Chain, e: PassEntry, o: Options) -> None:
    params: dict[str, Any] = {}
    model_type = o.get("model_type", (str,))
    if model_type:
        params["model_type"] = model_type
    level = o.get("opt_level", (int,), None, (0, 1, 2, 99))
    if level is not None:
        params["opt_level"] = level
    for key in ("num_heads", "hidden_size"):
        value = o.get(key, (int,))
        if value:
            params[key] = value
    if o.get("only_onnxruntime", (bool,)) is not None:
        params["only_onnxruntime"] = o.entry.options["only_onnxruntime"]
    fp16 = o.get("float16", (bool,), False)
    keep_io = o.get("keep_io_types", (bool,), False)
    fp32_ops = o.get("force_fp32_ops", (list,), [])
    o.same(*STORAGE)
    if chain.art.kind == "bundle":
        o.same("use_gpu", "optimization_options", "use_gqa", "input_int32", "force_fp16_inputs", "ep_path", "opt_level_ext", "model_type", "opt_level", "num_heads", "hidden_size", "only_onnxruntime", "keep_io_types", "force_fp32_ops")
        chain.pending_comments.append(f"Olive pass '{e.key}' ({e.type}) at {e.path}: no target of its own: {chain.art.ref.lstrip(':')} comes from the model builder, whose graph is already fused "
                                     "(GroupQueryAttention, SkipSimplifiedLayerNormalization, RotaryEmbedding, MatMulNBits); graph-optimize optimizes plain ONNX exports (OnnxConversion -> onnx-export)")
        o.finish()
        if fp16 and not chain.rebuild_as(e, "fp16", "float16 = true"):
            chain.unsupported(o.path("float16"), "float16 on a genai bundle that is not an fp32 ModelBuilder output")
        return
    o.note("use_gpu", "optimization_options", "use_gqa", "input_int32", "force_fp16_inputs", "ep_path", "opt_level_ext")
    if not chain.need(e, "onnx"):
        return
    source = chain.art
    art = chain.add(Target(chain.tname(e.key), "graph-optimize", params, {"model": source.ref}, doc=f"onnxruntime transformer optimizer (Olive pass '{e.key}')"),
                   e, (["model_type from config.json"] if not model_type else []) + o.finish())
    chain.art = Artifact(art.ref, source.kind, source.precision, art.target)
    if fp16:
        half = Target(f"{chain.tname(e.key)}-fp16", "onnx-fp16", {"keep_io_types": keep_io, "op_block_list": [str(x) for x in fp32_ops]}, {"model": chain.art.ref},
                      doc=f"fp16 of {art.target.name} (Olive pass '{e.key}', float16 = true)")
        art = chain.add(half, None, [f"from {o.path('float16')}: the optimizer's fp16 conversion as its own target"])
        chain.art = Artifact(art.ref, source.kind, "fp16", art.target)


def onnxfloattofloat16(chain: Chain, e: PassEntry, o: Options) -> None:
    keep_io = o.get("keep_io_types", (bool,), False)
    blocked = o.get("op_block_list", (list,), []) or []
    nodes = o.get("node_block_list", (list,), []) or []
    o.same(*STORAGE, "disable_shape_infer")
    o.note("min_positive_val", "max_finite_val")
    if chain.art.kind == "bundle":
        o.finish()
        if not chain.rebuild_as(e, "fp16", "the model builder writes fp16 itself; onnx-fp16 converts plain ONNX exports"):
            chain.unsupported(f"{e.path}.type", f"OnnxFloatToFloat16 on a {chain.art.precision} genai bundle: onnx-fp16 converts plain ONNX exports, genai-build builds fp16 from fp32 only")
        return
    if not chain.need(e, "onnx"):
        return
    params = {"keep_io_types": keep_io, "op_block_list": [str(x) for x in blocked]}
    if nodes:
        params["node_block_list"] = [str(x) for x in nodes]
    source = chain.art
    art = chain.add(Target(chain.tname(e.key), "onnx-fp16", params, {"model": source.ref}, doc=f"fp16 ONNX (Olive pass '{e.key}')"),
                   e, [f"params.keep_io_types = {str(keep_io).lower()}: written out (Olive's default is false, onnx-fp16's true)"] + o.finish())
    chain.art = Artifact(art.ref, source.kind, "fp16", art.target)


# olive/passes/onnx/{rtn,kquant,hqq}_quantization.py at v0.13.0: block size and accuracy level (unset = 0)
# where a workflow gives none (quantize-onnx's own defaults are block 32, accuracy level 4)
OLIVE_NBITS_DEFAULTS = {
    "onnxblockwisertnquantization": {"block_size": 128, "accuracy_level": 0},
    "onnxkquantquantization": {"block_size": 32, "accuracy_level": 0},
    "onnxhqqquantization": {"block_size": 128, "accuracy_level": 0},
}


def nbits(chain: Chain, e: PassEntry, o: Options) -> None:
    kind = norm_type(e.type)
    algorithm = {"onnxblockwisertnquantization": "rtn", "onnxkquantquantization": "k_quant", "onnxhqqquantization": "hqq"}.get(kind)
    if algorithm is None:
        written = o.get("algorithm", (str,), "DEFAULT")
        algorithm = {"default": "rtn", "rtn": "rtn", "hqq": "hqq", "gptq": "gptq", "kquant": "k_quant", "k_quant": "k_quant"}.get(written.lower())
        if algorithm is None:
            return chain.unsupported(o.path("algorithm"), f"{written!r}: quantize-onnx runs rtn, k_quant, hqq or gptq")
    bits = o.get("bits", (int,), 4)
    if bits != 4:
        return chain.unsupported(o.path("bits"), f"{bits}-bit MatMulNBits: quantize-onnx writes int4 (int8 per node: int8_nodes)")
    params: dict[str, Any] = {"algorithm": algorithm}
    defaults = OLIVE_NBITS_DEFAULTS.get(kind, {})  # Olive 0.13's, written out where the workflow is silent
    notes = [f"params.{key} = {json.dumps(value)}: Olive's {e.type} default" for key, value in defaults.items()
             if o.entry.options.get(key) is None]
    block = o.get("block_size", (int,), defaults.get("block_size"), BLOCK_SIZES)
    if block is not None:
        params["block_size"] = block
    sym = o.get("is_symmetric", (bool,))
    if sym is not None:
        params["symmetric"] = sym
    level = o.get("accuracy_level", (int,), defaults.get("accuracy_level"), (0, 1, 2, 3, 4))
    if level is not None:
        params["accuracy_level"] = level
    int8 = []
    for node, spec in (o.get("customized_weight_config", (dict,), {}) or {}).items():
        if isinstance(spec, dict) and set(spec) == {"bits"} and spec["bits"] == 8:
            int8.append(str(node))
        elif not (isinstance(spec, dict) and set(spec) == {"bits"} and spec["bits"] == 4):
            chain.leave_out(f"{o.path('customized_weight_config')}.{node}", "quantize-onnx takes int4 with int8 per node (int8_nodes), nothing else per node")
    if int8:
        params["int8_nodes"] = int8
    exclude = o.get("nodes_to_exclude", (list,), []) or []
    if exclude:
        params["keep_float"] = [str(x) for x in exclude]
    o.same(*STORAGE)
    o.note("op_types_to_quantize", "nodes_to_include", "axis", "quant_format", "weight_only_quant_configs", "quant_axes", "calibration_sampling_size")
    if algorithm != "gptq":
        o.note("data_config", why=f"{algorithm} needs no data")
    if not chain.need(e, "bundle"):
        return
    inputs = {"bundle": chain.art.ref}
    if algorithm == "gptq":
        inputs["calibration"] = chain.calibration(o, e.path)
    if chain.art.precision != "fp32":
        upstream = chain.art.target
        if upstream is None or upstream.pass_name != "genai-build":
            return chain.unsupported(f"{e.path}.type", f"quantize-onnx quantizes an fp32 genai bundle; this one is {chain.art.precision}")
        upstream.params["precision"] = "fp32"
        for key in ("int4_algorithm", "block_size", "accuracy_level", "symmetric"):
            upstream.params.pop(key, None)
        upstream.comments.append(f"  params.precision = \"fp32\": {e.key} ({e.type}) quantizes it with quantize-onnx, which reads fp32")
        chain.leave_out(f"{e.path}.type", f"Olive quantizes the {chain.art.precision} model; quantize-onnx reads {upstream.name} in fp32", e.type)
    art = chain.add(Target(chain.tname(e.key), "quantize-onnx", params, inputs, doc=f"int4 {algorithm} (Olive pass '{e.key}')"), e, notes + o.finish())
    chain.art = Artifact(art.ref, "bundle", "int4", art.target)


def lora(chain: Chain, e: PassEntry, o: Options) -> None:
    params: dict[str, Any] = {}
    for key, to, kinds in (("r", "rank", (int,)), ("alpha", "alpha", (int, float)), ("lora_dropout", "dropout", (int, float))):
        value = o.get(key, kinds)
        if value is not None:
            params[to] = float(value) if to != "rank" else value
    modules = o.get("target_modules", (list,))
    if modules:
        params["target_modules"] = [str(m) for m in modules]
    train = o.get("train_data_config", (str, dict))
    args = o.get("training_args", (dict,), {}) or {}
    for key, to, kinds in (("max_steps", "max_steps", (int,)), ("learning_rate", "learning_rate", (int, float)),
                           ("per_device_train_batch_size", "batch_size", (int,)), ("seed", "seed", (int,))):
        if key in args:
            value = expect(args[key], kinds, chain.wf.source, f"{o.path('training_args')}.{key}")
            params[to] = float(value) if to == "learning_rate" else value
    o.note("eval_data_config", "torch_dtype", "device_map", "ephemeral_gpu_offload", "use_ort_trainer", "bits", "double_quant", "quant_type",
           "compute_dtype", "merge_adapter_weights", "save_adapter", "modules_to_save", "ortmodule", "lora_r", "lora_alpha")
    for key in sorted(k for k in args if k not in ("max_steps", "learning_rate", "per_device_train_batch_size", "seed")):
        chain.leave_out(f"{o.path('training_args')}.{key}", "lora-finetune has no such training argument")
    if not chain.need(e, "hf"):
        return
    if train is None:
        raise chain.fail(f"{e.path}.train_data_config", "missing: LoRA trains on a data config")
    data = chain.data_file(train, o.path("train_data_config"), "train_data")
    notes = []
    spec, spec_path = chain.wf.data_configs.get(train, ({}, "")) if isinstance(train, str) else (train, o.path("train_data_config"))
    pre = (spec.get("pre_process_data_config") or {}) if isinstance(spec, dict) else {}
    pre_path = f"{spec_path}.pre_process_data_config"
    replaced = isinstance(train, str) and train in chain.data  # --data NAME=FILE: prompt/response records in place of the hub's
    template = pre.get("text_template")
    if pre.get("chat_template") is True:
        params["template"] = "chat"
    elif isinstance(template, str) and replaced:
        chain.leave_out(f"{pre_path}.text_template", f"it names the columns of the dataset --data {train}=FILE stands in for; "
                        "lora-finetune renders that file's prompt/response records with its own template")
    elif isinstance(template, str):
        if "{response}" not in template:
            raise chain.fail(f"{pre_path}.text_template", "lora-finetune puts the loss on what follows {response}: the template needs a {response} field "
                             "(or give the data as JSONL prompt/response records with --data NAME=FILE: lora-finetune's template then renders them)")
        params["template"] = template
    if isinstance(pre.get("max_seq_len"), int):
        params["max_length"] = pre["max_seq_len"]
    for key in ("text_cols", "input_cols", "max_samples", "add_special_tokens", "strategy"):
        if pre.get(key) not in (None, False):
            chain.leave_out(f"{pre_path}.{key}", "lora-finetune trains on every prompt/response record of the file, tokenized with the model's own special tokens")
    if norm_type(e.type) == "qlora":
        chain.leave_out(f"{e.path}.type", "QLoRA trains on a 4-bit base (bitsandbytes, CUDA); lora-finetune trains LoRA on the full-precision base", e.type)
    notes.append("params.rank, params.alpha: Olive's defaults (64, 16) where the workflow gives none; steps and batch come from training_args or lora-finetune's defaults")
    params.setdefault("rank", 64)
    params.setdefault("alpha", 16.0)
    target = Target(chain.tname(e.key), "lora-finetune", params, {"base": chain.art.ref, "data": data}, doc=f"LoRA adapter (Olive pass '{e.key}')")
    art = chain.add(target, e, notes + o.finish())
    chain.adapters = {NAME_SAFE.sub("-", e.key): art.ref}


def int8(chain: Chain, e: PassEntry, o: Options) -> None:
    kind = norm_type(e.type)
    mode = {"onnxdynamicquantization": "dynamic", "onnxstaticquantization": "static"}.get(kind)
    qmode = o.get("quant_mode", (str,), None, ("dynamic", "static"))
    data_ref = o.get("data_config", (str, dict))
    mode = mode or qmode or ("static" if data_ref is not None else "dynamic")
    params: dict[str, Any] = {"mode": mode}
    if o.get("per_channel", (bool,)) is not None:
        params["per_channel"] = o.entry.options["per_channel"]
    op_types = o.get("op_types_to_quantize", (list,))
    if op_types:
        params["op_types"] = [str(x) for x in op_types]
    samples = o.get("calibration_sampling_size", (int, list))
    if isinstance(samples, int):
        params["calibration_samples"] = samples
    o.same(*STORAGE)
    o.note("weight_type", "activation_type", "reduce_range", "nodes_to_exclude", "nodes_to_quantize", "quant_format", "calibrate_method",
           "extra_options", "quant_preprocess", "prepare_qnn_config", "qnn_extra_options", "WeightSymmetric", "ActivationSymmetric", "MatMulConstBOnly")
    if chain.art.kind == "bundle":
        o.finish()
        if mode != "dynamic" or not chain.rebuild_as(e, "int8", "the builder's int8 (8-bit weight-only MatMulNBits) stands in for onnxruntime's dynamic int8; onnx-int8 quantizes plain ONNX exports"):
            chain.unsupported(f"{e.path}.type", f"{mode} int8 quantization of a {chain.art.precision} genai bundle: onnx-int8 quantizes plain ONNX exports (OnnxConversion -> onnx-export)")
        return
    if not chain.need(e, "onnx"):
        return
    inputs = {"model": chain.art.ref}
    if mode == "static":
        if data_ref is None and "calibration" not in chain.data:
            raise chain.fail(e.path, "static int8 quantization calibrates on a data config: give data_config, or pass --data calibration=FILE")
        inputs["calibration"] = chain.data_file(data_ref, o.path("data_config"), "calibration") if data_ref is not None else chain.calibration(o, e.path)
    source = chain.art
    art = chain.add(Target(chain.tname(e.key), "onnx-int8", params, inputs, doc=f"int8 {mode} quantization (Olive pass '{e.key}')"), e, o.finish())
    chain.art = Artifact(art.ref, source.kind, "int8", art.target)


def extractadapters(chain: Chain, e: PassEntry, o: Options) -> None:
    o.same(*STORAGE)
    o.note("make_inputs", "dynamic_lora_r", "optional_inputs", "save_format", "adapter_type")
    o.finish()
    if chain.art.kind != "bundle" or not chain.adapters:
        return chain.unsupported(f"{e.path}.type", "ExtractAdapters needs a genai bundle built with a LoRA adapter (a LoRA pass or input_model.adapter_path before ModelBuilder)")
    chain.pending_comments.append(f"Olive pass '{e.key}' (ExtractAdapters) at {e.path}: no target of its own: {chain.art.ref[1:]} keeps adapters {', '.join(chain.adapters)} switchable")


def graphsurgeries(chain: Chain, e: PassEntry, o: Options) -> None:
    surgeries = o.get("surgeries", (list,), [])
    o.same(*STORAGE)
    notes = o.finish()
    for i, surgery in enumerate(surgeries):
        path = f"{o.path('surgeries')}[{i}]"
        expect(surgery, (dict,), chain.wf.source, path)
        surgeon = surgery.get("surgeon")
        if surgeon in surgery_steps.STEPS:
            surgery_steps.surgery_step(chain, e, i, path, surgery, notes)
            continue
        if surgeon not in SURGEONS:
            chain.unsupported(f"{path}.surgeon", f"graph surgeon {surgeon!r} has no modelbuild counterpart (supported: {', '.join(sorted(SURGEONS))})")
            continue
        if chain.art.kind != "bundle" or chain.art.precision != "int4":
            chain.unsupported(f"{path}.surgeon", f"TieWordEmbeddings: tie-embeddings ties the embedding of an int4 genai bundle; the chain holds {'an ' + chain.art.precision + ' bundle' if chain.art.kind == 'bundle' else 'a ' + chain.art.kind + ' model'} here")
            continue
        name = chain.tname(e.key) if len(surgeries) == 1 else chain.tname(f"{e.key}-{i}")
        if chain.untied_embedding:
            notes = notes + [f"the embedding reads the LM head's quantized weight: what {chain.untied_embedding[0]} = true asks for a tied model"]
            chain.untied_embedding = None
        art = chain.add(Target(name, "tie-embeddings", {}, {"bundle": chain.art.ref}, doc=f"embedding tied to the quantized LM head (Olive pass '{e.key}', TieWordEmbeddings)"), e, notes)
        chain.art = Artifact(art.ref, "bundle", "int4", art.target)

