"""``olive optimize|auto-opt|capture-onnx-graph|quantize|finetune ...`` -> the workflow Olive 0.13
runs for it, built the way its CLI builds it (olive/cli/*.py at v0.13.0: the same passes, options
and defaults), then imported like any workflow JSON: what modelbuild cannot do is left out or
refused there, naming the JSON path (or the option it came from).

The output, logging and cloud options are accepted and ignored (modelbuild puts outputs in
build/). Any other option is a one-line error.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from .workflow import OliveError

SOURCE = "--cli"
COMMANDS = ("optimize", "auto-opt", "capture-onnx-graph", "quantize", "finetune")
# JSON paths of the workflows made here -> the option they came from (for error messages)
OPTION_OF = {
    "input_model.model_path": "--model_name_or_path",
    "input_model.adapter_path": "--adapter_path",
    "input_model.task": "--task",
    "input_model.model_script": "--model_script",
    "data_configs[0]": "--data_name",
    "data_configs[0].load_dataset_config.data_files": "--data_files",
    "data_configs[0].pre_process_data_config.text_template": "--text_template",
    "systems.local_system.accelerators[0].execution_providers[0]": "--provider",
    "systems.local_system.accelerators[0].device": "--device",
    "passes.autoawqquantizer": "--data_name",
    "passes.gptq": "--data_name",
}
IGNORED = ("--output_path", "-o", "--log_level", "--save_config_file", "--dry_run", "--account_name", "--container_name",
           "--keep_intermediate_models", "--cost_model", "--memory", "--num_splits", "--enable_search", "--seed")
FLAGS = ("--dry_run", "--keep_intermediate_models", "--save_config_file")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print usage and exit
        raise OliveError(SOURCE, self.prog, message)


def _parser(command: str, adapter: bool = False, script: bool = False) -> _Parser:
    """Olive's add_input_model_options (+ logging/cache options, ignored)."""
    p = _Parser(prog=f"olive {command}", add_help=False, allow_abbrev=False)
    p.add_argument("-m", "--model_name_or_path", required=not script)
    p.add_argument("--trust_remote_code", action="store_true")
    p.add_argument("-t", "--task")
    if adapter:
        p.add_argument("-a", "--adapter_path")
    if script:
        p.add_argument("--model_script")
        p.add_argument("--script_dir")
    for flag in IGNORED:
        if flag in FLAGS:
            p.add_argument(flag, action="store_true")
        elif flag == "-o":
            continue
        elif flag == "--output_path":
            p.add_argument("-o", "--output_path")
        else:
            p.add_argument(flag)
    return p


def parse(line: str) -> dict:
    try:
        words = shlex.split(line)
    except ValueError as error:
        raise OliveError(SOURCE, "", f"cannot split the command line: {error}") from None
    if words[:1] == ["olive"]:
        words = words[1:]
    if not words:
        raise OliveError(SOURCE, "", f"empty command: expected 'olive COMMAND ...' ({', '.join(COMMANDS)})")
    command, rest = words[0], [w.replace("\\n", "\n") for w in words[1:]]
    build = {"optimize": _optimize, "auto-opt": _auto_opt, "capture-onnx-graph": _capture_onnx_graph,
             "quantize": _quantize, "finetune": _finetune}.get(command)
    if build is None:
        raise OliveError(SOURCE, command, f"unsupported Olive command (supported: {', '.join(COMMANDS)}; or import the workflow JSON)")
    return build(rest)


def _model(args) -> dict:
    """Olive's get_input_model_config: a model script -> PyTorchModel, a .onnx file or a folder of
    them -> ONNXModel, else a Hugging Face model (hub id or folder)."""
    path = args.model_name_or_path
    if getattr(args, "model_script", None):
        model = {"type": "PyTorchModel", "model_script": args.model_script}
        if path:
            model["model_path"] = path
        return model
    local = Path(path).expanduser()
    if local.exists() and ((local.is_file() and local.suffix == ".onnx") or any(local.glob("*.onnx"))):
        return {"type": "ONNXModel", "model_path": path}
    model = {"type": "HfModel", "model_path": path}
    if args.task:
        model["task"] = args.task
    if args.trust_remote_code:
        model["load_kwargs"] = {"trust_remote_code": True}
    if getattr(args, "adapter_path", None):
        model["adapter_path"] = args.adapter_path
    return model


