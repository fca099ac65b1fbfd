"""An onnxruntime-genai bundle on disk, as passes that rewrite its decoder read and write it
(quantize-onnx, tie-embeddings): find the decoder, name its external-data files, save a new
decoder beside them, copy the rest of the bundle (genai_config.json, tokenizer, adapters/)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from modelbuild import UserError

GENAI_CONFIG = "genai_config.json"
INLINE_BELOW = 1024  # bytes: a smaller initializer stays in the model file, a larger one goes to its data file
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


def onnx_input(source: Path, what: str) -> tuple[dict | None, Path, str]:
    """The model an ONNX-to-ONNX pass reads from its input: a genai bundle's decoder, or an ONNX
    folder's model. (decoder section or None for a folder, model file, its name in the folder);
    ``what`` says which targets make a fitting bundle, for the error."""
    from .onnx_models import model_path

    if (source / GENAI_CONFIG).is_file():
        decoder, filename = decoder_of(source, what)
        return decoder, source / filename, filename
    source_file = model_path(source)
    return None, source_file, source_file.name


def save_like_input(model, source: Path, source_file: Path, filename: str, bundle: bool, out_dir: Path) -> None:
    """Write an ONNX-to-ONNX pass's rewritten ``model`` in its input's layout (onnx_input): the
    bundle's decoder file with its data file and the rest of the bundle, or an ONNX folder."""
    from .onnx_models import copy_source_files, load_graph, save_model

    if bundle:
        data_files = external_data_files(load_graph(source_file))
        save_decoder(model, out_dir / filename, data_files[0] if len(data_files) == 1 else f"{filename}.data")
        copy_rest(source, out_dir, {filename, *data_files})
    else:
        save_model(model, out_dir)
        copy_source_files(source, out_dir)


def external_data_files(model) -> list[str]:
    """External-data files of an ONNX model (loaded without them), by name relative to its folder."""
    import onnx

    return sorted({
        entry.value
        for init in model.graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL
        for entry in init.external_data if entry.key == "location"
    })


def load_decoder_lazily(path: Path):
    """(the decoder graph with its weights left in their external-data files, ``read``):
    ``read(initializer)`` gives a weight as an array mapped from its file (np.memmap: page cache,
    which the kernel can drop) or, for one stored inline, decoded. A rewrite of a 15 GB fp32
    decoder (Phi-3.5-mini) then holds only what it adds: loaded whole, plus the packed weights
    LoRA fusion adds, it needed more than this machine's 24 GB."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    files: dict[str, object] = {}

    def read(init):
        if init.data_location != onnx.TensorProto.EXTERNAL:
            return numpy_helper.to_array(init)
        location, offset, length = _external(init)
        if location not in files:
            files[location] = np.memmap(path.parent / location, dtype=np.uint8, mode="r")
        data = files[location][offset:] if length is None else files[location][offset:offset + length]
        return data.view(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).reshape(tuple(init.dims))

    return model, read


def save_decoder_streaming(model, path: Path, read) -> None:
    """``save_decoder``'s layout (initializers of ``INLINE_BELOW`` bytes or more, in graph order, in one
    ``<model>.data`` beside the model), written one weight at a time from wherever ``read`` finds
    it, so no second copy of the decoder is made; the new data file replaces the old one, which
    the mapped weights were read from, only once it is complete."""
    import os

    import numpy as np
    import onnx

    data_name = path.name + ".data"
    partial = path.parent / f"{data_name}.partial"
    with open(partial, "wb") as out:
        for init in model.graph.initializer:
            external = init.data_location == onnx.TensorProto.EXTERNAL
            if not external and (not init.HasField("raw_data") or len(init.raw_data) < INLINE_BELOW):
                continue  # stays inline, as onnx.save leaves it
            offset = out.tell()
            if external:
                out.write(memoryview(np.ascontiguousarray(read(init))).cast("B"))
            else:
                out.write(init.raw_data)
            init.ClearField("raw_data")
            del init.external_data[:]
            init.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", offset), ("length", out.tell() - offset)):
                entry = init.external_data.add()
                entry.key, entry.value = key, str(value)
    os.replace(partial, path.parent / data_name)
    path.write_bytes(model.SerializeToString())


def _external(init) -> tuple[str, int, int | None]:
    info = {entry.key: entry.value for entry in init.external_data}
    return info["location"], int(info.get("offset", 0)), int(info["length"]) if "length" in info else None


def save_decoder(model, path: Path, data_name: str) -> None:
    """Every initializer of ``INLINE_BELOW`` bytes or more into one external-data file beside the model."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=INLINE_BELOW, convert_attribute=False)


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
