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
cache restores whole builds, as before). Without a reachable remote everything is local anyway.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import sys

from . import UserError

MODES = ("all", "toplevel")
ENV = "MODELBUILD_DOWNLOAD"
DOIT_COMMANDS = {"auto", "clean", "dumpdb", "forget", "help", "ignore", "info", "list", "reset-dep", "strace",
                 "tabcompletion"}


def check_mode(value: object, where: str) -> str:
    if value not in MODES:
        raise UserError(f"{where}: expected one of {', '.join(MODES)}, got {value!r}")
    return value


def mode(project) -> str:
    from .executor import executor_kind

    if os.environ.get(ENV):
        return check_mode(os.environ[ENV], ENV)
    return project.cache.get("download") or ("toplevel" if executor_kind(project) == "ray" else "all")


@functools.cache
def _command_line_tasks(argv: tuple[str, ...]) -> tuple[str, ...] | None:
    """The task names of this ``doit`` run as doit itself parses them; () when none is named;
    None when it cannot be told (then every output is downloaded)."""
    from doit.cmd_base import DodoTaskLoader, DoitCmdBase
    from doit.cmd_run import Run
    from doit.cmdparse import CmdOption, CmdParse, CmdParseError

    args = list(argv)
    if args and args[0] in DOIT_COMMANDS:
        return ()  # builds nothing
    if args and args[0] == "run":
        args = args[1:]
    options = [CmdOption(o) for o in (*DoitCmdBase.base_options, *DodoTaskLoader.cmd_options, *Run.cmd_options)]
    try:
        _, positional = CmdParse(options).parse(args)
    except CmdParseError:
        return None
    return tuple(name for name in positional if "=" not in name)  # NAME=VALUE are doit variables


def toplevel(project) -> set[str]:
    """The targets this doit run was asked for (group members included)."""
    names = _command_line_tasks(tuple(sys.argv[1:]))
    if names is None:
        return set(project.targets)
    if not names:
        names = tuple(project.default_targets or project.targets)
    wanted: set[str] = set()
    for name in names:
        for match in fnmatch.filter([*project.targets, *project.groups], name) or [name]:
            wanted.update(project.groups.get(match, [match]))
    return wanted


def needed_here(project, target) -> bool:
    """Must ``target``'s files be in build/ when this run ends?"""
    return mode(project) == "all" or bool(target.gates) or target.name in toplevel(project)
