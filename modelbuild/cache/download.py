"""Which outputs must be on this machine: the rest may stay on the remote cache (minimal download).

Like Bazel's ``--remote_download_outputs``: with ``toplevel``, a stage that was restored from
the remote cache, or that ran on a Ray worker, whose output nothing here needs is not
downloaded. Its folder in ``build/`` holds only its stamp, marked ``left_on_remote``, and status.py
calls it up to date: its key, manifest and digests are known, so downstream keys (which hash the
manifest digest) are the same as with the files present. The files come down when something
local needs them: the target is asked for on the ``doit`` command line (or is a default
target when none is named), it has quality gates (checked on its files), a local stage takes it
as an input, or ``release`` packs it. A Ray stage takes a left-on-remote input by its digests.

Setting: ``MODELBUILD_DOWNLOAD`` or ``[cache] download`` = ``all`` | ``toplevel``. Default:
``toplevel`` with the Ray executor (outputs are made remote there), ``all`` otherwise (a team
cache restores whole builds, as before). An output already left on a remote that is now off,
unreachable, or lost or corrupted it, is brought up to date here when a stage needs it (restored
with every object re-hashed, or rebuilt and pushed back): stage.py, ``_inputs_here``.
"""

from __future__ import annotations

import fnmatch

from ..core import settings
from ..core.project import executor_kind
from ..core.run import UNSET

def mode(project) -> str:
    chosen = settings.current().download or project.cache.get("download")
    return chosen or ("toplevel" if executor_kind(project) == "ray" else "all")


def _command_line_tasks(argv: tuple[str, ...]) -> tuple[str, ...] | None:
    """The task names of this ``doit run`` as doit itself parses them; () when none is named;
    None when it cannot be told, or for another doit command (then every output counts as asked
    for: ``auto`` and ``strace`` build what they name, the others build nothing)."""
    from doit.cmd_base import DodoTaskLoader, DoitCmdBase
    from doit.cmd_run import Run
    from doit.cmdparse import CmdOption, CmdParse, CmdParseError

    args = list(argv)
    if args and args[0] == "run":
        args = args[1:]
    elif args and not args[0].startswith("-") and args[0] in _doit_commands():
        return None
    options = [CmdOption(o) for o in (*DoitCmdBase.base_options, *DodoTaskLoader.cmd_options, *Run.cmd_options)]
    try:
        _, positional = CmdParse(options).parse(args)
    except CmdParseError:
        return None
    return tuple(name for name in positional if "=" not in name)  # NAME=VALUE are doit variables


def _doit_commands() -> set[str]:
    from doit.doit_cmd import DoitMain

    return {command.get_name() for command in DoitMain.DOIT_CMDS}


def toplevel(project) -> frozenset[str]:
    """The targets this doit run was asked for (group members included), from the command line
    its Run was given (core/run.py); beside doit, every target."""
    run = project.run
    with run.lock:
        if run.asked is UNSET:
            names = None if run.argv is None else _command_line_tasks(run.argv)
            wanted: set[str] = set()
            for name in project.targets if names is None else names or project.default_targets or project.targets:
                # doit's own selection: a name with "*" is a glob over task names, anything else is literal
                for match in fnmatch.filter([*project.targets, *project.groups], name) if "*" in name else [name]:
                    wanted.update(project.groups.get(match, [match]))
            run.asked = frozenset(wanted)
    return run.asked


def needed_here(project, target) -> bool:
    """Must ``target``'s files be in build/ when this run ends?"""
    return mode(project) == "all" or bool(target.gates) or target.name in toplevel(project)