def _system(provider: str, device: str | None) -> dict:
    accelerator = {"execution_providers": [provider]}
    if device:
        accelerator["device"] = device
    return {"local_system": {"type": "LocalSystem", "accelerators": [accelerator]}}


def _extra_options(text: str | None) -> dict:
    """--extra_mb_options 'k=v,k=v' (BaseOliveCLICommand._parse_extra_options)."""
    options = {}
    for item in (text or "").split(","):
        if item.strip():
            key, sep, value = item.partition("=")
            if not sep:
                raise OliveError(SOURCE, "--extra_mb_options", f"{item!r}: expected key=value")
            options[key.strip()] = value.strip()
    return options


OPTIMIZE_PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider", "QNNExecutionProvider", "VitisAIExecutionProvider",
                      "OpenVINOExecutionProvider", "WebGpuExecutionProvider", "NvTensorRTRTXExecutionProvider")
PRECISIONS = ("int4", "int8", "int16", "int32", "uint4", "uint8", "uint16", "uint32", "fp16", "fp32", "bf16")


def _optimize(rest: list[str]) -> dict:
    """``olive optimize``: olive/cli/optimize.py's pass schedule for a text model (v0.13.0)."""
    p = _parser("optimize", adapter=True, script=True)
    p.add_argument("--provider", default="CPUExecutionProvider", choices=OPTIMIZE_PROVIDERS)
    p.add_argument("--device", choices=("cpu", "gpu", "npu"))
    p.add_argument("--precision", default="fp32", choices=PRECISIONS)
    p.add_argument("--act_precision", choices=("int8", "uint8", "int16", "uint16"))
    p.add_argument("--num_split", type=int)
    p.add_argument("--exporter", choices=("model_builder", "dynamo_exporter", "torchscript_exporter", "optimum_exporter"))
    p.add_argument("--dim_param")
    p.add_argument("--dim_value")
    p.add_argument("--use_qdq_format", action="store_true")
    p.add_argument("--surgeries", nargs="*")
    p.add_argument("--block_size", type=int)
    p.add_argument("--modality", default="text", choices=("text",))
    p.add_argument("--enable_aot", action="store_true")
    p.add_argument("--qnn_env_path")
    p.add_argument("--extra_mb_options")
    args = p.parse_args(rest)
    exporter = args.exporter or "model_builder"
    provider, precision = args.provider, args.precision
    if (provider in ("CPUExecutionProvider",) and args.device in ("gpu", "npu")) or \
            (provider in ("CUDAExecutionProvider", "NvTensorRTRTXExecutionProvider") and args.device in ("cpu", "npu")):
        raise OliveError(SOURCE, "--device", f"{args.device} with {provider}: Olive refuses this combination")
    if args.enable_aot and (provider != "QNNExecutionProvider" or not args.qnn_env_path):
        raise OliveError(SOURCE, "--enable_aot", "ahead-of-time compilation is QNN's, with --qnn_env_path")
    model = _model(args)
    hf = model["type"] == "HfModel"
    int4 = precision in ("int4", "uint4")
    ov = provider == "OpenVINOExecutionProvider"
    qnn_like = provider in ("QNNExecutionProvider", "VitisAIExecutionProvider")
    passes: dict = {}
    if int4 and hf and qnn_like:
        passes["quarot"] = {"type": "QuaRot"}
    gptq = hf and int4 and not ov
    if gptq:
        passes["gptq"] = {"type": "Gptq", "bits": 4, "sym": precision == "int4"}
        if args.block_size is not None:
            passes["gptq"]["group_size"] = args.block_size
    if hf and args.num_split is not None:
        passes["capture_split_info"] = {"type": "CaptureSplitInfo", "unique_embeds_lm_head_splits": True, "num_splits": args.num_split}
    builder = hf and not ov and exporter == "model_builder"
    if builder:
        mb = {"type": "ModelBuilder", "precision": precision}
        if precision == "int4":
            block = args.block_size if args.block_size not in (None, -1) else 32
            mb.update(int4_block_size=min((16, 32, 64, 128, 256), key=lambda b: abs(b - block)), int4_accuracy_level=4,
                      int4_op_types_to_quantize=["MatMul", "Gather"])
        mb["extra_options"] = _extra_options(args.extra_mb_options)
        passes["model_builder"] = mb
    if hf and not ov and exporter in ("dynamo_exporter", "torchscript_exporter"):
        passes["onnx_conversion"] = {"type": "OnnxConversion", "use_dynamo_exporter": exporter == "dynamo_exporter"}
    if hf and ov:
        passes["optimum_openvino_conversion"] = {"type": "OpenVINOOptimumConversion"}
    if (qnn_like or args.device == "npu") and args.dim_param and args.dim_value:
        passes["dynamic_to_fixed_shape"] = {"type": "DynamicToFixedShape", "dim_param": [x.strip() for x in args.dim_param.split(",")],
                                            "dim_value": [int(x) for x in args.dim_value.split(",")]}
    if provider == "WebGpuExecutionProvider":
        passes["onnx_io_datatype_converter"] = {"type": "OnnxIODataTypeConverter", "name_pattern": "logits", "source_dtype": 10, "target_dtype": 1}
    if ov and hf:
        passes["openvino_io_update"] = {"type": "OpenVINOIoUpdate", "static": False, "reuse_cache": True}
    if not hf or exporter != "model_builder":
        passes["onnx_peephole_optimizer"] = {"type": "OnnxPeepholeOptimizer"}
    if provider != "NvTensorRTRTXExecutionProvider" and exporter in ("torchscript_exporter", "dynamo_exporter"):
        passes["ort_transformers_optimization"] = {"type": "OrtTransformersOptimization"}
    if hf and gptq and args.use_qdq_format:
        passes["matmul_nbits_to_qdq"] = {"type": "MatMulNBitsToQDQ", "add_zero_point": "true", "save_as_external_data": "true",
                                         "nodes_to_exclude": ["/lm_head/MatMulNBits", "/lm_head/MatMul_Q4"], **({"use_int4": "true"} if precision == "int4" else {})}
    if args.surgeries is not None:
        names = args.surgeries[0].split(",") if args.surgeries else []
        passes["graph_surgeries"] = {"type": "GraphSurgeries", "surgeries": [{"surgeon": n} for n in names], "save_as_external_data": "true"}
    if not hf and precision == "int4":
        passes["onnx_blockwise_rtn_quantization"] = {"type": "OnnxBlockWiseRtnQuantization", **({"block_size": args.block_size} if args.block_size else {})}
    if precision == "fp16" and not builder:
        passes["onnx_float_to_float16"] = {"type": "OnnxFloatToFloat16"}
    workflow: dict = {"input_model": model, "systems": _system(provider, args.device), "target": "local_system"}
    static = not ov and ((precision in ("int8", "uint8", "int16", "uint16") and not gptq) or args.act_precision is not None)
    if static:
        sq = {"type": "OnnxStaticQuantization", "precision": precision, "calibration_providers": ["CUDAExecutionProvider"],
              "quant_format": "QDQ" if args.use_qdq_format else "QOperator", "data_config": "wikitext2_train"}
        if args.act_precision:
            sq["activation_type"] = args.act_precision
        if hf:
            sq["op_types_to_exclude"] = ["GatherBlockQuantized", "GroupQueryAttention", "MatMulNBits"]
        if args.block_size == -1:
            sq["per_channel"] = True
        passes["onnx_static_quantization"] = sq
        workflow["data_configs"] = [{"name": "wikitext2_train", "type": "HuggingfaceContainer",
                                     "load_dataset_config": {"data_name": "Salesforce/wikitext", "subset": "wikitext-2-raw-v1", "split": "train"}}]
    if provider == "VitisAIExecutionProvider":
        passes["vitis_ai_add_metadata"] = {"type": "VitisAIAddMetaData"}
    if hf and args.num_split is not None:
        passes["split_model"] = {"type": "SplitModel"}
    if qnn_like:
        passes["static_llm"] = {"type": "StaticLLM"}
    if args.enable_aot:
        passes["ep_context_binary_generator"] = {"type": "EPContextBinaryGenerator"}
    if ov and hf:
        passes["openvino_encapsulation"] = {"type": "OpenVINOEncapsulation"}
    workflow["passes"] = passes
    return workflow


