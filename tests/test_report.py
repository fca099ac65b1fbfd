"""The variant report: metrics.json of evaluate targets -> markdown, HTML, PNG and JSON.

A real project on disk: model targets whose outputs are stand-in files, stamped exactly as
stage.py stamps a built output (key components, manifest, seconds), and evaluate targets whose
outputs hold a metrics.json in the evaluate pass's schema. The evaluate targets' inputs are
generated from the evaluate pass's declared inputs, so the test does not depend on their names.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from modelbuild import UserError
from modelbuild.core.digest import hash_json, tree_manifest
from modelbuild.passdef import get_pass
from modelbuild.graph.loader import load_project
from modelbuild.cli.report import write_report
from modelbuild.engine.stage import key_components, stat_cache
from modelbuild.core.stamp import STAMP, STAMP_DIR, read_stamp, write_stamp

MODELS = {  # model target -> (precision, stage seconds)
    "tiny-fp32": ("fp32", 10.0),
    "tiny-int8": ("int8", 8.25),
    "tiny-int4-rtn": ("int4", 7.5),
    "tiny-int4-b16": ("int4", 6.0),
    "tiny-int4-lossy": ("int4", 5.0),
    "tiny-int4-awq": ("int4", 30.0),
}
BASE_SECONDS = 2.0


def metrics(model: str, variant: str, size_mb: float, tps: float, ppl: float, ttft: float, rss: float,
            gate_ok: bool = True) -> dict:
    delta = round((ppl / 7.60 - 1) * 100, 2)
    return {
        "schema": 1, "model_target": model, "variant": variant, "adapter": "travel", "device": "cpu",
        "size_bytes": int(size_mb * 1e6), "perplexity": ppl, "reference_perplexity": 7.60,
        "perplexity_delta_pct": delta, "tokens_per_s": tps, "ttft_ms": ttft, "peak_rss_mb": rss,
        "eval_tokens": 5123,
        "gates": {"perplexity_delta_pct": {"op": "<=", "limit": 5.0, "value": delta, "passed": gate_ok}},
    }


EVALS = {  # eval target -> metrics written into its output (None: the stage failed, no output)
    "eval-fp32": metrics("tiny-fp32", "fp32", 540.0, 40.0, 7.60, 90.0, 2100.0),
    "eval-int8": metrics("tiny-int8", "int8", 270.0, 60.0, 7.70, 60.0, 1200.0),
    "eval-int4-rtn": metrics("tiny-int4-rtn", "int4-rtn", 150.0, 85.2, 7.91, 41.0, 812.0),
    # dominated by int4-rtn: bigger, slower and a higher perplexity
    "eval-int4-b16": metrics("tiny-int4-b16", "int4-b16", 160.0, 80.0, 8.0, 45.0, 830.0),
    # smallest and fastest, but its gate failed: drawn hollow red, never Pareto-optimal
    "eval-int4-lossy": metrics("tiny-int4-lossy", "int4-lossy", 140.0, 90.0, 9.5, 40.0, 800.0, gate_ok=False),
    "eval-int4-awq": None,
}


def _toml(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def _eval_inputs(model: str) -> dict:
    """Every required input of the evaluate pass, pointing at the model (or at a data file)."""
    inputs = {}
    for key, spec in get_pass("evaluate").inputs.items():
        if not spec.required:
            continue
        ref = "data/eval.jsonl" if spec.kind == "file" else f":{model}"
        inputs[key] = {"m": ref} if spec.named else ref
    return inputs


def stamp_as_built(project, name: str, seconds: float) -> None:
    """Stamp build/<name> as stage.build does after running the pass."""
    out = project.output_dir(name)
    cache = stat_cache(project)
    components = key_components(project, project.targets[name], cache)
    manifest = tree_manifest(out, cache, exclude=(STAMP_DIR,))
    stamp = {
        "target": name, "action_key": hash_json(components), "components": components, "manifest": manifest,
        "manifest_digest": hash_json(manifest), "seconds": round(seconds, 3), "origin": "built",
        "built_at": "2025-01-01T00:00:00Z",
    }
    write_stamp(out, stamp)
    assert read_stamp(out)["seconds"] == round(seconds, 3)


def make_project(root: Path):
    (root / "targets" / "data").mkdir(parents=True)
    (root / "targets" / "data" / "corpus.txt").write_text("hello travel world\n")
    (root / "targets" / "data" / "eval.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    lines = ['[target.tiny-base]', 'pass = "random-init"', 'inputs = { corpus = "data/corpus.txt" }', ""]
    for model, (precision, _) in MODELS.items():
        lines += [f"[target.{model}]", 'pass = "genai-build"', 'inputs = { base = ":tiny-base" }',
                  f'params = {{ precision = "{precision}" }}', ""]
    for name, data in EVALS.items():
        model = data["model_target"] if data else "tiny-int4-awq"
        lines += [f"[target.{name}]", 'pass = "evaluate"', f"inputs = {_toml(_eval_inputs(model))}", ""]
    (root / "targets" / "x.toml").write_text("\n".join(lines))
    project = load_project(root)

    def build(name: str, files: dict[str, str], seconds: float) -> None:
        out = project.output_dir(name)
        out.mkdir(parents=True)
        for rel, text in files.items():
            (out / rel).write_text(text)
        stamp_as_built(project, name, seconds)

    build("tiny-base", {"config.json": "{}"}, BASE_SECONDS)
    for model, (precision, seconds) in MODELS.items():
        build(model, {"model.onnx": f"{model} {precision}"}, seconds)
    for name, data in EVALS.items():
        if data is not None:
            build(name, {"metrics.json": json.dumps(data, indent=1)}, 3.0)
    return project


def parse_table(markdown: str) -> tuple[list[str], list[dict[str, str]]]:
    rows = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    assert set(rows[1]) <= set("|-:"), rows[1]
    body = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in rows[2:]]
    return header, body


@pytest.fixture
def project(tmp_path):
    return make_project(tmp_path / "project")


def test_report_table_plot_html_and_data(project, tmp_path):
    paths = write_report(project, ["eval-*"], tmp_path / "out")
    assert {p.name for p in paths.values()} == {"report.md", "report.html", "report.png", "report.json"}
    markdown = paths["md"].read_text()
    header, body = parse_table(markdown)
    assert header[0] == "Variant" and "Tokens/s" in header and "Gates" in header
    variants = [row["Variant"] for row in body]
    # sorted largest first (the fp32 reference on top); the variant without output last
    assert variants == ["★ fp32 +travel", "★ int8 +travel", "int4-b16 +travel", "★ int4-rtn +travel",
                        "int4-lossy +travel", "tiny-int4-awq"]
    by = {row["Model target"]: row for row in body}
    assert by["tiny-int4-rtn"] == {
        "Variant": "★ int4-rtn +travel", "Model target": "tiny-int4-rtn", "Device": "cpu", "Adapter": "travel",
        "Size MB": "150.0", "Size vs base": "28%", "Tokens/s": "85.2", "TTFT ms": "41.0", "Perplexity": "7.91",
        "Δppl %": "+4.1", "Peak RSS MB": "812", "Gates": "passed (1)",
        "Build s (total)": "9.5", "Build s (stage)": "7.5",
    }
    assert by["tiny-fp32"]["Size vs base"] == "100%" and by["tiny-fp32"]["Δppl %"] == "+0.0"
    assert by["tiny-fp32"]["Build s (total)"] == "12.0"
    assert by["tiny-int8"]["Build s (total)"] == "10.2"  # 2.0 + 8.25, one decimal
    assert by["tiny-int4-lossy"]["Gates"] == "FAILED: perplexity_delta_pct 25 not <= 5"
    missing = by["tiny-int4-awq"]
    assert missing["Gates"] == "gate failed / not built"
    assert missing["Size MB"] == missing["Tokens/s"] == missing["Perplexity"] == "—"
    assert missing["Build s (stage)"] == "30.0" and missing["Build s (total)"] == "32.0"  # the model itself was built
    assert "Pareto-optimal (★): fp32 +travel, int8 +travel, int4-rtn +travel. No other" in markdown
    assert "size relative to fp32 +travel (fp32 reference)" in markdown
    assert "eval-int4-awq: gate failed / not built: no output in build/eval-int4-awq" in markdown

    data = json.loads(paths["json"].read_text())
    rows = {row["eval_target"]: row for row in data["rows"]}
    assert data["targets"] == list(EVALS)
    assert {name for name, row in rows.items() if row["pareto"]} == {"eval-fp32", "eval-int8", "eval-int4-rtn"}
    assert rows["eval-int4-lossy"]["status"] == "gate failed"
    assert rows["eval-int4-awq"]["status"] == "not built" and rows["eval-int4-awq"]["tokens_per_s"] is None
    assert rows["eval-int4-rtn"]["size_mb"] == 150.0 and rows["eval-int4-rtn"]["tokens_per_s"] == 85.2
    assert rows["eval-int4-rtn"]["build_s_total"] == 9.5 and rows["eval-int4-rtn"]["build_s_stage"] == 7.5

    png = paths["png"].read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    from PIL import Image

    with Image.open(paths["png"]) as image:
        assert image.format == "PNG" and image.size == (900, 600)
        rgb = image.convert("RGB").tobytes()
    pure_red = [(i // 3) % 900 for i in range(0, len(rgb), 3) if rgb[i] > 200 and rgb[i + 1] < 60 and rgb[i + 2] < 60]
    # the failed-gate variant (smallest, fastest: left of the plot) is a red ring; the legend sits on the right
    assert sum(1 for x in pure_red if x < 300) > 20, "the failed-gate variant is not drawn in red"
    import matplotlib.image

    assert matplotlib.image.imread(paths["png"]).shape[:2] == (600, 900)

    page = paths["html"].read_text()
    assert page.startswith("<!DOCTYPE html>") and "<table>" in page
    assert f'src="data:image/png;base64,{base64.b64encode(png).decode()}"' in page
    assert page.count("<tr class=") == len(EVALS)
    for row in body:
        assert f"<td class=\"\">{row['Variant']}</td>" in page
    assert "FAILED: perplexity_delta_pct 25 not &lt;= 5" in page

    again = write_report(project, ["eval-*"], tmp_path / "again")
    for kind in ("md", "html", "json", "png"):
        assert again[kind].read_bytes() == paths[kind].read_bytes(), f"report.{kind} is not deterministic"


def test_exact_names_and_two_variant_front(project, tmp_path):
    paths = write_report(project, ["eval-int8", "eval-int4-b16", "eval-int8"], tmp_path / "out")
    _, body = parse_table(paths["md"].read_text())
    # no fp32 among them: sizes are relative to the largest; both are on the front (b16 is smaller and faster)
    assert [(r["Variant"], r["Size vs base"]) for r in body] == [("★ int8 +travel", "100%"), ("★ int4-b16 +travel", "59%")]
    assert "size relative to int8 +travel (largest variant)" in paths["md"].read_text()


def test_a_variant_only_as_small_and_fast_but_less_accurate_is_dominated(project, tmp_path):
    out = project.output_dir("eval-int4-b16")
    twin = {**EVALS["eval-int4-rtn"], "model_target": "tiny-int4-b16", "variant": "int4-b16", "perplexity": 8.0}
    (out / "metrics.json").write_text(json.dumps(twin))
    stamp_as_built(project, "eval-int4-b16", 3.0)  # rebuilt: a current evaluation again
    paths = write_report(project, ["eval-int4-*"], tmp_path / "out")
    rows = {r["eval_target"]: r for r in json.loads(paths["json"].read_text())["rows"]}
    assert rows["eval-int4-b16"]["status"] == "passed" and rows["eval-int4-b16"]["tokens_per_s"] == 85.2
    assert [name for name, r in rows.items() if r["pareto"]] == ["eval-int4-rtn"]
    assert "Pareto-optimal (★): int4-rtn +travel. No other" in paths["md"].read_text()


def test_a_gate_declared_now_is_checked_against_the_output(project, tmp_path):
    # as if targets/x.toml said gates = { perplexity_delta_pct = "<= 1" } (gates are not in the action key)
    project.targets["eval-int8"].gates = {"perplexity_delta_pct": ("<=", 1.0)}
    paths = write_report(project, ["eval-fp32", "eval-int8"], tmp_path / "out")
    _, body = parse_table(paths["md"].read_text())
    assert [(r["Variant"], r["Gates"]) for r in body] == [
        ("★ fp32 +travel", "passed (1)"), ("int8 +travel", "FAILED: perplexity_delta_pct 1.32 not <= 1")]


def test_stale_or_unstamped_evaluation_is_not_reported_as_current(project, tmp_path):
    metrics_file = project.output_dir("eval-int4-rtn") / "metrics.json"
    metrics_file.write_text(metrics_file.read_text().replace("85.2", "185.2"))  # edited after the build
    (project.output_dir("eval-int8") / STAMP).unlink()  # an output without a stamp is not a build
    paths = write_report(project, ["eval-int4-rtn", "eval-int8", "eval-int4-b16"], tmp_path / "out")
    _, body = parse_table(paths["md"].read_text())
    by = {row["Model target"]: row for row in body}
    assert by["tiny-int4-rtn"]["Gates"] == "gate failed / not built (stale output)"
    assert by["tiny-int4-rtn"]["Tokens/s"] == "—"  # stale numbers describe another model
    assert by["tiny-int8"]["Gates"] == "gate failed / not built"
    assert by["tiny-int4-b16"]["Variant"] == "★ int4-b16 +travel"  # the only current one
    rows = {r["eval_target"]: r for r in json.loads(paths["json"].read_text())["rows"]}
    assert rows["eval-int4-rtn"]["status"] == "stale" and rows["eval-int8"]["status"] == "not built"


def test_patterns_that_select_nothing_are_user_errors(project, tmp_path):
    with pytest.raises(UserError, match=r"^report: no target matches 'nope-\*'"):
        write_report(project, ["eval-*", "nope-*"], tmp_path / "out")
    with pytest.raises(UserError) as info:
        write_report(project, ["tiny-int4-r*"], tmp_path / "out")
    message = str(info.value)
    assert "'tiny-int4-r*' matches no evaluate target" in message and "genai-build" in message
    assert "evaluated by: eval-int4-rtn" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


# --- the plot: colours, Pareto stars and label placement (issue #11) ---

CLOSE = [  # (label, size MB, tokens/s, perplexity, gate failed): clusters as in a real SmolLM2 bench run
    ("merged-int4-rtn", 86.0, 88.0, 30.0, True), ("merged-int4-awq", 86.0, 86.5, 31.0, True),
    ("q4ft-int4-awq +travel", 97.0, 65.0, 27.0, True), ("int4-rtn +travel", 97.0, 74.0, 28.0, True),
    ("int4 +travel", 120.0, 68.0, 26.0, False), ("int4-gptq +travel", 210.0, 64.0, 29.5, True),
    ("int4-gptq-q8head +travel", 224.0, 61.5, 29.0, True), ("int4-k_quant +travel", 212.0, 34.5, 35.0, True),
    ("base torch-fp32", 537.0, 19.7, 62.0, False), ("torch-fp32 +travel", 537.0, 15.3, 23.1, False),
]


def close_rows(project) -> list[dict]:
    """The fixture project's report rows plus rows in tight clusters (copies of a real row, numbers changed)."""
    from modelbuild.cli.report import collect_rows, select_targets

    rows = collect_rows(project, select_targets(project, ["eval-*"]))
    template = next(r for r in rows if r["eval_target"] == "eval-int8")
    for label, size, tps, ppl, failed in CLOSE:
        rows.append({**template, "label": label, "size_mb": size, "tokens_per_s": tps, "perplexity": ppl,
                     "status": "gate failed" if failed else "passed", "pareto": False})
    return rows


