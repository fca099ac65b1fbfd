"""The Run: what one process learns about one project while it builds it.

A doit process loads its project once (``tasks.project_at``) and hands it doit's command line
there; every layer keeps what it works out once per run here, the first time it is needed: the
stat cache's connection (engine), the device slots and the machine behind them (engine, exec),
the remote tier with its queue of pushes (cache), the targets the command line asks for
(cache.download), the connection to a Ray cluster (exec), and what the graph cache did. The Run
travels with the project as ``project.run``; it is never pickled with the graph, so a project
loaded again, in the same process or another, starts a new Run and nothing carries over from an
earlier build (tests and benches reset nothing by hand).

Commands beside doit (``plan``, ``status``, ``release``, ...) get a Run with no command line:
for them no doit run is asking for particular targets.

What stays process-wide, on purpose: the registry of installed passes and the versions of the
installed libraries (``passdef``, ``core.key``) describe the Python environment, not a project or
a run, and cannot change while the process lives.
"""

from __future__ import annotations

import threading
from typing import Any

UNSET: Any = object()  # a part not worked out yet (None is a valid answer: "no remote", "no machine")


class Run:
    __slots__ = ("argv", "lock", "stat_cache", "slot_pool", "machine", "remote_tier", "asked", "ray", "graph_outcome")

    def __init__(self, argv: tuple[str, ...] | None = None):
        self.argv = None if argv is None else tuple(argv)  # doit's arguments (sys.argv[1:] of `doit ...`); None beside doit
        self.lock = threading.RLock()  # doit runs tasks in threads (par_type "thread")
        self.stat_cache = UNSET  # core.digest.StatCache of build/.modelbuild (engine.stage.stat_cache)
        self.slot_pool = UNSET  # exec.devices.SlotPool (engine.stage.slot_pool)
        self.machine = UNSET  # exec.devices.Machine, or None when every target is on the CPU (tasks.machine_for)
        self.remote_tier = UNSET  # cache.tiers.RemoteTier, or None without a remote (cache.tiers.remote_tier)
        self.asked = UNSET  # frozenset of the target names this doit run asks for (cache.download.toplevel)
        self.ray = {}  # Ray address -> exec.ray_exec.RayExecutor connected this run (exec.executor.run_on_ray)
        self.graph_outcome = ""  # what loading did: "hit", "stored", "not stored: ...", "off" (graph.graph_cache)

    def __repr__(self) -> str:
        return f"Run(argv={self.argv!r})"
