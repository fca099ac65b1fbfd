"""The validated graph, kept between doit runs: a no-op build neither re-parses and re-validates
every target file nor scans the installed distributions for pass plug-ins nor imports every pass
the files name (together most of what a no-op cost beyond doit itself, bench/noop_floor.py).

Served only when everything the loading read is as it was, checked on every run:

- the target files: the names and the whole contents of targets/*.toml (compared byte for byte);
- every input file or folder a target names: where its path as written resolves to (a link
  pointed elsewhere), and the stat identity (mode, inode, size, mtime_ns, ctime_ns) of the file,
  or of every entry of the folder (a pass's load-time ``check`` may read them);
- the code that built and validated it: every loaded modelbuild module, each pass module with the
  modelbuild modules its code digest covers and the loaded modules of its own package, any other
  module the load imported, and the entry_points.txt that registered the pass (stat identity);
- the installed distributions: sys.path and the names in each of its folders (installing,
  upgrading or removing a plug-in adds or removes a *.dist-info there), ``__pycache__`` aside:
  Python writes it on a first import, with bytecode caching on, and that changes nothing;
- the environment: every MODELBUILD_* variable but those that only steer a run (RUN_ONLY), the
  interpreter, the project root;

Nothing of this machine or a Ray cluster is in it: loading asks neither, and a device preference
list is resolved after the load, on every run (exec/executor.py resolve_devices).

A load that fails is never cached: its one-line error is raised as before, on every run. Files
modified within ``RACY_NS`` before the load are not trusted (the same-tick guard of digest.py's
stat cache): the graph is cached once they are older. The cache is a pickle in the project's
state folder (build/.modelbuild, as trusted as dodo.py beside it), replaced atomically; one that
cannot be read is ignored and rewritten (graph_store.py writes it). ``MODELBUILD_GRAPH_CACHE=0``
turns it off.
"""

from __future__ import annotations

import os
import pickle
import stat
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..core import settings
from ..core.digest import read_regular
from ..core.project import Project

if TYPE_CHECKING:  # passdef.py is imported only on a miss, or when a handle loads its pass
    from ..passdef import PassDef

FORMAT = 2  # bump when the shape of the cached data changes
RUN_ONLY = settings.RUN_ONLY  # read by the executor at build time, never by the loader
FILE = "graph.pickle"
RACY_NS = 2_000_000_000


class PassHandle:
    """A pass of a cached graph: what key_components and the task list read of it (plain values,
    recorded when the graph was validated); the pass module, and passdef.py, are imported only
    when something else is asked (its run, params, inputs, check...). Its code digest is the one
    computed then: the files it covers are part of what the cache checks. It offers exactly the
    PassDef attributes listed here; anything else is an AttributeError, never a silent import."""

    def __init__(self, pass_def: PassDef, entry: str):
        self.name, self.doc, self.version = pass_def.name, pass_def.doc, pass_def.version
        self.libraries, self.devices, self.metrics = pass_def.libraries, pass_def.devices, pass_def.metrics
        self._entry = entry
        self._digest = pass_def.code_digest()
        self._resolves = pass_def.resolve is not None

    def code_digest(self) -> str:
        return self._digest

    @property
    def resolve(self):
        return self._pass().resolve if self._resolves else None

    def _pass(self) -> PassDef:
        from ..passdef import load_entry

        return load_entry(self.name, self._entry)

    # The rest of PassDef, from the pass module itself (imported on first use).
    params = property(lambda self: self._pass().params)
    inputs = property(lambda self: self._pass().inputs)
    run = property(lambda self: self._pass().run)
    check = property(lambda self: self._pass().check)
    module = property(lambda self: self._pass().module)
    code_files = property(lambda self: self._pass().code_files)
    group_inputs = property(lambda self: self._pass().group_inputs)
    param_fields = property(lambda self: self._pass().param_fields)
    param_types = property(lambda self: self._pass().param_types)
    resolve_params = property(lambda self: self._pass().resolve_params)

    def __repr__(self) -> str:
        return f"PassHandle({self.name!r}, {self._entry!r})"


def load(root: Path | str) -> Project:
    """The validated project at ``root``: from the cache when nothing it depends on changed, else
    loaded (a ``UserError`` propagates, nothing is cached) and cached for the next run. What it
    did is ``project.run.graph_outcome``."""
    root = Path(root).resolve()
    if not settings.current().graph_cache:  # also where a bad MODELBUILD_* value stops the load
        from .loader import load_project  # only off or on a miss: a no-op served from the cache never compiles it

        project = load_project(root)
        project.run.graph_outcome = "off"
        return project
    path = Project(root=root).state_dir / FILE
    key = _key(root)
    cached = _read(path)
    if key is not None and cached is not None and cached["key"] == key and _still_valid(cached):
        project = cached["project"]
        project.run.graph_outcome = "hit"
        return project
    started = time.time_ns()
    record: dict = {"modules": set(sys.modules)}
    from .loader import load_project

    project = load_project(root, record)
    from .graph_store import store  # the writing half: compiled and imported only on a miss

    project.run.graph_outcome = store(path, key, project, record, started,
                         racy_ns=RACY_NS, pass_handle=PassHandle, identity=_identity, tree=_tree)
    return project


def _identity(path: str, follow: bool = True) -> tuple | None:
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except OSError:
        return None
    return st.st_mode, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _importable(entry: str) -> tuple | None:
    """What a sys.path entry can offer an import: the names in a folder but ``__pycache__``, the
    stat identity of a zip file, None for what is neither (an editable install's path hook)."""
    path = entry or "."
    try:
        return tuple(sorted(name for name in os.listdir(path) if name != "__pycache__"))
    except NotADirectoryError:
        return _identity(path)
    except OSError:
        return None


def _tree(path: str) -> tuple:
    """(relative name, own identity, where a link leads, identity there) of a file, or of a folder
    and every entry under it."""
    top = _identity(path)
    entries = [("", top, None, None)]
    if top is None or not stat.S_ISDIR(top[0]):
        return tuple(entries)
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            own = _identity(full, follow=False)
            link = own is not None and stat.S_ISLNK(own[0])
            entries.append((full[len(path):], own, os.path.realpath(full) if link else None,
                            _identity(full) if link else None))
    return tuple(entries)


def _key(root: Path) -> tuple | None:
    """What is compared on every run as a whole: cheap to gather, and the target files in full."""
    targets = root / "targets"
    try:
        names = sorted(n for n in os.listdir(targets) if n.endswith(".toml"))  # as Path.glob("*.toml"): dot-files too
        # never open(): a named pipe there would block every command before the loader could refuse it
        files = [(name, read_regular(targets / name)) for name in names]
    except OSError:  # NotAFile too
        return None  # load_project says what is wrong
    env = settings.graph_environment()
    paths = [(entry, _importable(entry)) for entry in sys.path]
    return FORMAT, sys.version, sys.executable, str(root), env, paths, files


def _read(path: Path) -> dict | None:
    try:
        with open(path, "rb") as handle:
            data = pickle.load(handle)
    except Exception:  # missing, truncated, corrupt, or written by other code: load again
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("project"), Project):
        return None
    return data if {"key", "files", "refs"} <= data.keys() else None


def _still_valid(cached: dict) -> bool:
    try:
        for file, identity in cached["files"]:
            if _identity(file) != identity:
                return False
        for written, resolved, tree in cached["refs"]:
            if os.path.realpath(written) != resolved or _tree(resolved) != tree:
                return False
    except Exception:  # a cache of another shape: load again
        return False
    return True