def _capture_onnx_graph(rest: list[str]) -> dict:
    """``olive capture-onnx-graph``: olive/cli/capture_onnx.py (v0.13.0)."""
    p = _parser("capture-onnx-graph", adapter=True, script=True)
    p.add_argument("--conversion_device", default="cpu", choices=("cpu", "gpu"))
    exporter = p.add_mutually_exclusive_group()
    exporter.add_argument("--use_dynamo_exporter", action="store_true")
    exporter.add_argument("--use_model_builder", action="store_true")
    exporter.add_argument("--use_mobius_builder", action="store_true")
    p.add_argument("--fixed_param_dict")
    p.add_argument("--past_key_value_name", default="past_key_values")
    p.add_argument("--torch_dtype")
    p.add_argument("--target_opset", type=int, default=20)
    p.add_argument("--precision", default="fp16", choices=("fp16", "fp32", "int4", "bf16"))
    p.add_argument("--int4_block_size", type=int, choices=(16, 32, 64, 128, 256))
    p.add_argument("--int4_accuracy_level", type=int)
    p.add_argument("--exclude_embeds", action="store_true")
    p.add_argument("--exclude_lm_head", action="store_true")
    p.add_argument("--enable_cuda_graph", action="store_true", default=None)
    p.add_argument("--extra_mb_options")
    p.add_argument("--use_ort_genai", action="store_true")
    args = p.parse_args(rest)
    model = _model(args)
    if model["type"] not in ("HfModel", "PyTorchModel"):
        raise OliveError(SOURCE, "--model_name_or_path", "capture-onnx-graph captures a Hugging Face or PyTorch model")
    half = (not args.use_model_builder and not args.use_mobius_builder and args.torch_dtype == "float16") or \
        ((args.use_model_builder or args.use_mobius_builder) and args.precision in ("fp16", "bf16"))
    system = _system("CUDAExecutionProvider" if half else "CPUExecutionProvider", "gpu" if half else "cpu")
    passes: dict = {}
    if args.use_mobius_builder:
        if args.precision not in ("fp32", "fp16", "bf16"):
            raise OliveError(SOURCE, "--precision", f"MobiusBuilder builds fp32/fp16/bf16, not {args.precision}")
        passes["b"] = {"type": "MobiusBuilder", "precision": args.precision}
    elif args.use_model_builder:
        mb = {"type": "ModelBuilder", "metadata_only": False, "precision": args.precision,
              "exclude_embeds": args.exclude_embeds, "exclude_lm_head": args.exclude_lm_head}
        if args.enable_cuda_graph is not None:
            mb["enable_cuda_graph"] = args.enable_cuda_graph
        if args.extra_mb_options:
            mb["extra_options"] = _extra_options(args.extra_mb_options)
        if args.int4_block_size is not None:
            mb["int4_block_size"] = args.int4_block_size
        if args.int4_accuracy_level is not None:
            mb["int4_accuracy_level"] = args.int4_accuracy_level
        passes["m"] = mb
    else:
        conversion = {"type": "OnnxConversion", "device": "cpu" if args.conversion_device == "cpu" else "cuda",
                      "target_opset": args.target_opset, "use_dynamo_exporter": args.use_dynamo_exporter,
                      "save_metadata_for_token_generation": args.use_ort_genai}
        if args.torch_dtype:
            conversion["torch_dtype"] = args.torch_dtype
        if args.use_dynamo_exporter:
            conversion["past_key_value_name"] = args.past_key_value_name
        passes["c"] = conversion
        if args.use_ort_genai:
            passes["m"] = {"type": "ModelBuilder", "metadata_only": True, "precision": {"fp16": "fp16", "bf16": "bf16"}.get(args.precision, "fp32")}
    if args.fixed_param_dict:
        pairs = [item.split("=", 1) for item in args.fixed_param_dict.split(",")]
        passes["f"] = {"type": "DynamicToFixedShape", "dim_param": [k for k, _ in pairs], "dim_value": [int(v) if v.isdigit() else v for _, v in pairs]}
    return {"input_model": model, "systems": system, "target": "local_system", "passes": passes}


