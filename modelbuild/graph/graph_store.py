"""The writing half of the graph cache (graph_cache.py): after a load that succeeded, record
what the graph depends on and write it, or say why not. Apart from graph_cache.py so that a no-op
served from the cache neither compiles nor imports it. graph_cache imports this module (on a miss)
and passes in what of its own the writing uses: this module never imports graph_cache.
"""

from __future__ import annotations

import copy
import os
import pickle
import sys
from pathlib import Path

from ..passdef import entry_point
from ..core.project import Project


def _code_files(project: Project, before: set[str]) -> set[str]:
    """The modules whose code shaped this graph: modelbuild's, each pass's with its package's, and
    whatever else the load imported (``before``: the modules loaded already)."""
    files: set[str] = set()
    packages = {"modelbuild"}
    for pass_def in {t.pass_def.name: t.pass_def for t in project.targets.values()}.values():
        module = pass_def.module
        packages.add(module.__name__.split(".")[0])
        files.update(str(p) for p in pass_def.code_files().values())
        dist_path = getattr(getattr(entry_point(pass_def.name), "dist", None), "_path", None)
        if dist_path is not None:
            files.add(str(Path(dist_path) / "entry_points.txt"))
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and (name.split(".")[0] in packages or name not in before):
            files.add(file)
    return files


def store(path: Path, key: tuple | None, project: Project, record: dict, started: int, *,
          racy_ns: int, pass_handle, identity, tree) -> str:
    """Write the cache for ``project`` to ``path``, loaded from ``key`` at ``started`` (ns) with
    ``record`` (loader.py); what happened, for project.run.graph_outcome. graph_cache's own parts:
    ``racy_ns`` its same-tick guard (read at the call: tests narrow it), ``pass_handle`` its
    PassHandle, ``identity`` and ``tree`` the stat identities its check compares."""
    if key is None:
        return "not stored: targets/ unreadable"
    try:
        files = [(file, identity(file)) for file in sorted(_code_files(project, record["modules"]))]
        refs = [(written, resolved, tree(resolved)) for written, resolved in dict.fromkeys(record.get("refs", []))]
        handles = {t.pass_def.name: pass_handle(t.pass_def, entry_point(t.pass_def.name).value)
                   for t in project.targets.values()}
    except (OSError, KeyError, TypeError, AttributeError) as error:  # a pass not from an entry point...
        return f"not stored: {error}"
    identities = [i for _, i in files]  # key[5], the sys.path listings, are names: no tick to race
    identities += [entry[j] for _, _, entries in refs for entry in entries for j in (1, 3)]
    if any(i is not None and max(i[4], i[5]) > started - racy_ns for i in identities):
        return "not stored: files changed in the last 2 s (same-tick guard)"
    stored = copy.copy(project)
    stored.targets = {}
    for name, target in project.targets.items():
        stored.targets[name] = copy.copy(target)
        stored.targets[name].pass_def = handles[target.pass_def.name]
    data = {"format": key[0], "key": key, "files": files, "refs": refs,  # key[0]: graph_cache.FORMAT (its _key)
            "project": stored}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            pickle.dump(data, handle, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    except (OSError, pickle.PicklingError, TypeError, AttributeError) as error:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return f"not stored: {error}"
    return "stored"
