"""The olive command lines people start from (#23, item 5), each built the way Olive 0.13's CLI
builds its workflow (olive/cli/{optimize,capture_onnx,quantize,finetune}.py at v0.13.0): every
documented flag parses; what maps imports and `doit list` validates it; the rest is one line."""

from __future__ import annotations

import pytest

from test_olive_fidelity import imported
from test_olive_import import TRAIN, assert_refused, bare, import_olive

# The flags of each command in Olive 0.13's CLI source (beside -m/-o/--log_level and the shared
# input-model options), each with a value it accepts.
OPTIMIZE_FLAGS = {
    "--provider": "CUDAExecutionProvider", "--device": "gpu", "--precision": "int4", "--act_precision": "int8",
    "--num_split": "2", "--memory": "4096", "--exporter": "model_builder", "--dim_param": "batch_size", "--dim_value": "1",
    "--use_qdq_format": None, "--surgeries": "RemoveRopeMultiCache", "--block_size": "64", "--modality": "text",
    "--enable_aot": None, "--qnn_env_path": "/qnn", "--extra_mb_options": "int4_is_symmetric=true",
}
CAPTURE_FLAGS = {
    "--conversion_device": "cpu", "--use_dynamo_exporter": None, "--use_model_builder": None, "--use_mobius_builder": None,
    "--fixed_param_dict": "batch_size=1", "--past_key_value_name": "past_key_values", "--torch_dtype": "float32",
    "--target_opset": "18", "--precision": "fp32", "--int4_block_size": "64", "--int4_accuracy_level": "4",
    "--exclude_embeds": None, "--exclude_lm_head": None, "--enable_cuda_graph": None, "--extra_mb_options": "a=b", "--use_ort_genai": None,
}
QUANTIZE_FLAGS = {"--algorithm": "awq", "--precision": "int4", "--act_precision": "int8", "--implementation": "awq",
                  "--use_qdq_encoding": None, "--data_name": "json", "--data_files": str(TRAIN), "--split": "train", "--subset": "x",
                  "--max_seq_len": "512", "--max_samples": "8", "--batch_size": "1"}
FINETUNE_FLAGS = {"--method": "lora", "--lora_r": "8", "--lora_alpha": "16", "--target_modules": "q_proj,v_proj", "--torch_dtype": "float32",
                  "--data_name": "json", "--data_files": str(TRAIN), "--train_split": "train", "--eval_split": "test", "--use_chat_template": None,
                  "--max_seq_len": "256", "--max_samples": "8", "--batch_size": "1"}


def line(command: str, flags: dict[str, str | None], model: str = "org/model") -> str:
    words = [f"olive {command} -m {model}"]
    for flag, value in flags.items():
        words.append(flag if value is None else f"{flag} {value!r}" if " " in value else f"{flag} {value}")
    return " ".join(words)


@pytest.mark.parametrize("command, flags", [("optimize", OPTIMIZE_FLAGS), ("capture-onnx-graph", CAPTURE_FLAGS),
                                            ("quantize", QUANTIZE_FLAGS), ("finetune", FINETUNE_FLAGS)])
def test_every_documented_flag_parses(tmp_path, command, flags):
    """One flag at a time: the import succeeds, or refuses in one line for what the flag asks
    (never 'unrecognized arguments', never a traceback)."""
    for i, (flag, value) in enumerate(flags.items()):
        project = bare(tmp_path, f"{command}-{i}")
        base = {"--data_files": {"--data_name": "json"}, "--qnn_env_path": {"--provider": "QNNExecutionProvider", "--enable_aot": None},
                "--enable_aot": {"--provider": "QNNExecutionProvider", "--qnn_env_path": "/qnn"}}.get(flag, {})
        if command in ("quantize", "finetune") and flag not in ("--data_name", "--data_files"):
            base = {**base, "--data_name": "json", "--data_files": str(TRAIN)}
        result = import_olive(project, "--cli", line(command, {**base, flag: value}), "--data", f"calibration={TRAIN}")
        lines = result.out.strip().splitlines()
        assert "Traceback" not in result.out and "unrecognized arguments" not in result.out, (flag, result.out)
        if result.returncode == 0:
            project.doit("list")
        else:
            assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("modelbuild: --cli: "), (flag, result.out)
            where = lines[0].split(": ")[2]
            assert where not in (command, f"olive {command}"), (flag, lines[0])  # refused for what it builds, not for the command line


