"""onnx-export (torch.onnx dynamo -> plain fp32 ONNX) and lora-merge (adapter folded into the
weights), on the tiny model: real exports loaded by onnxruntime, real merges compared with peft."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import new_project

EXPORT, MERGED = "tiny-onnx-fp32", "tiny-travel-merged"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    project = new_project(tmp_path_factory.mktemp("export") / "project")
    project.doit(EXPORT, MERGED)
    return project


def torch_logits(model_dir, ids, adapter_dir=None):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    with torch.inference_mode():
        return model.eval()(input_ids=torch.tensor(ids)).logits.numpy()


def test_export_passes_the_checker_and_matches_torch_at_new_shapes(built):
    import onnx
    import onnxruntime as ort

    model_file = built.path(f"build/{EXPORT}/model.onnx")
    onnx.checker.check_model(str(model_file), full_check=True)
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    assert all(isinstance(dim, str) for i in session.get_inputs() for dim in i.shape)  # batch, sequence: dynamic
    ids = np.random.default_rng(0).integers(5, 500, size=(3, 23)).astype(np.int64)  # neither probe's shape
    got = session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    expected = torch_logits(built.path("build/tiny-base"), ids)
    assert got.shape == (3, 23, 512)
    assert np.abs(got - expected).max() < 1e-4
    record = json.loads(built.path(f"build/{EXPORT}/export.json").read_text())
    assert record["outputs"] == ["logits"] and record["opset"] == 18
    assert built.path(f"build/{EXPORT}/tokenizer.json").is_file()


def test_export_rebuild_is_byte_identical(built):
    before = {p.name: p.read_bytes() for p in built.path(f"build/{EXPORT}").iterdir() if p.is_file()}
    built.doit("forget", EXPORT)
    rebuilt = built.doit(EXPORT, env={"MODELBUILD_FORCE": "1"})
    assert f". {EXPORT}" in rebuilt.out.replace(".  ", ". ")
    after = {p.name: p.read_bytes() for p in built.path(f"build/{EXPORT}").iterdir() if p.is_file()}
    assert before == after


def test_export_that_misses_its_tolerance_fails_and_leaves_nothing(built):
    failed = built.doit_with("targets/strict.toml",
        '[target.strict-export]\npass = "onnx-export"\ninputs = { model = ":tiny-base" }\nparams = { max_logit_diff = 1e-12 }\n',
        "strict-export")
    assert failed.returncode != 0
    assert "modelbuild: targets/strict.toml: target 'strict-export': exported model's logits differ from torch: max |dlogit|" in failed.out
    assert "> params.max_logit_diff 1e-12" in failed.out
    assert not built.path("build/strict-export").exists()


def test_merged_model_is_base_plus_adapter(built):
    ids = [[3, 17, 42, 99, 7, 250, 11, 64]]
    merged = torch_logits(built.path(f"build/{MERGED}"), ids)
    with_adapter = torch_logits(built.path("build/tiny-base"), ids, built.path("build/tiny-travel-adapter"))
    base = torch_logits(built.path("build/tiny-base"), ids)
    assert np.abs(merged - with_adapter).max() < 1e-4
    assert np.abs(merged - base).max() > 1e-2  # the adapter is really in the weights
    assert not list(built.path(f"build/{MERGED}").glob("adapter_*"))
    assert json.loads(built.path(f"build/{MERGED}/lora_merge.json").read_text())["rank"] == 4


def test_merging_something_that_is_no_adapter_is_a_one_line_error(built):
    failed = built.doit_with("targets/bad.toml",
        '[target.bad-merge]\npass = "lora-merge"\ninputs = { base = ":tiny-base", adapter = ":tiny-base" }\n',
        "bad-merge")
    assert failed.returncode != 0
    assert "targets/bad.toml: target 'bad-merge': inputs.adapter: no adapter_config.json: not a LoRA adapter" in failed.out
    assert "Traceback" not in failed.out
