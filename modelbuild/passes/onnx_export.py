"""onnx-export: HF causal LM -> fp32 ONNX model with torch.onnx's dynamo exporter.

A plain ONNX graph, ``input_ids, attention_mask -> logits`` with dynamic batch and sequence
dimensions and no KV cache: the artifact to hand to other ONNX tools (onnxruntime's own
quantizers and optimizers, Netron, other runtimes) and the reference that the genai builder's
graphs can be compared with. For generation with onnxruntime-genai use genai-build, which
writes the KV-cache graph and the genai_config.json.

Checked before it counts as built: ``onnx.checker`` (full check, shape inference included)
accepts the model, and onnxruntime's logits on two probe sequences of different lengths (so
the dynamic dimensions are exercised) match torch's to ``max_logit_diff``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from modelbuild import UserError, say
from modelbuild.passdef import Input, PassDef, param, require

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
PROBES = ("What should I pack for a week in Iceland?", "Plan a rainy day in London, please, with museums and a good lunch.")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "config.json")


@dataclass(frozen=True)
class Params:
    opset: int = param(18, "ONNX opset version of the exported graph", choices=(18, 19, 20, 21, 22, 23))
    max_logit_diff: float = param(1e-4, "largest |logit| difference allowed between onnxruntime and torch on the probes")

    def __post_init__(self):
        require(self.max_logit_diff > 0, "max_logit_diff", "positive", self.max_logit_diff)
    optimize: bool = param(True, "let the exporter fold constants and remove redundant ops (onnxscript optimizer)")


def _logits_module(model):
    import torch

    class Logits(torch.nn.Module):
        """forward(input_ids, attention_mask) -> logits: the signature the ONNX graph gets."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    return Logits(model).eval()


def run(params: Params, inputs: dict, out_dir: Path, ctx) -> None:
    import logging
    import warnings

    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(ctx.threads)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" x4
    source: Path = inputs["model"]
    if not (source / "config.json").is_file():
        raise UserError("inputs.model: no config.json: not a Hugging Face model folder")
    tokenizer = AutoTokenizer.from_pretrained(source)
    module = _logits_module(AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32))
    probes = [tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"] for text in PROBES]
    example = probes[0]
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    model_path = out_dir / MODEL_FILE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module, (example, torch.ones_like(example)), dynamo=True, opset_version=params.opset,
                input_names=["input_ids", "attention_mask"], output_names=["logits"],
                dynamic_shapes={"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}},
                optimize=params.optimize, verbose=False,
            )
        except Exception as error:  # the exporter raises many kinds; the first line says what failed
            raise UserError(f"torch.onnx dynamo export failed: {str(error).strip().splitlines()[0]}") from None
        program.save(str(model_path), external_data=True)
    if not (out_dir / DATA_FILE).is_file():
        raise UserError(f"the exporter wrote no {DATA_FILE} beside {MODEL_FILE}")

    onnx.checker.check_model(str(model_path), full_check=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = ctx.threads
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    worst = 0.0
    with torch.inference_mode():
        for ids in probes:
            mask = torch.ones_like(ids)
            expected = module(ids, mask).numpy()
            got = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
            worst = max(worst, float(np.abs(got - expected).max()))
    if not worst <= params.max_logit_diff:
        raise UserError(f"exported model's logits differ from torch: max |dlogit| {worst:.3g} > params.max_logit_diff {params.max_logit_diff:g}")
    say(f"'{ctx.target}': onnx.checker passed; onnxruntime matches torch to max |dlogit| {worst:.2g}")

    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out_dir / name)
    graph = onnx.load(str(model_path), load_external_data=False).graph
    (out_dir / "export.json").write_text(json.dumps({
        "exporter": "torch.onnx dynamo",
        "opset": params.opset,
        "inputs": [i.name for i in graph.input],
        "outputs": [o.name for o in graph.output],
        "files": [MODEL_FILE, DATA_FILE],
    }, indent=1, sort_keys=True) + "\n")


PASS = PassDef(
    name="onnx-export",
    version=1,
    doc="fp32 ONNX model (input_ids, attention_mask -> logits) with torch.onnx dynamo; checked by onnx.checker and against torch logits",
    params=Params,
    inputs={"model": Input("Hugging Face model folder")},
    run=run,
    libraries=("torch", "transformers", "onnx", "onnxscript", "onnxruntime"),
)
