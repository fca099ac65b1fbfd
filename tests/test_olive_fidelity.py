"""import-olive changes nothing in silence (#23): what the TOML file does not do is a `# left out:`
comment, a stderr line and a count; --strict refuses it; a chain with nothing to build, a model
made by its own code or for another task is refused in one line; the olive-recipes files the issue
checked by hand (tests/data/olive/recipes-all) carry their LM head, device and Olive's defaults."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

from conftest import REPO, new_project
from test_olive_import import EVAL, TRAIN, assert_refused, bare, import_olive, targets_of

CORPUS = REPO / "tests" / "data" / "olive" / "recipes-all"
DATA = ("--data", f"calibration={TRAIN}", "--data", f"eval={EVAL}")
CLAIM = re.compile(r"params\.([\w.]+) = (.+?)(?::\s|$)")


def write(tmp_path: Path, doc: dict, name: str = "workflow.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def imported(project) -> tuple[str, dict]:
    (path,) = sorted((project.root / "targets").glob("*.toml"))
    text = path.read_text()
    return text, tomllib.loads(text).get("target", {})


def claims(text: str) -> list[tuple[str, str, object]]:
    """(target, param path, value) for every `params.X = V` a target's comment states."""
    found, block = [], []
    for line in text.splitlines():
        if line.startswith("#"):
            block.append(line)
        elif line.startswith("[target."):
            name = tomllib.loads(f"{line}\nx = 1")["target"]
            name = next(iter(name))
            found += [(name, m.group(1), json.loads(m.group(2))) for c in block for m in CLAIM.finditer(c)]
            block = []
        else:
            block = [] if line.strip() else block
    return found


def assert_comments_match(text: str, targets: dict) -> None:
    for name, key, value in claims(text):
        node = targets[name].get("params", {})
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        assert node == value, (name, key, value, targets[name].get("params"))


BASE = {"input_model": {"type": "HfModel", "model_path": "org/model"}, "passes": {"m": {"type": "ModelBuilder", "precision": "int4"}}}


# -- 1. broken output: a chain with nothing to build ----------------------------------------------
def test_nothing_to_build_is_refused_and_writes_nothing(tmp_path):
    doc = {**BASE, "passes": {"ov": {"type": "OpenVINOConversion"}, "q": {"type": "QNNConversion"}}}
    path = write(tmp_path, doc)
    project = bare(tmp_path)
    line = assert_refused(import_olive(project, path, "--skip-unsupported"), path, "passes", "nothing to build")
    assert "passes.ov.type" in line
    assert not list((project.root / "targets").iterdir())
    # a corpus file the issue found broken (it wrote "[group] model.onnx = []", and doit list failed)
    source = CORPUS / "google-gemma-4-E2B-it__cpu__mixed__text.json"
    onnx = tmp_path / "decoder"
    onnx.mkdir()
    (onnx / "model.onnx").write_bytes(b"")
    assert_refused(import_olive(project, source, "--model-path", onnx, "--skip-unsupported"), source, "passes", "nothing to build")
    assert not list((project.root / "targets").iterdir())


# -- 2. nothing in silence: comment, stderr line, count; --strict -----------------------------------
def test_left_out_option_is_named_three_times_and_strict_refuses(tmp_path):
    doc = json.loads(json.dumps(BASE))
    doc["passes"]["m"]["int4_tied_embeddings"] = True
    path = write(tmp_path, doc)
    project = bare(tmp_path)
    result = import_olive(project, path)
    assert result.returncode == 0, result.out
    line = 'left out: passes.m.int4_tied_embeddings = true: ModelBuilder\'s int4_tied_embeddings has no modelbuild counterpart'
    text, _ = imported(project)
    assert f"# {line}" in text  # at the place it would have gone: above the ModelBuilder's target
    assert text.index(f"# {line}") < text.index("[target.model-m]")
    assert f"modelbuild: {path}: {line}" in result.out  # stderr
    assert "1 left out" in result.out  # the summary
    project.doit("list")

    strict = bare(tmp_path, "strict")
    assert_refused(import_olive(strict, path, "--strict"), path, "passes.m.int4_tied_embeddings", "--strict")
    assert not list((strict.root / "targets").iterdir())
    clean = write(tmp_path, BASE, "clean.json")
    result = import_olive(strict, clean, "--strict")
    assert result.returncode == 0 and "nothing left out" in result.out, result.out


