"""The action key: the one recipe of what a stage's output is a function of.

The key hashes everything that can change the output: pass name, version and code (its module
and every module of its own it imports, passdef.code_files), resolved params, device, the pinned
CPU code branch (numerics.py), Python version and platform, the versions of the libraries the
pass declares, what its params only name (a hub branch's commit), the content digest of every
input file and the manifest digest of every upstream artifact. Upstream artifacts enter the key
by the digest of what they contain, not by their key, so an upstream rebuild that produces
byte-identical output does not rerun anything downstream (early cutoff).

The components stay readable (a stamp explains itself, ``why`` names what changed); the key is
their hash. The executor (stage.py), status.py, report.py, plan.py and the Ray worker's version
check all take it from here.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import sys

from . import settings
from .digest import ALGORITHM, StatCache, hash_json, input_digest
from .numerics import branch as cpu_numerics
from .project import Project, Ref, Target, executor_kind
from .stamp import read_stamp

# Bump when the shape of the key changes (3: cpu_numerics; 4: pass code by its import graph, in
# the layered package: every code digest changed, so caches start cold once).
KEY_FORMAT = 4
PYTHON = ".".join(map(str, sys.version_info[:2]))
PLATFORM = f"{sys.platform}-{platform.machine()}"

_library_versions: dict[str, str] = {}


def library_version(name: str) -> str:
    """The installed version of a distribution, for action keys. Read from the names of the
    ``*.dist-info`` folders on sys.path (one listing per folder) rather than by parsing each
    METADATA file: a no-op asks for a dozen of them on every run."""
    if not _library_versions:
        for folder in sys.path:
            try:
                names = os.listdir(folder or ".")
            except OSError:
                continue
            for entry in names:
                if entry.endswith(".dist-info") and "-" in entry:
                    dist, version = entry[: -len(".dist-info")].rsplit("-", 1)
                    _library_versions.setdefault(_normalized(dist), version)
    key = _normalized(name)
    if key not in _library_versions:
        try:
            _library_versions[key] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            _library_versions[key] = "not installed"
    return _library_versions[key]


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _ref_digest(project: Project, ref: Ref, cache: StatCache) -> str | None:
    """Content digest of an input; None for an upstream target that has no intact output yet."""
    if ref.kind == "target":
        stamp = read_stamp(project.output_dir(ref.value))
        return stamp["manifest_digest"] if stamp else None
    return input_digest(project.root / ref.value, cache)


def key_components(project: Project, target: Target, cache: StatCache) -> dict:
    """Everything the action key hashes, kept readable so a stamp can explain itself."""
    if not target.device:  # a device preference list is resolved after the load (executor.resolve_devices)
        raise RuntimeError(f"{target.where}: device preference list {target.device_choices} not resolved before keying")
    inputs = {key: _ref_digest(project, ref, cache) for key, ref in target.inputs.items()}
    pass_def = target.pass_def
    resolved = pass_def.resolve(target.params, target.inputs) if pass_def.resolve else None
    return {
        "key_format": KEY_FORMAT,
        "digest": ALGORITHM,
        "python": PYTHON,  # the interpreter and platform run every pass: a wheel of another ABI may differ
        "platform": PLATFORM,
        "pass": pass_def.name,
        "pass_version": pass_def.version,
        "pass_code": pass_def.code_digest(),
        "params": target.params,
        "device": target.device,
        # the CPU code branch floats ran on (numerics.py); under Ray the nodes check their CPU
        "cpu_numerics": cpu_numerics(settings.current().cpu_numerics, project.devices,
                                     check_here=executor_kind(project) != "ray"),
        "libraries": {name: library_version(name) for name in ("modelbuild", *pass_def.libraries)},
        "inputs": inputs,
        **({"resolved": resolved} if resolved else {}),
    }


def key_of(components: dict) -> str:
    """The action key of these key components: the one formula, wherever a key is computed or
    checked (the engine, status, plan, audit, the local and remote caches)."""
    return hash_json(components)


def action_key(project: Project, target: Target, cache: StatCache) -> str:
    """The key of ``target``'s action now: the hash of its components."""
    return key_of(key_components(project, target, cache))


def versions(libraries: tuple[str, ...] = ()) -> dict:
    """What must match between a driver and a worker that runs its stage (the Ray executor):
    the key's interpreter, platform and library versions, read as the key reads them."""
    return {"python": PYTHON, "platform": PLATFORM,
            "libraries": {name: library_version(name) for name in ("modelbuild", *libraries)}}
