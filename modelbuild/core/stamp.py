"""The stamp: what a finished output says about itself, in ``.modelbuild/stamp.json``.

Written and read here only. It is also the action entry the cache stores (store.py), so its
fields are those of an entry: key, key components, manifest, manifest digest, seconds, where it
ran; plus, for this checkout only, ``left_on_remote`` (download.py).
"""

from __future__ import annotations

import json
from pathlib import Path

STAMP_DIR = ".modelbuild"
STAMP = f"{STAMP_DIR}/stamp.json"


def read_stamp(out_dir: Path) -> dict | None:
    """The stamp of a finished output, or None when there is none (or it is unreadable)."""
    try:
        stamp = json.loads((Path(out_dir) / STAMP).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) and isinstance(stamp.get("manifest"), dict) else None


def action_entry(stamp: dict) -> dict:
    """A stamp as a cache entry: without ``left_on_remote``, which says where this checkout keeps
    the files (download.py), no part of the action."""
    return {k: v for k, v in stamp.items() if k != "left_on_remote"}


def write_stamp(out_dir: Path, stamp: dict) -> None:
    (Path(out_dir) / STAMP_DIR).mkdir(exist_ok=True)
    (Path(out_dir) / STAMP).write_text(json.dumps(stamp, indent=1, sort_keys=True))
