"""Is a target up to date? The one answer: doit's uptodate check, the executor's reuse of a
complete output, ``why``, the report and ``release`` all ask ``status()``.

A target is **Fresh** when its output folder carries a stamp (``.modelbuild/stamp.json``) whose
action key is the key computed now, every output file still has the digest the stamp records
(and nothing else is there), and the output passes the target's quality gates; or when the
stamp says its files were left on the remote cache (download.py) and the folder holds nothing else. Otherwise it is
**Missing** (no stamped output) or **Stale**, with the reasons: what changed in the key (param,
input file, upstream artifact, library, pass code…), which output files changed, which gates
fail. Gates are part of the answer but not of the key, so tightening a gate makes a target
stale without invalidating its cached measurement.

The stamp is read and written by stamp.py only; the key is computed by key.py only.
"""

from __future__ import annotations

from .digest import StatCache, tree_manifest
from .gates import gate_failures
from .key import key_components, key_of
from .stamp import STAMP_DIR, read_stamp

class _State:
    """An immutable value, compared and shown by its fields (what ``@dataclass(frozen=True)`` gives,
    written out: status.py is imported by every no-op, and generating a dataclass costs more
    than the rest of this module)."""

    __slots__: tuple[str, ...] = ()

    def __init__(self, *values, **named):
        values += tuple(named.pop(name) for name in self.__slots__[len(values):] if name in named)
        if len(values) != len(self.__slots__) or named:
            raise TypeError(f"{type(self).__name__} takes {', '.join(self.__slots__)}")
        for name, value in zip(self.__slots__, values):
            object.__setattr__(self, name, value)

    def _values(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __setattr__(self, name, value):
        raise AttributeError(f"cannot assign to field '{name}' of {type(self).__name__}")

    def __eq__(self, other):
        return self._values() == other._values() if type(other) is type(self) else NotImplemented

    def __hash__(self):
        return hash(self._values())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{n}={v!r}' for n, v in zip(self.__slots__, self._values()))})"

    def __reduce__(self):
        return type(self), self._values()


class Fresh(_State):
    __slots__ = ("stamp",)  # stamp: dict


class Missing(_State):
    __slots__ = ("reason",)  # reason: str

    @property
    def text(self) -> str:
        return self.reason


class Stale(_State):
    """``why`` is "key" (what the output was built from changed), "output" (files in build/
    changed) or "gates" (the output is the right one but fails a gate declared now)."""

    __slots__ = ("why", "reasons", "stamp")  # why: str, reasons: tuple[str, ...], stamp: dict

    @property
    def text(self) -> str:
        return "; ".join(self.reasons)


def status(project, target, cache: StatCache, as_built: frozenset[str] = frozenset()) -> Fresh | Missing | Stale:
    """Fresh, Missing or Stale (with reasons) for ``target`` now.

    ``as_built``: upstream targets about to be rebuilt; their artifacts are taken as the stamp
    recorded them, since a rebuild that comes out byte-identical changes nothing here (this is
    how ``why`` tells "stale" from "waits on an upstream rebuild").
    """
    out = project.output_dir(target.name)
    stamp = read_stamp(out)
    if stamp is None:
        return Missing(f"never built (no output in build/{target.name})" if not out.exists()
                       else f"build/{target.name} has no stamp (an interrupted or foreign output)")
    now = key_components(project, target, cache)
    old = stamp.get("components") or {}
    for key, ref in target.inputs.items():
        if ref.kind == "target" and ref.value in as_built:
            now["inputs"][key] = (old.get("inputs") or {}).get(key)
    if stamp.get("action_key") != key_of(now):
        return Stale("key", tuple(key_differences(old, now, target) or ["action key changed"]), stamp)
    try:
        current = tree_manifest(out, cache, exclude=(STAMP_DIR,))
    except OSError as error:
        return Stale("output", (f"output unreadable: {error}",), stamp)
    if stamp.get("left_on_remote"):  # download.py: the files are on the remote cache, by digest
        if current:
            return Stale("output", (f"files appeared beside an output left on the remote: {', '.join(sorted(current))}",),
                         stamp)
        return Fresh(stamp)  # gates are checked when its files come down (every gated target is needed here)
    if current != stamp["manifest"]:
        changed = sorted(rel for rel in set(current) | set(stamp["manifest"])
                         if current.get(rel, {}).get("digest") != stamp["manifest"].get(rel, {}).get("digest"))
        return Stale("output", (f"output changed since it was built: {', '.join(changed)}",), stamp)
    failed = gate_failures(target, out)
    if failed:
        return Stale("gates", tuple(f"quality gate failed: {failure}" for failure in failed), stamp)
    return Fresh(stamp)


def key_differences(old: dict, new: dict, target) -> list[str]:
    """What differs between two sets of key components, one readable reason each."""
    reasons = []
    for field in ("pass_version", "pass_code", "device", "cpu_numerics", "key_format", "digest", "python", "platform",
                  "resolved"):
        if old.get(field) != new.get(field):
            reasons.append(f"{field.replace('_', ' ')}: {old.get(field)} -> {new.get(field)}")
    for what, a, b in (("param", old.get("params", {}), new.get("params", {})),
                       ("library", old.get("libraries", {}), new.get("libraries", {}))):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                shown = (repr(a.get(key)), repr(b.get(key))) if what == "param" else (a.get(key), b.get(key))
                reasons.append(f"{what} {key}: {shown[0]} -> {shown[1]}")
    old_inputs, new_inputs = old.get("inputs", {}), new.get("inputs", {})
    for key in sorted(set(old_inputs) | set(new_inputs)):
        if old_inputs.get(key) != new_inputs.get(key):
            reasons.append(_input_reason(key, target.inputs.get(key), old_inputs.get(key), new_inputs.get(key)))
    return reasons


def _input_reason(key: str, ref, old: str | None, new: str | None) -> str:
    what = "upstream artifact" if ref is not None and ref.kind == "target" else "input file"
    shown = str(ref) if ref is not None else key
    if old is None:
        return f"{what} {key} ({shown}): new input"
    if new is None:
        return f"{what} {key} ({shown}): removed, or upstream not built"
    return f"{what} {key} ({shown}) changed: {old[:12]} -> {new[:12]}"
