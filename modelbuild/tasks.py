"""Graph -> doit tasks. One doit task per target, named after the target.

Used from ``dodo.py``::

    from modelbuild.tasks import doit_config, tasks_for_project
    DOIT_CONFIG = doit_config(ROOT)
    task_modelbuild = tasks_for_project(ROOT)

A task is up to date when status.py says its target is Fresh (stamped key = the key computed
now, output intact, gates passed) and doit recorded that same key; so ``doit forget`` and a
damaged ``build/`` both lead to a rebuild, as doit users expect.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from doit.exceptions import TaskFailed

from . import UserError
from .exec.devices import Machine, doit_jobs
from .exec.executor import resolve_devices
from .graph.graph_cache import load as load_graph
from .core.project import Project, Target, executor_kind
from .core.run import UNSET
from .engine.stage import StageError, build, check_state, is_up_to_date, slot_pool

_loaded: dict[Path, Project] = {}  # dodo.py asks twice (DOIT_CONFIG, then the tasks): one load, one Run


def project_at(root: Path, argv: list[str] | None = None) -> Project:
    """The validated project of this doit process, loaded once (from the graph cache when
    nothing it depends on changed, graph_cache.py) with its Run (core/run.py), which is given
    doit's command line (``argv``, default ``sys.argv[1:]``: read here and nowhere else); its
    device preference lists are then resolved on the machine the stages' slot pool schedules
    on. A user mistake exits with one line."""
    root = Path(root).resolve()
    if root not in _loaded:
        try:
            project = load_graph(root)
            project.run.argv = tuple(sys.argv[1:] if argv is None else argv)
            doit_jobs(project.run.argv)  # `doit -n -1` would otherwise exit 0 having built nothing
            _loaded[root] = resolve_devices(project, lambda: slot_pool(project).machine)
            check_state(project)
        except UserError as error:
            print(f"modelbuild: {error}", file=sys.stderr)
            raise SystemExit(2) from None
    return _loaded[root]


def machine_for(project: Project) -> Machine | None:
    """The machine's devices, discovered only when the project has GPU targets (a no-op stays
    fast); the same discovery the stages' slot pool then schedules on. Decided once per run
    (graph loading stays linear in the number of targets)."""
    run = project.run
    if run.machine is UNSET:
        run.machine = None
        if any(t.device != "cpu" for t in project.targets.values()):
            try:
                run.machine = slot_pool(project).machine
            except UserError as error:
                print(f"modelbuild: {error}", file=sys.stderr)
                raise SystemExit(2) from None
    return run.machine


def unavailable_device(project: Project, target: Target) -> str | None:
    """Why the target's device is not on this machine, or None. With the Ray executor the
    cluster places stages, so only a device no cluster can honour (``cuda:N``) is refused here."""
    if executor_kind(project) == "ray":
        return "names a GPU of one machine; on a Ray cluster declare device = \"cuda\"" if ":" in target.device else None
    machine = machine_for(project)
    return machine.lacks(target.device) if machine else None


def doit_config(root: Path) -> dict:
    """doit settings. The default targets (every target when no file sets default_targets) leave
    out those whose device this machine lacks."""
    project = project_at(root)
    project.state_dir.mkdir(parents=True, exist_ok=True)
    wanted = project.default_targets or list(project.targets)
    defaults = [name for name in wanted if name in project.groups or not unavailable_device(project, project.targets[name])]
    return {
        "backend": "sqlite3",  # the default dbm falls back to the slow dbm.dumb on this Python
        "dep_file": str(project.state_dir / "doit.sqlite3"),
        "default_tasks": defaults,
        "verbosity": 2,  # passes draw their own progress bars; let them through
        "par_type": "thread",  # each stage runs in its own worker process anyway
    }


def _build_action(project: Project, target: Target):
    try:
        return build(project, target)
    except StageError as error:
        return TaskFailed(str(error))
    except UserError as error:  # e.g. an input folder that gained a link to outside since load
        return TaskFailed(f"{target.file}: target '{target.name}': {error}")


def _unavailable_action(target: Target, reason: str):
    return TaskFailed(f"{target.file}: target '{target.name}': device {target.device}: {reason}")


def _clean_action(project: Project, target: Target) -> None:
    shutil.rmtree(project.output_dir(target.name), ignore_errors=True)


class ActionKeyCheck:
    """doit ``uptodate`` object: the stage's action key and its output's manifest still hold."""

    def __init__(self, project: Project, target: Target):
        self.project = project
        self.target = target

    def __call__(self, task, values) -> bool:
        try:
            return is_up_to_date(self.project, self.target, values)
        except UserError:
            return False  # the build action meets the same problem and reports it in one line

    def __repr__(self) -> str:
        return f"action key of '{self.target.name}' (pass, params, device, libraries, input contents) and its output manifest"


def task_dicts(project: Project):
    for name, target in project.targets.items():
        doc = target.doc or f"{target.pass_def.name}: {target.pass_def.doc}"
        reason = unavailable_device(project, target)
        if reason:
            # Fails before its upstream stages run: no minutes of CPU work for a build that cannot finish.
            yield {
                "basename": name,
                "doc": f"{doc} [{target.device}: not on this machine]",
                "actions": [(_unavailable_action, (target, reason))],
                "uptodate": [False],
                "verbosity": 2,
            }
            continue
        file_deps = [path for path in (os.path.join(project.root, ref.value) for ref in target.inputs.values()
                                       if ref.kind == "file") if os.path.isfile(path)]
        yield {
            "basename": name,
            "doc": f"{doc} [{target.device}]",
            "actions": [(_build_action, (project, target))],
            "task_dep": target.deps(),
            "file_dep": file_deps,
            "uptodate": [ActionKeyCheck(project, target)],
            "targets": [str(project.output_dir(name))],
            "clean": [(_clean_action, (project, target))],
        }


def group_task_dicts(project: Project):
    """One doit group task per [group]: no action, it depends on its members."""
    for name, members in project.groups.items():
        available = [m for m in members if not unavailable_device(project, project.targets[m])]
        yield {"basename": name, "doc": f"group: {len(available)} targets ({', '.join(members[:3])}...)",
               "actions": None, "task_dep": available}


def tasks_for_project(root: Path):
    """A ``task_*`` function for dodo.py that yields every target of the project."""

    def task_modelbuild():
        yield from task_dicts(project_at(root))
        yield from group_task_dicts(project_at(root))

    task_modelbuild.__doc__ = "modelbuild targets"
    return task_modelbuild
