"""A scratch copy of this project for a benchmark: dodo.py + targets/, its own cache (sharing only
the sha256-pinned downloads), and the environment that points doit at that cache."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def scratch_project(folder: Path, cache: Path | None = None) -> tuple[Path, dict]:
    """(project root, environment) of a fresh copy under ``folder``; ``cache`` defaults to a new
    one beside it (pass a warm cache to restore upstream stages instead of building them)."""
    project = Path(folder) / "project"
    project.mkdir(parents=True)
    shutil.copy(REPO / "dodo.py", project / "dodo.py")
    shutil.copytree(REPO / "targets", project / "targets")
    cache = Path(cache) if cache else Path(folder) / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    if (REPO / "cache" / "downloads").is_dir() and not (cache / "downloads").exists():
        (cache / "downloads").symlink_to(REPO / "cache" / "downloads")
    env = {**os.environ, "MODELBUILD_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "GIT_DIR": os.devnull}
    return project, env
