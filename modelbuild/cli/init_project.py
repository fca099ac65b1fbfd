"""``python -m modelbuild init [DIR] [--from-olive WORKFLOW.json]``: start a project anywhere.

Writes ``dodo.py``, ``targets/`` (the example tiny travel recipe with its data files, or the
imported Olive workflow, and ``devices.toml``: the CPU numerics pin) and a ``.gitignore`` for ``build/`` and ``cache/``, then prints the next
command. The files come from package data (``modelbuild/cli/templates/project``), so this works from
an installed wheel, not only from a checkout. Existing files are never overwritten.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .. import UserError

TEMPLATE = ("templates", "project")
DEVICES_FILE = "targets/devices.toml"


def numerics_pin() -> str:
    """The CPU numerics branch a new project pins (core/numerics.py): ``avx2`` where this CPU runs
    it, the branch x86 machines of the last decade share (an AVX-512 machine left unpinned
    would build apart from its AVX2 colleagues); else the widest this machine has."""
    from ..core.numerics import missing, widest

    return "avx2" if missing("avx2") is None else widest()


def devices_toml(pin: str) -> str:
    return f"""\
# Written by `python -m modelbuild init`. The CPU code branch every stage's float math runs
# (docs/devices.md): it is part of every action key, so only machines that build under one
# branch share cache entries. Unpinned, each machine takes the widest its CPU has, and an
# AVX-512 machine and an AVX2 one never share. Pinned here, every machine of the team builds
# (and shares) this branch; a machine whose CPU lacks it says so in one line.
# MODELBUILD_CPU_NUMERICS overrides it for one run.

[devices]
cpu_numerics = "{pin}"
"""
IGNORE_LINES = ("build/", "cache/", "reports/", "release/")


def template_files() -> dict[str, bytes]:
    """Relative path -> content of every file of the project template (package data)."""
    root = resources.files("modelbuild.cli").joinpath(*TEMPLATE)
    files: dict[str, bytes] = {}

    def walk(node, prefix: str) -> None:
        for child in node.iterdir():
            rel = f"{prefix}{child.name}"
            if child.is_dir():
                walk(child, rel + "/")
            elif not child.name.endswith((".pyc", ".pyo")):
                files[rel] = child.read_bytes()

    walk(root, "")
    if "dodo.py" not in files:
        raise UserError("modelbuild's project template is missing from this installation "
                        "(modelbuild/cli/templates/project)")
    return files


def init(folder: Path, from_olive=None, args=None) -> list[str]:
    """Create the project in ``folder``; returns the paths written (relative)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = template_files()
    wanted = {"dodo.py": files["dodo.py"]}
    if from_olive is None:
        wanted.update({rel: data for rel, data in files.items() if rel.startswith("targets/")})
    wanted[DEVICES_FILE] = devices_toml(numerics_pin()).encode()  # so a team shares one cache (#24, item 6)
    clashes = [rel for rel in wanted if (folder / rel).exists()]
    if (folder / "targets").is_dir() and any((folder / "targets").glob("*.toml")):
        clashes.append("targets/*.toml")
    if clashes:
        raise UserError(f"{folder}: already a project ({', '.join(clashes)} exist); init writes only into a folder without them")
    written = []
    if from_olive is not None:  # import first: a bad workflow leaves the folder untouched
        from ..olive import run_import

        args.project = str(folder)
        out, _, _ = run_import(args, None, default_targets=True, workflow=from_olive)
        written.append(out.relative_to(folder).as_posix())
    for rel, data in wanted.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written.append(rel)
    ignore = folder / ".gitignore"
    have = ignore.read_text(encoding="utf-8").splitlines() if ignore.exists() else []
    missing = [line for line in IGNORE_LINES if line not in have]
    if missing:
        with open(ignore, "a", encoding="utf-8") as handle:
            if have and have[-1] != "":
                handle.write("\n")
            handle.write("".join(f"{line}\n" for line in missing))
        written.append(".gitignore")
    return written


def cmd_init(args) -> int:
    folder = Path(args.dir)
    written = init(folder, args.from_olive, args)
    print(f"modelbuild project in {folder.resolve()}: wrote {', '.join(sorted(written))}")
    where = "" if folder.resolve() == Path.cwd().resolve() else f"cd {folder} && "
    print(f"next: {where}doit list && doit")
    return 0


def add_command(sub) -> None:
    from ..olive import add_import_arguments

    p = sub.add_parser("init", help="start a modelbuild project: dodo.py, targets/ (example or imported Olive workflow), .gitignore")
    p.add_argument("dir", nargs="?", default=".", help="project folder (created if missing; default: here)")
    p.add_argument("--from-olive", metavar="WORKFLOW.json", help="targets/ from this Olive workflow instead of the example recipe")
    add_import_arguments(p)
    p.set_defaults(func=cmd_init, cli=None)
