"""Quality gates: limits on the metrics a stage writes, declared in TOML, checked by the executor.

    [target.smollm2-travel-cpu-int4-eval]
    pass = "evaluate"
    gates = { perplexity_delta_pct = "<= 5", tokens_per_s = ">= 40" }

A pass that measures things lists its metric names (``PassDef.metrics``) and writes them to
``metrics.json`` in its output. A gate on a metric the pass does not write is a load-time error.
After the pass runs (or its output is restored from the cache) the executor checks every gate;
a failure fails the target with the metric, its value and the limit, and the output is not put
in place, so nothing that failed a gate looks up to date. Gates are not part of the action key:
the measured output stays in the cache, so relaxing a gate re-checks without re-measuring.
"""

from __future__ import annotations

import json
import operator
import re
from pathlib import Path

from .. import UserError

METRICS_FILE = "metrics.json"
OPERATORS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}
GATE_RE = re.compile(r"^\s*(<=|>=|<|>)\s*(-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)\s*$")


def parse_gates(value: object, metrics: tuple[str, ...], pass_name: str, where: str) -> dict[str, tuple[str, float]]:
    """``{metric: "<= 5"}`` -> ``{metric: ("<=", 5.0)}``, with one-line errors naming the key."""
    if not isinstance(value, dict):
        raise UserError(f"{where}: gates: expected a table of metric = \"<= limit\"")
    gates = {}
    for metric, spec in value.items():
        if metric not in metrics:
            known = ", ".join(metrics) or "none: it writes no metrics"
            raise UserError(f"{where}: gates.{metric}: pass '{pass_name}' writes no such metric (known: {known})")
        match = GATE_RE.match(spec) if isinstance(spec, str) else None
        if not match:
            raise UserError(f"{where}: gates.{metric}: expected a string such as \"<= 5\" or \">= 40\", got {spec!r}")
        gates[metric] = (match.group(1), float(match.group(2)))
    return gates


def check_gates(target, out_dir: Path) -> dict[str, dict]:
    """Each gate's value, limit and verdict, read from the output's metrics.json."""
    if not target.gates:
        return {}
    try:
        metrics = json.loads((Path(out_dir) / METRICS_FILE).read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{target.file}: target '{target.name}': gates: cannot read {METRICS_FILE} of the output ({error})") from None
    return gate_results(target, metrics)


def gate_results(target, metrics: dict) -> dict[str, dict]:
    """Each gate's value, limit and verdict for these metrics; a gated metric without a value is a UserError."""
    where = f"{target.file}: target '{target.name}'"
    results = {}
    for metric, (op, limit) in target.gates.items():
        value = metrics.get(metric)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise UserError(f"{where}: gates.{metric}: the pass measured no value for it ({value!r})")
        results[metric] = {"op": op, "limit": limit, "value": value, "passed": bool(OPERATORS[op](value, limit))}
    return results


def gate_failures(target, out_dir: Path) -> list[str]:
    """One "metric = value (limit op x)" per gate the output at ``out_dir`` fails; an output
    whose metrics cannot be read fails every gate, with the reason."""
    try:
        results = check_gates(target, out_dir)
    except UserError as error:
        return [str(error)]
    return [f"{metric} = {r['value']:g} (limit {r['op']} {r['limit']:g})" for metric, r in results.items() if not r["passed"]]
