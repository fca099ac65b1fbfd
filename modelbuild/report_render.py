"""The report's rows (report.py) as a markdown table, a self-contained HTML page and a PNG plot.

Rendering only: every number comes from the rows; nothing here reads the project or the cache.
The outputs hold no timestamps or absolute paths, so the same rows give byte-identical files.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

DASH = "—"
NOT_BUILT = "gate failed / not built"
PNG_SIZE = (9.0, 6.0)  # inches
PNG_DPI = 100  # -> 900 x 600 pixels


def number(value, spec: str, prefix: str = "") -> str:
    """A metric formatted with ``spec``, or a dash where none was measured."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return DASH
    return prefix + format(value, spec)


COLUMNS = (
    ("Variant", lambda r: ("★ " if r["pareto"] else "") + r["label"]),
    ("Model target", lambda r: r["model_target"] or DASH),
    ("Device", lambda r: r["device"] or DASH),
    ("Adapter", lambda r: r["adapter"] or DASH),
    ("Size MB", lambda r: number(r["size_mb"], ".1f")),
    ("Size vs base", lambda r: number(r["size_vs_baseline_pct"], ".0f") + ("%" if r["size_vs_baseline_pct"] is not None else "")),
    ("Tokens/s", lambda r: number(r["tokens_per_s"], ".1f")),
    ("TTFT ms", lambda r: number(r["ttft_ms"], ".1f")),
    ("Perplexity", lambda r: number(r["perplexity"], ".2f")),
    ("Δppl %", lambda r: number(r["perplexity_delta_pct"], "+.1f")),
    ("Peak RSS MB", lambda r: number(r["peak_rss_mb"], ".0f")),
    ("Gates", lambda r: r["status_text"]),
    ("Build s (total)", lambda r: ("≥" if r["build_missing"] and r["build_s_total"] is not None else "") + number(r["build_s_total"], ".1f")),
    ("Build s (stage)", lambda r: number(r["build_s_stage"], ".1f")),
)
RIGHT = {"Size MB", "Size vs base", "Tokens/s", "TTFT ms", "Perplexity", "Δppl %", "Peak RSS MB", "Build s (total)", "Build s (stage)"}


def table_cells(rows: list[dict]) -> list[list[str]]:
    return [[cell(row) for _, cell in COLUMNS] for row in rows]


def _notes(rows: list[dict]) -> list[str]:
    """Plain-text lines shown under the table (markdown and HTML)."""
    pareto = [r["label"] for r in rows if r["pareto"]]
    dims = next((r["pareto_dims"] for r in rows if r["pareto_dims"]), None)
    if pareto:
        lines = [f"Pareto-optimal (★): {', '.join(pareto)}. No other variant that passed its gates is at least "
                 f"as good in each of {dims} and better in one."]
    else:
        lines = ["Pareto-optimal: none (no variant with a measured size and speed passed its gates)."]
    base = next((r for r in rows if r["baseline"]), None)
    if base:
        lines.append(f"Size vs base: size relative to {base['baseline']} ({base['baseline_kind']}). "
                     "Δppl %: perplexity relative to the fp32 reference of each evaluation.")
    lines.append("Build s: seconds the evaluated model's stage took to build (stage) and the sum over it and every "
                 "stage it is built from (total; shared upstream stages count in each variant; ≥ where some "
                 "were not built).")
    for row in rows:
        if row["status"] in ("not built", "stale"):
            lines.append(f"{row['eval_target']}: {NOT_BUILT}: {row['note']}; run `doit {row['eval_target']}` "
                         "to see why.")
        elif row["status"] == "gate failed":
            where = " (measurement from the cache: a target that fails its gate is not put in build/)" \
                if row["state"] == "measured" else ""
            lines.append(f"{row['eval_target']}: {row['status_text']}{where}.")
    return lines


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def render_markdown(rows: list[dict], title: str) -> str:
    header = [name for name, _ in COLUMNS]
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if name in RIGHT else "---" for name in header) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in cells) + " |" for cells in table_cells(rows)]
    lines.append("")
    lines += [f"- {_md_cell(line)}" for line in _notes(rows)]
    lines += ["", "![size vs tokens/s](report.png)", ""]
    return "\n".join(lines)


