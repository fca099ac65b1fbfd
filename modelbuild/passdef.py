"""What a pass is, and the registry that finds passes by name.

A pass is a module exposing ``PASS = PassDef(...)``: a name, a version (bump it whenever the
output for the same inputs would change), a typed params dataclass, the inputs it reads and
a ``run`` function. Passes register through the ``modelbuild.passes`` entry-point group, so a
third-party package adds passes by declaring, in its own pyproject::

    [project.entry-points."modelbuild.passes"]
    my-pass = "my_package.my_pass:PASS"

Pass modules are imported while doit loads tasks, so their top level must stay light: heavy
libraries (torch, transformers, onnx...) are imported inside ``run``.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import inspect
import math
import re
import sys
import sysconfig
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import UserError

ENTRY_POINT_GROUP = "modelbuild.passes"
DEVICES = ("cpu", "cuda")


def param(default: Any, doc: str, choices: tuple | None = None):
    """A pass parameter: its default, a one-line doc and optionally the allowed values."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"doc": doc, "choices": choices})
    return field(default=default, metadata={"doc": doc, "choices": choices})


@dataclass(frozen=True)
class Input:
    """An input slot of a pass.

    kind: "file" (a file in the project), "dir" (a folder: a file input or another target's
    output), "any" (either). ``named`` inputs take a table of name -> reference (e.g. several
    adapters, each with the name it will be switched on by).
    """

    doc: str
    kind: str = "dir"
    required: bool = True
    named: bool = False


