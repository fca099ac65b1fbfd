"""The graph of targets that targets/*.toml declare: its classes, and ``load_project``.

Nothing here runs a pass. Every check a user can fail (malformed TOML, unknown pass, unknown
param or wrong type, missing input file, unknown target, duplicate name, cycle) happens when the
files are loaded (loader.py), before any stage runs, and raises a one-line ``UserError`` naming
the file, target and key.

File format (see README for a full example)::

    default_targets = ["smollm2-travel-cpu-int4-smoke"]   # at most one file sets it

    [target.smollm2-base]             # a plain target
    pass = "embedded-import"
    params = { ... }
    device = "cpu"                    # optional: cpu, cuda (any GPU) or cuda:N
    gpu_memory_gb = 20                # optional, cuda only: share of a GPU (default: all of it)
    inputs = { data = "data/x.jsonl", base = ":other-target" }

    [recipe.travel]                   # a template, instantiated by [[use]]
    required = ["model"]              # vars each use must give
    vars = { steps = 100 }            # vars with defaults
    [recipe.travel.target."{model}-travel-adapter"]
    pass = "lora-finetune"
    inputs = { base = ":{model}-base" }
    params = { max_steps = "{steps}" }

    [[use]]
    recipe = "travel"
    vars = { model = "smollm2", steps = 40 }

    [devices]                         # optional, at most one file: see devices.py
    cpu_slots = 2

    [group]                           # names that build every matching target
    smollm2-variants = ["smollm2-*-eval"]

    [cache]                           # optional, at most one file: the remote tier (see tiers.py)
    remote = "s3://bucket/prefix"     # MODELBUILD_REMOTE_CACHE overrides it ("off": none)
    push = true                       # false: a read-only consumer
    required = false                  # true: stop before any stage when it is unreachable

    [executor]                        # optional, at most one file: where stages run (executor.py)
    kind = "ray"                      # MODELBUILD_EXECUTOR overrides it; "local" is the default

Recipes and matrices are expanded by expand.py. An input reference that starts with ":"
names a target; anything else is a file path relative to the TOML file.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import UserError
from . import settings
from .run import Run
from .settings import check_download_mode, check_remote_url

if TYPE_CHECKING:
    from ..passdef import PassDef

# The loader and its checks live in loader.py, imported only when the target files are read: a
# no-op build served from the graph cache (graph_cache.py) needs only the classes below.

# `doit <name>` runs the doit command of that name, never a task: such a target could not be built.
DOIT_COMMANDS = frozenset({"clean", "dumpdb", "forget", "help", "ignore", "info", "list", "reset-dep",
                           "run", "strace", "tabcompletion"})
CACHE_KEYS = {"remote", "push", "required", "download", "signing_key", "trusted_keys"}
EXECUTOR_KEYS = {"kind"}


class _Fields:
    """Compared and shown by their fields, as dataclasses are. Written out rather than generated:
    project.py is imported by every no-op, and generating a dataclass costs more than the rest
    of the module."""

    __slots__ = ()
    _fields: tuple[str, ...] = ()

    def _values(self) -> tuple:
        return tuple(getattr(self, name) for name in self._fields)

    def __eq__(self, other):
        return self._values() == other._values() if type(other) is type(self) else NotImplemented

    __hash__ = None  # mutable, as a dataclass with eq and without frozen

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{n}={v!r}' for n, v in zip(self._fields, self._values()))})"


class Ref(_Fields):
    """An input reference: another target's output, or a file/folder in the project. Immutable."""

    __slots__ = _fields = ("kind", "value")

    def __init__(self, kind: str, value: str):
        object.__setattr__(self, "kind", kind)  # "target" | "file"
        object.__setattr__(self, "value", value)  # target name, or path relative to the project root (posix)

    def __setattr__(self, name, value):
        raise AttributeError(f"cannot assign to field '{name}' of Ref")

    def __hash__(self):
        return hash(self._values())

    def __reduce__(self):
        return Ref, self._values()

    def __str__(self) -> str:
        return f":{self.value}" if self.kind == "target" else self.value


