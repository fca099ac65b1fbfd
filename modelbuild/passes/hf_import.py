"""hf-import: a Hugging Face model, from a local folder or the hub, as a folder of its files.

Files are taken as they are (config, safetensors weights, tokenizer, chat template, and the
model's own code when trust_remote_code is set); downstream passes load them. A local folder is
keyed by its content. A hub model is keyed by (id, the commit its revision resolves to): a sha
is its own commit; a branch or tag is resolved through the local Hugging Face cache (no network
on a no-op), so when the branch moves and the new commit is fetched, the stage rebuilds. A
branch never fetched here keys as unresolved until the first download (one extra rebuild then).
Pin revision to a commit sha for hermetic builds; hf_import.json records the commit either way.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from modelbuild import UserError
from modelbuild.passdef import Input, PassDef, param

MODEL_FILES = (
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)


@dataclass(frozen=True)
class Params:
    model: str = param("", "hub id (org/name); ignored when inputs.local is given, except in messages")
    revision: str = param("main", "hub branch, tag or commit sha (a sha makes the build hermetic)")
    trust_remote_code: bool = param(False, "also take the model's own *.py files (needed by some architectures)")


def _wanted(name: str, trust_remote_code: bool) -> bool:
    patterns = MODEL_FILES + (("*.py",) if trust_remote_code else ())
    return any(fnmatch(name, pattern) for pattern in patterns)


def _from_hub(params: Params, ctx) -> tuple[Path, str]:
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    from huggingface_hub import snapshot_download

    patterns = list(MODEL_FILES) + (["*.py"] if params.trust_remote_code else [])
    try:
        folder = Path(snapshot_download(params.model, revision=params.revision, allow_patterns=patterns))
    except Exception as error:  # hub errors come in many classes; all mean the same to the user
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"cannot get {params.model}@{params.revision} from the Hugging Face hub or its local cache ({reason}); "
            f"download it where the hub is reachable and set inputs.local = \"/path/to/folder\" on target "
            f"'{ctx.target}' in targets/"
        ) from None
    return folder, folder.name


def resolve(params: dict, inputs: dict) -> dict:
    """The commit a hub revision names, from the local Hugging Face cache's refs (key component)."""
    if "local" in inputs or not params["model"]:
        return {}
    revision = params["revision"]
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return {"commit": revision}
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME") or Path.home() / ".cache/huggingface") / "hub")
    ref = hub / f"models--{params['model'].replace('/', '--')}" / "refs" / revision
    try:
        return {"commit": ref.read_text().strip()}
    except OSError:
        return {"commit": f"unresolved {revision}"}


def check(params: dict, inputs: dict) -> None:
    """At load: a hub id or a local folder that holds a Hugging Face model (config.json + safetensors)."""
    local = inputs.get("local")
    if local is None:
        if not params["model"]:
            raise UserError("params.model: give a hub id, or set inputs.local to a model folder")
        return
    if not isinstance(local, Path):
        return  # another target's output: checked when it is built
    names = [entry.name for entry in local.iterdir()]
    if "config.json" not in names:
        raise UserError(f"inputs.local: {local} has no config.json: not a Hugging Face model folder")
    if not any(name.endswith(".safetensors") for name in names):
        raise UserError(f"inputs.local: {local} has no *.safetensors weights (convert .bin checkpoints to safetensors first)")


def run(params: Params, inputs: dict, out_dir: Path, ctx) -> None:
    local = inputs.get("local")
    if local is not None:
        source, origin = local, {"local": True}
    else:
        source, commit = _from_hub(params, ctx)
        origin = {"model": params.model, "revision": params.revision, "commit": commit}
    copied = []
    for path in sorted(source.iterdir()):
        if path.is_file() and _wanted(path.name, params.trust_remote_code):
            shutil.copyfile(path, out_dir / path.name)  # copy, never link: build outputs are private
            copied.append(path.name)
    if "config.json" not in copied:
        raise UserError(f"{source}: no config.json: not a Hugging Face model folder")
    if not any(name.endswith(".safetensors") for name in copied):
        raise UserError(f"{source}: no *.safetensors weights (convert .bin checkpoints to safetensors first)")
    (out_dir / "hf_import.json").write_text(json.dumps({**origin, "files": copied}, indent=1, sort_keys=True) + "\n")


PASS = PassDef(
    name="hf-import",
    version=1,
    doc="Hugging Face model from a local folder or the hub (id + revision) -> folder of its model files",
    params=Params,
    inputs={"local": Input("local model folder, instead of the hub", required=False)},
    run=run,
    libraries=("huggingface_hub",),
    check=check,
    resolve=resolve,
)
