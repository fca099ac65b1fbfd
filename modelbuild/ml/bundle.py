"""An onnxruntime-genai bundle on disk, as passes that rewrite its decoder read and write it
(quantize-onnx, tie-embeddings): find the decoder, name its external-data files, save a new
decoder beside them, copy the rest of the bundle (genai_config.json, tokenizer, adapters/)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from modelbuild import UserError

GENAI_CONFIG = "genai_config.json"
NOT_COPIED = (".modelbuild", "modelbuild.json")  # the upstream stamp and genai-build's own record


def decoder_of(bundle: Path, what: str) -> tuple[dict, str]:
    """(decoder section of genai_config.json, decoder model file name); ``what`` says which
    targets make a fitting bundle, for the error."""
    config_file = bundle / GENAI_CONFIG
    if not config_file.is_file():
        raise UserError(f"inputs.bundle: no {GENAI_CONFIG}: not an onnxruntime-genai bundle (use {what})")
    try:
        decoder = json.loads(config_file.read_text())["model"]["decoder"]
        filename = decoder["filename"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"inputs.bundle: {GENAI_CONFIG} names no model.decoder.filename") from None
    if not (bundle / filename).is_file():
        raise UserError(f"inputs.bundle: {GENAI_CONFIG} names {filename}, which the bundle does not have")
    return decoder, filename


def external_data_files(model) -> list[str]:
    """External-data files of an ONNX model (loaded without them), by name relative to its folder."""
    import onnx

    return sorted({
        entry.value
        for init in model.graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL
        for entry in init.external_data if entry.key == "location"
    })


def save_decoder(model, path: Path, data_name: str) -> None:
    """Every initializer of 1 KiB or more into one external-data file beside the model."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024, convert_attribute=False)


def copy_rest(bundle: Path, out_dir: Path, model_files: set[str]) -> None:
    """Everything else of the bundle, unchanged: genai_config.json, tokenizer files, adapters/, records."""
    for entry in sorted(bundle.iterdir()):
        if entry.name in NOT_COPIED or entry.name in model_files:
            continue
        target = out_dir / entry.name
        if entry.is_dir():
            shutil.copytree(entry, target, copy_function=shutil.copyfile)
        else:
            shutil.copyfile(entry, target)


def files_size(folder: Path, names) -> int:
    return sum((folder / name).stat().st_size for name in names if (folder / name).is_file())
