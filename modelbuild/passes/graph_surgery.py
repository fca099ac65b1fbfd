"""graph-surgery: Olive's ``GraphSurgeries`` surgeons, as ordered steps on an ONNX model folder
(onnx-export, graph-optimize) or an onnxruntime-genai bundle (genai-build, quantize-onnx).

``steps`` is Olive's ``surgeries`` list as TOML tables, ``{ surgeon = "...", <option> = ... }``,
with Olive's option names and defaults (modelbuild/ml/surgeons.py says what each one does and to
which graphs it applies). Unknown surgeons and options are load-time errors; the surgeons that
cannot apply to the graphs modelbuild builds (GemmToMatMulAdd, PackedAttentionToLoopMHA) are
refused at load with the reason, TieWordEmbeddings points to the tie-embeddings pass. A step
that finds nothing to change fails the build with one line: a recipe's surgery is done or not
built, never skipped.

Checked before it counts as built: onnxruntime runs the input and the output graph on the same
probe sequences (fed as each graph wants them: ``attention_mask`` for the input, the equivalent
``past_seq_len``/``total_seq_len`` after AttentionMaskToSequenceLengths) and the logits must
agree within ``max_logit_diff``. The surgeons are exact but for SimplifiedLayerNormToL2Norm,
which drops RMSNorm's epsilon: with it, the reference is the input with its epsilons set to 0
(what an L2 norm computes), and the change against the untouched input is recorded
(``vs_input_with_epsilon``; on the tiny random model, whose hidden states are small, 0.0085). With
``RemoveRopeMultiCache.use_large_cache`` the probe is one sequence longer than the model's
original context, where the input graph uses the large cache too. A bundle must still load and
generate in onnxruntime-genai, unless its inputs changed to sequence lengths (a graph for NPU
runtimes, which onnxruntime-genai's CPU path does not feed; recorded as not generated).

``graph_surgery.json`` records each step's changes and the check's figures; the same input and
params give byte-identical output.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from modelbuild import UserError, say
from modelbuild.ml.bundle import GENAI_CONFIG, copy_rest, external_data_files, onnx_input, save_decoder
from modelbuild.ml.graph_logits import LENGTH_INPUTS, graph_logits
from modelbuild.ml.onnx_models import (
    compare,
    copy_source_files,
    load_graph,
    load_model,
    probe_ids,
    rounded,
    save_model,
    status,
    write_record,
)
from modelbuild.ml.surgeons import OPTIONS, apply, parse_step, without_epsilon
from modelbuild.passdef import Input, PassDef, param

RECORD = "graph_surgery.json"


@dataclass(frozen=True)
class Params:
    steps: list[dict] = param([], "Olive's surgeries in order, each { surgeon = NAME, option = value }: "
                                  f"surgeons {', '.join(OPTIONS)}")
    max_logit_diff: float = param(1e-3, "largest |logit| difference allowed between the input and the output graph on the probes")
    check_prompt: str = param("Hello! Who are you?", "prompt a bundle output must generate from in onnxruntime-genai")

    def __post_init__(self):
        if not self.steps:
            raise ValueError("params.steps: empty; give at least one { surgeon = ... } table")
        for i, raw in enumerate(self.steps):
            parse_step(raw, f"params.steps[{i}]")
        if not self.max_logit_diff > 0:
            raise ValueError(f"params.max_logit_diff: must be positive, got {self.max_logit_diff}")


def run(params: Params, inputs: dict, out_dir: Path, ctx) -> None:
    import onnx

    source: Path = inputs["model"]
    decoder, source_file, filename = onnx_input(source, "a genai-build or quantize-onnx target")
    is_bundle = decoder is not None
    steps = [parse_step(raw, f"params.steps[{i}]") for i, raw in enumerate(params.steps)]

    with status() as line:
        line.update(f"graph-surgery: loading {source_file.name}")
        model = load_model(source_file)
        data_files = external_data_files(load_graph(source_file))
        # An L2 norm has no epsilon: SimplifiedLayerNormToL2Norm must equal the input without it.
        reference_model = None
        if any(step.surgeon == "SimplifiedLayerNormToL2Norm" for step in steps):
            reference_model = onnx.ModelProto()
            reference_model.CopyFrom(model)
            without_epsilon(reference_model)
        done = []
        for i, step in enumerate(steps):
            line.update(f"graph-surgery: step {i + 1}/{len(steps)}: {step.surgeon}")
            done.append({"surgeon": step.surgeon, "options": step.options, **apply(model, step, f"params.steps[{i}]")})
        line.update("saving the rewritten graph")
        if is_bundle:
            data_name = data_files[0] if len(data_files) == 1 else f"{filename}.data"
            save_decoder(model, out_dir / filename, data_name)
            copy_rest(source, out_dir, {filename, *data_files})
        else:
            save_model(model, out_dir)
            copy_source_files(source, out_dir)
        inputs_after = [value.name for value in model.graph.input]
        del model

        probes = probe_ids(source)
        large = next((d for d in done if d["surgeon"] == "RemoveRopeMultiCache" and d["kept_cache"] == "large"), None)
        if large is not None:
            if not large.get("original_max_length"):
                raise UserError("params.steps: RemoveRopeMultiCache use_large_cache: the input's cache switch length is unknown, so "
                                "no probe can check the large cache against it")
            length = large["original_max_length"] + 8  # the input graph takes the large cache above it
            probes = [[probes[0][i % len(probes[0])] for i in range(length)]]
        line.update("checking: onnxruntime logits of the input and the rewritten graph on the probes")
        reference = graph_logits(source_file, probes, decoder, ctx.threads, "inputs.model")
        got = graph_logits(out_dir / filename, probes, decoder, ctx.threads, "rewritten graph")
        epsilon_effect = None
        if reference_model is not None:
            with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
                save_decoder(reference_model, Path(tmp) / filename, f"{filename}.data")
                del reference_model
                epsilon_effect = rounded(compare(reference, got))
                reference = graph_logits(Path(tmp) / filename, probes, decoder, ctx.threads, "inputs.model without epsilon")
    stats = compare(reference, got)
    if not stats["finite"] or not stats["max_abs_diff"] <= params.max_logit_diff:
        raise UserError(f"the rewritten graph's logits differ from the input's: max |dlogit| {stats['max_abs_diff']:.3g} "
                        f"> params.max_logit_diff {params.max_logit_diff:g}")

    generated = None
    if is_bundle:
        config_path = out_dir / GENAI_CONFIG
        if any(name in inputs_after for name in LENGTH_INPUTS):
            config = json.loads(config_path.read_text())
            declared = config["model"]["decoder"].setdefault("inputs", {})
            declared.pop("attention_mask", None)
            declared["past_sequence_length"], declared["total_sequence_length"] = LENGTH_INPUTS
            config_path.write_text(json.dumps(config, indent=4) + "\n")
        else:
            from modelbuild.ml.genai import verify_bundle

            generated = verify_bundle(out_dir, params.check_prompt, "rewritten bundle")
    changes = ", ".join(f"{d['surgeon']} ({d['changed']})" for d in done)
    say(f"'{ctx.target}': {changes}; logits match to max |dlogit| "
        f"{stats['max_abs_diff']:.2g}" + (f"; generates ({generated['(none)']} tokens)" if generated else ""))
    write_record(out_dir, RECORD, {
        "input_kind": "bundle" if is_bundle else "onnx",
        "steps": done,
        "inputs_after": inputs_after,
        "check": {**rounded(stats), "max_logit_diff": params.max_logit_diff, "probes": [len(p) for p in probes],
                  "reference": "the input with its RMSNorm epsilons set to 0" if epsilon_effect else "the input"},
        "vs_input_with_epsilon": epsilon_effect,
        "generated_tokens": generated,
    })


PASS = PassDef(
    name="graph-surgery",
    version=1,
    doc="Olive's GraphSurgeries surgeons as steps (SimplifiedLayerNormToL2Norm, ReplaceAttentionMaskValue, "
        "AttentionMaskToSequenceLengths, RemoveRopeMultiCache, RenameOutputDims) on an ONNX folder or genai bundle; checked against the input's logits",
    params=Params,
    inputs={"model": Input("ONNX model folder (onnx-export, graph-optimize) or onnxruntime-genai bundle (genai-build, quantize-onnx)")},
    run=run,
    libraries=("onnx", "onnxruntime", "onnxruntime-genai", "tokenizers", "numpy"),
)
