"""Import every workflow JSON of olive-recipes (tests/data/olive/recipes-all, vendored at a pinned
commit: see its SOURCES.md) in-process, without building, and count what happens:

- full: imports as is and leaves nothing out;
- partial: imports (as is, or with --skip-unsupported), each thing it does not do named by a
  ``# left out:`` line;
- refused: one line naming the file and JSON path (exit 2, nothing written);
- broken: a traceback, or a file `doit` cannot load (a bug: the test fails on any).

    .venv/bin/python bench/olive_corpus.py            # count, write the results
    .venv/bin/python bench/olive_corpus.py --vendor GIT_DIR   # re-vendor the corpus from a clone

Every import gets the two local data roles the recipes leave to Olive's hub defaults
(``--data calibration=targets/data/travel_train.jsonl --data eval=targets/data/travel_eval.jsonl``);
no --model-path (hub ids validate without the hub). Writes bench/results/olive_corpus.json and
tests/data/olive/COUNTS.md (counts by device, the most frequent left-out items, every file).
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CORPUS = REPO / "tests" / "data" / "olive" / "recipes-all"
COUNTS = REPO / "tests" / "data" / "olive" / "COUNTS.md"
RESULTS = REPO / "bench" / "results" / "olive_corpus.json"
DATA = {"calibration": REPO / "targets" / "data" / "travel_train.jsonl", "eval": REPO / "targets" / "data" / "travel_eval.jsonl"}
STATUSES = ("full", "partial", "refused", "broken")


def device_of(doc: dict) -> str:
    """CPU, CUDA or other: the execution provider of the workflow's target system (Olive's default: CPU)."""
    systems = doc.get("systems") if isinstance(doc.get("systems"), dict) else {}
    target = doc.get("target", (doc.get("engine") or {}).get("target") if isinstance(doc.get("engine"), dict) else None)
    system = systems.get(target) if isinstance(target, str) else target if isinstance(target, dict) else next(iter(systems.values()), None)
    if not isinstance(system, dict):
        return "CPU"
    body = system.get("config", system) if isinstance(system.get("config"), dict) else system
    accelerators = body.get("accelerators") or []
    if not accelerators or not isinstance(accelerators[0], dict):
        return "CPU" if system.get("type", "LocalSystem") == "LocalSystem" else "other"
    acc = accelerators[0]
    providers = acc.get("execution_providers") or []
    provider = providers[0] if providers else None
    device = str(acc.get("device") or "").lower()
    if provider == "CPUExecutionProvider" or (provider is None and device in ("", "cpu")):
        return "CPU"
    if provider == "CUDAExecutionProvider" or (provider is None and device == "gpu"):
        return "CUDA"
    return "other"


def causal_lm(doc: dict) -> bool:
    """A workflow on a Hugging Face causal LM: an HfModel/PyTorchModel by checkpoint, with no loader
    code, io_config or other task."""
    model = doc.get("input_model") if isinstance(doc.get("input_model"), dict) else {}
    body = model.get("config") if isinstance(model.get("config"), dict) else model
    if str(model.get("type", "")).lower() not in ("hfmodel", "pytorchmodel"):
        return False
    if any(body.get(k) for k in ("model_loader", "model_script", "io_config", "dummy_inputs_func")):
        return False
    return body.get("task") in (None, "text-generation", "text-generation-with-past", "causal-lm")


def left_out_label(doc: dict, path: str, value) -> str:
    """What a left-out line is about, for the frequency table: 'pass X', 'X.option', 'LMEvaluator task'..."""
    parts = path.replace("[", ".[").split(".")
    if parts[0] == "passes" and len(parts) > 1:
        spec = (doc.get("passes") or {}).get(parts[1]) or {}
        ptype = spec.get("type", parts[1]) if isinstance(spec, dict) else parts[1]
        rest = [p for p in parts[2:] if p != "config"]
        if not rest:
            return f"{ptype} (whole pass)"
        if rest == ["type"]:
            return f"pass {ptype}"
        if rest[0] == "surgeries":
            return f"surgeon {value}" if isinstance(value, str) else "GraphSurgeries surgery"
        if rest[0] in ("algorithm", "precision") and isinstance(value, str):
            return f"{ptype}.{rest[0]} = {value}"
        return f"{ptype}.{rest[0]}"
    if parts[0] == "evaluators":
        return "LMEvaluator task" if ".tasks" in path else f"evaluator {value}" if parts[-1] == "type" else f"evaluator {parts[-1]}"
    if parts[0] == "systems":
        return f"execution provider {value}" if isinstance(value, str) else "system"
    return ".".join(p for p in parts if not p.startswith("[") and p != "config")


def classify(path: Path, work: Path, keep_text: bool = False) -> dict:
    """Import ``path`` in-process (as is, then with --skip-unsupported) into a fresh project under
    ``work`` and load what was written the way doit does (``keep_text``: the TOML text too)."""
    from modelbuild import UserError
    from modelbuild.graph.loader import load_project
    from modelbuild.olive.importer import import_workflow
    from modelbuild.olive.workflow import OliveError, load_json

    result: dict = {"file": path.name}
    try:
        doc = load_json(path, str(path))
    except OliveError as error:
        return {**result, "status": "refused", "device": "other", "causal_lm": False, "message": str(error)}
    result.update(device=device_of(doc), causal_lm=causal_lm(doc))
    project = work / path.stem
    out = project / "targets" / "imported.toml"
    for mode, skip in (("full", False), ("partial", True)):
        try:
            text, names, left = import_workflow(json.loads(json.dumps(doc)), str(path), path.parent, out, data=DATA, skip_unsupported=skip)
        except OliveError as error:
            result[f"{mode}_error"] = str(error)
            continue
        except Exception:  # a traceback is a bug: recorded, and the test fails on it
            return {**result, "status": "broken", "message": traceback.format_exc(limit=3)}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        try:
            load_project(project)
        except UserError as error:
            return {**result, "status": "broken", "message": f"doit cannot load it: {error}"}
        passes = sorted({line.split('"')[1] for line in text.splitlines() if line.startswith("pass = ")})
        lines = [item.line() for item in left]
        result.update(status="full" if not left else "partial", targets=len(names), passes=passes, left_out=lines,
                      left_out_labels=[left_out_label(doc, item.path, item.value) for item in left], skip_unsupported=skip)
        if keep_text:
            result["text"] = text
        return result
    return {**result, "status": "refused", "message": result["partial_error"]}


def run(files: list[Path]) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="olive-corpus-") as tmp:
        return [classify(path, Path(tmp)) for path in files]


def summary(results: list[dict]) -> dict:
    by_device = {}
    for device in ("CPU", "CUDA", "other"):
        rows = [r for r in results if r["device"] == device]
        by_device[device] = {k: sum(r["status"] == k for r in rows) for k in STATUSES} | {"files": len(rows)}
    llm = [r for r in results if r["causal_lm"] and r["device"] in ("CPU", "CUDA")]
    labels = collections.Counter(label for r in results for label in set(r.get("left_out_labels", [])))
    return {"counts": {k: sum(r["status"] == k for r in results) for k in STATUSES}, "by_device": by_device,
            "cpu_cuda_causal_lm": {"files": len(llm), "full": sum(r["status"] == "full" for r in llm)},
            "top_left_out": labels.most_common(25)}


def write(results: list[dict], facts: dict) -> None:
    RESULTS.parent.mkdir(exist_ok=True)
    brief = [{"file": r["file"], "device": r["device"], "causal_lm": r["causal_lm"], "status": r["status"], "left_out": len(r.get("left_out", []))}
             for r in results]  # the lines themselves: COUNTS.md
    RESULTS.write_text(json.dumps({**facts, "results": brief}, indent=1) + "\n")
    c, llm = facts["counts"], facts["cpu_cuda_causal_lm"]
    md = ["# Olive corpus: import results", "",
          f"Generated by `.venv/bin/python bench/olive_corpus.py` over the {len(results)} workflow files of `recipes-all/` "
          "(microsoft/olive-recipes at a pinned commit, see recipes-all/SOURCES.md), each imported in-process with "
          "`--data calibration=targets/data/travel_train.jsonl --data eval=targets/data/travel_eval.jsonl` and loaded as doit loads it.", "",
          "| device | files | full | partial | refused | broken |", "|---|---|---|---|---|---|"]
    for device, row in facts["by_device"].items():
        md.append(f"| {device} | {row['files']} | {row['full']} | {row['partial']} | {row['refused']} | {row['broken']} |")
    md += [f"| all | {len(results)} | {c['full']} | {c['partial']} | {c['refused']} | {c['broken']} |", "",
           f"CPU/CUDA causal-LM workflows: {llm['full']} of {llm['files']} full.", "",
           "Full: imports as is, nothing left out. Partial: imports (with `--skip-unsupported` where a pass has no counterpart); "
           "each thing not done is a `# left out:` line. Refused: one line naming the file and JSON path, exit 2, nothing written.", "",
           "| most frequent left-out item | files |", "|---|---|"]
    md += [f"| {label.replace('|', '/')} | {n} |" for label, n in facts["top_left_out"]]
    md += ["", "| file | device | result | left out / why refused |", "|---|---|---|---|"]
    for r in results:
        why = "; ".join(r.get("left_out", [])) if r["status"] in ("full", "partial") else r.get("message", "")
        why = why.replace(f"{CORPUS}/{r['file']}: ", "").replace("|", "/").replace("\n", " ")[:300]
        md.append(f"| {r['file']} | {r['device']} | {r['status']} | {why} |")
    COUNTS.write_text("\n".join(md) + "\n")


def vendor(git_dir: str, commit: str = "HEAD") -> int:
    """Copy every workflow JSON (a JSON object with an input_model) of an olive-recipes clone at
    ``commit`` into recipes-all/, its path's '/' written as '__'."""
    git = ["git", "--git-dir", git_dir]
    sha = subprocess.run([*git, "rev-parse", commit], capture_output=True, text=True, check=True).stdout.strip()
    names = subprocess.run([*git, "ls-tree", "-r", "--name-only", sha], capture_output=True, text=True, check=True).stdout.splitlines()
    CORPUS.mkdir(parents=True, exist_ok=True)
    count = 0
    for name in names:
        if not name.lower().endswith(".json"):
            continue
        data = subprocess.run([*git, "show", f"{sha}:{name}"], capture_output=True, check=True).stdout
        try:
            doc = json.loads(data)
        except ValueError:
            continue
        if isinstance(doc, dict) and "input_model" in doc:
            (CORPUS / name.replace("/", "__").lstrip(".")).write_bytes(data)
            count += 1
    print(f"vendored {count} workflow files of {sha}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vendor", metavar="GIT_DIR", help="re-vendor recipes-all/ from an olive-recipes git dir (at --commit)")
    parser.add_argument("--commit", default="HEAD")
    args = parser.parse_args()
    if args.vendor:
        return vendor(args.vendor, args.commit)
    results = run(sorted(CORPUS.glob("*.json")))
    facts = summary(results)
    for device, row in facts["by_device"].items():
        print(f"{device:6} {row['files']:4} files: " + ", ".join(f"{row[k]} {k}" for k in STATUSES))
    llm = facts["cpu_cuda_causal_lm"]
    print(f"all    {len(results):4} files: " + ", ".join(f"{v} {k}" for k, v in facts["counts"].items()))
    print(f"CPU/CUDA causal-LM: {llm['full']} of {llm['files']} full")
    print("top left out: " + "; ".join(f"{label} ({n})" for label, n in facts["top_left_out"][:12]))
    write(results, facts)
    return 0 if not facts["counts"]["broken"] else 1


if __name__ == "__main__":
    sys.exit(main())