def render_html(rows: list[dict], title: str, png: bytes) -> str:
    esc = html.escape
    head = "".join(f'<th class="{"num" if name in RIGHT else ""}">{esc(name)}</th>' for name, _ in COLUMNS)
    body = []
    for row, cells in zip(rows, table_cells(rows)):
        css = {"gate failed": "failed", "not built": "missing", "stale": "missing"}.get(row["status"], "")
        css = (css + " pareto").strip() if row["pareto"] else css
        tds = "".join(f'<td class="{"num" if name in RIGHT else ""}">{esc(cell)}</td>'
                      for (name, _), cell in zip(COLUMNS, cells))
        body.append(f'<tr class="{css}">{tds}</tr>')
    notes = "".join(f"<li>{esc(line)}</li>" for line in _notes(rows))
    image = base64.b64encode(png).decode("ascii")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{esc(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; white-space: nowrap; }}
th {{ background: #f0f0f0; }}
td.num, th.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
tr.pareto td:first-child {{ font-weight: bold; }}
tr.failed {{ background: #fde8e8; }}
tr.missing {{ background: #f4f4f4; color: #777; }}
img {{ max-width: 100%; margin-top: 1em; }}
</style>
</head>
<body>
<h1>{esc(title)}</h1>
<table>
<thead><tr>{head}</tr></thead>
<tbody>
{chr(10).join(body)}
</tbody>
</table>
<ul>{notes}</ul>
<img alt="size vs tokens/s, perplexity as colour" src="data:image/png;base64,{image}">
</body>
</html>
"""


def render_png(rows: list[dict], title: str, path: Path) -> None:
    """Scatter of size vs tokens/s; written with the Agg canvas directly (no pyplot, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=PNG_SIZE, dpi=PNG_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    plotted = [r for r in rows if r["size_mb"] is not None and r["tokens_per_s"] is not None]
    good = [r for r in plotted if r["status"] != "gate failed"]
    failed = [r for r in plotted if r["status"] == "gate failed"]
    coloured = [r for r in good if r["perplexity"] is not None]
    grey = [r for r in good if r["perplexity"] is None]
    handles = []
    if coloured:
        values = [r["perplexity"] for r in coloured]
        low, high = min(values), max(values)
        if low == high:
            low, high = low - 0.5, high + 0.5
        points = ax.scatter([r["size_mb"] for r in coloured], [r["tokens_per_s"] for r in coloured], c=values,
                            cmap="viridis", norm=Normalize(low, high), s=90, edgecolors="black", linewidths=0.6,
                            zorder=3)
        fig.colorbar(points, ax=ax, label="perplexity (lower is better)")
    if grey:
        ax.scatter([r["size_mb"] for r in grey], [r["tokens_per_s"] for r in grey], s=90, color="lightgrey",
                   edgecolors="black", linewidths=0.6, zorder=3)
        handles.append(Line2D([], [], marker="o", ls="", color="lightgrey", markeredgecolor="black",
                              label="perplexity not measured"))
    if failed:
        ax.scatter([r["size_mb"] for r in failed], [r["tokens_per_s"] for r in failed], s=90, facecolors="none",
                   edgecolors="red", linewidths=1.8, zorder=3)
        handles.append(Line2D([], [], marker="o", ls="", markerfacecolor="none", markeredgecolor="red",
                              markeredgewidth=1.8, label="gate failed"))
    front = sorted((r for r in plotted if r["pareto"]), key=lambda r: (r["size_mb"], r["tokens_per_s"]))
    if front:
        ax.plot([r["size_mb"] for r in front], [r["tokens_per_s"] for r in front], ls="--", color="black",
                lw=1.2, zorder=2)
        handles.append(Line2D([], [], ls="--", color="black", label="Pareto front"))
    for row in plotted:
        ax.annotate(row["label"], (row["size_mb"], row["tokens_per_s"]), xytext=(6, 6), textcoords="offset points",
                    fontsize=9, color="firebrick" if row["status"] == "gate failed" else "black")
    if not plotted:
        ax.text(0.5, 0.5, "no evaluated variant to plot", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.margins(0.15)
    if handles:
        ax.legend(handles=handles, loc="best", fontsize=9)
    missing = [r["label"] for r in rows if r["status"] in ("not built", "stale")]
    if missing:
        fig.text(0.01, 0.01, f"{NOT_BUILT}: {', '.join(missing)}", fontsize=8, color="dimgrey")
    ax.set_title(f"{title}: size vs decode speed (up and left is better)")
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("decode speed (tokens/s)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout(rect=(0, 0.03, 1, 1) if missing else (0, 0, 1, 1))
    fig.savefig(path, format="png", dpi=PNG_DPI, metadata={"Software": None})
