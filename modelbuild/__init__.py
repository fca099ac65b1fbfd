"""modelbuild: Make for model artifacts.

Every model artifact (imported base, LoRA adapter, int4 genai bundle, smoke answers) is a
build target declared in TOML under ``targets/``; doit rebuilds exactly the stale stages.

This package is imported by ``dodo.py`` on every ``doit`` call, so nothing imported at module
level here (or in the modules the task loader uses) may pull in torch, transformers or onnx.
"""

__version__ = "0.1.0"


class UserError(Exception):
    """A mistake in the user's targets, inputs or command line.

    Printed as one line (no traceback) and turned into a non-zero exit. The message names
    the file, the target and the key wherever they are known.
    """


def say(message: str) -> None:
    """One status line on stderr, written in one call so lines of parallel stages never interleave."""
    import sys

    sys.stderr.write(f"modelbuild: {message}\n")
    sys.stderr.flush()