@dataclass(frozen=True)
class PassDef:
    name: str
    version: int
    doc: str
    params: type
    inputs: dict[str, Input]
    run: Callable[..., None]
    # Distributions whose versions shape this pass's output: part of every action key.
    libraries: tuple[str, ...] = ()
    devices: tuple[str, ...] = ("cpu",)
    # Numbers the pass writes to metrics.json in its output; targets may gate on them (gates.py).
    metrics: tuple[str, ...] = ()
    # Load-time check of a combination of params and inputs that the graph can answer (e.g.
    # "gptq needs inputs.calibration"): check(params: dict, inputs: dict) gets each given input as
    # the absolute Path of a file or folder, or the Ref of another target (a dict of those for a
    # named input), and raises UserError("inputs.x: ..."); the loader prefixes file and target.
    # It reads nothing else: the graph cache (graph_cache.py) runs it again only when the params,
    # those files or the pass's code changed.
    # Rules on params alone belong in the Params dataclass's __post_init__ (ValueError("params.x: ...")).
    check: Callable[[dict, dict], None] | None = None
    # What the params only name and the action depends on, resolved when the key is computed
    # (hf-import: the commit a hub branch points at): resolve(params, inputs) -> dict, cheap
    # and offline (it runs on every no-op), part of the key as "resolved".
    resolve: Callable[[dict, dict], dict] | None = None

    @property
    def module(self) -> types.ModuleType:
        return inspect.getmodule(self.run)

    def code_files(self) -> dict[str, Path]:
        """The pass's code by module name: its module and every module of its own it imports
        (``code_files`` below says which)."""
        return code_files(self.run.__module__, Path(inspect.getsourcefile(self.run)))

    @functools.cached_property
    def _code_digest(self) -> str:
        digest = hashlib.sha256()
        for name, path in self.code_files().items():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
        return digest.hexdigest()[:16]

    def code_digest(self) -> str:
        """Digest of the pass's code (``code_files``): helpers such as hf.py or a plug-in's own
        modules shape outputs too, so an edited pass reruns even without a version bump. Computed
        once per loaded pass: a new process, or a reloaded plug-in, reads the files again."""
        return self._code_digest

    def group_inputs(self, flat: dict[str, Any]) -> dict[str, Any]:
        """Flat inputs ("adapters.travel": x) as the pass reads them ({"adapters": {"travel": x}})."""
        grouped: dict[str, Any] = {}
        for key, value in flat.items():
            name, _, sub = key.partition(".")
            if self.inputs[name].named:
                grouped.setdefault(name, {})[sub] = value
            else:
                grouped[key] = value
        return grouped

    def param_fields(self) -> list[dataclasses.Field]:
        return list(dataclasses.fields(self.params))

    def param_types(self) -> dict[str, Any]:
        """Resolved annotations (pass modules may use ``from __future__ import annotations``)."""
        return _type_hints(self.params)

    def resolve_params(self, given: dict, where: str) -> dict:
        """Validate user params against the typed config and fill in defaults.

        ``where`` prefixes every error ("targets/x.toml: target 'y'"), so the message names
        the file, the target and the key.
        """
        fields_by_name = {f.name: f for f in self.param_fields()}
        types_by_name = self.param_types()
        for key in given:
            if key not in fields_by_name:
                known = ", ".join(sorted(fields_by_name)) or "none"
                raise UserError(f"{where}: params.{key}: unknown param of pass '{self.name}' (known: {known})")
        resolved = {}
        for name, f in fields_by_name.items():
            if name in given:
                value = check_type(given[name], types_by_name[name], f"{where}: params.{name}")
                choices = f.metadata.get("choices")
                if choices and value not in choices:
                    raise UserError(f"{where}: params.{name}: {value!r} is not one of {', '.join(map(repr, choices))}")
                resolved[name] = value
            elif f.default is not dataclasses.MISSING:
                resolved[name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                resolved[name] = f.default_factory()
            else:
                raise UserError(f"{where}: params.{name}: required param of pass '{self.name}' is missing")
        try:
            self.params(**resolved)  # its __post_init__ checks ranges: at load, not in the worker
        except (ValueError, TypeError, UserError) as error:
            message = str(error)
            raise UserError(f"{where}: {message if message.startswith('params.') else 'params: ' + message}") from None
        return resolved


@functools.lru_cache(maxsize=None)
def _type_hints(params: type) -> dict[str, Any]:
    """Resolved once per Params class: every target of a pass checks its params against them."""
    return typing.get_type_hints(params)


_PACKAGE_DIR = Path(__file__).resolve().parent
_STDLIB_DIRS = tuple({Path(sysconfig.get_paths()[name]).resolve() for name in ("stdlib", "platstdlib")})


def _is_library_file(path: Path) -> bool:
    """Python's own modules and installed distributions: they enter a key by version (the pass's
    ``libraries``, the interpreter's version), never by source."""
    return any(part in ("site-packages", "dist-packages") for part in path.parts) or any(
        path.is_relative_to(root) for root in _STDLIB_DIRS)


_BODIES = ("body", "orelse", "finalbody", "handlers", "cases")


@functools.lru_cache(maxsize=1024)
def _import_statements(source: bytes, filename: str) -> tuple[tuple[int, str, tuple[str, ...]], ...]:
    """(level, module, names) of every import statement in a module's source, at any depth
    (inside functions, classes, if/try/with blocks): one parse per content, shared by every pass
    that imports the module. Only statements are visited: imports are never inside expressions."""
    found = []
    todo = list(ast.parse(source, filename).body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import):
            found += [(0, alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or "", tuple(a.name for a in node.names if a.name != "*")))
        else:
            for field_name in _BODIES:
                todo.extend(getattr(node, field_name, ()))
    return tuple(found)


def _imported_names(path: Path, module: str) -> set[str]:
    """Every module the imports in ``path`` (module ``module``) may load, as absolute dotted
    names: the module itself, its parent packages (their ``__init__`` runs), and for
    ``from x import y`` the name ``x.y`` too (y may be a submodule)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    parts = package.split(".") if package else []
    names: set[str] = set()
    for level, base, imported in _import_statements(path.read_bytes(), str(path)):
        if level:
            if not parts or level - 1 >= len(parts):
                continue  # beyond the top-level package: Python refuses it too
            base = ".".join([*parts[:len(parts) - level + 1], *([base] if base else [])])
        for name in (base, *(f"{base}.{leaf}" for leaf in imported)):
            pieces = name.split(".")
            names.update(".".join(pieces[:i]) for i in range(1, len(pieces) + 1))
    return names


def _find_module(name: str, found: dict[str, tuple[Path | None, list[str]]]) -> tuple[Path | None, list[str]]:
    """(source file, submodule search locations) of module ``name``, located without importing
    anything (a pass's heavy imports stay out of task loading): a top-level name through every
    import finder (an editable install is found by its own), a submodule in its package's
    folders. No file for a built-in, a compiled or a namespace module, or no module at all."""
    if name not in found:
        parent, _, leaf = name.rpartition(".")
        spec = None
        try:
            if not parent:
                if name not in sys.stdlib_module_names:  # Python's own: keyed by the interpreter's version
                    loaded = sys.modules.get(name)
                    spec = getattr(loaded, "__spec__", None) or importlib.util.find_spec(name)
            else:
                search = _find_module(parent, found)[1]
                spec = importlib.machinery.PathFinder.find_spec(leaf, search) if search else None
        except (ImportError, ValueError):
            spec = None
        origin = getattr(spec, "origin", None)
        found[name] = (Path(origin).resolve() if origin and origin.endswith(".py") else None,
                       list(getattr(spec, "submodule_search_locations", None) or ()))
    return found[name]


def code_files(module: str, source_file: Path) -> dict[str, Path]:
    """The code of module ``module`` (a pass) by dotted name: its own file and every module it
    imports, transitively, that is not Python's or an installed library's (those enter the key by
    version). That follows absolute, relative and in-function imports, into modelbuild, into the
    pass's own package wherever it is installed, and into any module outside site-packages (a
    plug-in's helpers beside it, a project's own package), so that editing any of them changes
    the pass's code digest. passdef itself is left out: the registry shapes no output."""
    own_roots = {_PACKAGE_DIR}
    if "." in module or source_file.name == "__init__.py":
        depth = module.count(".") + (source_file.name == "__init__.py")
        own_roots.add(source_file.resolve().parents[depth - 1])
    registry_file = _PACKAGE_DIR / "passdef.py"
    files: dict[str, Path] = {}
    located: dict[str, tuple[Path | None, list[str]]] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        path = source_file.resolve() if name == module else _find_module(name, located)[0]
        if name in files or path is None or path == registry_file:
            continue
        if not any(path.is_relative_to(root) for root in own_roots) and _is_library_file(path):
            continue
        files[name] = path
        todo.extend(_imported_names(path, name) - files.keys())
    return dict(sorted(files.items()))


def require(ok: bool, key: str, rule: str, value: Any) -> None:
    """For a Params ``__post_init__``: ``require(self.rank >= 1, "rank", "at least 1", self.rank)``."""
    if not ok:
        raise ValueError(f"params.{key}: must be {rule}, got {value!r}")


def type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def check_type(value: Any, annotation: Any, where: str) -> Any:
    """Check a TOML value against a param annotation; return it (ints widen to float)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return check_type(value, arg, where)
            except UserError:
                pass
        raise UserError(f"{where}: expected {type_name(annotation)}, got {type(value).__name__} {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [check_type(item, args[0], f"{where}[{i}]") for i, item in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a table, got {type(value).__name__} {value!r}")
        return dict(value)
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise UserError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if annotation is int and isinstance(value, bool):
        raise UserError(f"{where}: expected int, got bool {value!r}")
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise UserError(f"{where}: expected {type_name(annotation)}, got {type(value).__name__} {value!r}")
    return value


_entries: dict[str, importlib.metadata.EntryPoint] | None = None
_loaded: dict[str, PassDef] = {}


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    """Every registered pass's entry point by name, found once per process (nothing imported yet)."""
    global _entries
    if _entries is None:
        found: dict[str, importlib.metadata.EntryPoint] = {}
        for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if entry.name in found and found[entry.name].value != entry.value:
                raise UserError(f"pass '{entry.name}' is registered twice ({found[entry.name].value} and {entry.value})")
            found[entry.name] = entry
        _entries = found
    return _entries


def get_pass(name: str) -> PassDef | None:
    """The pass called ``name``, its module imported on first use: a no-op build imports only
    the passes its target files name."""
    if name not in _loaded:
        entry = _entry_points().get(name)
        if entry is None:
            return None
        _loaded[name] = _checked(name, entry.value, entry.load())
    return _loaded[name]


def load_entry(name: str, value: str) -> PassDef:
    """The pass registered as ``name = value`` ("module:attr"), imported without scanning the
    installed distributions: the graph cache (graph_cache.py) recorded the entry point."""
    if name not in _loaded:
        import importlib

        match = re.match(r"\s*([\w.]+)\s*(?::\s*([\w.]+))?", value)  # as EntryPoint.load reads it
        if match is None:
            raise UserError(f"entry point {name} = {value}: not module:attribute")
        found = importlib.import_module(match.group(1))
        for part in match.group(2).split(".") if match.group(2) else ():
            found = getattr(found, part)
        _loaded[name] = _checked(name, value, found)
    return _loaded[name]


def _checked(name: str, value: str, pass_def: Any) -> PassDef:
    if not isinstance(pass_def, PassDef):
        raise UserError(f"entry point {name} = {value}: not a modelbuild PassDef")
    if pass_def.name != name:
        raise UserError(f"entry point {name} = {value}: the pass calls itself '{pass_def.name}'")
    return pass_def


def entry_point(name: str) -> importlib.metadata.EntryPoint:
    """The entry point a loaded pass came from (for the graph cache's record of it)."""
    return _entry_points()[name]


def pass_names() -> list[str]:
    """The registered passes' names, without importing any of them."""
    return sorted(_entry_points())


def registry() -> dict[str, PassDef]:
    """All passes by name (every pass module imported: for listing them)."""
    return {name: get_pass(name) for name in pass_names()}