class Target(_Fields):
    _fields = ("name", "pass_def", "params", "inputs", "device", "file", "doc", "origin", "gpu_memory_gb", "gates",
               "device_choices")

    def __init__(self, name: str, pass_def: PassDef, params: dict[str, Any], inputs: dict[str, Ref], device: str,
                 file: str, doc: str = "", origin: str = "", gpu_memory_gb: float | None = None,
                 gates: dict[str, tuple[str, float]] | None = None, device_choices: tuple[str, ...] = ()):
        self.name = name
        self.pass_def = pass_def  # a PassDef, or a graph_cache.PassHandle standing for one
        self.params = params
        self.inputs = inputs  # "data": a reference; "adapters.travel": one entry of a named input (flat)
        self.device = device  # "" until a preference list is resolved (exec/executor.py resolve_devices)
        self.device_choices = device_choices  # a preference list as written (["cuda", "cpu"]), else ()
        self.file = file  # TOML file, relative to the project root
        self.doc = doc
        self.origin = origin  # "recipe 'travel' (model=smollm2)" for instantiated targets
        self.gpu_memory_gb = gpu_memory_gb  # share of a GPU slot; None = the whole GPU (scheduling only)
        self.gates = {} if gates is None else gates  # metric -> (op, limit), gates.py

    @property
    def where(self) -> str:
        """``targets/x.toml: target 'name' (recipe ...)``: how a one-line error names this target."""
        return f"{self.file}: target '{self.name}'" + (f" ({self.origin})" if self.origin else "")

    @property
    def named(self) -> str:
        """``targets/x.toml: target 'name'``: how a failure while building names this target (the
        recipe origin that ``where`` adds for load-time errors would repeat the whole matrix row)."""
        return f"{self.file}: target '{self.name}'"

    def input_refs(self) -> list[Ref]:
        return list(self.inputs.values())

    def deps(self) -> list[str]:
        return sorted({ref.value for ref in self.input_refs() if ref.kind == "target"})


class Project(_Fields):
    _fields = ("root", "targets", "default_targets", "devices", "groups", "cache", "cache_from", "executor",
               "executor_from")

    def __init__(self, root: Path, targets: dict[str, Target] | None = None, default_targets: list[str] | None = None,
                 devices: dict[str, Any] | None = None, groups: dict[str, list[str]] | None = None,
                 cache: dict[str, Any] | None = None, cache_from: str = "", executor: dict[str, Any] | None = None,
                 executor_from: str = ""):
        self.root = root
        self.targets = {} if targets is None else targets
        self.default_targets = [] if default_targets is None else default_targets
        self.devices = {} if devices is None else devices  # the [devices] table (see devices.py)
        self.groups = {} if groups is None else groups  # [group] name -> target names
        self.cache = {} if cache is None else cache  # the [cache] table (remote, push, required)
        self.cache_from = cache_from  # the file that sets it
        self.executor = {} if executor is None else executor  # the [executor] table (executor.py)
        self.executor_from = executor_from
        self.run = Run()  # this process's run (core/run.py); tasks.project_at gives it doit's command line

    def __getstate__(self) -> dict:
        return {name: value for name, value in self.__dict__.items() if name != "run"}  # a run is never cached

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.run = Run()

    @property
    def build_dir(self) -> Path:
        return self.root / "build"

    @property
    def cache_dir(self) -> Path:
        return Path(settings.current().cache or self.root / "cache")

    @property
    def state_dir(self) -> Path:
        """Per-checkout state (doit's database, the stat cache): lives and dies with build/."""
        return self.build_dir / ".modelbuild"

    def output_dir(self, name: str) -> Path:
        return self.build_dir / name

    def closure(self, names: list[str]) -> list[str]:
        """The named targets and everything they depend on, in build order."""
        order: list[str] = []
        seen: set[str] = set()

        def visit(name: str) -> None:
            if name in seen:
                return
            seen.add(name)
            for dep in self.targets[name].deps():
                visit(dep)
            order.append(name)

        for name in names:
            visit(name)
        return order


