"""Olive passes -> modelbuild targets: the mapping table and the chain builder.

The workflow's passes run in order; each consumes what the chain holds (a Hugging Face folder,
a plain ONNX folder or an onnxruntime-genai bundle, plus LoRA adapters) and most become one
target. Torch-side weight quantizers (gptq, rtn, AwqQuantizer, SelectiveMixedPrecision) only
decide how the following ModelBuilder quantizes, so they are carried forward as a *pending*
quantization and written where the int4 model is made:

    gptq -> ... -> ModelBuilder int4     genai-build fp32 + quantize-onnx algorithm=gptq
    rtn (4 bit) -> ModelBuilder int4     genai-build int4, int4_algorithm=rtn
    rtn (8 bit, lm_head) after gptq      quantize-onnx int8_nodes=["/lm_head/MatMul"]
    AwqQuantizer -> ModelBuilder int4    awq target (HF -> HF) + genai-build int4 rtn
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from . import gptqmodel, graph_passes, passes, quantizers
from .chain import Chain, Options
from .model import PASS_TYPES, SUPPORTED, Artifact, Target, norm_type
from .workflow import OliveError, PassEntry, expect

# Olive pass type (normalized, as PASS_TYPES) -> its handler: handler(chain, entry, options).
HANDLERS: dict[str, Callable[[Chain, PassEntry, Options], None]] = {
    "modelbuilder": passes.modelbuilder,
    "onnxconversion": passes.onnxconversion,
    "orttransformersoptimization": passes.orttransformersoptimization,
    "onnxfloattofloat16": passes.onnxfloattofloat16,
    "onnxblockwisertnquantization": passes.nbits,
    "onnxkquantquantization": passes.nbits,
    "onnxmatmul4quantizer": passes.nbits,
    "matmulnbitsquantizer": passes.nbits,
    "onnxhqqquantization": passes.nbits,
    "gptq": quantizers.gptq, "gptqquantizer": quantizers.gptq,
    "rtn": quantizers.rtn,
    "awq": quantizers.awq, "awqquantizer": quantizers.awq, "autoawqquantizer": quantizers.awq,
    "selectivemixedprecision": quantizers.selectivemixedprecision,
    "lora": passes.lora, "qlora": passes.lora,
    "onnxdynamicquantization": passes.int8,
    "onnxstaticquantization": passes.int8,
    "onnxquantization": passes.int8,
    "extractadapters": passes.extractadapters,
    "graphsurgeries": passes.graphsurgeries,
    "dynamictofixedshape": graph_passes.dynamictofixedshape,
    "matmulnbitstoqdq": graph_passes.matmulnbitstoqdq,
    "onnxpeepholeoptimizer": graph_passes.onnxpeepholeoptimizer,
    "gptqmodel": gptqmodel.gptqmodel,
}
CAUSAL_LM_TASKS = ("text-generation", "text-generation-with-past", "causal-lm")
if HANDLERS.keys() != PASS_TYPES.keys():  # the two tables name the same pass types
    raise AssertionError(f"olive HANDLERS and PASS_TYPES differ: {sorted(HANDLERS.keys() ^ PASS_TYPES.keys())}")


class Importer(Chain):
    """One chain of targets for one workflow (one search combination): the input model, each pass
    through its handler (HANDLERS: passes.py, quantizers.py), the evaluator."""

    def run(self) -> list[Target]:
        self.device = self.pick_device()
        self.input_model()
        for self.index, entry in enumerate(self.wf.passes):
            kind = norm_type(entry.type)
            if kind not in PASS_TYPES:
                self.unsupported(f"{entry.path}.type", f"Olive pass '{entry.key}' ({entry.type}) has no modelbuild counterpart (supported: {SUPPORTED})")
                continue
            HANDLERS[kind](self, entry, Options(self, entry))
        if self.pending.algorithm not in ("", "awq") or self.pending.int8_nodes or self.pending.mixed or self.pending.precision:
            path, text = self.pending.sources[0]
            self.unsupported(path, f"{text} quantizes the torch model for a later ModelBuilder, and none follows: modelbuild quantizes int4 while building the genai bundle")
        if self.untied_embedding:  # the TieWordEmbeddings that would have quantized it was left out
            path, bits = self.untied_embedding
            self.leave_out(path, f"the {bits}-bit embedding: quantize-onnx quantizes MatMuls, and no tie-embeddings makes it the LM head's")
        self.evaluators()
        self.load_kwargs_used()
        if self.pending_comments:
            self.header += self.pending_comments
        for name in self.data:
            if name not in self.used_data and name not in ("calibration", "eval"):  # roles: used where a pass needs them
                raise OliveError("--data", name, f"the workflow reads no data config '{name}' (data configs: {', '.join(self.wf.data_configs) or 'none'}; also: calibration, eval)")
        return self.targets

    def pick_device(self) -> str:
        wf = self.wf
        if wf.target_system is None:
            return "cpu"
        system = wf.systems[wf.target_system]
        if norm_type(str(system["type"])) not in ("localsystem", "pythonenvironment"):
            self.unsupported(system["type_path"], f"system type {system['type']}: modelbuild builds on this machine (LocalSystem)")
        accelerators = system["accelerators"]
        if not accelerators:
            return "cpu"
        path = f"{system['path']}.accelerators[0]"
        acc = expect(accelerators[0], (dict,), wf.source, path)
        device = acc.get("device")
        providers = expect(acc.get("execution_providers") or [], (list,), wf.source, f"{path}.execution_providers")
        provider = providers[0] if providers else None
        if provider in (None, "CPUExecutionProvider") and device in (None, "cpu", "CPU"):
            return "cpu"
        if provider == "CUDAExecutionProvider" or (provider is None and str(device).lower() == "gpu"):
            self.header.append(f"device: {path} ({device or 'gpu'}, {provider or 'CUDA'}) -> device = \"cuda\" where the pass runs on CUDA")
            return "cuda"
        where = f"{path}.execution_providers[0]" if provider else f"{path}.device"
        self.unsupported(where, f"{provider or device} has no modelbuild device (supported: CPUExecutionProvider -> cpu, CUDAExecutionProvider -> cuda)")
        self.header.append(f"built for cpu instead of {provider or device}")
        return "cpu"

    def input_model(self) -> None:
        wf, model = self.wf, self.wf.input_model
        mtype = expect(model.get("type"), (str,), wf.source, "input_model.type", "a model type such as HfModel")
        body, body_path = (model["config"], "input_model.config") if isinstance(model.get("config"), dict) else (model, "input_model")
        kind = norm_type(mtype)
        if kind in ("hfmodel", "pytorchmodel"):
            self.refuse_unfaithful(body, body_path, mtype)
            hf = body.get("hf_config") or {}
            expect(hf, (dict,), wf.source, f"{body_path}.hf_config")
            model_id = body.get("model_path") or hf.get("model_name")
            id_path = f"{body_path}.model_path" if body.get("model_path") else f"{body_path}.hf_config.model_name"
            trust = bool(body.get("trust_remote_code") or hf.get("trust_remote_code") or (body.get("load_kwargs") or {}).get("trust_remote_code"))
            params = {"trust_remote_code": True} if trust else {}
            inputs = {}
            if self.model_path is not None:
                inputs["local"] = self.rel(self.model_path)
                if isinstance(model_id, str):
                    params["model"] = model_id
            elif not isinstance(model_id, str) or not model_id:
                raise self.fail(id_path, "no model: give a hub id or a folder (or pass --model-path FOLDER)")
            elif model_id.startswith("<") or "://" in model_id:
                raise self.fail(id_path, f"'{model_id}' is not a hub id or a folder: pass --model-path FOLDER")
            elif (wf.base_dir / model_id).exists() or model_id.startswith((".", "/", "~")):
                inputs["local"] = self.rel(self.local(model_id, id_path))
            elif re.fullmatch(r"[\w.-]+/[\w.-]+", model_id):
                params["model"] = model_id
            else:
                raise self.fail(id_path, f"'{model_id}' is no local folder (relative paths are taken from {self.wf.base_dir}) and no hub id (org/name): pass --model-path FOLDER")
            revision = hf.get("revision") or (body.get("load_kwargs") or {}).get("revision")
            if isinstance(revision, str):
                params["revision"] = revision
            notes = ["--model-path -> inputs.local"] if self.model_path is not None else []
            target = Target(f"{self.name}-base", "hf-import", params, inputs, doc=f"{model_id or 'model'} (Olive input_model)")
            target.comments.append(f"from Olive input_model ({mtype}) at {body_path}")
            for key in body:
                if key not in ("type", "model_path", "hf_config", "load_kwargs", "adapter_path", "task", "trust_remote_code"):
                    self.leave_out(f"{body_path}.{key}", f"input_model key {key} has no modelbuild counterpart")
            for key in (hf if isinstance(hf, dict) else {}):
                if key not in ("model_name", "revision", "trust_remote_code", "task"):
                    self.leave_out(f"{body_path}.hf_config.{key}", f"hf_config key {key} has no modelbuild counterpart")
            load = expect(body.get("load_kwargs") or {}, (dict,), wf.source, f"{body_path}.load_kwargs")
            self.load_options = {f"{body_path}.load_kwargs.{k}": v for k, v in load.items() if k not in ("trust_remote_code", "revision")}
            target.comments += [f"  {n}" for n in notes]
            self.targets.append(target)
            self.art = self.base = Artifact(f":{target.name}", "hf", target=target)
            adapter = body.get("adapter_path")
            if adapter is not None:
                expect(adapter, (str,), wf.source, f"{body_path}.adapter_path")
                self.adapters["adapter"] = self.rel(self.local(adapter, f"{body_path}.adapter_path"))
                self.header.append(f"{body_path}.adapter_path -> a switchable adapter 'adapter' of the genai bundle")
        elif kind == "onnxmodel":
            path_text = body.get("model_path")
            if self.model_path is not None:
                folder = self.model_path
            else:
                expect(path_text, (str,), wf.source, f"{body_path}.model_path", "a path to the ONNX model")
                folder = self.local(path_text, f"{body_path}.model_path")
            if folder.is_file():
                folder = folder.parent
            genai = (folder / "genai_config.json").is_file()
            self.art = Artifact(self.rel(folder), "bundle" if genai else "onnx", "fp32" if genai else "")
            self.header.append(f"input_model ({mtype}) -> the folder {self.rel(folder)} as a file input")
        else:
            raise self.fail("input_model.type", f"{mtype}: modelbuild imports HfModel, PyTorchModel (hub id or folder) and ONNXModel")

    def refuse_unfaithful(self, body: dict, body_path: str, mtype: str) -> None:
        """A model made by its own code, or for another task, cannot become a causal-LM import: one
        line naming the JSON path, whatever --skip-unsupported says."""
        for key in ("model_loader", "model_script", "script_dir", "io_config", "dummy_inputs_func"):
            if body.get(key) is not None:
                raise self.fail(f"{body_path}.{key}", f"{mtype} with its own {key}: the model is what that code makes, and modelbuild "
                                "imports Hugging Face causal LMs by their checkpoint: importing it would build something else")
        hf = body.get("hf_config") if isinstance(body.get("hf_config"), dict) else {}
        task, task_path = (body["task"], f"{body_path}.task") if "task" in body else (hf.get("task"), f"{body_path}.hf_config.task")
        if task is not None and task not in CAUSAL_LM_TASKS:
            raise self.fail(task_path, f"task {task!r}: modelbuild builds causal language models ({', '.join(CAUSAL_LM_TASKS)}); "
                            "a causal-LM export of this model would not do that task")

    def load_kwargs_used(self) -> None:
        """load_kwargs (torch_dtype, attn_implementation) say how Olive loads the torch model. The
        model builder reads the checkpoint itself, as Olive's ModelBuilder does; a pass that computes
        on the torch model in modelbuild (gptq calibration, awq, LoRA, onnx-export) does so in float32."""
        torch_side = [t.name for t in self.targets if t.pass_name in ("awq", "lora-finetune", "onnx-export")
                      or (t.pass_name == "quantize-onnx" and t.params.get("algorithm") == "gptq")]
        for path, value in self.load_options.items():
            if torch_side:
                self.leave_out(path, f"{', '.join(torch_side)} compute(s) on the model in float32 with modelbuild's own attention", value)
            else:
                self.header.append(f"{path} = {json.dumps(value)}: how Olive loads the torch model; the model builder reads the checkpoint itself (as Olive's ModelBuilder does)")

    # -- evaluation -----------------------------------------------------------------------------
    def evaluators(self) -> None:
        wf = self.wf
        unused = [n for n in wf.evaluators if n != wf.evaluator]
        if unused:
            self.header.append(f"evaluators not used by the workflow (no evaluator set for them): {', '.join(unused)}")
        if wf.evaluator is None:
            return
        spec, path = wf.evaluators[wf.evaluator]
        etype = spec.get("type")
        if etype is not None and norm_type(str(etype)) == "lmevaluator":
            tasks = spec.get("tasks")
            if isinstance(tasks, list) and tasks:
                for i, task in enumerate(tasks):
                    self.leave_out(f"{path}.tasks[{i}]", "an lm-eval task: its data comes from the hub; modelbuild's evaluate measures perplexity and speed on local JSONL", task.get("task", task) if isinstance(task, dict) else task)
            else:
                self.leave_out(f"{path}.tasks", "lm-eval tasks: their data comes from the hub; modelbuild's evaluate measures perplexity and speed on local JSONL")
            return
        if etype is not None and norm_type(str(etype)) != "oliveevaluator":
            return self.leave_out(f"{path}.type", f"evaluator type {etype}: modelbuild's evaluate measures perplexity on local JSONL and speed")
        for key in spec:
            if key not in ("type", "metrics", "name"):
                raise self.fail(f"{path}.{key}", "unknown evaluator key (known: type, metrics)")
        gates: dict[str, str] = {}
        data_ref: Any = None
        reference_needed = False
        notes = []
        for i, metric in enumerate(expect(spec.get("metrics", []), (list,), wf.source, f"{path}.metrics")):
            mpath = f"{path}.metrics[{i}]"
            expect(metric, (dict,), wf.source, mpath)
            mtype = metric.get("type")
            subs = expect(metric.get("sub_types", []), (list,), wf.source, f"{mpath}.sub_types")
            if metric.get("data_config") is not None:
                data_ref = (metric["data_config"], f"{mpath}.data_config")
            for j, sub in enumerate(subs):
                spath = f"{mpath}.sub_types[{j}]"
                expect(sub, (dict,), wf.source, spath)
                sub_name = sub.get("name")
                if mtype == "latency":
                    metric_name = "ttft_ms"
                elif mtype == "throughput":
                    metric_name = "tokens_per_s"
                elif mtype == "accuracy" and sub_name == "perplexity":
                    metric_name = "perplexity"
                else:
                    self.leave_out(f"{spath}.name", f"metric {mtype}/{sub_name}: evaluate measures perplexity, tokens/s, time to first token, peak RSS and size")
                    continue
                notes.append(f"{spath} ({mtype} {sub_name}) -> {metric_name}")
                goal = sub.get("goal")
                if goal is None:
                    continue
                expect(goal, (dict,), wf.source, f"{spath}.goal")
                gtype, value = goal.get("type"), goal.get("value")
                expect(value, (int, float), wf.source, f"{spath}.goal.value")
                if gtype == "threshold":
                    gates[metric_name] = f"{'>=' if metric_name == 'tokens_per_s' else '<='} {value}"
                elif gtype == "percent-max-degradation" and metric_name == "perplexity":
                    gates["perplexity_delta_pct"] = f"<= {value}"
                    reference_needed = True
                else:
                    self.leave_out(f"{spath}.goal.type", f"goal {gtype} on {mtype}: gates are limits on measured values (threshold; percent-max-degradation for perplexity)")
        if self.art.kind == "onnx":
            return self.leave_out(path, "evaluate measures a genai bundle or an HF model; this chain ends in a plain ONNX model")
        if data_ref is not None:
            data = self.data_file(data_ref[0], data_ref[1], "eval")
        elif "eval" in self.data:
            self.used_data.add("eval")
            data = self.rel(self.data["eval"])
        else:
            raise self.fail(path, "evaluate measures on held-out JSONL prompt/response records: pass --data eval=FILE")
        inputs: dict[str, Any] = {"model": self.art.ref, "data": data}
        if reference_needed:
            ref = Target(f"{self.name}-input-eval", "evaluate", {"variant": "input model (torch)"}, {"model": self.base.ref, "data": data},
                         self.device, doc="the input model, measured as the reference of relative goals")
            if not any(t.name == ref.name for t in self.targets):
                self.add(ref, None, ["Olive's evaluate_input_model: the reference of percent goals"])
            inputs["reference"] = f":{ref.name}"
        if self.adapters and self.art.kind == "bundle":
            notes.append(f"measured without adapter (params.adapter = \"{next(iter(self.adapters))}\" measures with it)")
        target = Target(f"{self.name}-eval{self.suffix(len(self.wf.passes))}", "evaluate", {}, inputs, self.device, doc=f"Olive evaluator '{wf.evaluator}'", gates=gates)
        target.comments.append(f"from Olive evaluator '{wf.evaluator}' at {path}")
        self.add(target, None, notes + ([f"goals -> gates {json.dumps(gates)}"] if gates else []))
