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


FAILED_EDGE = "red"
LABEL_PT = 8  # label font size (points)
MARKER_S = 110  # scatter marker area (points^2)
STAR = 2.4  # Pareto-optimal variants are stars of this many times that area
RINGS = (4, 12, 22, 34, 50, 70)  # label distances from its point (points), tried nearest first
DIRECTIONS = ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))  # dx, dy signs


def plot_figure(rows: list[dict], title: str):
    """The report's plot as a matplotlib Figure on an Agg canvas (no pyplot, no global backend).

    Size vs tokens/s; every point with a perplexity is filled with its colour (log scale), the
    failed ones included, which get a thick red edge; Pareto-optimal variants (the table's ★)
    are stars. Labels are placed so they overlap neither each other nor any point.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=PNG_SIZE, dpi=PNG_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    plotted = [r for r in rows if r["size_mb"] is not None and r["tokens_per_s"] is not None]
    values = [v for v in map(_perplexity, plotted) if v is not None]
    norm, cmap = None, colormaps["viridis"]
    if values:
        low, high = min(values), max(values)
        if low == high:
            low, high = low - 0.5, high + 0.5
        norm = LogNorm(low, high) if high / low > 3 else Normalize(low, high)  # log: a failed variant can be 50x
    handles = []
    for star in (False, True):
        for failed in (False, True):
            group = [r for r in plotted if bool(r["pareto"]) == star and (r["status"] == "gate failed") == failed]
            if not group:
                continue
            colours = [cmap(norm(_perplexity(r))) if _perplexity(r) is not None else "lightgrey" for r in group]
            ax.scatter([r["size_mb"] for r in group], [r["tokens_per_s"] for r in group], c=colours,
                       s=MARKER_S * (STAR if star else 1), marker="*" if star else "o",
                       edgecolors=FAILED_EDGE if failed else "black", linewidths=2.0 if failed else 0.7, zorder=3,
                       gid=("pareto" if star else "point") + ("-failed" if failed else ""))
    if norm is not None:
        from matplotlib.cm import ScalarMappable
        from matplotlib.ticker import LogFormatter

        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="perplexity (lower is better)")
        if isinstance(norm, LogNorm):
            bar.ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
            bar.ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    if any(r["pareto"] for r in plotted):
        dims = next((r["pareto_dims"] for r in rows if r.get("pareto_dims")), "size, tokens/s, perplexity")
        handles.append(Line2D([], [], marker="*", ms=13, ls="", color="white", markeredgecolor="black",
                              label=f"Pareto front (★ in the table):\nno passing variant beats it on {dims}"))
    if any(r["status"] == "gate failed" for r in plotted):
        handles.append(Line2D([], [], marker="o", ms=9, ls="", color="white", markeredgecolor=FAILED_EDGE,
                              markeredgewidth=2.0, label="gate failed (red edge, red label)"))
    if len(values) < len(plotted):
        handles.append(Line2D([], [], marker="o", ms=9, ls="", color="lightgrey", markeredgecolor="black",
                              label="perplexity not measured"))
    if not plotted:
        ax.text(0.5, 0.5, "no evaluated variant to plot", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.margins(0.12)
    if handles:
        ax.legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.9)
    missing = [r["label"] for r in rows if r["status"] in ("not built", "stale")]
    if missing:
        fig.text(0.01, 0.01, f"{NOT_BUILT}: {', '.join(missing)}", fontsize=8, color="dimgrey")
    ax.set_title(f"{title}: size vs decode speed (up and left is better)")
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("decode speed (tokens/s)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout(rect=(0, 0.03, 1, 1) if missing else (0, 0, 1, 1))
    _place_labels(fig, ax, plotted)
    return fig


def _place_labels(fig, ax, rows: list[dict]) -> None:
    """Label each point at the nearest free spot around it (greedy, in a fixed order, so deterministic):
    a spot is free when the label's box stays inside the axes and overlaps no placed label, no point
    and the legend. A label set off from its point gets a thin leader line."""
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    scale = fig.dpi / 72  # points -> pixels
    area = ax.get_window_extent(renderer)
    legend = ax.get_legend()
    taken = [legend.get_window_extent(renderer).padded(2)] if legend else []
    centres = [ax.transData.transform((r["size_mb"], r["tokens_per_s"])) for r in rows]
    radii = [(MARKER_S * (STAR if r["pareto"] else 1)) ** 0.5 / 2 * scale + 1 for r in rows]
    taken += [Bbox.from_extents(x - d, y - d, x + d, y + d) for (x, y), d in zip(centres, radii)]
    order = sorted(range(len(rows)), key=lambda i: (not rows[i]["pareto"], -centres[i][1], centres[i][0]))
    for i in order:
        row, (x, y) = rows[i], centres[i]
        colour = "firebrick" if row["status"] == "gate failed" else "black"
        text = ax.text(0, 0, row["label"], fontsize=LABEL_PT)
        size = text.get_window_extent(renderer)
        text.remove()
        w, h = size.width + 2, size.height + 2
        best = None
        for ring in RINGS:
            for dx, dy in DIRECTIONS:
                off = radii[i] + ring * scale
                left = x + dx * off - (w if dx < 0 else w / 2 if dx == 0 else 0)
                bottom = y + dy * off * (0.7 if dx else 1) - (h if dy < 0 else h / 2 if dy == 0 else 0)
                box = Bbox.from_bounds(left, bottom, w, h)
                clash = sum(box.overlaps(other) for other in taken) + (not area.contains(left, bottom)) \
                    + (not area.contains(left + w, bottom + h))
                if best is None or clash < best[0]:
                    best = (clash, ring, box)
                if clash == 0:
                    break
            if best[0] == 0:
                break
        _, ring, box = best
        taken.append(box)
        far = ring > RINGS[0]
        leader = {"arrowstyle": "-", "color": "grey", "lw": 0.6, "shrinkA": 0, "shrinkB": 5} if far else None
        centre = ((box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2)
        ax.annotate(row["label"], (row["size_mb"], row["tokens_per_s"]), xytext=centre, textcoords="figure pixels",
                    ha="center", va="center", fontsize=LABEL_PT, color=colour, zorder=4, gid="label", arrowprops=leader)


def _perplexity(row: dict) -> float | None:
    value = row["perplexity"]
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


def render_png(rows: list[dict], title: str, path: Path) -> None:
    """The plot (plot_figure) as a PNG; the same rows give the same bytes."""
    plot_figure(rows, title).savefig(path, format="png", dpi=PNG_DPI, metadata={"Software": None})
