"""import-olive: Olive workflows (the seeds', olive-recipes', hand-written ones) and olive command
lines become target files that real doit runs validate and build on the tiny model; every bad
input is one line naming the file and the JSON path, exit 2, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import REPO, new_project

OLIVE = REPO / "tests" / "data" / "olive"
SEEDS = OLIVE / "seeds"
WORKFLOWS = OLIVE / "workflows"
TRAIN = REPO / "targets" / "data" / "travel_train.jsonl"
EVAL = REPO / "targets" / "data" / "travel_eval.jsonl"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The tiny random Phi3 as an HF folder (built by a real doit run): what --model-path points at."""
    project = new_project(tmp_path_factory.mktemp("tiny") / "project")
    project.doit("tiny-base")
    return project.root / "build" / "tiny-base"


def bare(tmp_path: Path, name: str = "imported"):
    """A project with dodo.py and an empty targets/ (nothing else to validate or build)."""
    project = new_project(tmp_path / name)
    shutil.rmtree(project.root / "targets")
    (project.root / "targets").mkdir()
    return project


def import_olive(project, *args: str):
    return project.modelbuild("import-olive", *map(str, args))


def assert_refused(result, source: Path | str, json_path: str, *words: str) -> str:
    lines = result.out.strip().splitlines()
    assert result.returncode == 2, result.out
    assert len(lines) == 1 and "Traceback" not in result.out, result.out
    assert lines[0].startswith(f"modelbuild: {source}: {json_path}: "), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def targets_of(project) -> dict:
    import tomllib

    docs = [tomllib.loads(p.read_text()) for p in sorted((project.root / "targets").glob("*.toml"))]
    return {name: t for doc in docs for name, t in doc.get("target", {}).items()}


# -- the seeds' workflows ---------------------------------------------------------------------------
def test_seed_workflow_imports_builds_and_answers(tiny, tmp_path):
    """The seeds' main workflow (older schema: ModelBuilder int4 + OrtTransformersOptimization, a
    latency evaluator, an engine with search_strategy): import -> doit -> the bundle answers."""
    project = bare(tmp_path)
    seed = SEEDS / "qwen2.5_modelbuilder_transformers_opt.json"
    result = import_olive(project, seed, "--name", "seed", "--model-path", tiny, "--data", f"eval={EVAL}")
    assert result.returncode == 0, result.out
    text = (project.root / "targets" / "seed.toml").read_text()
    assert "# from Olive pass 'conversion' (ModelBuilder) at passes.conversion.config" in text
    assert "# Olive pass 'optimization' (OrtTransformersOptimization)" in text
    targets = targets_of(project)
    assert {n: t["pass"] for n, t in targets.items()} == {"seed-base": "hf-import", "seed-conversion": "genai-build", "seed-eval": "evaluate"}
    assert targets["seed-conversion"]["params"] == {"precision": "int4", "int4_algorithm": "default"}

    built = project.doit("seed")
    assert {"seed-base", "seed-conversion", "seed-eval"} <= built.executed
    metrics = json.loads((project.root / "build" / "seed-eval" / "metrics.json").read_text())
    assert metrics["ttft_ms"] > 0 and metrics["perplexity"] > 1  # the latency metric, measured
    from modelbuild.ml.genai import Chat

    chat = Chat(project.root / "build" / "seed-conversion")
    tokens = chat.generate("What should I see in Chicago?", None, 8)
    assert 0 < len(tokens) <= 8 and chat.answer("What should I see in Chicago?", None, 8)
    assert tokens == chat.generate("What should I see in Chicago?", None, 8)  # greedy: deterministic
    again = project.doit("seed")
    assert not again.executed  # a second doit is a no-op


def test_transformer_optimizer_adds_nothing_to_a_builder_graph(tiny, tmp_path):
    """Why OrtTransformersOptimization after ModelBuilder becomes no target: onnxruntime's transformer
    optimizer (the seeds' settings, model_type gpt2) finds no new fusion in the builder's graph."""
    import logging

    import onnx
    import onnxruntime
    from onnxruntime.transformers.optimizer import optimize_model

    project = bare(tmp_path)
    assert import_olive(project, SEEDS / "phi4-mini_modelbuilder_int4.json", "--name", "b", "--model-path", tiny).returncode == 0
    project.doit("b")
    model = project.root / "build" / "b-convert" / "model.onnx"
    before = {n.op_type for n in onnx.load(str(model)).graph.node}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization", "MatMulNBits"} <= before  # fused by the builder
    onnxruntime.set_default_logger_severity(3)
    logging.disable(logging.WARNING)
    try:
        optimized = optimize_model(str(model), model_type="gpt2", num_heads=4, hidden_size=128, opt_level=1)
    finally:
        logging.disable(logging.NOTSET)
    after = {n.op_type for n in optimized.model.graph.node}
    assert after <= before  # no new (fused) operator type; only constants folded


