"""`python -m modelbuild card`: a Hugging Face model card of a real evaluate target of the tiny
recipe, parsed back with huggingface_hub, every file it names present, its numbers those of
metrics.json; a release lock carried only when it describes the build being shipped."""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import pytest
from conftest import new_project
from huggingface_hub import ModelCard

from modelbuild.exec.executor import load_here

EVAL = "tiny-travel-cpu-int4-eval"
MODEL = "tiny-travel-cpu-int4"
COLUMNS = {"perplexity": "perplexity", "perplexity Δ vs torch fp32 (%)": "perplexity_delta_pct",
           "tokens/s": "tokens_per_s", "tokens/s torch fp32": "reference_tokens_per_s",
           "speed vs torch fp32 (×)": "speed_ratio", "time to first token (ms)": "ttft_ms", "size (MB)": "size_mb",
           "size vs torch fp32": "size_ratio", "peak RSS (MB)": "peak_rss_mb"}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    project = new_project(tmp_path_factory.mktemp("card") / "project")
    project.doit(EVAL)
    return project


def table(markdown: str, first_header: str) -> list[dict[str, str]]:
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True)))
    return rows


def card_of(project, *args):
    result = project.modelbuild("card", *args)
    assert result.returncode == 0, result.out
    folder = project.path(f"hub/{MODEL}")
    assert f"model card: {folder / 'README.md'}" in result.out
    return folder, ModelCard.load(folder / "README.md")


def test_card_parses_names_only_present_files_and_carries_metrics_json(evaluated):
    folder, card = card_of(evaluated, EVAL)
    data = card.data.to_dict()
    assert data["library_name"] == "onnxruntime-genai" and data["pipeline_tag"] == "text-generation"
    assert data["license"] == "unknown"  # a random-init base has none
    assert "base_model" not in data  # and no hub base: the card says so instead of inventing one
    assert {"modelbuild", "onnx", "int4", "lora-adapter-travel", "random-init"} <= set(data["tags"])
    assert "a random model, no hub base" in card.text

    named = [row["file"].strip("`") for row in table(card.text, "file")]
    shipped = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert sorted(named + ["README.md"]) == shipped
    for rel in set(re.findall(r"`((?:adapters|metrics)/[^`]+)`", card.text)) | set(named):
        assert (folder / rel).is_file(), rel
    for row in table(card.text, "file"):
        assert int(row["bytes"]) == (folder / row["file"].strip("`")).stat().st_size
    built = evaluated.path(f"build/{MODEL}")
    for rel in ("model.onnx", "model.onnx.data", "adapters/travel.onnx_adapter", "genai_config.json"):
        assert (folder / rel).read_bytes() == (built / rel).read_bytes()

    metrics = json.loads(evaluated.path(f"build/{EVAL}/metrics.json").read_text())
    assert json.loads((folder / f"metrics/{EVAL}.json").read_text()) == metrics
    [row] = table(card.text, "evaluation")
    assert row["evaluation"] == EVAL and row["adapter"] == "travel"
    for column, key in COLUMNS.items():
        assert metrics[key] is not None and float(row[column]) == metrics[key], (column, row[column], metrics[key])
    assert "12 held-out records of `targets/data/travel_eval.jsonl`" in card.text
    assert "16 new tokens on each of 3 prompts" in card.text  # the eval target's own params
    assert "No release lock was written" in card.text


def test_release_lock_is_named_when_it_describes_this_build(evaluated, tmp_path):
    result = evaluated.modelbuild("release", MODEL)
    assert result.returncode == 0, result.out
    lock = evaluated.path(f"release/{MODEL}/{MODEL}.lock.json")
    try:
        folder, card = card_of(evaluated, MODEL, "--base-model", "someone/tiny-phi3", "--license", "mit")
        data = card.data.to_dict()
        assert data["base_model"] == "someone/tiny-phi3" and data["base_model_relation"] == "quantized"
        assert data["license"] == "mit"
        digest = hashlib.sha256(lock.read_bytes()).hexdigest()
        assert f"`{lock.name}` (sha256 `{digest}`)" in card.text
        assert (folder / lock.name).read_bytes() == lock.read_bytes()

        # A lock of another build of the model: one line, and the card already there stays whole.
        before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        other = json.loads(lock.read_text())
        other["stages"][MODEL]["outputs"]["model.onnx"]["digest"] = "0" * 64
        lock.write_text(json.dumps(other))
        result = evaluated.modelbuild("card", MODEL)
        assert result.returncode == 2
        assert result.out.strip() == (f"modelbuild: release/{MODEL}/{lock.name}: made from another build of '{MODEL}' "
                                      f"(its output digests differ); run `python -m modelbuild release {MODEL}` again, "
                                      f"or delete it")
        assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
        assert sorted(p.name for p in folder.parent.iterdir()) == [MODEL]  # no staging folder left
    finally:
        shutil.rmtree(lock.parent)


def test_base_metadata_comes_from_the_base(tmp_path, monkeypatch):
    from modelbuild.cli.card import _base

    fresh = new_project(tmp_path / "project")
    monkeypatch.setenv("MODELBUILD_CACHE", str(fresh.cache))
    project = load_here(str(fresh.root))
    smollm2 = _base(project, "smollm2-travel-cpu-int4", None, None)
    # the embedded GGUF's own general.license
    assert smollm2 == {"target": "smollm2-base", "pass": "embedded-import",
                       "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"}
    phi = _base(project, "phi35-travel-cpu-int4", None, None)
    assert phi["hub_id"] == "microsoft/Phi-3.5-mini-instruct" and phi["pass"] == "hf-import"


@pytest.mark.parametrize("args, says", [
    (["no-such-target"], "modelbuild: unknown target 'no-such-target' (see `python -m modelbuild targets`)"),
    (["smollm2-travel-cpu-int4-eval"], "modelbuild: target 'smollm2-travel-cpu-int4' is not built here"),
    (["tiny-travel-adapter"], "modelbuild: target 'tiny-travel-adapter': no evaluate target measures it"),
])
def test_bad_requests_are_one_line_and_write_nothing(project, args, says):
    result = project.modelbuild("card", *args)
    assert result.returncode == 2 and result.out.startswith(says) and result.out.count("\n") == 1, result.out
    assert not project.path("hub").exists()


def test_a_folder_it_did_not_write_is_never_replaced(evaluated, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    result = evaluated.modelbuild("card", EVAL, "--out", str(mine))
    assert result.returncode == 2 and "exists and is not a card folder modelbuild wrote" in result.out, result.out
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
