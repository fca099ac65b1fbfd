"""Pass registry, plug-ins and the failure modes of individual passes."""

from __future__ import annotations

import json
import sys
import textwrap

from conftest import run_cmd

from modelbuild.passdef import registry


def test_passes_command_documents_every_param_from_the_configs(project):
    result = project.modelbuild("passes")
    assert result.returncode == 0, result.out
    for name, pass_def in registry().items():
        assert f"{name} (v{pass_def.version}" in result.out
        for field in pass_def.param_fields():
            assert f"    {field.name}: " in result.out, (name, field.name)
            assert field.metadata["doc"] in result.out
        for input_name in pass_def.inputs:
            assert f"    {input_name} (" in result.out


def test_loading_tasks_imports_no_heavy_library(project):
    code = "import runpy, sys; runpy.run_path('dodo.py'); from modelbuild.passdef import registry; registry(); " \
           "print(sorted(m for m in ('torch', 'transformers', 'onnx', 'onnxruntime', 'peft', 'numpy', 'onnxruntime_genai', " \
           "'matplotlib', 'rich') if m in sys.modules))"
    result = run_cmd([sys.executable, "-c", code], project.root)
    assert result.out.strip().splitlines()[-1] == "[]", result.out


PLUGIN = '''
from dataclasses import dataclass
from modelbuild.passdef import Input, PassDef, param

@dataclass(frozen=True)
class Params:
    text: str = param("hello", "text to write")

def run(params, inputs, out_dir, ctx):
    words = inputs["source"].read_text().split()
    (out_dir / "out.txt").write_text(params.text + " " + str(len(words)))

PASS = PassDef(name="count-words", version=1, doc="count words", params=Params,
               inputs={"source": Input("a text file", kind="file")}, run=run)
'''