def _auto_opt(rest: list[str]) -> dict:
    p = _parser("auto-opt")
    p.add_argument("--adapter_path")
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu", "npu"))
    p.add_argument("--provider")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "int8", "int4"))
    p.add_argument("--use_ort_genai", action="store_true")
    p.add_argument("--use_model_builder", action="store_true")
    p.add_argument("--use_dynamo_exporter", action="store_true")
    args = p.parse_args(rest)
    model = _model(args)
    if args.adapter_path:
        model["adapter_path"] = args.adapter_path
    provider = args.provider or {"cpu": "CPUExecutionProvider", "gpu": "CUDAExecutionProvider"}.get(args.device, "QNNExecutionProvider")
    workflow = {
        "input_model": model,
        "systems": {"local_system": {"type": "LocalSystem", "accelerators": [{"device": args.device, "execution_providers": [provider]}]}},
        "target": "local_system",
    }
    if args.use_ort_genai or args.use_model_builder:
        builder = {"type": "ModelBuilder", "precision": args.precision}
        if args.precision == "int4" and not args.use_model_builder:
            # Olive 0.13's route: OnnxConversion -> OrtTransformersOptimization -> OnnxBlockWiseRtnQuantization
            # (its defaults: block 128, symmetric, accuracy level unset) -> ModelBuilder metadata_only;
            # the builder's RTN at the same grid makes the same MatMulNBits
            builder.update(int4_algo_config="rtn", int4_block_size=128, int4_is_symmetric=True, int4_accuracy_level=0)
        workflow["passes"] = {"builder": builder}
        if args.adapter_path:
            workflow["passes"]["extract"] = {"type": "ExtractAdapters"}
    else:
        passes = {"conversion": {"type": "OnnxConversion"}, "optimize": {"type": "OrtTransformersOptimization"}}
        if args.precision == "fp16":
            passes["fp16"] = {"type": "OnnxFloatToFloat16"}
        elif args.precision == "int8":
            passes["int8"] = {"type": "OnnxDynamicQuantization"}
        elif args.precision == "int4":
            raise OliveError(SOURCE, "--precision", "int4 without --use_ort_genai: modelbuild's int4 models are onnxruntime-genai bundles; add --use_ort_genai")
        if args.adapter_path:
            raise OliveError(SOURCE, "--adapter_path", "an adapter without --use_ort_genai: add --use_ort_genai to keep it switchable in a genai bundle")
        workflow["passes"] = passes
    return workflow


