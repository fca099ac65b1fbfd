"""Graph -> doit tasks. One doit task per target, named after the target.

Used from ``dodo.py``::

    from modelbuild.tasks import doit_config, tasks_for_project
    DOIT_CONFIG = doit_config(ROOT)
    task_modelbuild = tasks_for_project(ROOT)

A task is up to date when the action key it recorded in doit's database, the key stamped in
its output folder and the freshly computed key all agree and the output is intact; so
``doit forget`` and a damaged ``build/`` both lead to a rebuild, as doit users expect.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from doit.exceptions import TaskFailed

from . import UserError
from .project import Project, Target, load_project
from .stage import StageError, build, input_path, is_up_to_date

_projects: dict[Path, Project] = {}


def project_at(root: Path) -> Project:
    """The validated project, loaded once per process; a user mistake exits with one line."""
    root = Path(root).resolve()
    if root not in _projects:
        try:
            _projects[root] = load_project(root)
        except UserError as error:
            print(f"modelbuild: {error}", file=sys.stderr)
            raise SystemExit(2) from None
    return _projects[root]


def doit_config(root: Path) -> dict:
    project = project_at(root)
    project.state_dir.mkdir(parents=True, exist_ok=True)
    return {
        "backend": "sqlite3",  # the default dbm falls back to the slow dbm.dumb on this Python
        "dep_file": str(project.state_dir / "doit.sqlite3"),
        "default_tasks": project.default_targets,
        "verbosity": 2,  # passes draw their own progress bars; let them through
        "par_type": "thread",  # each stage runs in its own worker process anyway
    }


def _build_action(project: Project, target: Target):
    try:
        return build(project, target)
    except StageError as error:
        return TaskFailed(str(error))


def _clean_action(project: Project, target: Target) -> None:
    shutil.rmtree(project.output_dir(target.name), ignore_errors=True)


class ActionKeyCheck:
    """doit ``uptodate`` object: the stage's action key and its output's manifest still hold."""

    def __init__(self, project: Project, target: Target):
        self.project = project
        self.target = target

    def __call__(self, task, values) -> bool:
        return is_up_to_date(self.project, self.target, values)

    def __repr__(self) -> str:
        return f"action key of '{self.target.name}' (pass, params, device, libraries, input contents) and its output manifest"


def task_dicts(project: Project):
    for name, target in project.targets.items():
        doc = target.doc or f"{target.pass_def.name}: {target.pass_def.doc}"
        file_deps = [
            str(input_path(project, ref)) for ref in target.input_refs()
            if ref.kind == "file" and (project.root / ref.value).is_file()
        ]
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


def tasks_for_project(root: Path):
    """A ``task_*`` function for dodo.py that yields every target of the project."""

    def task_modelbuild():
        yield from task_dicts(project_at(root))

    task_modelbuild.__doc__ = "modelbuild targets"
    return task_modelbuild
