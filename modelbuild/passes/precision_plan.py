"""precision-plan: pick the int4/int8 mix to ship from a precision-search, under a budget.

The search measured every candidate once; the budget lives here, so tightening or relaxing it
re-runs only this cheap stage and the search stays cached. Among the candidates that meet all three
limits (perplexity increase, size and decode speed, each relative to the fp32 bundle measured in the
same search run), the smallest wins, then the fastest. plan.json is what quantize-onnx follows
(``modelbuild.ml.precision.read_plan``); plan.md says why the winner won and why every other
candidate lost. When none meets the budget the stage fails with one line naming the closest one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from modelbuild import UserError
from modelbuild.ml.precision import CANDIDATES_FILE, PLAN_FILE, SCHEMA
from modelbuild.passdef import Input, PassDef, param, require

REPORT = "plan.md"
METRICS = ("perplexity_delta_pct", "size_ratio", "speed_ratio", "int8_count")


@dataclass(frozen=True)
class Params:
    max_ppl_increase_pct: float = param(5.0, "largest held-out perplexity increase over the fp32 bundle, in percent")
    max_size_ratio: float = param(0.3, "largest model file size as a fraction of the fp32 bundle's (0 < x <= 1)")
    min_speed_ratio: float = param(0.0, "smallest decode tokens/s as a fraction of the fp32 bundle's (0 = no limit)")

    def __post_init__(self):
        require(self.max_ppl_increase_pct >= 0, "max_ppl_increase_pct", "0 or more", self.max_ppl_increase_pct)
        require(0 < self.max_size_ratio <= 1, "max_size_ratio", "more than 0 and at most 1 (a fraction of the fp32 size)", self.max_size_ratio)
        require(self.min_speed_ratio >= 0, "min_speed_ratio", "0 (no limit) or more", self.min_speed_ratio)


def failures(candidate: dict, params: Params) -> list[str]:
    """The limits ``candidate`` misses, in words (empty: it meets the budget)."""
    out = []
    if candidate["perplexity_delta_pct"] > params.max_ppl_increase_pct:
        out.append(f"perplexity {candidate['perplexity_delta_pct']:+.2f} % > +{params.max_ppl_increase_pct:g} %")
    if candidate["size_ratio"] > params.max_size_ratio:
        out.append(f"size {candidate['size_ratio']:.3f} of fp32 > {params.max_size_ratio:g}")
    if params.min_speed_ratio and candidate["speed_ratio"] < params.min_speed_ratio:
        out.append(f"speed {candidate['speed_ratio']:.2f}x of fp32 < {params.min_speed_ratio:g}x")
    return out


def overshoot(candidate: dict, params: Params) -> float:
    """How far outside the budget, each limit's miss relative to the limit, summed (0 = inside)."""
    ppl = max(0.0, candidate["perplexity_delta_pct"] - params.max_ppl_increase_pct) / max(params.max_ppl_increase_pct, 1.0)
    size = max(0.0, candidate["size_ratio"] - params.max_size_ratio) / params.max_size_ratio
    speed = max(0.0, params.min_speed_ratio - candidate["speed_ratio"]) / params.min_speed_ratio if params.min_speed_ratio else 0.0
    return ppl + size + speed


def numbers(c: dict) -> str:
    return f"perplexity {c['perplexity_delta_pct']:+.2f} %, size {c['size_ratio']:.3f} of fp32, speed {c['speed_ratio']:.2f}x of fp32"


def budget_text(params: Params) -> str:
    speed = f", speed >= {params.min_speed_ratio:g}x" if params.min_speed_ratio else ""
    return f"perplexity <= +{params.max_ppl_increase_pct:g} %, size <= {params.max_size_ratio:g}{speed}"


def choose(candidates: list[dict], params: Params) -> tuple[dict, dict[str, str]]:
    """(winner, candidate name -> why it won or lost); UserError when none meets the budget."""
    fitting = [c for c in candidates if not failures(c, params)]
    if not fitting:
        closest = min(candidates, key=lambda c: (overshoot(c, params), c["size_bytes"]))
        raise UserError(f"no precision candidate meets the budget ({budget_text(params)}); closest: {closest['name']} "
                        f"({numbers(closest)}; misses {' and '.join(failures(closest, params))})")
    winner = min(fitting, key=lambda c: (c["size_bytes"], -c["tokens_per_s"], c["int8_count"]))
    why = {winner["name"]: f"won: the smallest of the {len(fitting)} candidate(s) within the budget"
                           f"{' (then the fastest)' if sum(c['size_bytes'] == winner['size_bytes'] for c in fitting) > 1 else ''}"}
    for c in candidates:
        if c is winner:
            continue
        missed = failures(c, params)
        if missed:
            why[c["name"]] = "lost: " + "; ".join(missed)
        elif c["size_bytes"] > winner["size_bytes"]:
            why[c["name"]] = f"lost: within the budget but {c['size_bytes'] - winner['size_bytes']:,} bytes larger than {winner['name']}"
        else:
            why[c["name"]] = f"lost: within the budget and as small as {winner['name']}, but slower ({c['tokens_per_s']:g} vs {winner['tokens_per_s']:g} tok/s)"
    return winner, why