def _dataset_options(p: _Parser, train: bool) -> None:
    """Olive's add_dataset_options."""
    p.add_argument("-d", "--data_name", required=train)
    if train:
        p.add_argument("--train_subset")
        p.add_argument("--train_split", default="train")
        p.add_argument("--eval_subset")
        p.add_argument("--eval_split", default="")
    else:
        p.add_argument("--subset")
        p.add_argument("--split")
    p.add_argument("--data_files")
    text = p.add_mutually_exclusive_group()
    text.add_argument("--text_field")
    text.add_argument("--text_template")
    text.add_argument("--use_chat_template", action="store_true")
    p.add_argument("--max_seq_len", type=int, default=1024)
    p.add_argument("--add_special_tokens", action="store_true", default=None)
    p.add_argument("--max_samples", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--input_cols", nargs="*")


def _data_config(args, name: str, train: bool) -> dict:
    """Olive's update_dataset_options on its template data config."""
    load = {"data_name": args.data_name, "split": args.train_split if train else args.split,
            "subset": args.train_subset if train else args.subset,
            "data_files": args.data_files.split(",") if args.data_files else None}
    if load["data_files"] and len(load["data_files"]) == 1:
        load["data_files"] = load["data_files"][0]
    pre = {"text_cols": args.text_field, "text_template": args.text_template, "chat_template": args.use_chat_template or None,
           "max_seq_len": args.max_seq_len, "add_special_tokens": args.add_special_tokens, "input_cols": args.input_cols,
           "max_samples": args.max_samples}
    return {"name": name, "type": "HuggingfaceContainer", "load_dataset_config": {k: v for k, v in load.items() if v is not None},
            "pre_process_data_config": {k: v for k, v in pre.items() if v is not None}, "dataloader_config": {"batch_size": args.batch_size}}


def _finetune(rest: list[str]) -> dict:
    """``olive finetune``: olive/cli/finetune.py (v0.13.0); unknown ``--flags`` are Hugging Face
    TrainingArguments, as Olive parses them."""
    p = _parser("finetune")
    p.add_argument("--method", default="lora", choices=("lora", "qlora"))
    p.add_argument("--lora_r", type=int, default=64)
    p.add_argument("--lora_alpha", type=int, default=16)
    p.add_argument("--target_modules")
    p.add_argument("--torch_dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    _dataset_options(p, train=True)
    args, unknown = p.parse_known_args(rest)
    training = _training_args(unknown)
    model = _model(args)
    if model["type"] != "HfModel":
        raise OliveError(SOURCE, "--model_name_or_path", "olive finetune trains a Hugging Face model")
    lora = {"type": "LoRA" if args.method == "lora" else "QLoRA", "train_data_config": "train_data", "torch_dtype": args.torch_dtype,
            "r": args.lora_r, "alpha": args.lora_alpha}
    if training:
        lora["training_args"] = training
    if args.method == "lora" and args.target_modules:
        lora["target_modules"] = args.target_modules.split(",")
    data = [_data_config(args, "train_data", train=True)]
    if args.eval_split:
        evaluation = _data_config(args, "eval_data", train=True)
        evaluation["load_dataset_config"]["split"] = args.eval_split
        data.append(evaluation)
        lora["eval_data_config"] = "eval_data"
    return {"input_model": model, "data_configs": data, "passes": {"finetune": lora}}


TRAINING_TYPES = {"max_steps": int, "learning_rate": float, "per_device_train_batch_size": int, "seed": int}


def _training_args(words: list[str]) -> dict:
    """``--key value`` pairs Olive hands to TrainingArguments: typed where lora-finetune reads them,
    kept as written otherwise (the import then names them as left out)."""
    args, i = {}, 0
    while i < len(words):
        word = words[i]
        if not word.startswith("--"):
            raise OliveError(SOURCE, "olive finetune", f"unrecognized argument {word!r}")
        key, sep, value = word[2:].partition("=")
        if not sep:
            if i + 1 < len(words) and not words[i + 1].startswith("--"):
                value, i = words[i + 1], i + 1
            else:
                value = "true"
        kind = TRAINING_TYPES.get(key, str)
        try:
            args[key] = kind(value)
        except ValueError:
            raise OliveError(SOURCE, f"--{key}", f"expected {kind.__name__}, got {value!r}") from None
        i += 1
    return args


# olive/cli/quantize.py: the torch-side passes by --implementation, in its order (PT_QUANT_IMPLEMENTATION_MAPPING),
# with olive_config.json's algorithms and precisions for each
PT_QUANT = [("quarot", "QuaRot", ("quarot",), None), ("spinquant", "SpinQuant", ("spinquant",), None),
            ("awq", "AutoAWQQuantizer", ("awq",), ("int4", "int8", "int16", "uint4", "uint8", "uint16")),
            ("olive", "Gptq", ("gptq", "quarot", "spinquant"), ("int4", "int8", "uint4", "uint8")),
            ("autogptq", "GptqQuantizer", ("gptq", "quarot", "spinquant"), ("int4", "int8", "int16", "uint4", "uint8", "uint16")),
            ("olive", "Rtn", ("rtn",), ("int4", "int8", "uint4", "uint8"))]
ONNX_QUANT = [("bnb", "OnnxBnB4Quantization", ("rtn",), ("nf4", "fp4")), ("ort", "OnnxDynamicQuantization", ("rtn",), ("int8", "uint8")),
              ("ort", "OnnxStaticQuantization", ("rtn",), ("int8", "int16", "uint8", "uint16")),
              ("olive", "OnnxHqqQuantization", ("hqq",), ("int4",)), ("olive", "OnnxBlockWiseRtnQuantization", ("rtn",), ("int4",))]
BITS = {"int4": 4, "uint4": 4, "int8": 8, "uint8": 8, "int16": 16, "uint16": 16}


def _quantize(rest: list[str]) -> dict:
    """``olive quantize``: olive/cli/quantize.py (v0.13.0): --algorithm, --precision and
    --implementation pick the passes."""
    p = _parser("quantize", script=True)
    p.add_argument("-a", "--algorithm", default="rtn")
    p.add_argument("--precision", default="int8")
    p.add_argument("--act_precision", default="int8")
    p.add_argument("--implementation", default="olive")
    p.add_argument("--use_qdq_encoding", action="store_true")
    _dataset_options(p, train=False)
    args = p.parse_args(rest)
    model = _model(args)
    hf = model["type"] == "HfModel"
    if hf:
        model.setdefault("load_kwargs", {})["attn_implementation"] = "eager"
    table = PT_QUANT if hf else ONNX_QUANT
    chosen = [t for impl, t, algos, precisions in table if impl == args.implementation and args.algorithm in algos
              and (precisions is None or args.precision in precisions)
              and (t != "OnnxStaticQuantization" or args.data_name)]
    if not chosen:
        raise OliveError(SOURCE, "--implementation", f"Olive has no {args.implementation} quantization for {args.algorithm} {args.precision} "
                         f"on {'a Hugging Face' if hf else 'an ONNX'} model")
    passes: dict = {}
    for pass_type in chosen:
        spec: dict = {"type": pass_type}
        if pass_type in ("AutoAWQQuantizer", "GptqQuantizer"):  # Olive sets bits on these two only (Gptq, Rtn: their default, 4)
            spec["bits"] = BITS.get(args.precision, 4)
        if pass_type in ("OnnxDynamicQuantization", "OnnxStaticQuantization"):
            spec.update(precision=args.precision, quant_format="QDQ" if args.use_qdq_encoding else "QOperator")
        if pass_type == "OnnxStaticQuantization":
            spec.update(act_precision=args.act_precision, data_config="default_data_config")
        passes[pass_type.lower()] = spec
    if args.implementation == "olive" and args.use_qdq_encoding:
        passes["matmulnbitstoqdq"] = {"type": "MatMulNBitsToQDQ"}
    workflow = {"input_model": model, "systems": _system("CPUExecutionProvider", "cpu"), "target": "local_system", "passes": passes}
    if args.data_name:
        workflow["data_configs"] = [_data_config(args, "default_data_config", train=False)]
    return workflow
