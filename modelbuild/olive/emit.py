"""Targets -> a readable TOML file (comments above each target), written atomically."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from .model import Target

BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def key(text: str) -> str:
    return text if BARE_KEY.match(text) else json.dumps(text)


def value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(v, list):
        return "[" + ", ".join(value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{key(k)} = {value(x)}" for k, x in v.items()) + " }" if v else "{}"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def comment(text: str) -> str:
    return "\n".join(f"# {line}".rstrip() for line in text.splitlines() or [""])


def render(header: list[str], targets: list[Target], groups: dict[str, list[str]], default: list[str] | None = None) -> str:
    out = [comment(line) for line in header]
    out.append("")
    if default:
        out += [f"default_targets = {value(default)}", ""]
    for t in targets:
        out += [comment(line) for line in t.comments]
        out.append(f"[target.{key(t.name)}]")
        if t.doc:
            out.append(f"doc = {value(t.doc)}")
        out.append(f"pass = {value(t.pass_name)}")
        if t.device != "cpu":
            out.append(f"device = {value(t.device)}")
        if t.inputs:
            out.append(f"inputs = {value(t.inputs)}")
        if t.params:
            out.append(f"params = {value(t.params)}")
        if t.gates:
            out.append(f"gates = {value(t.gates)}")
        out.append("")
    if groups:
        out.append("[group]")
        out += [f"{key(name)} = {value(members)}" for name, members in groups.items()]
        out.append("")
    return "\n".join(out)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