def test_second_seed_workflow_imports(tiny, tmp_path):
    project = bare(tmp_path)
    result = import_olive(project, SEEDS / "phi4-mini_modelbuilder_int4.json", "--model-path", tiny)
    assert result.returncode == 0, result.out
    targets = targets_of(project)
    assert targets["phi-4-mini-instruct-base"]["params"] == {"trust_remote_code": True, "model": "microsoft/Phi-4-mini-instruct"}
    assert targets["phi-4-mini-instruct-convert"]["params"] == {"precision": "int4", "int4_algorithm": "default"}
    project.doit("list")  # built in test_transformer_optimizer_adds_nothing_to_a_builder_graph


@pytest.mark.parametrize("name, json_path, words", [
    ("gpu_system_fragment.json", "input_model", ["missing"]),
    ("int8_fragment_with_comments.jsonc", "line 6 column 40", ["malformed JSON", "comments are not JSON"]),
])
def test_seed_fragments_refused(tmp_path, name, json_path, words):
    project = bare(tmp_path)
    assert_refused(import_olive(project, SEEDS / name), SEEDS / name, json_path, *words)
    assert not list((project.root / "targets").iterdir())


def test_seed_command_lines(tiny, tmp_path):
    """Every olive command line of the seeds imports (doit list validates it) or is refused in one line."""
    outcomes = []
    for i, line in enumerate((SEEDS / "commands.txt").read_text().splitlines()):
        project = bare(tmp_path, f"cli{i}")
        data = {"finetune": ["--data", f"train_data={TRAIN}"]}.get(line.split()[1], [])
        result = import_olive(project, "--cli", line, "--model-path", tiny, "--name", f"cli{i}", "--data", f"calibration={TRAIN}", *data)
        if result.returncode == 0:
            project.doit("list")
            outcomes.append(("ok", line.split()[1]))
        else:
            outcomes.append(("refused", result.out.strip()))
            assert result.returncode == 2 and len(result.out.strip().splitlines()) == 1, result.out
    refused = " ".join(o[1] for o in outcomes if o[0] == "refused")
    assert len(outcomes) == 8 and sum(o[0] == "refused" for o in outcomes) == 3, outcomes
    assert "modelbuild: --cli: --provider: DmlExecutionProvider has no modelbuild device" in refused
    assert "modelbuild: --cli: --adapter_path: no such file or folder" in refused
    # the seeds' `olive quantize --algorithm awq` predates Olive 0.13, whose default --implementation (olive) has no AWQ
    assert "modelbuild: --cli: --implementation: Olive has no olive quantization for awq int8" in refused


def test_auto_opt_command_line_round_trip(tiny, tmp_path):
    project = bare(tmp_path)
    line = ("olive auto-opt --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct --output_path models/smolm2-optimized "
            "--device cpu --provider CPUExecutionProvider --use_ort_genai --precision int4 --log_level 1")
    result = import_olive(project, "--cli", line, "--model-path", tiny)
    assert result.returncode == 0, result.out
    target = targets_of(project)["smollm2-135m-instruct-builder"]
    assert target["pass"] == "genai-build" and target["params"]["int4_algorithm"] == "rtn"
    project.doit("smollm2-135m-instruct")
    from modelbuild.ml.genai import Chat

    assert Chat(project.root / "build" / "smollm2-135m-instruct-builder").answer("Plan a rainy day in London.", None, 6)


