"""The loader: targets/*.toml -> the validated graph (project.py's classes).

Every check a user can fail (malformed TOML, unknown pass, unknown param or wrong type, missing
input file, unknown target, duplicate name, cycle) happens here, before any stage runs, and
raises a one-line ``UserError`` naming the file, target and key. The file format is described in
project.py. Kept apart from project.py so that a no-op build served from the graph cache
(graph_cache.py) neither imports nor compiles any of it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .. import UserError
from ..core import settings
from ..core.digest import NotAFile, read_regular_text, special
from ..passdef import PassDef, get_pass, pass_names
from ..core.project import (
    DOIT_COMMANDS,
    Project,
    Ref,
    Target,
    check_cache_table,
    check_devices_table,
    check_executor_table,
    executor_kind,
)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Output folders, their temporary siblings (".<name>~xxxxxxxx.tmp") and lock files carry the
# name: it must fit the 255-byte file-name limit of common filesystems with room to spare.
MAX_NAME = 200
DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?)$")

TOP_KEYS = {"default_targets", "target", "recipe", "use", "devices", "group", "cache", "executor"}
TARGET_KEYS = {"pass", "doc", "inputs", "params", "device", "gpu_memory_gb", "matrix", "gates"}
RECIPE_KEYS = {"doc", "required", "vars", "target"}
USE_KEYS = {"recipe", "vars"}


def load_project(root: Path | str, record: dict | None = None) -> Project:
    """Read every targets/*.toml of the project at ``root`` and return the validated graph.

    ``record`` (graph_cache.py) collects what the graph depends on besides the target files:
    ``record["refs"]`` gets (path as written, resolved path) of every input file or folder.

    Loading is pure: it reads the project's files and asks nothing of this machine or a Ray
    cluster. A device preference list stays a list (``Target.device_choices``) until
    ``exec.executor.resolve_devices`` picks from it, once per run, after the load."""
    import tomllib

    from .expand import check_keys, expand_matrix, expand_use, table_of
    from ..core.numerics import branch as cpu_numerics

    root = Path(root).resolve()
    targets_dir = root / "targets"
    if not targets_dir.is_dir():
        raise UserError(f"{root}: no targets/ folder: a modelbuild project keeps its target files there")
    project = Project(root=root)
    raw_targets: list[tuple[str, str, dict, str]] = []  # (file, name, table, origin)
    recipes: dict[str, tuple[str, dict]] = {}
    uses: list[tuple[str, int, dict]] = []
    default_from = None
    devices_from = None
    raw_groups: list[tuple[str, str, object]] = []

    for path in sorted(targets_dir.glob("*.toml")):
        rel = path.relative_to(root).as_posix()
        try:
            doc = tomllib.loads(read_regular_text(path))
        except NotAFile as error:  # a named pipe would block the open, a device read without end
            raise UserError(f"{rel}: {error}: a target file holds TOML text") from None
        except OSError as error:
            raise UserError(f"{rel}: cannot read: {error.strerror}") from None
        except tomllib.TOMLDecodeError as error:
            raise UserError(f"{rel}: malformed TOML: {error}") from None
        except UnicodeDecodeError as error:
            raise UserError(f"{rel}: not UTF-8 text: {error}") from None
        for key in doc:
            if key not in TOP_KEYS:
                raise UserError(f"{rel}: {key}: unknown top-level key (known: {', '.join(sorted(TOP_KEYS))})")
        if "default_targets" in doc:
            if default_from:
                raise UserError(f"{rel}: default_targets: already set in {default_from}")
            default_from = rel
            value = doc["default_targets"]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise UserError(f"{rel}: default_targets: expected a list of target names")
            if not value:
                raise UserError(f"{rel}: default_targets: empty list; name the targets plain `doit` builds, "
                                "or remove the key to build every target")
            project.default_targets = value
        if "devices" in doc:
            if devices_from:
                raise UserError(f"{rel}: devices: already set in {devices_from}")
            devices_from = rel
            project.devices = check_devices_table(doc["devices"], f"{rel}: devices")
        if "cache" in doc:
            if project.cache_from:
                raise UserError(f"{rel}: cache: already set in {project.cache_from}")
            project.cache, project.cache_from = check_cache_table(doc["cache"], f"{rel}: cache"), rel
        if "executor" in doc:
            if project.executor_from:
                raise UserError(f"{rel}: executor: already set in {project.executor_from}")
            project.executor, project.executor_from = check_executor_table(doc["executor"], f"{rel}: executor"), rel
        for name, table in table_of(doc, "target", rel, "target").items():
            table = table_of({"t": table}, "t", rel, f"target '{name}'")
            for expanded_name, expanded, label in expand_matrix(name, table, None, f"{rel}: target '{name}'"):
                raw_targets.append((rel, expanded_name, expanded, label and f"matrix {label}"))
        raw_groups.extend((rel, name, patterns) for name, patterns in table_of(doc, "group", rel, "group").items())
        for name, table in table_of(doc, "recipe", rel, "recipe").items():
            table = table_of({"r": table}, "r", rel, f"recipe '{name}'")
            check_keys(table, RECIPE_KEYS, rel, f"recipe '{name}'")
            if name in recipes:
                raise UserError(f"{rel}: recipe '{name}': duplicate recipe name (also in {recipes[name][0]})")
            recipes[name] = (rel, table)
        use_list = doc.get("use", [])
        if not isinstance(use_list, list):
            raise UserError(f"{rel}: use: expected an array of tables ([[use]])")
        for index, use in enumerate(use_list, 1):
            if not isinstance(use, dict):
                raise UserError(f"{rel}: use #{index}: expected a table")
            check_keys(use, USE_KEYS, rel, f"use #{index}")
            uses.append((rel, index, use))

    for rel, index, use in uses:
        raw_targets.extend(expand_use(rel, index, use, recipes))
    # a branch this CPU lacks is one line now (under Ray the nodes check it: stages run there)
    cpu_numerics(settings.current().cpu_numerics, project.devices, f"{devices_from}: devices",
                 check_here=executor_kind(project) != "ray")

    seen_in: dict[str, str] = {}
    for rel, name, table, origin in raw_targets:
        where = f"{rel}: target '{name}'" + (f" ({origin})" if origin else "")
        _check_name(name, where, "target")
        if name in seen_in:
            raise UserError(f"{where}: duplicate target name (also defined in {seen_in[name]})")
        seen_in[name] = rel
        project.targets[name] = _make_target(root, rel, name, table, origin, where, record)

    for target in project.targets.values():
        where = f"{target.file}: target '{target.name}'"
        for key, ref in target.inputs.items():
            if ref.kind == "target" and ref.value not in project.targets:
                raise UserError(f"{where}: inputs.{key}: unknown target '{ref.value}'")
    for rel, name, patterns in raw_groups:
        project.groups[name] = _resolve_group(project, rel, name, patterns)
    for name in project.default_targets:
        if name not in project.targets and name not in project.groups:
            raise UserError(f"{default_from}: default_targets: unknown target '{name}'")
    _check_cycles(project)
    return project


def _resolve_group(project: Project, rel: str, name: str, patterns: object) -> list[str]:
    """A group builds every target matching its globs: ``smollm2-variants = ["smollm2-*-eval"]``."""
    import fnmatch

    where = f"{rel}: group.{name}"
    _check_name(name, where, "group")
    if name in project.targets or name in project.groups:
        raise UserError(f"{where}: the name is already taken by a target or group")
    if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) for p in patterns):
        raise UserError(f"{where}: expected a non-empty list of target names or globs")
    members: list[str] = []
    for pattern in patterns:
        matched = fnmatch.filter(project.targets, pattern)
        if not matched:
            raise UserError(f"{where}: '{pattern}' matches no target")
        members.extend(m for m in matched if m not in members)
    return members


def _check_name(name: str, where: str, what: str) -> None:
    if not NAME_RE.match(name):
        raise UserError(f"{where}: bad {what} name: use letters, digits, '.', '_' and '-'")
    if len(name) > MAX_NAME:
        raise UserError(f"{where}: {what} name is {len(name)} characters long (at most {MAX_NAME}: it names folders and files)")
    if name in DOIT_COMMANDS:
        raise UserError(f"{where}: '{name}' is a doit command (`doit {name}` would run the command, not build the {what}); "
                        "choose another name")


def _device(value: Any, pass_def: PassDef, where: str) -> tuple[str, tuple[str, ...]]:
    """(device, preference list) of a target: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, or a list
    (``["cuda", "cpu"]``) kept for resolve_devices, which picks the first this machine (or the
    Ray cluster) has before anything runs, so the action key records the device actually used."""
    choices = value if isinstance(value, list) else [value]
    if not choices or not all(isinstance(c, str) and DEVICE_RE.match(c) for c in choices):
        raise UserError(f"{where}: device: {value!r} is not cpu, cuda, cuda:N or a list of them in order of preference")
    for choice in choices:
        if choice.split(":")[0] not in pass_def.devices:
            raise UserError(f"{where}: device: pass '{pass_def.name}' runs on {', '.join(pass_def.devices)}, not {choice}")
    return (value, ()) if not isinstance(value, list) else ("", tuple(choices))


def _make_target(root: Path, rel: str, name: str, table: dict, origin: str, where: str,
                 record: dict | None = None) -> Target:
    from .expand import check_keys, table_of

    check_keys(table, TARGET_KEYS, rel, f"target '{name}'")
    pass_name = table.get("pass")
    if pass_name is None:
        raise UserError(f"{where}: pass: missing (every target names the pass that builds it)")
    if not isinstance(pass_name, str):
        raise UserError(f"{where}: pass: must be a string (a pass name), got {type(pass_name).__name__} {pass_name!r}")
    pass_def = get_pass(pass_name)
    if pass_def is None:
        raise UserError(f"{where}: pass: unknown pass '{pass_name}' (known: {', '.join(pass_names())})")
    wanted = table.get("device", "cpu")
    device, device_choices = _device(wanted, pass_def, where)
    params = pass_def.resolve_params(table_of(table, "params", rel, f"target '{name}'"), where)
    doc = table.get("doc", "")
    if not isinstance(doc, str):
        raise UserError(f"{where}: doc: expected a string")
    gpu_memory_gb = table.get("gpu_memory_gb")
    if gpu_memory_gb is not None:
        if isinstance(gpu_memory_gb, bool) or not isinstance(gpu_memory_gb, (int, float)) or gpu_memory_gb <= 0:
            raise UserError(f"{where}: gpu_memory_gb: expected a positive number of GB, got {gpu_memory_gb!r}")
        if wanted == "cpu":
            raise UserError(f"{where}: gpu_memory_gb: only for cuda targets (device is cpu)")
        gpu_memory_gb = float(gpu_memory_gb)  # resolve_devices drops it if a preference list falls back to cpu

    given_inputs = table_of(table, "inputs", rel, f"target '{name}'")
    inputs: dict[str, Ref] = {}
    for key in given_inputs:
        if key not in pass_def.inputs:
            known = ", ".join(sorted(pass_def.inputs)) or "none"
            raise UserError(f"{where}: inputs.{key}: pass '{pass_name}' has no such input (known: {known})")
    base_dir = (root / rel).parent
    for key, spec in pass_def.inputs.items():
        if key not in given_inputs:
            if spec.required:
                raise UserError(f"{where}: inputs.{key}: required input of pass '{pass_name}' is missing ({spec.doc})")
            continue
        value = given_inputs[key]
        if spec.named:
            if not isinstance(value, dict) or not value:
                raise UserError(f"{where}: inputs.{key}: expected a table of name = reference")
            for sub, ref in value.items():
                inputs[f"{key}.{sub}"] = _make_ref(root, base_dir, ref, spec.kind, f"{where}: inputs.{key}.{sub}", record)
        else:
            inputs[key] = _make_ref(root, base_dir, value, spec.kind, f"{where}: inputs.{key}", record)
    if pass_def.check is not None:
        def resolved(ref: Ref):
            return ref if ref.kind == "target" else (root / ref.value).resolve()

        try:
            pass_def.check(params, pass_def.group_inputs({key: resolved(ref) for key, ref in inputs.items()}))
        except UserError as error:
            raise UserError(f"{where}: {error}") from None
        except OSError as error:
            raise UserError(f"{where}: inputs: cannot read {error.filename}: {error.strerror}") from None
    for key, ref in inputs.items():
        if ref.kind == "file" and (root / ref.value).is_dir():
            _check_folder(root / ref.value, f"{where}: inputs.{key}")
    gates = {}
    if "gates" in table:
        from ..core.gates import parse_gates

        gates = parse_gates(table["gates"], pass_def.metrics, pass_name, where)
    return Target(name, pass_def, params, inputs, device, rel, doc, origin, gpu_memory_gb, gates, device_choices)


def _make_ref(root: Path, base_dir: Path, value: Any, kind: str, where: str, record: dict | None = None) -> Ref:
    """':name' is a target; anything else a path relative to the TOML file (or absolute).

    Paths inside the project are kept relative so nothing machine-specific enters the graph;
    action keys use input contents, never paths, either way.
    """
    if not isinstance(value, str) or not value:
        raise UserError(f"{where}: expected a string (':target-name' or a file path), got {value!r}")
    if value.startswith(":"):
        return Ref("target", value[1:])
    written = Path(os.path.normpath(base_dir / Path(value).expanduser()))
    path = written.resolve()
    shown = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
    if written.is_relative_to(root) and not path.is_relative_to(root):
        # A link inside the project must not pull an outside file into artifacts and the cache
        # behind the user's back; an outside path written as such is taken as meant.
        raise UserError(f"{where}: {written.relative_to(root).as_posix()} is a symbolic link to {path}, outside the "
                        "project; write that path itself if you mean to use it")
    if not path.exists():
        raise UserError(f"{where}: missing input file {shown}")
    if what := special(path.stat().st_mode):  # a named pipe, a device, a socket: never read
        raise UserError(f"{where}: {shown} is {what}, not a {'folder' if kind == 'dir' else 'file'}")
    if kind == "file" and not path.is_file():
        raise UserError(f"{where}: {shown} is not a file")
    if kind == "dir" and not path.is_dir():
        raise UserError(f"{where}: {shown} is not a folder")
    if record is not None:
        record.setdefault("refs", []).append((str(written), str(path)))
    return Ref("file", shown)


def _check_folder(folder: Path, where: str) -> None:
    """A folder input: readable, and no symbolic link inside it leads out of it."""
    from ..core.digest import walk_files

    try:
        for _ in walk_files(folder):
            pass
    except UserError as error:
        raise UserError(f"{where}: {error}") from None
    except OSError as error:
        raise UserError(f"{where}: cannot read {error.filename or folder}: {error.strerror}") from None


def _check_cycles(project: Project) -> None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(name: str, stack: list[str]) -> None:
        state[name] = 1
        stack.append(name)
        for dep in project.targets[name].deps():
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                target = project.targets[dep]
                raise UserError(f"{target.file}: target '{dep}': inputs: dependency cycle {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep, stack)
        stack.pop()
        state[name] = 2

    for name in sorted(project.targets):
        if name not in state:
            visit(name, [])
