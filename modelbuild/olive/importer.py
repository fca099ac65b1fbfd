"""``python -m modelbuild import-olive``: an Olive workflow (JSON or an ``olive`` command line)
-> a TOML target file that doit builds. Nothing is run; the file is written once, atomically,
only when the whole workflow imported (every mistake is one line naming the JSON path, exit 2).

    python -m modelbuild import-olive WORKFLOW.json [--name NAME] [--model-path DIR]
        [--data NAME=FILE ...] [-o targets/NAME.toml] [--skip-unsupported] [--force]
    python -m modelbuild import-olive --cli "olive auto-opt -m org/model --precision int4 --use_ort_genai"

``--data NAME=FILE`` gives a local JSONL file for the data config NAME, or for the two roles a
workflow leaves to Olive's hub defaults: ``calibration`` (gptq, AWQ, static int8 without a
data_config) and ``eval`` (evaluators whose metrics name no data config).
"""

from __future__ import annotations

import copy
import itertools
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from modelbuild import UserError

from . import cli_args
from .emit import render, write_atomic
from .chain import LeftOut
from .mapping import Importer
from .model import NAME_SAFE
from .workflow import OliveError, expect, load_json, normalize

MAX_COMBINATIONS = 16  # a search space above this is refused (each combination is a whole chain)


def _label(key: str, value) -> str:
    text = value if isinstance(value, str) else f"{key}{str(value).lower()}"
    return NAME_SAFE.sub("-", str(text)).strip("-.") or "x"


def derive_name(model: dict, source: str) -> str:
    """The target prefix: the model id's last part ("Qwen/Qwen2.5-0.5B-Instruct" -> "qwen2.5-0.5b-instruct")."""
    body = model.get("config") if isinstance(model.get("config"), dict) else model
    hf = body.get("hf_config") if isinstance(body.get("hf_config"), dict) else {}
    model_id = body.get("model_path") or hf.get("model_name")
    if not isinstance(model_id, str) or model_id.startswith("<"):
        model_id = Path(source).stem
    return NAME_SAFE.sub("-", model_id.rstrip("/").split("/")[-1].lower()).strip("-.") or "imported"


def search_axes(wf) -> list[tuple[int, str, list, str]]:
    axes = []
    for index, entry in enumerate(wf.passes):
        for key, value in entry.options.items():
            path = f"{entry.path}.{key}"
            if value == "SEARCHABLE_VALUES":
                raise wf.fail(path, 'Olive\'s default search space is not written in the file: list the values, {"type": "Categorical", "values": [...]}')
            if isinstance(value, dict) and value.get("type") in ("Categorical", "Boolean"):
                values = [True, False] if value["type"] == "Boolean" else expect(value.get("values"), (list,), wf.source, f"{path}.values")
                if not values:
                    raise wf.fail(f"{path}.values", "empty search space")
                axes.append((index, key, values, path))
    return axes


def import_workflow(doc: dict, source: str, base_dir: Path, out_path: Path, name: str | None = None,
                    model_path: Path | None = None, data: dict[str, Path] | None = None,
                    skip_unsupported: bool = False, command: str = "", default_targets: bool = False,
                    strict: bool = False) -> tuple[str, list[str], list[LeftOut]]:
    """The TOML text for a workflow, the names of its targets and what it leaves out (raises
    OliveError; a chain that would build nothing is refused: "nothing to build")."""
    wf = normalize(doc, source, base_dir)
    name = name or derive_name(wf.input_model, source)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise OliveError("--name", name, "use letters, digits, '.', '_' and '-'")
    axes = search_axes(wf)
    combos = list(itertools.product(*[values for _, _, values, _ in axes]))
    if len(combos) > MAX_COMBINATIONS:
        raise wf.fail(axes[0][3], f"the search space has {len(combos)} combinations; import builds every one and stops at {MAX_COMBINATIONS}: narrow the values")
    header = [f"Imported from the Olive workflow {source} by: python -m modelbuild import-olive{command}",
              "Each target's comment names the Olive pass it came from; a 'left out:' line names what this file does not do.",
              "Nothing here was run: `doit list` validates this file, `doit " + name + "` builds every target of it."]
    targets: dict[str, object] = {}
    notes: list[str] = []
    left_out: list[LeftOut] = []
    for combo in combos:
        work = copy.deepcopy(wf)
        for (index, key, _, _), value in zip(axes, combo):
            work.passes[index].options[key] = value
        labels = [(index, _label(key, value)) for (index, key, _, _), value in zip(axes, combo)]
        imp = Importer(work, name, out_path.parent, model_path, data, skip_unsupported, labels, strict)
        for target in imp.run():
            if target.name in targets:
                continue  # shared by the combinations (made before the pass whose value differs)
            targets[target.name] = target
        notes = notes or imp.header
        left_out += [item for item in imp.left_out if item not in left_out]
    if all(t.pass_name == "hf-import" for t in targets.values()):
        why = f"{left_out[0].path}: {left_out[0].why}" if left_out else "no pass makes a target"
        raise wf.fail("passes", f"nothing to build: every pass was left out, the file would only import the model ({why})")
    header += notes
    if wf.ignored:
        header.append(f"not carried over (logging, caches and output folders are modelbuild's own): {', '.join(wf.ignored)}")
    if wf.search_strategy and axes:
        header.append(f"search: {len(combos)} combinations of {', '.join(p for _, _, _, p in axes)} -> a target chain each (suffix = the values)")
    elif wf.search_strategy:
        header.append("search_strategy: the passes declare no search space, so there is one chain to build")
    names = list(targets)
    text = render(header, list(targets.values()), {name: names}, names[-1:] if default_targets else None)
    return text, names, left_out