# -- hand-written workflows: the ONNX chain, LoRA with switchable adapters, quantizers, search -------
def test_onnx_chain_builds(tiny, tmp_path):
    project = bare(tmp_path)
    result = import_olive(project, WORKFLOWS / "onnx_chain.json", "--name", "chain", "--model-path", tiny)
    assert result.returncode == 0, result.out
    passes = [t["pass"] for t in targets_of(project).values()]
    assert passes == ["hf-import", "onnx-export", "graph-optimize", "onnx-int8"]
    project.doit("chain")
    record = json.loads((project.root / "build" / "chain-optimize" / "graph_optimize.json").read_text())
    assert record["nodes_after"] < record["nodes_before"]  # the optimizer fused something
    size = lambda t: sum(p.stat().st_size for p in (project.root / "build" / t).glob("model.onnx*"))
    assert size("chain-quantize") < size("chain-optimize") / 2  # int8 weights


def test_lora_workflow_keeps_adapter_switchable(tiny, tmp_path):
    project = bare(tmp_path)
    result = import_olive(project, WORKFLOWS / "lora_adapters.json", "--name", "travel", "--model-path", tiny)
    assert result.returncode == 0, result.out
    targets = targets_of(project)
    assert targets["travel-finetune"]["params"]["rank"] == 4 and targets["travel-finetune"]["params"]["max_steps"] == 12
    assert targets["travel-builder"]["inputs"]["adapters"] == {"finetune": ":travel-finetune"}
    assert targets["travel-finetune"]["inputs"]["data"] == str(TRAIN)  # the data config's local file
    project.doit("travel")
    from modelbuild.ml.genai import Chat

    chat = Chat(project.root / "build" / "travel-builder")
    assert chat.adapter_names == ["finetune"]
    prompt = "What should I see in Chicago?"
    assert chat.generate(prompt, None, 10) != chat.generate(prompt, "finetune", 10)  # the adapter moves the answer

    # The seed lab's last step: auto-opt with --adapter_path (the adapter just trained) -> a
    # bundle whose adapter 'adapter' is switchable (input_model.adapter_path -> inputs.adapters).
    line = f"olive auto-opt -m {tiny} --adapter_path {project.root / 'build' / 'travel-finetune'} --device cpu --use_ort_genai --precision int4"
    result = import_olive(project, "--cli", line, "--name", "ao")
    assert result.returncode == 0, result.out
    built = targets_of(project)["ao-builder"]
    assert built["inputs"]["adapters"] == {"adapter": "../build/travel-finetune"} and built["inputs"]["base"] == ":ao-base"
    project.doit("ao")
    chat = Chat(project.root / "build" / "ao-builder")
    assert chat.adapter_names == ["adapter"] and chat.generate(prompt, None, 10) != chat.generate(prompt, "adapter", 10)


def test_onnx_model_input_is_a_file_input(tmp_path):
    folder = tmp_path / "exported"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"")
    doc = {"input_model": {"type": "ONNXModel", "model_path": str(folder / "model.onnx")},
           "passes": {"o": {"type": "OrtTransformersOptimization", "model_type": "gpt2"}, "q": {"type": "OnnxQuantization", "quant_mode": "dynamic"}}}
    path = tmp_path / "onnx.json"
    path.write_text(json.dumps(doc))
    project = bare(tmp_path)
    assert import_olive(project, path, "--name", "x").returncode == 0
    t = targets_of(project)
    assert t["x-o"]["inputs"] == {"model": str(folder)} and t["x-q"] == {**t["x-q"], "pass": "onnx-int8", "inputs": {"model": ":x-o"}}
    project.doit("list")
    doc["input_model"]["model_path"] = "missing/model.onnx"
    path.write_text(json.dumps(doc))
    assert_refused(import_olive(project, path, "--name", "y"), path, "input_model.model_path", "no such file or folder 'missing/model.onnx'")


def test_gptq_rtn_and_goals_map_to_quantize_onnx_and_gates(tiny, tmp_path):
    project = bare(tmp_path)
    result = import_olive(project, WORKFLOWS / "gptq_mixed.json", "--name", "g", "--model-path", tiny, "--data", f"calibration={TRAIN}", "--data", f"eval={EVAL}")
    assert result.returncode == 0, result.out
    t = targets_of(project)
    assert t["g-m-fp32"]["params"] == {"precision": "fp32"}
    assert t["g-m"]["pass"] == "quantize-onnx"
    assert t["g-m"]["params"] == {"algorithm": "gptq", "block_size": 32, "symmetric": True, "int8_nodes": ["/lm_head/MatMul"]}
    assert t["g-eval"]["gates"] == {"perplexity_delta_pct": "<= 50", "ttft_ms": "<= 500"}
    assert t["g-eval"]["inputs"]["reference"] == ":g-input-eval"
    listing = project.doit("list")
    assert {"g-m", "g-m-fp32", "g-eval", "g-input-eval"} <= {line.split()[0] for line in listing.out.splitlines() if line.strip()}