def _pixels(fig):
    import numpy as np

    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[:, :, :3].astype(int)


def _centre(fig, ax, row) -> tuple[int, int]:
    x, y = ax.transData.transform((row["size_mb"], row["tokens_per_s"]))
    return int(round(float(fig.bbox.height - y))), int(round(float(x)))  # (image row, column)


def test_plot_failed_points_keep_their_perplexity_colour_with_a_red_edge(project):
    import numpy as np
    from matplotlib import colormaps

    from modelbuild.cli.report_render import plot_figure

    rows = close_rows(project)
    fig = plot_figure(rows, "t")
    ax = fig.axes[0]
    image = _pixels(fig)
    lut = (colormaps["viridis"](np.linspace(0, 1, 256))[:, :3] * 255).astype(int)
    plotted = [r for r in rows if r["size_mb"] is not None]
    centres = {r["label"]: _centre(fig, ax, r) for r in plotted}
    alone = {name for name, (y, x) in centres.items()  # no other marker drawn over this one's centre
             if all(abs(y - v) + abs(x - u) > 20 for other, (v, u) in centres.items() if other != name)}
    failed = [r for r in plotted if r["status"] == "gate failed" and r["label"] in alone]
    assert len(failed) >= 5
    colours = set()
    for row in failed:
        cy, cx = centres[row["label"]]
        centre = image[cy, cx]
        distance = int(np.abs(lut - centre).sum(axis=1).min())
        assert distance < 20, f"{row['label']}: {centre.tolist()} is not a perplexity colour"
        colours.add(tuple(centre))
        ring = image[cy - 8:cy + 9, cx - 8:cx + 9].reshape(-1, 3)
        red = (ring[:, 0] > 200) & (ring[:, 1] < 60) & (ring[:, 2] < 60)
        assert red.sum() > 10, f"{row['label']}: no red edge"
    assert len(colours) > 3  # different perplexities, different colours: not one flat colour for every failure
    # a passing point has no red edge
    cy, cx = _centre(fig, ax, next(r for r in rows if r["label"] == "int4 +travel"))
    ring = image[cy - 8:cy + 9, cx - 8:cx + 9].reshape(-1, 3)
    assert not ((ring[:, 0] > 200) & (ring[:, 1] < 60) & (ring[:, 2] < 60)).any()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("gate failed" in t and "red" in t for t in legend), legend


