"""Reading an Olive workflow JSON: both schemas, every mistake as one line with its JSON path.

Olive has two spellings of the same workflow:

- the older one (the seeds, Olive <= 0.6 docs): options nested under ``"config"``
  (``{"type": "ModelBuilder", "config": {"precision": "int4"}}``), the model's hub id under
  ``input_model.config.hf_config.model_name``, accelerators under ``systems.X.config``, and an
  ``engine`` section with ``search_strategy``, ``evaluator``, ``host``, ``target``, ``cache_dir``
  and ``output_dir``;
- the current flat one (olive-recipes): options beside ``"type"``, ``input_model.model_path``,
  ``systems.X.accelerators`` and the engine keys at the top level.

``normalize`` turns either into one flat shape and keeps, for every value, the JSON path it came
from, so an error names the user's own key (``passes.conversion.config.precision``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelbuild import UserError
from modelbuild.core.digest import NotAFile, read_regular_text

# Top-level / engine keys Olive accepts that say nothing about what is built (logging, caching,
# output folders, cloud plumbing): accepted and listed in the header comment of the TOML file.
IGNORED_TOP = {
    "cache_dir", "output_dir", "output_name", "log_severity_level", "ort_log_severity_level",
    "ort_py_log_severity_level", "log_to_file", "no_artifacts", "clean_cache", "clean_evaluation_cache",
    "packaging_config", "workflow_id", "azureml_client", "plot_pareto_frontier", "verbose",
    "evaluate_input_model", "host", "auto_optimizer_config", "python_environment_path", "workflow_host",
    "cache_config", "skip_saving_artifacts", "save_all_intermediate_models", "debug", "packaging",
}
ENGINE_KEYS = {"search_strategy", "evaluator", "target"}
TOP_KEYS = {"input_model", "systems", "data_configs", "evaluators", "passes", "pass_flows", "engine"} | ENGINE_KEYS | IGNORED_TOP
PASS_META = {"type", "config", "disable_search", "clean_run", "output_name", "host", "evaluator", "reuse_cache"}


MISSING = type("Missing", (), {"__repr__": lambda self: "MISSING"})()  # no value at a JSON path


class OliveError(UserError):
    """``FILE: JSON.path: what is wrong`` (printed as ``modelbuild: ...``, exit 2)."""

    def __init__(self, source: str, path: str, message: str):
        super().__init__(f"{source}: {path}: {message}" if path else f"{source}: {message}")
        self.json_path = path


@dataclass
class PassEntry:
    key: str  # the pass's name in "passes"
    type: str  # as written ("ModelBuilder")
    options: dict[str, Any]  # the pass's options (flattened out of "config" in the older schema)
    path: str  # JSON path of the options ("passes.conversion.config" or "passes.conversion")


@dataclass
class Workflow:
    source: str  # file name shown in messages
    base_dir: Path  # relative paths in the workflow are resolved against this folder
    input_model: dict
    input_path: str
    passes: list[PassEntry]
    systems: dict[str, dict]  # name -> {"accelerators": [...]} (flattened)
    target_system: str | None
    data_configs: dict[str, tuple[dict, str]]  # name -> (config, JSON path)
    evaluators: dict[str, tuple[dict, str]]
    evaluator: str | None  # the engine's evaluator (name), if any
    evaluator_path: str
    search_strategy: Any
    ignored: list[str] = field(default_factory=list)  # top-level keys accepted but not carried over
    doc: dict = field(default_factory=dict)  # the workflow as written (value_at reads it)

    def fail(self, path: str, message: str) -> OliveError:
        return OliveError(self.source, path, message)

    def value_at(self, path: str) -> Any:
        """The value a JSON path ("passes.s.algorithm", "evaluators.e.metrics[0].name") names in
        the workflow as written, or MISSING."""
        node: Any = self.doc
        for name, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", path):
            if index:
                node = node[int(index)] if isinstance(node, list) and int(index) < len(node) else MISSING
            else:
                node = node.get(name, MISSING) if isinstance(node, dict) else MISSING
            if node is MISSING:
                return MISSING
        return node


def expect(value: Any, kinds: tuple, source: str, path: str, what: str = "") -> Any:
    names = {dict: "an object", list: "an array", str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        wanted = what or " or ".join(names.get(k, k.__name__) for k in kinds)
        raise OliveError(source, path, f"expected {wanted}, got {type(value).__name__} {json.dumps(value)[:60]}")
    return value


def load_json(path: Path, shown: str) -> dict:
    try:
        text = read_regular_text(path)  # a named pipe would block, a device read without end
    except FileNotFoundError:
        raise OliveError(shown, "", "no such file") from None
    except NotAFile as error:
        raise OliveError(shown, "", f"{error}: a workflow is a JSON file") from None
    except (UnicodeDecodeError, IsADirectoryError) as error:
        raise OliveError(shown, "", f"cannot read a JSON text: {error}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as error:
        hint = " (comments are not JSON: remove the // ...)" if "//" in text.splitlines()[error.lineno - 1] else ""
        raise OliveError(shown, f"line {error.lineno} column {error.colno}", f"malformed JSON: {error.msg}{hint}") from None
    return expect(doc, (dict,), shown, "(top level)", "a JSON object (an Olive workflow)")


def normalize(doc: dict, source: str, base_dir: Path) -> Workflow:
    for key in doc:
        if key not in TOP_KEYS:
            raise OliveError(source, key, f"unknown key of an Olive workflow (known: {', '.join(sorted(TOP_KEYS - IGNORED_TOP))}, and {len(IGNORED_TOP)} logging/output keys)")
    engine = expect(doc.get("engine", {}), (dict,), source, "engine")
    for key in engine:
        if key not in ENGINE_KEYS | IGNORED_TOP:
            raise OliveError(source, f"engine.{key}", f"unknown engine key (known: {', '.join(sorted(ENGINE_KEYS))}, and output/logging keys)")

    def engine_value(key: str) -> tuple[Any, str]:
        if key in doc and key in engine:
            raise OliveError(source, f"engine.{key}", f"also given at the top level ({key}): give it once")
        return (engine[key], f"engine.{key}") if key in engine else (doc.get(key), key)

    if "input_model" not in doc:
        raise OliveError(source, "input_model", "missing: the workflow names no model to start from")
    input_model = expect(doc["input_model"], (dict,), source, "input_model")

    passes_doc = expect(doc.get("passes", {}), (dict,), source, "passes")
    if not passes_doc:
        raise OliveError(source, "passes", "no passes: nothing to build")
    entries = []
    for key, spec in passes_doc.items():
        path = f"passes.{key}"
        expect(spec, (dict,), source, path)
        if not isinstance(spec.get("type"), str):
            raise OliveError(source, f"{path}.type", "missing: every pass names its Olive type")
        if "config" in spec:
            options = expect(spec["config"], (dict,), source, f"{path}.config")
            opt_path = f"{path}.config"
            extra = [k for k in spec if k not in PASS_META]
            if extra:
                raise OliveError(source, f"{path}.{extra[0]}", "unknown key beside 'config' (options go inside config)")
        else:
            options = {k: v for k, v in spec.items() if k not in PASS_META}
            opt_path = path
        entries.append(PassEntry(key, spec["type"], options, opt_path))

    flows, flows_path = doc.get("pass_flows"), "pass_flows"
    if flows is not None:
        expect(flows, (list,), source, flows_path)
        if len(flows) != 1:
            raise OliveError(source, flows_path, f"{len(flows)} pass flows: import supports one chain per workflow (split the file, one flow each)")
        flow = expect(flows[0], (list,), source, f"{flows_path}[0]")
        by_key = {e.key: e for e in entries}
        for i, key in enumerate(flow):
            if key not in by_key:
                raise OliveError(source, f"{flows_path}[0][{i}]", f"unknown pass '{key}' (passes: {', '.join(by_key)})")
        entries = [by_key[k] for k in flow]

    systems = {}
    for name, spec in expect(doc.get("systems", {}), (dict,), source, "systems").items():
        path = f"systems.{name}"
        expect(spec, (dict,), source, path)
        body = spec.get("config", spec)
        body_path = f"{path}.config" if "config" in spec else path
        expect(body, (dict,), source, body_path)
        system_type = spec.get("type", "LocalSystem")
        accelerators = expect(body.get("accelerators", []), (list,), source, f"{body_path}.accelerators")
        systems[name] = {"type": system_type, "accelerators": accelerators, "path": body_path, "type_path": f"{path}.type"}

    target, target_path = engine_value("target")
    if target is not None:
        if isinstance(target, dict):  # an inline system
            systems["(inline target)"] = {"type": target.get("type", "LocalSystem"), "accelerators": target.get("config", target).get("accelerators", []), "path": target_path, "type_path": f"{target_path}.type"}
            target = "(inline target)"
        expect(target, (str,), source, target_path)
        if target not in systems:
            raise OliveError(source, target_path, f"unknown system '{target}' (systems: {', '.join(systems) or 'none'})")
    elif len(systems) == 1:
        target = next(iter(systems))

    data_configs = {}
    for i, spec in enumerate(expect(doc.get("data_configs", []), (list,), source, "data_configs")):
        path = f"data_configs[{i}]"
        expect(spec, (dict,), source, path)
        name = expect(spec.get("name"), (str,), source, f"{path}.name", "a string name")
        data_configs[name] = (spec, path)

    evaluators = {}
    for name, spec in expect(doc.get("evaluators", {}), (dict,), source, "evaluators").items():
        evaluators[name] = (expect(spec, (dict,), source, f"evaluators.{name}"), f"evaluators.{name}")
    evaluator, evaluator_path = engine_value("evaluator")
    if evaluator is not None:
        if isinstance(evaluator, dict):
            evaluators["(inline evaluator)"] = (evaluator, evaluator_path)
            evaluator = "(inline evaluator)"
        expect(evaluator, (str,), source, evaluator_path)
        if evaluator not in evaluators:
            raise OliveError(source, evaluator_path, f"unknown evaluator '{evaluator}' (evaluators: {', '.join(evaluators) or 'none'})")
    search, _ = engine_value("search_strategy")
    ignored = sorted({k for k in doc if k in IGNORED_TOP} | {f"engine.{k}" for k in engine if k in IGNORED_TOP})
    return Workflow(source, base_dir, input_model, "input_model", entries, systems, target, data_configs,
                    evaluators, evaluator, evaluator_path, search, ignored, doc)