def test_search_space_becomes_one_chain_per_combination(tmp_path):
    project = bare(tmp_path)
    assert import_olive(project, WORKFLOWS / "search.json", "--name", "s").returncode == 0
    names = set(targets_of(project))
    quant = {n for n in names if n.startswith("s-quant-")}
    assert names - quant == {"s-base", "s-builder"}  # shared by every combination
    assert quant == {f"s-quant-block_size{b}-is_symmetric{s}" for b in (32, 64) for s in ("true", "false")}
    # accuracy_level 0: OnnxBlockWiseRtnQuantization's default in Olive 0.13 (unset), written out
    assert targets_of(project)["s-quant-block_size64-is_symmetricfalse"]["params"] == {"algorithm": "rtn", "block_size": 64, "symmetric": False, "accuracy_level": 0}
    project.doit("list")
    doc = json.loads((WORKFLOWS / "search.json").read_text())
    doc["passes"]["builder"]["precision"] = {"type": "Categorical", "values": ["fp32", "fp16", "int8", "int4", "fp32"]}
    big = tmp_path / "big.json"
    big.write_text(json.dumps(doc))
    assert_refused(import_olive(bare(tmp_path, "big"), big), big, "passes.builder.precision", "20 combinations", "stops at 16")


# -- bad input: one line, JSON path, exit 2, nothing written ------------------------------------------
BASE = {"input_model": {"type": "HfModel", "model_path": "org/model"}, "passes": {"m": {"type": "ModelBuilder", "precision": "int4"}}}


@pytest.mark.parametrize("change, json_path, words", [
    (lambda d: d.update(engines={}), "engines", ["unknown key"]),
    (lambda d: d["passes"]["m"].update(precision=4), "passes.m.precision", ["expected a string", "int 4"]),
    (lambda d: d["passes"]["m"].update(precison="int4"), "passes.m.precison", ["unknown option of Olive pass ModelBuilder"]),
    (lambda d: d["passes"].update(ov={"type": "OpenVINOConversion"}), "passes.ov.type", ["OpenVINOConversion", "no modelbuild counterpart", "ModelBuilder", "--skip-unsupported"]),
    (lambda d: d["passes"].update(q={"type": "QNNConversion"}), "passes.q.type", ["QNNConversion", "supported:"]),
    (lambda d: d.update(data_configs=[{"name": "d", "type": "HuggingfaceContainer", "load_dataset_config": {"data_name": "tatsu-lab/alpaca"}}],
                        passes={"l": {"type": "LoRA", "train_data_config": "d"}}), "data_configs[0]", ["hub dataset 'tatsu-lab/alpaca'", "--data d=FILE"]),
    (lambda d: d["passes"].update(g={"type": "GraphSurgeries", "surgeries": [{"surgeon": "DecomposeRotaryEmbedding"}]}), "passes.g.surgeries[0].surgeon", ["DecomposeRotaryEmbedding"]),
    (lambda d: d.update(systems={"s": {"type": "LocalSystem", "accelerators": [{"device": "npu", "execution_providers": ["QNNExecutionProvider"]}]}}),
     "systems.s.accelerators[0].execution_providers[0]", ["QNNExecutionProvider has no modelbuild device"]),
    (lambda d: d["input_model"].update(model_path="<MODEL_PATH>"), "input_model.model_path", ["--model-path"]),
    (lambda d: d.update(passes={"g": {"type": "gptq"}, "m": {"type": "ModelBuilder", "precision": "int4"}}), "passes.g", ["--data calibration=FILE"]),
])
def test_bad_input_is_one_line(tmp_path, change, json_path, words):
    doc = json.loads(json.dumps(BASE))
    change(doc)
    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(doc))
    project = bare(tmp_path)
    assert_refused(import_olive(project, path), path, json_path, *words)
    assert not list((project.root / "targets").iterdir())


