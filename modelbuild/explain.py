"""``python -m modelbuild why <target>``: what changed since each stage was last built.

Compares, stage by stage in build order, the key components stamped in the output with the
ones computed now, and names every difference: input file, param (old -> new), library
version, pass version or code, device, upstream artifact. Up-to-date stages say where their
output came from (built, or restored from the cache).
"""

from __future__ import annotations

import json
import sqlite3

from .digest import hash_json, tree_manifest
from .project import Project
from .stage import STAMP_DIR, key_components, read_stamp, stat_cache


def doit_values(project: Project, name: str) -> dict:
    path = project.state_dir / "doit.sqlite3"
    if not path.exists():
        return {}
    with sqlite3.connect(path) as db:
        try:
            row = db.execute("select task_data from doit where task_id = ?", (name,)).fetchone()
        except sqlite3.DatabaseError:
            return {}
    return json.loads(row[0]).get("_values_:", {}) if row else {}


def _diff(old: dict, new: dict, project: Project, target) -> list[str]:
    reasons = []
    for field in ("pass_version", "pass_code", "device", "key_format", "digest"):
        if old.get(field) != new.get(field):
            reasons.append(f"{field.replace('_', ' ')}: {old.get(field)} -> {new.get(field)}")
    old_params, new_params = old.get("params", {}), new.get("params", {})
    for key in sorted(set(old_params) | set(new_params)):
        if old_params.get(key) != new_params.get(key):
            reasons.append(f"param {key}: {old_params.get(key)!r} -> {new_params.get(key)!r}")
    old_libs, new_libs = old.get("libraries", {}), new.get("libraries", {})
    for lib in sorted(set(old_libs) | set(new_libs)):
        if old_libs.get(lib) != new_libs.get(lib):
            reasons.append(f"library {lib}: {old_libs.get(lib)} -> {new_libs.get(lib)}")
    old_inputs, new_inputs = old.get("inputs", {}), new.get("inputs", {})
    for key in sorted(set(old_inputs) | set(new_inputs)):
        a, b = old_inputs.get(key), new_inputs.get(key)
        if a == b:
            continue
        ref = target.inputs.get(key)
        if isinstance(b, dict) or isinstance(a, dict):
            a, b = a or {}, b or {}
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub):
                    reasons.append(_input_reason(f"{key}.{sub}", (ref or {}).get(sub), a.get(sub), b.get(sub)))
        else:
            reasons.append(_input_reason(key, ref, a, b))
    return reasons


def _input_reason(key: str, ref, old: str | None, new: str | None) -> str:
    what = "upstream artifact" if ref is not None and ref.kind == "target" else "input file"
    shown = str(ref) if ref is not None else key
    if old is None:
        return f"{what} {key} ({shown}): new input"
    if new is None:
        return f"{what} {key} ({shown}): removed, or upstream not built"
    return f"{what} {key} ({shown}) changed: {old[:12]} -> {new[:12]}"


def explain(project: Project, names: list[str]) -> list[str]:
    cache = stat_cache(project)
    lines = []
    stale: set[str] = set()
    for name in project.closure(names):
        target = project.targets[name]
        out = project.output_dir(name)
        stamp = read_stamp(out)
        waiting = [dep for dep in target.deps() if dep in stale]
        if stamp is None:
            lines.append(f"{name}: stale: never built (no output in build/{name})")
            stale.add(name)
            continue
        now = key_components(project, target, cache)
        old = stamp.get("components", {})
        for key, ref in target.inputs.items():
            # An upstream that rebuilds first may come out identical: judge this stage as if it did.
            if isinstance(ref, dict):
                for sub, r in ref.items():
                    if r.kind == "target" and r.value in waiting:
                        now["inputs"][key][sub] = old.get("inputs", {}).get(key, {}).get(sub)
            elif ref.kind == "target" and ref.value in waiting:
                now["inputs"][key] = old.get("inputs", {}).get(key)
        key = hash_json(now)
        after = f" (after {', '.join(waiting)} rebuild)" if waiting else ""
        if stamp.get("action_key") != key:
            reasons = _diff(old, now, project, target)
            lines.append(f"{name}: stale{after}: " + "; ".join(reasons or ["action key changed"]))
            stale.add(name)
            continue
        current = tree_manifest(out, cache, exclude=(STAMP_DIR,))
        if current != stamp["manifest"]:
            changed = sorted(
                rel for rel in set(current) | set(stamp["manifest"])
                if current.get(rel, {}).get("digest") != stamp["manifest"].get(rel, {}).get("digest")
            )
            lines.append(f"{name}: stale: output changed since it was built: {', '.join(changed)}")
            stale.add(name)
            continue
        if waiting:
            lines.append(f"{name}: waits on {', '.join(waiting)}: reruns only if their output changes")
            continue
        origin = stamp.get("origin", "built")
        when = stamp.get("restored_at") or stamp.get("built_at") or "?"
        detail = f"built in {stamp['seconds']} s" if origin == "built" else origin
        note = ""
        if doit_values(project, name).get("action_key") != key:
            note = " (doit has no record of it: forgotten or interrupted run; the intact output will be reused)"
        lines.append(f"{name}: up to date ({detail}, {when}){note}")
    return lines