def test_optimize_int4_cpu_is_olive_gptq_then_model_builder(tmp_path):
    """optimize --precision int4 on CPU: Olive's Gptq (4 bits, symmetric, group 128) -> ModelBuilder
    int4 (block 32, accuracy level 4, MatMul and Gather): gptq is quantize-onnx on an fp32 build."""
    project = bare(tmp_path)
    result = import_olive(project, "--cli", "olive optimize -m org/model --precision int4", "--data", f"calibration={TRAIN}")
    assert result.returncode == 0, result.out
    text, t = imported(project)
    assert t["model-model_builder-fp32"]["params"] == {"precision": "fp32"}
    assert t["model-model_builder"]["params"] == {"algorithm": "gptq", "block_size": 128, "symmetric": True, "accuracy_level": 4}
    assert "# left out: passes.model_builder.int4_op_types_to_quantize = [\"MatMul\", \"Gather\"]" in text  # the int4 embedding
    assert "# left out: passes.gptq.lm_head = false" in text
    project.doit("list")


def test_optimize_fp16_cuda_is_a_cuda_build(tmp_path):
    project = bare(tmp_path)
    result = import_olive(project, "--cli", "olive optimize -m org/model --provider CUDAExecutionProvider --precision fp16")
    assert result.returncode == 0 and "nothing left out" in result.out, result.out
    _, t = imported(project)
    assert t["model-model_builder"] == {**t["model-model_builder"], "pass": "genai-build", "device": "cuda", "params": {"precision": "fp16"}}
    project.doit("list")


def test_capture_onnx_graph_with_and_without_model_builder(tmp_path):
    project = bare(tmp_path, "mb")
    result = import_olive(project, "--cli", "olive capture-onnx-graph -m org/model --use_model_builder --precision int4 --int4_block_size 64")
    assert result.returncode == 0, result.out
    _, t = imported(project)
    assert t["model-m"]["pass"] == "genai-build" and t["model-m"]["params"]["block_size"] == 64 and "device" not in t["model-m"]
    half = bare(tmp_path, "fp16")  # capture-onnx-graph's default precision, fp16, runs on CUDA in Olive
    assert import_olive(half, "--cli", "olive capture-onnx-graph -m org/model --use_model_builder").returncode == 0
    assert imported(half)[1]["model-m"]["device"] == "cuda"
    export = bare(tmp_path, "export")
    result = import_olive(export, "--cli", "olive capture-onnx-graph -m org/model --target_opset 18")
    assert result.returncode == 0 and "nothing left out" in result.out, result.out
    assert imported(export)[1]["model-c"] == {**imported(export)[1]["model-c"], "pass": "onnx-export", "params": {"opset": 18}}
    export.doit("list")


def test_quantize_implementation_picks_olive_passes(tmp_path):
    project = bare(tmp_path)
    awq = f"olive quantize -m org/model --algorithm awq --precision int4 --implementation awq --data_name json --data_files {TRAIN}"
    result = import_olive(project, "--cli", awq, "--data", f"calibration={TRAIN}")
    assert result.returncode == 0, result.out
    _, t = imported(project)
    assert t["model-autoawqquantizer"]["pass"] == "awq"
    # Olive 0.13's default implementation (olive) has no AWQ: it refuses this, and so does the import
    assert_refused(import_olive(bare(tmp_path, "x"), "--cli", "olive quantize -m org/model --algorithm awq"), "--cli", "--implementation", "no olive quantization for awq int8")
    # rtn writes a quantized torch model, which nothing here consumes
    assert_refused(import_olive(bare(tmp_path, "y"), "--cli", "olive quantize -m org/model --algorithm rtn --precision int4"), "--cli", "passes.rtn", "none follows")


def test_finetune_chat_template_and_the_hub_dataset_fix(tmp_path):
    project = bare(tmp_path)
    local = f"olive finetune -m org/model --data_name json --data_files {TRAIN} --use_chat_template --max_steps 5"
    result = import_olive(project, "--cli", local)
    assert result.returncode == 0, result.out
    _, t = imported(project)
    assert t["model-finetune"]["params"]["template"] == "chat" and t["model-finetune"]["params"]["max_steps"] == 5
    project.doit("list")

    hub = "olive finetune -m org/model --data_name tatsu-lab/alpaca --text_template '### Question: {instruction}\\n### Answer: {output}'"
    refused = assert_refused(import_olive(bare(tmp_path, "hub"), "--cli", hub), "--cli", "--data_name", "--data train_data=FILE")
    fix = refused.split("pass ", 1)[1].split(" ")[:1]  # the fix the message gives
    assert fix == ["--data"]
    fixed = bare(tmp_path, "fixed")
    result = import_olive(fixed, "--cli", hub, "--data", f"train_data={TRAIN}")
    assert result.returncode == 0, result.out  # the fix works
    assert "left out: data_configs[0].pre_process_data_config.text_template" in result.out
    fixed.doit("list")