def _report(search: dict, winner: dict, why: dict, params: Params) -> str:
    q, ref = search["quantization"], search["fp32"]
    lines = [
        f"# Precision plan: {winner['name']}", "",
        f"int4 {q['algorithm']} (block {q['block_size']}, accuracy level {q['accuracy_level']}) with "
        f"{winner['int8_count']} MatMul(s) in int8; budget: {budget_text(params)} (vs the fp32 bundle).", "",
        f"fp32 bundle: perplexity {ref['perplexity']:g}, {ref['size_bytes']:,} bytes, {ref['tokens_per_s']:g} tok/s"
        f" (adapter: {search.get('adapter') or 'none'}, {search['heldout']['records']} held-out records).", "",
        "| candidate | int8 MatMuls | perplexity | delta % | size bytes | size ratio | tok/s | speed ratio | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in search["candidates"]:
        lines.append(f"| {c['name']} | {c['int8_count']} | {c['perplexity']:g} | {c['perplexity_delta_pct']:+.2f} | {c['size_bytes']:,} "
                     f"| {c['size_ratio']:.3f} | {c['tokens_per_s']:g} | {c['speed_ratio']:.2f} | {why[c['name']]} |")
    lines += ["", f"int8 MatMuls of {winner['name']} (most sensitive first): {', '.join(winner['int8_nodes']) or 'none'}.", ""]
    return "\n".join(lines)


def _read_candidates(folder: Path) -> dict:
    try:
        search = json.loads((folder / CANDIDATES_FILE).read_text())
        assert search["schema"] == SCHEMA and search["candidates"]
        for c in search["candidates"]:
            for key in ("name", "int8_nodes", "perplexity_delta_pct", "size_ratio", "speed_ratio", "size_bytes", "tokens_per_s"):
                c[key]  # noqa: B018 (each candidate has every number)
        return search
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise UserError(f"inputs.candidates: no valid {CANDIDATES_FILE} (use a precision-search target)") from None


def run(params: Params, inputs: dict, out_dir: Path, ctx) -> None:
    from modelbuild.core.gates import METRICS_FILE
    from modelbuild.ml.precision import read_plan

    search = _read_candidates(inputs["candidates"])
    winner, why = choose(search["candidates"], params)
    q = search["quantization"]
    plan = {
        "schema": SCHEMA,
        "algorithm": q["algorithm"], "block_size": q["block_size"], "symmetric": q["symmetric"],
        "accuracy_level": q["accuracy_level"], "int8_nodes": winner["int8_nodes"],
        "candidate": winner["name"],
        "budget": {"max_ppl_increase_pct": params.max_ppl_increase_pct, "max_size_ratio": params.max_size_ratio,
                   "min_speed_ratio": params.min_speed_ratio},
        "measured": {key: winner[key] for key in ("perplexity", "perplexity_delta_pct", "size_bytes", "size_ratio",
                                                  "tokens_per_s", "speed_ratio")},
        "fp32": search["fp32"],
        "adapter": search.get("adapter"),
    }
    (out_dir / PLAN_FILE).write_text(json.dumps(plan, indent=1) + "\n")
    read_plan(out_dir / PLAN_FILE)  # what quantize-onnx will read must read
    (out_dir / REPORT).write_text(_report(search, winner, why, params))
    (out_dir / METRICS_FILE).write_text(json.dumps({key: winner[key] for key in METRICS}, indent=1) + "\n")


PASS = PassDef(
    name="precision-plan",
    version=1,
    doc="choose the smallest measured precision-search candidate within a perplexity/size/speed budget; plan.json + plan.md",
    params=Params,
    inputs={"candidates": Input("a precision-search target (its candidates.json)")},
    run=run,
    metrics=METRICS,
)
