"""What the importer builds: the target records, the chain's current artifact, the pending
torch-side quantization, and the pass-type table: the bottom of the importer, importing none of
its other modules."""

from __future__ import annotations

import re
from dataclasses import dataclass, field


# Olive pass type (normalized: lower case, letters and digits) -> its name in messages
# (each has its handler in mapping.py's HANDLERS).
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
    "awq": "awq", "awqquantizer": "AwqQuantizer", "autoawqquantizer": "AutoAWQQuantizer",
    "selectivemixedprecision": "SelectiveMixedPrecision",
    "lora": "LoRA", "qlora": "QLoRA",
    "onnxdynamicquantization": "OnnxDynamicQuantization",
    "onnxstaticquantization": "OnnxStaticQuantization",
    "onnxquantization": "OnnxQuantization",
    "extractadapters": "ExtractAdapters",
    "graphsurgeries": "GraphSurgeries",
    "dynamictofixedshape": "DynamicToFixedShape",
    "matmulnbitstoqdq": "MatMulNBitsToQDQ",
    "onnxpeepholeoptimizer": "OnnxPeepholeOptimizer",
    "gptqmodel": "GptqModel",
}
SUPPORTED = ", ".join(sorted(set(PASS_TYPES.values()), key=str.lower))
# TieWordEmbeddings -> tie-embeddings; the others -> graph-surgery steps (surgery.py).
SURGEONS = {"TieWordEmbeddings", "GemmToMatMulAdd", "AttentionMaskToSequenceLengths", "RemoveRopeMultiCache",
            "ReplaceAttentionMaskValue", "SimplifiedLayerNormToL2Norm", "RenameOutputDims"}
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
    mixed_path: str = ""  # its JSON path
    lm_head_quantized: bool = False  # a torch-side quantizer took the LM head (gptq/rtn lm_head, k_quant_*)
    calibration: str | None = None
    precision: str = ""  # "int8" when an 8-bit rtn is the only quantizer
    sources: list[tuple[str, str]] = field(default_factory=list)  # (pass path, text) for comments
