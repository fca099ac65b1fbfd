"""The chain being mapped: its state (targets so far, the current artifact, the pending torch-side
quantization, adapters, comments) and the helpers every pass handler uses (refusals, target names,
paths, data files), with typed access to a pass's options.

Below the pass handlers (passes.py, quantizers.py) and the importer (mapping.py), which all
import it; it imports only model.py and workflow.py.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .model import NAME_SAFE, Artifact, Pending, Target
from .workflow import MISSING, OliveError, PassEntry, Workflow, expect


@dataclass(frozen=True)
class LeftOut:
    path: str  # JSON path in the workflow
    value: Any  # what it says there (MISSING: the path names no single value)
    why: str

    def line(self) -> str:
        shown = "" if self.value is MISSING else f" = {json.dumps(self.value, sort_keys=True)[:120]}"
        return f"left out: {self.path}{shown}: {self.why}"


class Chain:
    """One chain of targets for one workflow (one search combination), as the handlers see it."""

    def __init__(self, wf: Workflow, name: str, out_dir: Path, model_path: Path | None = None,
                 data: dict[str, Path] | None = None, skip_unsupported: bool = False,
                 labels: list[tuple[int, str]] | None = None, strict: bool = False):
        self.wf, self.name, self.out_dir = wf, name, out_dir
        self.strict = strict  # --strict: anything left out refuses the import
        self.model_path, self.data = model_path, dict(data or {})
        self.skip, self.labels = skip_unsupported, labels or []  # search: (pass index, value label) per axis
        self.index = -1  # the pass being mapped
        self.targets: list[Target] = []
        self.header: list[str] = []  # comments at the top of the file
        self.pending_comments: list[str] = []  # go above the next target written
        self.used_data: set[str] = set()
        self.left_out: list[LeftOut] = []  # what the TOML file does not do, each also a comment and a stderr line
        self.adapters: dict[str, str] = {}
        self.pending = Pending()
        self.untied_embedding: tuple[str, int] | None = None  # rtn embeds waiting for a TieWordEmbeddings: (JSON path, bits)
        self.load_options: dict[str, Any] = {}  # input_model.load_kwargs modelbuild does not read (JSON path -> value)
        self.device = "cpu"
        self.base: Artifact | None = None
        self.art: Artifact | None = None

    def fail(self, path: str, message: str) -> OliveError:
        return self.wf.fail(path, message)

    def unsupported(self, path: str, message: str) -> None:
        """A one-line refusal, or with --skip-unsupported the rest imported and this left out."""
        if not self.skip:
            raise self.fail(path, f"{message}; --skip-unsupported imports the rest without it")
        self.leave_out(path, message)

    def leave_out(self, path: str, why: str, value: Any = MISSING) -> None:
        """Something of the workflow the TOML file does not do: a ``# left out:`` comment where it
        would have gone, a stderr line and a count in the summary (``--strict`` refuses instead)."""
        if value is MISSING:
            value = self.wf.value_at(path)
        if self.strict:
            raise self.fail(path, f"left out: {why} (--strict refuses an import that leaves anything out)")
        item = LeftOut(path, value, why)
        if item not in self.left_out:
            self.left_out.append(item)
            self.pending_comments.append(item.line())

    def tname(self, key: str) -> str:
        stem = NAME_SAFE.sub("-", key).strip("-.") or "pass"
        return f"{self.name}-{stem}{self.suffix(self.index)}"

    def suffix(self, upto: int) -> str:
        """A search combination's values, for the passes at or before ``upto``: targets before a
        searched pass are shared by every combination."""
        return "".join(f"-{label}" for index, label in self.labels if index <= upto)

    def add(self, target: Target, entry: PassEntry | None, notes: list[str]) -> Artifact:
        comments = list(self.pending_comments)
        self.pending_comments = []
        if entry is not None:
            comments.append(f"from Olive pass '{entry.key}' ({entry.type}) at {entry.path}")
        target.comments = comments + target.comments + [f"  {n}" for n in notes]
        if any(t.name == target.name for t in self.targets):
            raise self.fail(entry.path if entry else "passes", f"two targets would be called '{target.name}': rename a pass")
        self.targets.append(target)
        return Artifact(f":{target.name}", "hf", target=target)

    def rel(self, path: Path) -> str:
        """A path as the TOML file refers to it: relative inside the project, else absolute."""
        path = path.resolve()
        root = self.out_dir.parent.resolve()
        if path.is_relative_to(root):
            return Path(os.path.relpath(path, self.out_dir.resolve())).as_posix()
        return str(path)

    def local(self, text: str, path: str) -> Path:
        """A path written in the workflow, relative to the workflow file's folder (or the cwd)."""
        for base in (self.wf.base_dir, Path.cwd()):
            candidate = (base / Path(text).expanduser())
            if candidate.exists():
                return candidate
        raise self.fail(path, f"no such file or folder '{text}' (relative paths are taken from {self.wf.base_dir})")

    def data_file(self, ref: Any, path: str, role: str) -> str:
        """A data config (by name or inline) -> a local JSONL file for the TOML file."""
        if isinstance(ref, str) and ref in self.data:
            self.used_data.add(ref)
            return self.rel(self.data[ref])
        if isinstance(ref, str):
            if ref not in self.wf.data_configs:
                raise self.fail(path, f"unknown data config '{ref}' (data_configs: {', '.join(self.wf.data_configs) or 'none'})")
            spec, spec_path = self.wf.data_configs[ref]
            name = ref
        else:
            spec, spec_path = expect(ref, (dict,), self.wf.source, path, "a data config name or object"), path
            name = spec.get("name", role)
            if name in self.data:
                self.used_data.add(name)
                return self.rel(self.data[name])
        load = spec.get("load_dataset_config", spec.get("params_config", {})) or {}
        expect(load, (dict,), self.wf.source, f"{spec_path}.load_dataset_config")
        data_name = load.get("data_name")
        files = load.get("data_files")
        if data_name in ("json", "jsonl") and isinstance(files, str):
            return self.rel(self.local(files, f"{spec_path}.load_dataset_config.data_files"))
        source = f"the hub dataset '{data_name}'" if data_name else f"data of type {spec.get('type', '?')}"
        raise self.fail(spec_path, f"loads {source}: download it, write it as JSONL prompt/response records and pass --data {name}=FILE "
                        "(its text_template names the hub's columns: modelbuild's own renders the records)")

    def calibration(self, o: Options, path: str) -> str:
        ref = o.get("data_config", (str, dict))
        if ref is not None:
            return self.data_file(ref, o.path("data_config"), "calibration")
        if "calibration" in self.data:
            self.used_data.add("calibration")
            return self.rel(self.data["calibration"])
        raise self.fail(path, "calibrates on Olive's default hub dataset (no data_config): pass a local JSONL file with --data calibration=FILE")

    def need(self, entry: PassEntry, *kinds: str) -> bool:
        if self.art is not None and self.art.kind in kinds:
            return True
        have = {"hf": "a Hugging Face model", "onnx": "a plain ONNX model", "bundle": "an onnxruntime-genai bundle"}
        wanted = " or ".join(have[k] for k in kinds)
        self.unsupported(f"{entry.path}.type", f"{entry.type} needs {wanted}, but the chain holds {have[self.art.kind]} here")
        return False

    def rebuild_as(self, e: PassEntry, precision: str, why: str) -> bool:
        """Fold an ONNX-side conversion into the ModelBuilder that made the chain's bundle."""
        upstream = self.art.target
        if self.art.kind != "bundle" or upstream is None or upstream.pass_name != "genai-build" or self.art.precision != "fp32":
            return False
        upstream.params["precision"] = precision
        for key in ("int4_algorithm", "block_size", "accuracy_level", "symmetric"):
            upstream.params.pop(key, None)
        upstream.comments.append(f"  params.precision = {json.dumps(precision)}: folded in from Olive pass '{e.key}' ({e.type}): {why}")
        self.pending_comments.append(f"Olive pass '{e.key}' ({e.type}) at {e.path}: no target of its own: {upstream.name} builds {precision} ({why})")
        self.art = Artifact(self.art.ref, "bundle", precision, upstream)
        return True


class Options:
    """A pass's options: typed reads, options accepted but not carried over, unknown-key errors."""

    def __init__(self, imp: Chain, entry: PassEntry):
        self.imp, self.entry, self.known = imp, entry, set()

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

    def note(self, *keys: str, why: str = "") -> None:
        """Options Olive knows that modelbuild cannot carry: each one given is left out (a comment,
        a stderr line, a count), never dropped in silence."""
        for key in keys:
            self.known.add(key)
            if self.entry.options.get(key) is not None:
                self.imp.leave_out(self.path(key), why or f"{self.entry.type}'s {key} has no modelbuild counterpart")

    def same(self, *keys: str) -> None:
        """Options that only say how Olive lays out its files (external data, file names): modelbuild
        writes its own layout, the weights and graph are the same either way."""
        for key in keys:
            self.known.add(key)

    def finish(self) -> list[str]:
        """Refuse an option no read, note or same named; returns the notes for the target's comment
        (none: what is not carried became left-out lines as it was read, at its place in the file)."""
        for key in self.entry.options:
            if key not in self.known:
                raise self.imp.fail(self.path(key), f"unknown option of Olive pass {self.entry.type} (known: {', '.join(sorted(self.known))})")
        return []