def test_plot_stars_the_pareto_front_and_says_so(project):
    import numpy as np

    from modelbuild.cli.report_render import plot_figure

    rows = close_rows(project)
    fig = plot_figure(rows, "t")
    ax = fig.axes[0]
    stars = np.concatenate([c.get_offsets() for c in ax.collections if (c.get_gid() or "").startswith("pareto")])
    front = {(r["size_mb"], r["tokens_per_s"]) for r in rows if r["pareto"]}
    assert front and {tuple(map(float, xy)) for xy in stars} == front  # fp32, int8 and int4-rtn of the fixture
    legend = " ".join(t.get_text() for t in ax.get_legend().get_texts())
    assert "Pareto front" in legend and "size, tokens/s, perplexity" in legend


def test_plot_labels_of_close_points_overlap_nothing(project):
    from matplotlib.transforms import Bbox

    from modelbuild.cli.report_render import plot_figure

    rows = close_rows(project)
    fig = plot_figure(rows, "t")
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    labels = [t for t in ax.texts if t.get_gid() == "label"]
    plotted = [r for r in rows if r["size_mb"] is not None]
    assert sorted(t.get_text() for t in labels) == sorted(r["label"] for r in plotted)
    boxes = {t.get_text(): t.get_window_extent(renderer) for t in labels}
    names = sorted(boxes)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not boxes[a].overlaps(boxes[b]), f"labels {a!r} and {b!r} overlap"
    area = ax.get_window_extent(renderer)
    legend = ax.get_legend().get_window_extent(renderer)
    for name, box in boxes.items():
        assert area.contains(box.x0, box.y0) and area.contains(box.x1, box.y1), f"{name!r} leaves the axes"
        assert not box.overlaps(legend), f"{name!r} is under the legend"
        for row in plotted:  # no label covers a point (the marker's square around its centre)
            x, y = ax.transData.transform((row["size_mb"], row["tokens_per_s"]))
            assert not box.overlaps(Bbox.from_extents(x - 5, y - 5, x + 5, y + 5)), f"{name!r} covers {row['label']!r}"