# -- the five cases the issue checked against built bundles ----------------------------------------
def test_qwen3_14b_keeps_its_8bit_lm_head(tmp_path):
    """SelectiveMixedPrecision k_quant_mixed -> gptq -> rtn 8-bit lm_head -> ModelBuilder int4: the
    LM head stays int8, and what quantize-onnx cannot do (k_quant_mixed's 8-bit layers, the 8-bit
    embedding) is named."""
    source = CORPUS / "Qwen-Qwen3-14B__cpu__Qwen-Qwen3-14B_cpu_int4.json"
    project = bare(tmp_path)
    result = import_olive(project, source, *DATA)
    assert result.returncode == 0, result.out
    text, t = imported(project)
    assert t["qwen3-14b-m"]["pass"] == "quantize-onnx"
    assert t["qwen3-14b-m"]["params"]["int8_nodes"] == ["/lm_head/MatMul"]
    assert "keep_float" not in t["qwen3-14b-m"]["params"]
    assert '# left out: passes.s = "k_quant_mixed": its 8-bit q/k/v and down_proj' in text
    assert "# left out: passes.r.embeds = true" in text
    assert_comments_match(text, t)


def test_mistral_nemo_cuda_stays_cuda_and_doit_refuses_it_here(tmp_path, tiny_hf):
    source = CORPUS / "nvidia-Mistral-NeMo-12B-Instruct__cuda__nvidia-Mistral-NeMo-12B-Instruct_cuda_int4.json"
    project = bare(tmp_path)
    result = import_olive(project, source, "--name", "nemo", "--model-path", tiny_hf, *DATA)
    assert result.returncode == 0, result.out
    text, t = imported(project)
    assert t["nemo-m-fp32"]["device"] == "cuda" and t["nemo-m-fp32"]["pass"] == "genai-build"
    assert t["nemo-m"]["params"]["int8_nodes"] == ["/lm_head/MatMul"]  # k_quant_last + rtn 8-bit lm_head
    project.doit("list")
    refused = project.doit("nemo-m", check=False)
    assert refused.returncode != 0 and "cuda" in refused.out, refused.out
    assert not (project.root / "build" / "nemo-m-fp32").exists()


def test_hy_mt_comments_say_what_is_built_and_its_evaluator_is_named(tmp_path):
    source = CORPUS / "tencent-HY-MT1.5-1.8B__cpu__tencent-HY-MT1.5-1.8B_cpu_int4_with_eval.json"
    project = bare(tmp_path)
    result = import_olive(project, source, *DATA)
    assert result.returncode == 0, result.out
    text, t = imported(project)
    built = {p.get("params", {}).get("int4_algorithm") for p in t.values()} | {p.get("params", {}).get("algorithm") for p in t.values()}
    for said in re.findall(r"int4_algorithm\W+(\w+)", text):
        assert said in built, (said, built)  # no comment names an algorithm nothing uses
    assert t["hy-mt1.5-1.8b-m"]["params"]["algorithm"] == "gptq"
    assert '# left out: evaluators.zh_en_translation.tasks[0] = "wmt18-zh-en": an lm-eval task' in text
    assert_comments_match(text, t)


def test_text_classification_task_is_refused(tmp_path):
    source = CORPUS / "intel-bert-base-uncased-mrpc__oci__gpu__cuda__ptq.json"
    project = bare(tmp_path)
    for extra in ((), ("--skip-unsupported",)):
        assert_refused(import_olive(project, source, *extra, *DATA), source, "input_model.task", "'text-classification'", "causal")
    assert not list((project.root / "targets").iterdir())


@pytest.mark.parametrize("key", ["model_loader", "model_script", "io_config", "dummy_inputs_func"])
def test_model_made_by_its_own_code_is_refused(tmp_path, key):
    doc = {"input_model": {"type": "PyTorchModel", "model_path": "openai/whisper-tiny", key: "x"}, "passes": BASE["passes"]}
    path = write(tmp_path, doc)
    project = bare(tmp_path)
    assert_refused(import_olive(project, path, "--skip-unsupported"), path, f"input_model.{key}", "build something else")
    nemo = CORPUS / "nvidia-nemotron-speech-streaming-en-0.6b__cpu__nemotron_encoder_int4_cpu.json"  # was FULL: an LLM export of it
    assert_refused(import_olive(project, nemo, "--skip-unsupported", *DATA), nemo, "input_model.model_loader")