def parse_data(items: list[str]) -> dict[str, Path]:
    data = {}
    for item in items or []:
        key, sep, path = item.partition("=")
        if not sep or not key or not path:
            raise UserError(f"--data {item}: expected NAME=FILE (a data config name, or calibration / eval)")
        if not Path(path).is_file():
            raise UserError(f"--data {item}: no such file {path}")
        data[key] = Path(path).resolve()
    return data


@dataclass
class Imported:
    path: Path  # the TOML file written
    names: list[str]  # its targets
    group: str  # the group of them all
    left_out: list[LeftOut]  # what it does not do (each printed on stderr)


def run_import(args, out_path: Path, default_targets: bool = False, workflow: str | None = None) -> tuple[Path, list[str], str]:
    """Import per the parsed command-line ``args``; returns (output path, target names, name)."""
    done = import_file(args, out_path, default_targets, workflow)
    return done.path, done.names, done.group


def import_file(args, out_path: Path | None, default_targets: bool = False, workflow: str | None = None) -> Imported:
    """Import per the parsed command-line ``args``: the file written, once, atomically; each thing
    left out is one stderr line."""
    workflow = workflow if workflow is not None else args.workflow
    if (workflow is None) == (getattr(args, "cli", None) is None):
        raise UserError("import-olive: give a workflow JSON file or --cli \"olive ...\" (one of them)")
    model_path = Path(args.model_path).resolve() if args.model_path else None
    if model_path is not None and not model_path.exists():
        raise UserError(f"--model-path {args.model_path}: no such file or folder")
    data = parse_data(args.data)
    if workflow is not None:
        path = Path(workflow)
        doc = load_json(path, str(workflow))
        source, base_dir, command = str(workflow), path.resolve().parent, f" {workflow}"
    else:
        doc, source, base_dir, command = cli_args.parse(args.cli), "--cli", Path.cwd(), f" --cli {shlex.quote(args.cli)}"
    for flag, value in (("--name", args.name), ("--model-path", args.model_path)):
        if value:
            command += f" {flag} {value}"
    command += "".join(f" --data {d}" for d in args.data or []) + (" --skip-unsupported" if args.skip_unsupported else "")
    strict = bool(getattr(args, "strict", False))
    name = args.name or derive_name(doc.get("input_model") if isinstance(doc.get("input_model"), dict) else {}, source)
    if out_path is None:
        out_path = Path(args.project) / "targets" / f"{name}.toml"
    try:
        text, names, left_out = import_workflow(doc, source, base_dir, out_path, name, model_path, data, args.skip_unsupported,
                                                command, default_targets, strict)
    except OliveError as error:
        if source != "--cli" or error.json_path not in cli_args.OPTION_OF:
            raise
        # the workflow was made from the command line: name the option, not the JSON path
        raise OliveError(source, cli_args.OPTION_OF[error.json_path], str(error).split(f"{error.json_path}: ", 1)[1]) from None
    if out_path.exists() and not args.force:
        raise UserError(f"{out_path}: already exists (--force replaces it)")
    write_atomic(out_path, text)
    for item in left_out:
        print(f"modelbuild: {source}: {item.line()}", file=sys.stderr)
    return Imported(out_path, names, name, left_out)


def cmd_import_olive(args) -> int:
    out = Path(args.output) if args.output else None
    done = import_file(args, out)
    left = f"; {len(done.left_out)} left out (listed above, '# left out:' in the file; --strict refuses)" if done.left_out else "; nothing left out"
    print(f"wrote {done.path}: {len(done.names)} targets ({', '.join(done.names)}){left}")
    print(f"next: doit list   # validate;   doit {done.group}   # build them")
    return 0
