"""Run doit with this checkout's passes registered, even those the installed modelbuild's
dist-info predates.

Passes register through entry points (pyproject.toml), which an editable install records only
when it is (re)installed: a pass added since is invisible to ``doit`` until then. ``env(tmp)``
writes a dist-info listing just the entry points pyproject.toml has and the installed ones lack
into ``tmp`` and returns the PYTHONPATH that adds it; once installed, nothing is missing and it
writes nothing, so the tests then use the real registration only.
"""

from __future__ import annotations

import importlib.metadata
import os
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GROUP = "modelbuild.passes"


def missing() -> dict[str, str]:
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"][GROUP]
    installed = {entry.name for entry in importlib.metadata.entry_points(group=GROUP)}
    return {name: value for name, value in declared.items() if name not in installed}


def env(tmp: Path) -> dict:
    entries = missing()
    if not entries:
        return {}
    info = tmp / "modelbuild_checkout_passes-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: modelbuild-checkout-passes\nVersion: 0\n")
    (info / "entry_points.txt").write_text(f"[{GROUP}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()))
    path = [str(REPO), str(tmp)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {"PYTHONPATH": os.pathsep.join(path)}
