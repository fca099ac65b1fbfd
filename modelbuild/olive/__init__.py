"""``python -m modelbuild import-olive``: an Olive workflow (JSON or an ``olive`` command line)
-> a TOML target file that doit builds. Nothing is run; the file is written once, atomically,
only when the whole workflow imported (every mistake is one line naming the JSON path, exit 2).

    python -m modelbuild import-olive WORKFLOW.json [--name NAME] [--model-path DIR]
        [--data NAME=FILE ...] [-o targets/NAME.toml] [--skip-unsupported] [--strict] [--force]
    python -m modelbuild import-olive --cli "olive auto-opt -m org/model --precision int4 --use_ort_genai"

``--data NAME=FILE`` gives a local JSONL file for the data config NAME, or for the two roles a
workflow leaves to Olive's hub defaults: ``calibration`` (gptq, AWQ, static int8 without a
data_config) and ``eval`` (evaluators whose metrics name no data config).

Only the argument parsing lives here (the CLI imports it on every call); the importer itself is
in importer.py (workflow.py reads the JSON, mapping.py maps passes to targets through the
handlers of passes.py and quantizers.py, on the state and helpers of chain.py; emit.py writes
TOML, cli_args.py turns olive command lines into workflows).
"""

from __future__ import annotations


def run_import(*args, **kwargs):
    from .importer import run_import as run

    return run(*args, **kwargs)


def cmd_import_olive(args) -> int:
    from .importer import cmd_import_olive as cmd

    return cmd(args)


def add_import_arguments(p) -> None:
    p.add_argument("--name", help="target name prefix (default: from the model id)")
    p.add_argument("--model-path", help="local model folder: inputs.local of the imported base (hubs are often unreachable)")
    p.add_argument("--data", action="append", metavar="NAME=FILE",
                   help="local JSONL for data config NAME, or for 'calibration' / 'eval' when the workflow relies on hub defaults (repeatable)")
    p.add_argument("--skip-unsupported", action="store_true", help="write what maps, with a '# left out:' comment where a pass was left out")
    p.add_argument("--strict", action="store_true", help="refuse the import if anything of the workflow would be left out")
    p.add_argument("--force", action="store_true", help="replace an existing output file")


def add_commands(sub) -> None:
    """Register ``import-olive`` on the CLI's subparsers (``init``, which imports Olive workflows
    too, is init_project.py's, registered by the CLI: this package never imports it)."""
    p = sub.add_parser("import-olive", help="Olive workflow JSON (or an olive command line) -> a TOML target file")
    p.add_argument("workflow", nargs="?", help="Olive workflow JSON (olive run --config FILE)")
    p.add_argument("--cli", help='an olive command line instead: "olive auto-opt ..." / "olive finetune ..." / "olive quantize ..."')
    p.add_argument("-o", "--output", help="TOML file to write (default: targets/NAME.toml in the project)")
    add_import_arguments(p)
    p.set_defaults(func=cmd_import_olive)