def test_torch_dtype_is_named(tmp_path):
    doc = json.loads(json.dumps(BASE))
    doc["input_model"]["load_kwargs"] = {"torch_dtype": "float16"}
    project = bare(tmp_path)
    result = import_olive(project, write(tmp_path, doc))
    assert result.returncode == 0, result.out
    text, _ = imported(project)
    assert '# input_model.load_kwargs.torch_dtype = "float16": how Olive loads the torch model; the model builder reads the checkpoint itself' in text
    doc["passes"] = {"g": {"type": "gptq"}, "m": {"type": "ModelBuilder", "precision": "int4"}}
    result = import_olive(bare(tmp_path, "gptq"), write(tmp_path, doc, "gptq.json"), "--data", f"calibration={TRAIN}")
    assert result.returncode == 0 and 'left out: input_model.load_kwargs.torch_dtype = "float16"' in result.out, result.out


def test_auto_opt_int4_uses_olive_rtn_defaults(tmp_path):
    """auto-opt --use_ort_genai --precision int4 is Olive's OnnxBlockWiseRtnQuantization route:
    block 128, symmetric, accuracy level unset."""
    project = bare(tmp_path)
    result = import_olive(project, "--cli", "olive auto-opt -m org/model --use_ort_genai --precision int4")
    assert result.returncode == 0, result.out
    _, t = imported(project)
    assert t["model-builder"]["params"] == {"precision": "int4", "int4_algorithm": "rtn", "block_size": 128, "accuracy_level": 0, "symmetric": True}
    result = import_olive(bare(tmp_path, "mb"), "--cli", "olive auto-opt -m org/model --use_model_builder --precision int4")
    assert result.returncode == 0, result.out


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    project = new_project(tmp_path_factory.mktemp("tiny") / "project")
    project.doit("tiny-base")
    return project.root / "build" / "tiny-base"


def test_rtn_embeds_is_carried_by_a_tie_and_its_asymmetry_named(tmp_path):
    """gptq -> rtn 8-bit (lm_head, embeds, sym false) -> ModelBuilder -> TieWordEmbeddings: the tie
    makes the embedding the 8-bit head's (what embeds asks of a tied model); quantize-onnx's int8
    head is symmetric, which is named. Without the tie, the embedding stays float: named too."""
    source = CORPUS / "Qwen-Qwen3-0.6B__cpu__Qwen-Qwen3-0.6B_cpu_int4.json"
    project = bare(tmp_path)
    result = import_olive(project, source, "--skip-unsupported", *DATA)
    assert result.returncode == 0, result.out
    text, t = imported(project)
    assert "left out: passes.r.embeds" not in text and t["qwen3-0.6b-t"]["pass"] == "tie-embeddings"
    assert "what passes.r.embeds = true asks for a tied model" in text
    assert "# left out: passes.r.sym = false: quantize-onnx's int8 LM head (int8_nodes) is symmetric" in text
    doc = json.loads(source.read_text())
    del doc["passes"]["t"]
    project = bare(tmp_path, "untied")
    assert import_olive(project, write(tmp_path, doc), "--skip-unsupported", *DATA).returncode == 0
    assert "# left out: passes.r.embeds = true: the 8-bit embedding" in imported(project)[0]


def test_onnx_rtn_uses_olive_defaults_and_int8_node_lists(tmp_path):
    """OnnxBlockWiseRtnQuantization with no block size is Olive 0.13's block 128, accuracy level
    unset (quantize-onnx's own defaults are 32 and 4); OnnxKQuantQuantization's 8-bit
    customized_weight_config nodes are quantize-onnx int8_nodes."""
    doc = {**BASE, "passes": {"m": {"type": "ModelBuilder", "precision": "fp32"},
                              "q": {"type": "OnnxBlockWiseRtnQuantization"}}}
    project = bare(tmp_path)
    assert import_olive(project, write(tmp_path, doc)).returncode == 0
    text, t = imported(project)
    assert t["model-q"]["params"] == {"algorithm": "rtn", "block_size": 128, "accuracy_level": 0}
    assert_comments_match(text, t)
    doc["passes"]["q"] = {"type": "OnnxKQuantQuantization", "customized_weight_config": {"/lm_head/MatMul": {"bits": 8}}}
    project = bare(tmp_path, "k")
    assert import_olive(project, write(tmp_path, doc, "k.json")).returncode == 0
    assert imported(project)[1]["model-q"]["params"] == {"algorithm": "k_quant", "block_size": 32, "accuracy_level": 0, "int8_nodes": ["/lm_head/MatMul"]}