def test_skip_unsupported_writes_the_rest_with_a_comment(tmp_path):
    doc = json.loads(json.dumps(BASE))
    doc["passes"]["ov"] = {"type": "OpenVINOConversion", "config": {}}
    doc["passes"] = {"ov": {"type": "OpenVINOConversion"}, "m": doc["passes"]["m"]}
    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(doc))
    project = bare(tmp_path)
    result = import_olive(project, path, "--skip-unsupported")
    assert result.returncode == 0, result.out
    text = (project.root / "targets" / "model.toml").read_text()
    assert "# left out: passes.ov.type = \"OpenVINOConversion\": Olive pass 'ov' (OpenVINOConversion) has no modelbuild counterpart" in text
    assert f"modelbuild: {path}: left out: passes.ov.type = \"OpenVINOConversion\": Olive pass 'ov'" in result.out  # the stderr line
    assert "1 left out" in result.out  # the summary
    assert [t["pass"] for t in targets_of(project).values()] == ["hf-import", "genai-build"]
    project.doit("list")
    again = import_olive(project, path, "--skip-unsupported")
    assert again.returncode == 2 and "already exists (--force replaces it)" in again.out


def test_malformed_json_and_missing_file(tmp_path):
    project = bare(tmp_path)
    path = tmp_path / "broken.json"
    path.write_text('{"input_model": {"type": "HfModel",, }}')
    assert_refused(import_olive(project, path), path, "line 1 column 36", "malformed JSON")
    missing = import_olive(project, tmp_path / "nope.json")
    assert missing.returncode == 2 and missing.out.strip() == f"modelbuild: {tmp_path / 'nope.json'}: no such file"


def test_pass_mappings_validate(tmp_path):
    """More of the mapping table, each imported into one project and validated by `doit list`."""
    hf = {"type": "HfModel", "model_path": "org/model"}
    data = [{"name": "calib", "type": "HuggingfaceContainer", "load_dataset_config": {"data_name": "json", "data_files": str(TRAIN)}}]
    cases = {
        "awq": {"passes": {"a": {"type": "AwqQuantizer", "group_size": 64, "data_config": "calib"}, "m": {"type": "ModelBuilder", "precision": "int4"}}},
        "mixed": {"passes": {"s": {"type": "SelectiveMixedPrecision", "algorithm": "k_quant_mixed"}, "m": {"type": "ModelBuilder", "precision": "int4"}}},
        "half": {"passes": {"m": {"type": "ModelBuilder", "precision": "fp32"}, "h": {"type": "OnnxFloatToFloat16"}}},
        "static": {"passes": {"c": {"type": "OnnxConversion"}, "f": {"type": "OrtTransformersOptimization", "float16": True, "keep_io_types": True},
                              "q": {"type": "OnnxStaticQuantization", "data_config": "calib", "per_channel": True}}},
        "qlora": {"passes": {"l": {"type": "QLoRA", "r": 8, "train_data_config": "calib"}, "m": {"type": "ModelBuilder", "precision": "int8"}}},
    }
    project = bare(tmp_path)
    for name, body in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"input_model": hf, "data_configs": data, **body}))
        result = import_olive(project, path, "--name", name)
        assert result.returncode == 0, result.out
    t = targets_of(project)
    assert t["awq-a"]["pass"] == "awq" and t["awq-a"]["params"] == {"block_size": 64, "symmetric": False}
    assert t["awq-a"]["inputs"] == {"base": ":awq-base", "data": str(TRAIN)}
    assert t["awq-m"]["params"] == {"precision": "int4", "int4_algorithm": "rtn", "block_size": 64, "symmetric": False}
    assert t["mixed-m"]["params"] == {"precision": "int4", "int4_algorithm": "k_quant_mixed"}
    assert t["half-m"]["params"] == {"precision": "fp16"} and "half-h" not in t  # folded into the builder
    assert [t[n]["pass"] for n in ("static-c", "static-f", "static-f-fp16", "static-q")] == ["onnx-export", "graph-optimize", "onnx-fp16", "onnx-int8"]
    assert t["static-f-fp16"]["params"] == {"keep_io_types": True, "op_block_list": []}
    assert t["static-q"]["params"] == {"mode": "static", "per_channel": True} and t["static-q"]["inputs"]["calibration"] == str(TRAIN)
    assert t["qlora-l"]["pass"] == "lora-finetune" and t["qlora-l"]["params"]["rank"] == 8
    assert t["qlora-m"]["inputs"]["adapters"] == {"l": ":qlora-l"}
    assert "QLoRA trains on a 4-bit base" in (project.root / "targets" / "qlora.toml").read_text()
    project.doit("list")
