"""Keeping library chatter out of build logs: passes draw their own rich progress."""

from __future__ import annotations

import contextlib
import logging
import os

from modelbuild.core import settings


@contextlib.contextmanager
def quiet_stdout():
    """Libraries that print per-layer or per-node progress to stdout (the genai model builder,
    onnxruntime's quantizers) stay silent unless MODELBUILD_VERBOSE is set."""
    if settings.current().verbose:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


@contextlib.contextmanager
def quiet_onnxruntime():
    """onnxruntime's Python tools (transformer optimizer, quantizers) log a warning per unmatched
    pattern and advice per node, and print to stdout: silent unless MODELBUILD_VERBOSE is set."""
    if settings.current().verbose:
        yield
        return
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    logging.disable(logging.WARNING)
    try:
        with quiet_stdout():
            yield
    finally:
        logging.disable(logging.NOTSET)

