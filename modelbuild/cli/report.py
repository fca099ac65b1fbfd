"""``python -m modelbuild report PATTERN...``: compare evaluated variants in one table and one plot.

Reads the ``metrics.json`` that each selected ``evaluate`` target wrote into its output folder,
adds the build time of the evaluated model (its stamp's seconds, and the sum over the stages it
is built from) and writes into the output folder:

    report.md    markdown table, one row per variant, Pareto-optimal variants starred
    report.html  the same table, self-contained, with the plot embedded
    report.png   size (MB) vs decode speed (tokens/s), perplexity as colour, Pareto front as a line
    report.json  the rows as data

Gates: those the evaluate target declares in TOML, checked against its measurement now (as the
executor checks them), else those metrics.json records. A gate that fails makes the evaluate
stage fail, so nothing is put in build/; the measurement itself is in the cache (the executor
records it before it checks the gates), and the report reads it from there by the target's
current action key: such variants keep their numbers, are marked "FAILED: metric value not op
limit", drawn as red circles and kept off the Pareto front. Only a variant with no measurement
of its current inputs is "not built" (or "stale"). A variant is Pareto-optimal when no other
variant is at least as small, as fast and as accurate (perplexity) and strictly better in one of
them; only variants that passed their gates compete. Outputs hold no timestamps or absolute
paths: the same build folder and cache give byte-identical text files.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

from .. import UserError
from ..core.gates import gate_results
from ..core.project import Project
from ..core.key import action_key
from ..engine.stage import stat_cache
from .report_render import NOT_BUILT, number, render_html, render_markdown, render_png
from ..core.stamp import read_stamp
from ..core.status import Fresh, Missing, Stale, status
from ..cache.store import Store

EVALUATE = "evaluate"
METRICS = "metrics.json"
REPORT_FORMAT = 1
METRIC_KEYS = (
    "model_target", "variant", "adapter", "device", "size_bytes", "perplexity", "reference_perplexity",
    "perplexity_delta_pct", "tokens_per_s", "ttft_ms", "peak_rss_mb", "eval_tokens",
)


def select_targets(project: Project, patterns: list[str]) -> list[str]:
    """Evaluate targets matching any pattern (fnmatch glob or exact name), in project order.

    No pattern: every evaluate target. A pattern that matches nothing, or only targets of
    other passes, is a ``UserError``.
    """
    evaluate = [name for name, target in project.targets.items() if target.pass_def.name == EVALUATE]
    if not patterns:
        if not evaluate:
            raise UserError("report: the project has no evaluate targets (pass = \"evaluate\") to report on")
        return evaluate
    chosen: set[str] = set()
    for pattern in patterns:
        matches = [name for name in project.targets if fnmatch.fnmatchcase(name, pattern)]
        if not matches:
            raise UserError(f"report: no target matches '{pattern}' (see: python -m modelbuild targets)")
        hits = [name for name in matches if name in evaluate]
        if not hits:
            passes = sorted({project.targets[name].pass_def.name for name in matches})
            evaluating = [name for name in evaluate if set(project.targets[name].deps()) & set(matches)]
            hint = f"; evaluated by: {', '.join(evaluating)}" if evaluating else ""
            raise UserError(
                f"report: '{pattern}' matches no evaluate target, only {_names(matches)} "
                f"(pass {', '.join(passes)}); a report reads the metrics.json of evaluate targets{hint}"
            )
        chosen.update(hits)
    return [name for name in evaluate if name in chosen]


def _names(names: list[str], most: int = 3) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def _guess_model_target(project: Project, name: str) -> str | None:
    """The evaluated target when there is no metrics.json to name it: input 'model', or the only upstream."""
    target = project.targets[name]
    ref = target.inputs.get("model")
    if ref is not None and ref.kind == "target":
        return ref.value
    deps = target.deps()
    return deps[0] if len(deps) == 1 else None


def _parse_metrics(text: str | bytes, shown: str) -> dict:
    try:
        metrics = json.loads(text)
    except ValueError as error:
        raise UserError(f"{shown}: not readable JSON: {error}") from None
    if not isinstance(metrics, dict) or metrics.get("schema") != 1:
        schema = metrics.get("schema") if isinstance(metrics, dict) else None
        raise UserError(f"{shown}: unknown metrics schema {schema!r} (this modelbuild reads schema 1)")
    return metrics


def evaluation_state(project: Project, name: str) -> tuple[str, dict | None, str]:
    """(state, metrics, note): state is "current", "measured" (a measurement of the current
    inputs that failed its gate at build time, so it lives in the cache only), "not built" or "stale"."""
    target = project.targets[name]
    out = project.output_dir(name)
    cache = stat_cache(project)
    state = status(project, target, cache)  # the executor's own decision
    if isinstance(state, Missing):
        cached = Store(project.cache_dir).read_output(action_key(project, target, cache), METRICS)
        if cached is not None:
            return "measured", _parse_metrics(cached, f"cache: {name}: {METRICS}"), \
                "measured, but failed its gate at build time, so not put in build/ (numbers from the cache)"
        return "not built", None, f"no output in build/{name}" if not out.exists() else f"build/{name} has no stamp"
    path = out / METRICS
    if isinstance(state, Fresh) and state.stamp.get("left_on_remote"):
        return "not built", None, f"left on {state.stamp['left_on_remote']}: `doit {name}` downloads it"
    if not path.is_file():
        return "not built", None, f"build/{name} has no {METRICS}"
    try:
        metrics = _parse_metrics(path.read_text(encoding="utf-8"), f"build/{name}/{METRICS}")
    except OSError as error:
        raise UserError(f"build/{name}/{METRICS}: not readable: {error}") from None
    if isinstance(state, Stale) and state.why == "key":
        return "stale", metrics, "inputs changed since this evaluation (its rebuild failed or has not run)"
    if isinstance(state, Stale) and state.why == "output":
        return "stale", metrics, "output changed since it was built"
    return "current", metrics, ""  # fresh, or a current measurement failing a gate declared now


def _gate_results(project: Project, name: str, metrics: dict) -> dict:
    """The gates the target declares now, checked against its measurement as the executor checks
    them (a gate tightened since the build fails here too); else the gates metrics.json recorded."""
    target = project.targets[name]
    declared = getattr(target, "gates", None)
    if not declared:
        return metrics.get("gates") or {}
    try:
        return gate_results(target, metrics)
    except UserError:  # a gated metric was not measured: the executor fails such a gate
        return {metric: {"op": op, "limit": limit, "value": metrics.get(metric), "passed": False}
                for metric, (op, limit) in declared.items()}


def _gate_status(gates: dict) -> tuple[str, str]:
    """(status, text) from metrics['gates']."""
    if not gates:
        return "no gates", "no gates"
    failed = []
    for key in sorted(gates):
        gate = gates[key] or {}
        if gate.get("passed") is False:
            failed.append(f"{key} {number(gate.get('value'), '.4g')} not {gate.get('op', '?')} {number(gate.get('limit'), '.4g')}")
    if failed:
        return "gate failed", "FAILED: " + "; ".join(failed)
    return "passed", f"passed ({len(gates)})"


def _build_seconds(project: Project, model: str | None) -> tuple[float | None, float | None, list[str]]:
    """(stage seconds, total seconds over the model and its upstream stages, stages without a stamp)."""
    if model is None or model not in project.targets:
        return None, None, []
    total, missing, stage = 0.0, [], None
    for name in project.closure([model]):
        stamp = read_stamp(project.output_dir(name))
        if stamp is None or not isinstance(stamp.get("seconds"), (int, float)):
            missing.append(name)
            continue
        total += stamp["seconds"]
        if name == model:
            stage = float(stamp["seconds"])
    return stage, (round(total, 3) if len(missing) < len(project.closure([model])) else None), missing


def collect_rows(project: Project, names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        state, metrics, note = evaluation_state(project, name)
        row: dict = {"eval_target": name, "state": state, "note": note}
        usable = metrics if state in ("current", "measured") else None  # a stale one describes an older model
        for key in METRIC_KEYS:
            row[key] = usable.get(key) if usable else None
        row["model_target"] = (usable or metrics or {}).get("model_target") or _guess_model_target(project, name)
        row["variant"] = row["variant"] or project.targets[name].params.get("variant")
        row["gates"] = _gate_results(project, name, usable) if usable else {}
        if usable:
            row["status"], row["status_text"] = _gate_status(row["gates"])
        else:
            row["status"] = state
            row["status_text"] = NOT_BUILT + (" (stale output)" if state == "stale" else "")
        row["size_mb"] = round(row["size_bytes"] / 1e6, 3) if isinstance(row["size_bytes"], (int, float)) else None
        stage, total, missing = _build_seconds(project, row["model_target"])
        row["build_s_stage"], row["build_s_total"], row["build_missing"] = stage, total, missing
        rows.append(row)
    _label(rows)
    rows.sort(key=lambda r: (r["size_mb"] is None, -(r["size_mb"] or 0), r["label"], r["eval_target"]))
    _relative_size(rows)
    _pareto(rows)
    return rows


def _label(rows: list[dict]) -> None:
    """A short, unique name per row: the variant label, else the model target, else the eval target."""
    for row in rows:
        label = row["variant"] or row["model_target"] or row["eval_target"]
        row["label"] = f"{label} +{row['adapter']}" if row["adapter"] and row["variant"] else label
    seen: dict[str, int] = {}
    for row in rows:
        seen[row["label"]] = seen.get(row["label"], 0) + 1
    for row in rows:
        if seen[row["label"]] > 1:
            row["label"] = f"{row['label']} ({row['eval_target']})"


def _relative_size(rows: list[dict]) -> None:
    sized = [r for r in rows if r["size_mb"]]
    reference = [r for r in sized if any("fp32" in (r[k] or "").lower() for k in ("variant", "model_target"))]
    base = max(reference or sized, key=lambda r: r["size_mb"], default=None)
    for row in rows:
        row["size_vs_baseline_pct"] = round(100 * row["size_mb"] / base["size_mb"], 1) if base and row["size_mb"] else None
        row["baseline"] = base["label"] if base else None
        row["baseline_kind"] = ("fp32 reference" if reference else "largest variant") if base else None


def _pareto(rows: list[dict]) -> None:
    """Mark rows no other competing row beats in size, speed and perplexity (ties are not beaten)."""
    candidates = [r for r in rows if r["status"] in ("passed", "no gates") and r["size_mb"] is not None
                  and r["tokens_per_s"] is not None]
    use_ppl = all(r["perplexity"] is not None for r in candidates)

    def costs(r: dict) -> tuple:
        return (r["size_mb"], -r["tokens_per_s"]) + ((r["perplexity"],) if use_ppl else ())

    for row in rows:
        row["pareto"] = False
    for row in candidates:
        mine = costs(row)
        row["pareto"] = not any(
            all(a <= b for a, b in zip(costs(other), mine)) and costs(other) != mine
            for other in candidates if other is not row
        )
    for row in rows:
        row["pareto_dims"] = ("size, tokens/s, perplexity" if use_ppl else "size, tokens/s") if candidates else None


def write_report(project: Project, patterns: list[str], out_dir: Path) -> dict[str, Path]:
    """Write report.md, report.html, report.png and report.json for the matching evaluate targets."""
    names = select_targets(project, list(patterns))
    rows = collect_rows(project, names)
    if all(row["status"] in ("not built", "stale") for row in rows):
        shown = names[0] if len(names) == 1 else f"{names[0]} and {len(names) - 1} more"
        raise UserError(f"report: no evaluation of the {len(names)} selected is built and current ({shown}); "
                        f"build them first: doit -c {' '.join(names[:3])}{' ...' if len(names) > 3 else ''}")
    title = "Model variants"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: out_dir / f"report.{kind}" for kind in ("md", "html", "png", "json")}
    render_png(rows, title, paths["png"])
    paths["md"].write_text(render_markdown(rows, title), encoding="utf-8")
    paths["html"].write_text(render_html(rows, title, paths["png"].read_bytes()), encoding="utf-8")
    data = {"format": REPORT_FORMAT, "patterns": list(patterns), "targets": names, "rows": rows}
    paths["json"].write_text(json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    return paths