def test_third_party_pass_plugs_in_through_entry_points(project, tmp_path):
    site = tmp_path / "site"
    (site / "countwords_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "countwords_plugin.py").write_text(PLUGIN)
    (site / "countwords_plugin-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: countwords-plugin\nVersion: 0.1\n")
    (site / "countwords_plugin-0.1.dist-info" / "entry_points.txt").write_text(
        "[modelbuild.passes]\ncount-words = countwords_plugin:PASS\n"
    )
    project.path("targets/plug.toml").write_text(
        '[target.words]\npass = "count-words"\ninputs = { source = "data/tokenizer_corpus.txt" }\nparams = { text = "n" }\n'
    )
    env = {"PYTHONPATH": str(site)}
    listed = project.modelbuild("passes", "count-words", env=env)
    assert "text: str = 'hello'" in listed.out
    project.doit("words", env=env)
    expected = len(project.path("targets/data/tokenizer_corpus.txt").read_text().split())
    assert project.path("build/words/out.txt").read_text() == f"n {expected}"
    # Without the plug-in installed, the target file names a pass nobody provides.
    missing = project.doit("list", check=False)
    assert missing.returncode != 0 and "pass: unknown pass 'count-words'" in missing.out


def test_phi35_offline_fails_fast_and_says_how_to_use_a_local_copy(project):
    result = project.doit("phi35-travel-cpu-int4", check=False)
    assert result.returncode != 0
    assert "target 'phi35-base'" in result.out
    assert "microsoft/Phi-3.5-mini-instruct" in result.out
    assert 'set inputs.local = "/path/to/folder"' in result.out
    assert "Traceback" not in result.out
    assert not project.path("build/phi35-base").exists()


def test_hf_import_from_a_local_folder_copies_the_model_files(built_tiny):
    built_tiny.path("targets/local.toml").write_text(
        '[target.local-copy]\npass = "hf-import"\nparams = { model = "tiny" }\ninputs = { local = "../build/tiny-base" }\n'
    )
    built_tiny.doit("local-copy")
    source, copy = built_tiny.path("build/tiny-base"), built_tiny.path("build/local-copy")
    for name in ["config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"]:
        assert (copy / name).read_bytes() == (source / name).read_bytes()
    assert json.loads((copy / "hf_import.json").read_text())["local"] is True


def test_random_init_refuses_the_lm_head_trap(project):
    project.path("targets/trap.toml").write_text(textwrap.dedent("""
        [target.trap]
        pass = "random-init"
        inputs = { corpus = "data/tokenizer_corpus.txt" }
        params = { config = { model_type = "phi3", vocab_size = 512, hidden_size = 128, intermediate_size = 256, num_hidden_layers = 1, num_attention_heads = 4, num_key_value_heads = 4, max_position_embeddings = 512, original_max_position_embeddings = 512 } }
    """))
    result = project.doit("trap", check=False)
    assert result.returncode != 0
    assert "gate_up_proj has out_features == vocab_size (512)" in result.out
    assert not project.path("build/trap").exists()


def test_embedded_import_rejects_a_wheel_with_the_wrong_sha256(project):
    project.path("targets/sha.toml").write_text(
        '[target.bad-sha]\npass = "embedded-import"\nparams = { sha256 = "' + "0" * 64 + '" }\n'
    )
    result = project.doit("bad-sha", check=False)
    assert result.returncode != 0
    assert "params.sha256:" in result.out and "expected 0000" in result.out
    assert not project.path("build/bad-sha").exists()


def test_finetune_names_the_bad_record(project):
    project.path("targets/data/broken.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n')
    project.path("targets/broken.toml").write_text(
        '[target.broken]\npass = "lora-finetune"\ninputs = { base = ":tiny-base", data = "data/broken.jsonl" }\n'
    )
    result = project.doit("broken", check=False)
    assert result.returncode != 0
    assert "targets/data/broken.jsonl: record 2: template field 'response' is not in the record" in result.out
    assert not project.path("build/broken").exists()


def test_pass_code_in_the_key_covers_the_helpers_it_imports():
    """Editing a helper that shapes a pass's output (hf.py, genai.py) must change that pass's key."""

    def names(pass_name):
        return set(registry()[pass_name].code_files())

    assert {"modelbuild.passes.random_init", "modelbuild.ml.hf"} <= names("random-init")
    assert {"modelbuild.passes.smoke", "modelbuild.ml.genai", "modelbuild.core.progress"} <= names("smoke")
    assert {"modelbuild.passes.genai_build", "modelbuild.ml.genai"} <= names("genai-build")
    assert "modelbuild.passdef" not in names("genai-build")  # the registry shapes no output
    assert "modelbuild.ml.onnx_models" in names("graph-optimize")  # a parenthesized, multi-line import is followed too
    assert "modelbuild.ml.hf" not in names("smoke")
    assert not any(name.split(".")[0] in ("torch", "onnx", "json") for name in names("genai-build"))  # libraries: by version


def test_no_pass_imports_another_pass_so_keys_follow_only_shared_code():
    """A pass's key follows the modules it imports: editing the LoRA training loop must not
    invalidate cached AWQ, GPTQ or evaluation outputs. What passes share lives in modelbuild/ml."""
    for name, pass_def in registry().items():
        if not pass_def.run.__module__.startswith("modelbuild."):
            continue  # a plug-in
        passes = [module for module in pass_def.code_files() if module.startswith("modelbuild.passes.")]
        assert passes == [pass_def.run.__module__], (name, passes)
    awq = set(registry()["awq"].code_files())
    assert {"modelbuild.ml.records", "modelbuild.ml.int4"} <= awq and "modelbuild.passes.lora_finetune" not in awq


def test_hf_import_from_the_hub_keys_the_commit_its_branch_resolves_to(built_tiny, tmp_path):
    """A hub model on a branch is keyed by the commit the branch points at (through the local
    Hugging Face cache, offline here), not by the branch name: when the branch moves, it rebuilds."""
    import shutil

    hub = tmp_path / "hub"
    repo = hub / "models--test--tiny"
    for commit in ("a" * 40, "b" * 40):
        shutil.copytree(built_tiny.path("build/tiny-base"), repo / "snapshots" / commit, ignore=shutil.ignore_patterns(".modelbuild"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    built_tiny.path("targets/hub.toml").write_text('[target.hub-tiny]\npass = "hf-import"\nparams = { model = "test/tiny", revision = "main" }\n')
    try:
        assert built_tiny.doit("hub-tiny", env=env).executed == {"hub-tiny"}
        assert json.loads(built_tiny.path("build/hub-tiny/hf_import.json").read_text())["commit"] == "a" * 40
        assert built_tiny.doit("hub-tiny", env=env).executed == set()
        (repo / "refs" / "main").write_text("b" * 40)  # the branch moved, and the new commit was fetched
        why = built_tiny.modelbuild("why", "hub-tiny", env=env).out
        assert f"hub-tiny: stale: resolved: {{'commit': '{'a' * 40}'}} -> {{'commit': '{'b' * 40}'}}" in why
        assert built_tiny.doit("hub-tiny", env=env).executed == {"hub-tiny"}
        assert json.loads(built_tiny.path("build/hub-tiny/hf_import.json").read_text())["commit"] == "b" * 40
    finally:
        built_tiny.path("targets/hub.toml").unlink()
