"""``olive auto-opt ...`` / ``olive finetune ...`` / ``olive quantize ...`` -> the workflow they run.

Only the options that decide what is built are mapped; the output, logging and cloud options
are accepted and ignored (modelbuild puts outputs in build/). Anything else is a one-line error.
"""

from __future__ import annotations

import argparse
import shlex

from .workflow import OliveError

SOURCE = "--cli"
# JSON paths of the workflows made here -> the option they came from (for error messages)
OPTION_OF = {
    "input_model.model_path": "--model_name_or_path",
    "input_model.adapter_path": "--adapter_path",
    "data_configs[0]": "--data_name",
    "data_configs[0].load_dataset_config.data_files": "--data_files",
    "data_configs[0].pre_process_data_config.text_template": "--text_template",
    "systems.local_system.accelerators[0].execution_providers[0]": "--provider",
    "systems.local_system.accelerators[0].device": "--device",
    "passes.awq": "--data_name",
}
IGNORED = ("--output_path", "-o", "--log_level", "--save_config_file", "--dry_run", "--account_name", "--container_name",
           "--keep_intermediate_models", "--cost_model", "--memory", "--num_splits", "--enable_search", "--seed")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print usage and exit
        raise OliveError(SOURCE, self.prog, message)


def _parser(command: str) -> _Parser:
    p = _Parser(prog=f"olive {command}", add_help=False)
    p.add_argument("-m", "--model_name_or_path", required=True)
    p.add_argument("--trust_remote_code", action="store_true")
    p.add_argument("--task")
    for flag in IGNORED:
        if flag == "--dry_run" or flag == "--keep_intermediate_models":
            p.add_argument(flag, action="store_true")
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
        raise OliveError(SOURCE, "", "empty command: expected 'olive auto-opt ...', 'olive finetune ...' or 'olive quantize ...'")
    command, rest = words[0], [w.replace("\\n", "\n") for w in words[1:]]
    if command == "auto-opt":
        return _auto_opt(rest)
    if command == "finetune":
        return _finetune(rest)
    if command == "quantize":
        return _quantize(rest)
    raise OliveError(SOURCE, command, "unsupported Olive command (supported: auto-opt, finetune, quantize; or import the workflow JSON)")


def _model(args) -> dict:
    model = {"type": "HfModel", "model_path": args.model_name_or_path}
    if args.trust_remote_code:
        model["load_kwargs"] = {"trust_remote_code": True}
    return model


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


def _finetune(rest: list[str]) -> dict:
    p = _parser("finetune")
    p.add_argument("--method", default="lora", choices=("lora", "qlora"))
    p.add_argument("--data_name", required=True)
    p.add_argument("--data_files")
    p.add_argument("--train_split")
    p.add_argument("--eval_split")
    p.add_argument("--text_template")
    p.add_argument("--max_seq_len", type=int)
    p.add_argument("--max_samples", type=int)
    p.add_argument("--max_steps", type=int)
    p.add_argument("--lora_r", type=int)
    p.add_argument("--lora_alpha", type=float)
    p.add_argument("--learning_rate", type=float)
    p.add_argument("--per_device_train_batch_size", type=int)
    p.add_argument("--target_modules")
    p.add_argument("--torch_dtype")
    args = p.parse_args(rest)
    load = {"data_name": args.data_name}
    if args.data_files:
        load["data_files"] = args.data_files
    pre = {}
    if args.text_template:
        pre["text_template"] = args.text_template
    if args.max_seq_len:
        pre["max_seq_len"] = args.max_seq_len
    data = {"name": "train_data", "type": "HuggingfaceContainer", "load_dataset_config": load}
    if pre:
        data["pre_process_data_config"] = pre
    lora = {"type": "LoRA" if args.method == "lora" else "QLoRA", "train_data_config": "train_data"}
    if args.lora_r:
        lora["r"] = args.lora_r
    if args.lora_alpha:
        lora["alpha"] = args.lora_alpha
    if args.target_modules:
        lora["target_modules"] = args.target_modules.split(",")
    training = {k: v for k, v in (("max_steps", args.max_steps), ("learning_rate", args.learning_rate),
                                  ("per_device_train_batch_size", args.per_device_train_batch_size)) if v is not None}
    if training:
        lora["training_args"] = training
    return {"input_model": _model(args), "data_configs": [data], "passes": {"finetune": lora}}


def _quantize(rest: list[str]) -> dict:
    p = _parser("quantize")
    p.add_argument("--algorithm", required=True)
    p.add_argument("--precision", default="int4")
    p.add_argument("--data_name")
    p.add_argument("--data_files")
    args = p.parse_args(rest)
    if args.algorithm != "awq":
        raise OliveError(SOURCE, "--algorithm", f"{args.algorithm}: modelbuild's torch-side quantizer is awq; rtn/gptq int4 happen while building the genai bundle (olive auto-opt --use_ort_genai --precision int4)")
    workflow = {"input_model": _model(args), "passes": {"awq": {"type": "AwqQuantizer"}}}
    if args.data_name:
        load = {"data_name": args.data_name, **({"data_files": args.data_files} if args.data_files else {})}
        workflow["data_configs"] = [{"name": "calibration_data", "type": "HuggingfaceContainer", "load_dataset_config": load}]
        workflow["passes"]["awq"]["data_config"] = "calibration_data"
    return workflow
