"""toypass: pure-Python passes for the core test lane (tests/test_core_*.py).

No torch, onnx or onnxruntime anywhere: a stage of these passes runs in milliseconds, so the
executor, the caches, locks, kill recovery and the remote tier are tested on their own. Putting
``tests/toypass`` on PYTHONPATH registers the passes (``toypass-0.1.dist-info/entry_points.txt``).

Every real run appends one line ``<target> <pass>`` to the file named by ``$TOYPASS_RUN_LOG``
(when set), so a test counts the runs a build really made, beside what doit printed.
"""

from __future__ import annotations

import os


def record_run(target: str, pass_name: str) -> None:
    log = os.environ.get("TOYPASS_RUN_LOG")
    if log:
        with open(log, "a") as handle:
            handle.write(f"{target} {pass_name}\n")