DEVICE_KEYS = {"gpus": list, "gpu_memory_gb": float, "simulated": bool, "cpu_slots": int, "cpu_threads": int,
               "cpu_numerics": str}


def check_devices_table(table: object, where: str) -> dict:
    """Validate a ``[devices]`` table; errors name the file and the key."""
    if not isinstance(table, dict):
        raise UserError(f"{where}: expected a table")
    for key, value in table.items():
        if key not in DEVICE_KEYS:
            raise UserError(f"{where}.{key}: unknown key (known: {', '.join(sorted(DEVICE_KEYS))})")
        expected = DEVICE_KEYS[key]
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise UserError(f"{where}.{key}: expected {expected.__name__}, got {type(value).__name__} {value!r}")
        if key == "gpus" and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
            raise UserError(f"{where}.gpus: expected a list of GPU indices such as [0, 1]")
        if key == "gpus" and len(set(value)) != len(value):
            twice = sorted({i for i in value if value.count(i) > 1})
            raise UserError(f"{where}.gpus: GPU {twice[0]} is listed twice (each GPU is one slot)")
        if key in ("cpu_slots", "cpu_threads", "gpu_memory_gb") and value <= 0:
            raise UserError(f"{where}.{key}: must be positive")
        if key == "cpu_numerics":
            from .numerics import check_name  # only when the key is there: a no-op never loads a [devices] table

            check_name(value, f"{where}.cpu_numerics")
    return dict(table)


def check_cache_table(table: object, where: str) -> dict[str, Any]:
    """The [cache] table: remote (s3 URL), push and required (booleans), download (download.py),
    signing_key (a path) and trusted_keys (a list of paths; signing.py reads the files)."""
    if not isinstance(table, dict):
        raise UserError(f"{where}: expected a table ([cache])")
    for key in table:
        if key not in CACHE_KEYS:
            raise UserError(f"{where}.{key}: unknown key (known: {', '.join(sorted(CACHE_KEYS))})")
    out: dict[str, Any] = {}
    if "remote" in table:
        out["remote"] = check_remote_url(table["remote"], f"{where}.remote")
    if "download" in table:
        out["download"] = check_download_mode(table["download"], f"{where}.download")
    for key in ("push", "required"):
        if key in table:
            if not isinstance(table[key], bool):
                raise UserError(f"{where}.{key}: expected true or false, got {type(table[key]).__name__}")
            out[key] = table[key]
    if "signing_key" in table:  # a path (relative: to the project folder); the key itself never goes here
        if not isinstance(table["signing_key"], str) or not table["signing_key"].strip():
            raise UserError(f"{where}.signing_key: expected the path of a private key file (a string)")
        out["signing_key"] = table["signing_key"]
    if "trusted_keys" in table:
        keys = table["trusted_keys"]
        if not isinstance(keys, list) or not all(isinstance(k, str) and k.strip() for k in keys):
            raise UserError(f"{where}.trusted_keys: expected a list of paths of .pub files")
        out["trusted_keys"] = list(keys)
    return out


def check_executor_table(table: object, where: str) -> dict:
    """The [executor] table, validated at load."""
    if not isinstance(table, dict):
        raise UserError(f"{where}: expected a table ([executor])")
    for key in table:
        if key not in EXECUTOR_KEYS:
            raise UserError(f"{where}.{key}: unknown key (known: {', '.join(sorted(EXECUTOR_KEYS))})")
    if "kind" in table and table["kind"] not in settings.EXECUTOR_KINDS:
        raise UserError(f"{where}.kind: {table['kind']!r} is not one of {', '.join(map(repr, settings.EXECUTOR_KINDS))}")
    return dict(table)


def executor_kind(project) -> str:
    """MODELBUILD_EXECUTOR (settings.py checked it), else [executor] kind (checked at load), else local."""
    return settings.current().executor or project.executor.get("kind", "local")


def input_path(project: Project, ref: Ref) -> Path:
    """Where an input is read from: an upstream target's output folder, or a file or folder of the project."""
    return project.output_dir(ref.value) if ref.kind == "target" else project.root / ref.value
