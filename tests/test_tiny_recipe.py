"""The travel recipe end to end on the tiny random Phi3: real doit, real bundles, real adapters."""

from __future__ import annotations

import json

import numpy as np

from conftest import TINY, new_project, ort_logits

FP32_TARGETS = """
[target.tiny-fp32]
pass = "genai-build"
inputs = { base = ":tiny-base", adapters = { travel = ":tiny-travel-adapter" } }
params = { precision = "fp32" }
"""


def test_build_executes_every_stage_and_smoke_answers(built_tiny):
    answers = json.loads(built_tiny.path(f"build/{TINY}/answers.json").read_text())
    assert set(answers) == {"What should I see in Chicago?", "Plan a rainy day in London.", "What should I pack for a week in Iceland?"}
    for by_variant in answers.values():
        assert set(by_variant) == {"(none)", "travel"}
    bundle = built_tiny.path("build/tiny-travel-cpu-int4")
    for name in ["model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "adapters/travel.onnx_adapter"]:
        assert (bundle / name).is_file(), name


def test_bundle_loads_and_adapter_switches_tokens(built_tiny):
    from modelbuild.ml.genai import Chat

    chat = Chat(built_tiny.path("build/tiny-travel-cpu-int4"))
    assert chat.adapter_names == ["travel"]
    prompt = "What should I see in Chicago?"
    base = chat.generate(prompt, None, 24)
    tuned = chat.generate(prompt, "travel", 24)
    assert base and tuned and base != tuned
    # Switching back off restores the base model exactly: the default LoRA weights are zero.
    assert chat.generate(prompt, None, 24) == base


def test_int4_base_is_quantized_and_lora_stays_float(built_tiny):
    import onnx

    model = onnx.load(str(built_tiny.path("build/tiny-travel-cpu-int4/model.onnx")), load_external_data=False)
    ops = {node.op_type for node in model.graph.node}
    assert "MatMulNBits" in ops
    lora_nodes = [n for n in model.graph.node if "/lora_A/" in n.name or "/lora_B/" in n.name]
    assert lora_nodes and all(n.op_type in ("MatMul", "Gemm") for n in lora_nodes)  # Gemm: B and its Add (lora_gemm.py)
    lora_inputs = {i.name for i in model.graph.input if ".lora_" in i.name}
    assert lora_inputs == {n.input[1] for n in lora_nodes}


def test_bundle_bytes_do_not_follow_the_git_repo_around_the_venv(built_tiny):
    """The builder stamps a git commit into the model: its own, never the HEAD of a repo that
    happens to hold the virtual environment (that made rebuilds differ after every commit)."""
    import onnx
    import onnxruntime_genai as og

    model = onnx.load(str(built_tiny.path("build/tiny-travel-cpu-int4/model.onnx")), load_external_data=False)
    assert model.producer_version == f"{og.__version__}+{og.__commit__[:7]}"


def test_fp32_builder_logits_match_torch_with_and_without_adapter(built_tiny):
    """Guards the builder's LM-head trap and the switchable-adapter layout against torch/peft."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    built_tiny.path("targets/fp32.toml").write_text(FP32_TARGETS)
    result = built_tiny.doit("tiny-fp32")
    assert result.executed == {"tiny-fp32"}  # base and adapter are reused
    bundle = built_tiny.path("build/tiny-fp32")
    ids = np.array([[5, 17, 42, 99, 300, 7, 8, 250]], dtype=np.int64)

    base = AutoModelForCausalLM.from_pretrained(built_tiny.path("build/tiny-base"), dtype=torch.float32).eval()
    with torch.no_grad():
        torch_base = base(torch.from_numpy(ids)).logits.numpy()
    onnx_base = ort_logits(bundle, ids)
    assert np.abs(onnx_base - torch_base).max() < 1e-4
    assert (onnx_base.argmax(-1) == torch_base.argmax(-1)).all()

    tuned = PeftModel.from_pretrained(base, built_tiny.path("build/tiny-travel-adapter")).eval()
    with torch.no_grad():
        torch_tuned = tuned(torch.from_numpy(ids)).logits.numpy()
    onnx_tuned = ort_logits(bundle, ids, bundle / "adapters/travel.onnx_adapter")
    assert np.abs(torch_tuned - torch_base).max() > 1e-2  # the adapter really moves the logits
    assert np.abs(onnx_tuned - torch_tuned).max() < 1e-4


def test_two_adapters_in_one_bundle_each_match_peft(built_tiny):
    """A second adapter (another seed) gets its own .onnx_adapter in the builder's layout: in an
    fp32 bundle, each named adapter reproduces its own peft model's logits."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from modelbuild.ml.genai import bundle_adapters

    built_tiny.path("targets/two.toml").write_text("""
[target.tiny-adapter-b]
pass = "lora-finetune"
inputs = { base = ":tiny-base", data = "data/travel_train.jsonl" }
params = { max_steps = 10, batch_size = 2, max_length = 64, learning_rate = 5e-3, rank = 4, seed = 7 }

[target.tiny-two]
pass = "genai-build"
inputs = { base = ":tiny-base", adapters = { travel = ":tiny-travel-adapter", other = ":tiny-adapter-b" } }
params = { precision = "fp32" }
""")
    built_tiny.doit("tiny-two")
    bundle = built_tiny.path("build/tiny-two")
    assert sorted(bundle_adapters(bundle)) == ["other", "travel"]
    ids = np.array([[9, 33, 120, 480, 2, 61]], dtype=np.int64)
    base = AutoModelForCausalLM.from_pretrained(built_tiny.path("build/tiny-base"), dtype=torch.float32).eval()
    logits = {}
    for name, folder in [("travel", "tiny-travel-adapter"), ("other", "tiny-adapter-b")]:
        tuned = PeftModel.from_pretrained(base, built_tiny.path(f"build/{folder}"), adapter_name=name).eval()
        with torch.no_grad():
            logits[name] = tuned(torch.from_numpy(ids)).logits.numpy()
        onnx_logits = ort_logits(bundle, ids, bundle / f"adapters/{name}.onnx_adapter")
        assert np.abs(onnx_logits - logits[name]).max() < 1e-4, name
        base = tuned.unload()
    assert np.abs(logits["travel"] - logits["other"]).max() > 1e-2


def test_rebuild_in_a_fresh_project_is_byte_identical(built_tiny, tmp_path):
    """Same inputs -> same bytes, LoRA adapter included (the peer's finetune is not reproducible)."""
    other = new_project(tmp_path / "again")
    other.doit("tiny-travel-cpu-int4")
    for target in ["tiny-base", "tiny-travel-adapter", "tiny-travel-cpu-int4"]:
        a = json.loads(built_tiny.path(f"build/{target}/.modelbuild/stamp.json").read_text())
        b = json.loads(other.path(f"build/{target}/.modelbuild/stamp.json").read_text())
        assert a["manifest"] == b["manifest"], target
        assert a["action_key"] == b["action_key"], target
    config = json.loads(other.path("build/tiny-travel-adapter/adapter_config.json").read_text())
    assert str(other.root) not in json.dumps(config) and config["target_modules"] == sorted(config["target_modules"])


def test_chat_command_with_and_without_adapter(built_tiny):
    bundle = str(built_tiny.path("build/tiny-travel-cpu-int4"))
    on = built_tiny.modelbuild("chat", bundle, "What should I see in Chicago?", "--adapter", "travel", "--max-new-tokens", "16")
    off = built_tiny.modelbuild("chat", bundle, "What should I see in Chicago?", "--max-new-tokens", "16")
    assert on.returncode == 0 and off.returncode == 0, on.out + off.out
    assert on.out.strip() and on.out != off.out
    bad = built_tiny.modelbuild("chat", bundle, "hi", "--adapter", "nope")
    assert bad.returncode == 2 and "no adapter 'nope' (has: travel)" in bad.out


def test_parallel_doit_builds_independent_targets(built_tiny):
    built_tiny.path("targets/par.toml").write_text("""
[target.tiny-int8]
pass = "genai-build"
inputs = { base = ":tiny-base" }
params = { precision = "int8" }

[target.tiny-fp32-plain]
pass = "genai-build"
inputs = { base = ":tiny-base" }
params = { precision = "fp32" }
""")
    result = built_tiny.doit("-n", "2", "tiny-int8", "tiny-fp32-plain")
    assert result.executed == {"tiny-int8", "tiny-fp32-plain"}
    assert "tiny-base" in result.up_to_date


def test_genai_build_refuses_a_bundle_that_does_not_match_torch(built_tiny, tmp_path):
    """The LM-head trap through hf-import (random-init refuses such configs): with vocab 512 and
    intermediate 256, Phi3's fused gate_up has 512 outputs and the builder takes it for the LM
    head. The bundle loads and generates, but is not the model: genai-build must fail, not ship."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, Phi3Config

    tiny = json.loads(built_tiny.path("build/tiny-base/config.json").read_text())
    config = Phi3Config(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                        original_max_position_embeddings=512, tie_word_embeddings=False,
                        bos_token_id=tiny["bos_token_id"], eos_token_id=tiny["eos_token_id"], pad_token_id=tiny["pad_token_id"])
    torch.manual_seed(0)
    trap = tmp_path / "trap-model"
    AutoModelForCausalLM.from_config(config).save_pretrained(trap)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(built_tiny.path(f"build/tiny-base/{name}"), trap / name)
    result = built_tiny.doit_with("targets/trap.toml", f"""
[target.trap-base]
pass = "hf-import"
inputs = {{ local = "{trap}" }}

[target."trap-{{precision}}"]
pass = "genai-build"
inputs = {{ base = ":trap-base" }}
params = {{ precision = "{{precision}}" }}
matrix = {{ precision = ["fp32", "int4"] }}
""", "-c", "trap-fp32", "trap-int4")
    assert result.returncode != 0 and "Traceback" not in result.out, result.out
    assert "target 'trap-fp32': built fp32 model differs from torch fp32: max |dlogit|" in result.out
    assert "target 'trap-int4': built int4 model does not follow torch fp32 on the check prompt: logit correlation" in result.out
    assert not built_tiny.path("build/trap-fp32").exists() and not built_tiny.path("build/trap-int4").exists()
    checked = json.loads(built_tiny.path("build/tiny-travel-cpu-int4/modelbuild.json").read_text())["vs_torch_fp32"]
    assert checked["correlation"] >= 0.9  # the real tiny int4 bundle passes the same check
