"""What the importer builds: the target records, the chain's current artifact, the pending
torch-side quantization, typed access to a pass's options, and the pass-type table."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .workflow import PassEntry, expect

if TYPE_CHECKING:
    from .mapping import Importer

# Olive pass type (normalized: lower case, letters and digits) -> handler name.
PASS_TYPES = {
    "modelbuilder": "ModelBuilder",
    "onnxconversion": "OnnxConversion",
    "orttransformersoptimization": "OrtTransformersOptimization",
    "onnxfloattofloat16": "OnnxFloatToFloat16",
    "onnxblockwisertnquantization": "OnnxBlockWiseRtnQuantization",
    "onnxkquantquantization": "OnnxKQuantQuantization",
    "onnxmatmul4quantizer": "OnnxMatMul4Quantizer",
    "matmulnbitsquantizer": "MatMulNBitsQuantizer",
    "onnxhqqquantization": "OnnxHqqQuantization",
    "gptq": "gptq", "gptqquantizer": "GptqQuantizer",
    "rtn": "rtn",
    "awq": "awq", "awqquantizer": "AwqQuantizer",
    "selectivemixedprecision": "SelectiveMixedPrecision",
    "lora": "LoRA", "qlora": "QLoRA",
    "onnxdynamicquantization": "OnnxDynamicQuantization",
    "onnxstaticquantization": "OnnxStaticQuantization",
    "onnxquantization": "OnnxQuantization",
    "extractadapters": "ExtractAdapters",
    "graphsurgeries": "GraphSurgeries",
}
SUPPORTED = ", ".join(sorted(set(PASS_TYPES.values()), key=str.lower))
SURGEONS = {"TieWordEmbeddings"}
# Options any ONNX-writing pass may carry: how the file is laid out on disk, never its content.
STORAGE = ("save_as_external_data", "all_tensors_to_one_file", "external_data_name", "size_threshold", "convert_attribute")
BLOCK_SIZES = (16, 32, 64, 128, 256)
NAME_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def norm_type(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


@dataclass
class Target:
    name: str
    pass_name: str
    params: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)
    device: str = "cpu"
    doc: str = ""
    comments: list[str] = field(default_factory=list)
    gates: dict = field(default_factory=dict)


@dataclass
class Artifact:
    ref: str  # ":target" or a path relative to the TOML file
    kind: str  # "hf" | "onnx" | "bundle"
    precision: str = ""  # bundles: int4, int8, fp32, fp16
    target: Target | None = None


@dataclass
class Pending:
    """A torch-side quantizer's decision, written at the next ModelBuilder."""

    algorithm: str = ""  # "", "rtn", "gptq", "awq"
    block_size: int | None = None
    symmetric: bool | None = None
    int8_nodes: list[str] = field(default_factory=list)
    mixed: str = ""  # SelectiveMixedPrecision algorithm carried to the builder
    calibration: str | None = None
    precision: str = ""  # "int8" when an 8-bit rtn is the only quantizer
    sources: list[tuple[str, str]] = field(default_factory=list)  # (pass path, text) for comments


class Options:
    """A pass's options: typed reads, options accepted but not carried over, unknown-key errors."""

    def __init__(self, imp: "Importer", entry: PassEntry):
        self.imp, self.entry, self.known, self.dropped = imp, entry, set(), []

    def path(self, key: str) -> str:
        return f"{self.entry.path}.{key}"

    def get(self, key: str, kinds: tuple, default: Any = None, choices: tuple | None = None) -> Any:
        self.known.add(key)
        if key not in self.entry.options or self.entry.options[key] is None:
            return default
        value = expect(self.entry.options[key], kinds, self.imp.wf.source, self.path(key))
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if choices and value not in choices:
            raise self.imp.fail(self.path(key), f"{json.dumps(value)} is not one of {', '.join(json.dumps(c) for c in choices)}")
        return value

    def note(self, *keys: str) -> None:
        """Options Olive knows that change nothing modelbuild builds (or that it cannot carry)."""
        for key in keys:
            self.known.add(key)
            if key in self.entry.options:
                self.dropped.append(key)

    def finish(self) -> list[str]:
        for key in self.entry.options:
            if key not in self.known:
                raise self.imp.fail(self.path(key), f"unknown option of Olive pass {self.entry.type} (known: {', '.join(sorted(self.known))})")
        return [f"not carried over: {', '.join(self.dropped)}"] if self.dropped else []
