"""``python -m modelbuild why <target>``: per stage, in build order, what ``doit`` will do and why.

Each line is ``status()`` (status.py), the executor's own decision, put in words: a stale stage
names every difference (input file, param old -> new, library version, pass version or code,
device, upstream artifact, changed output files, a failed quality gate); a stage whose only
change is an upstream that rebuilds first "waits" (it reruns only if that output changes); an
up-to-date stage says where its output came from (built, or restored from the cache).
"""

from __future__ import annotations

from ..core.project import Project
from ..engine.stage import stat_cache
from ..core.status import Fresh, Missing, status


def _doit_records(project: Project):
    """doit's record of the tasks it ran (the values each saved), read through doit's own
    Dependency API rather than its database schema; None before doit's first run here."""
    path = project.state_dir / "doit.sqlite3"
    if not path.exists():
        return None
    from doit.dependency import Dependency, SqliteDB

    return Dependency(SqliteDB, str(path))


def explain(project: Project, names: list[str]) -> list[str]:
    cache = stat_cache(project)
    records = _doit_records(project)
    try:
        return _explain(project, names, cache, records)
    finally:
        if records is not None:
            records.close()


def _explain(project: Project, names: list[str], cache, records) -> list[str]:
    lines = []
    rebuilding: set[str] = set()
    for name in project.closure(names):
        target = project.targets[name]
        waiting = [dep for dep in target.deps() if dep in rebuilding]
        state = status(project, target, cache, as_built=frozenset(waiting))
        if isinstance(state, Missing):
            lines.append(f"{name}: stale: {state.text}")
            rebuilding.add(name)
        elif not isinstance(state, Fresh):
            after = f" (after {', '.join(waiting)} rebuild)" if waiting and state.why == "key" else ""
            lines.append(f"{name}: stale{after}: {state.text}")
            rebuilding.add(name)
        elif waiting:
            lines.append(f"{name}: waits on {', '.join(waiting)}: reruns only if their output changes")
        else:
            stamp = state.stamp
            origin = stamp.get("origin", "built")
            when = stamp.get("restored_at") or stamp.get("built_at") or "?"
            detail = f"built in {stamp['seconds']} s" if origin == "built" else origin
            if stamp.get("left_on_remote"):
                detail += f"; files left on {stamp['left_on_remote']}: `doit {name}` downloads them"
            note = ""
            recorded = records.get_values(name) if records is not None else {}
            if recorded.get("action_key") != stamp["action_key"]:
                note = " (doit has no record of it: forgotten or interrupted run; the intact output will be reused)"
            lines.append(f"{name}: up to date ({detail}, {when}){note}")
    return lines
