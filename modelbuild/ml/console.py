"""Keeping library chatter out of build logs: passes draw their own rich progress."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def quiet_stdout():
    """Libraries that print per-layer or per-node progress to stdout (the genai model builder,
    onnxruntime's quantizers) stay silent unless MODELBUILD_VERBOSE is set."""
    if os.environ.get("MODELBUILD_VERBOSE"):
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield
