"""The report's building blocks (charts drawn as SVG and PNG from one geometry, the image grid,
the dataset card's Markdown), the report of a protocol run's results and the console summary."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import numpy as np
from PIL import Image

from synthlesion.evaluation.charts import (
    RefLine,
    Series,
    bar_chart,
    forest_plot,
    image_grid,
    nice_ticks,
)
from synthlesion.evaluation.console import arms_table, comparison_lines, convergence_line
from synthlesion.evaluation.report import markdown_to_html, verdict, write_report


def test_ticks_cover_the_data_range():
    for low, high in [(0, 0.223), (0, 1), (-3.2, 7.9), (0, 509.1), (0.5, 0.5)]:
        ticks = nice_ticks(low, high)
        assert ticks[0] <= low and ticks[-1] >= high and len(ticks) <= 12


def test_bar_chart_draws_the_same_figure_as_svg_and_png():
    chart = bar_chart(
        "Dice",
        ["real", "diffusion-50"],
        [Series("dice", [0.2, math.nan], [0.05, math.nan], [[0.15, 0.2, 0.25], []])],
        bounds=(0.0, 1.0),
    )
    svg = chart.svg("Dice")
    assert svg.startswith("<svg") and svg.count("<circle") == 3 and "n/a" in svg
    image = Image.open(io.BytesIO(chart.png()))
    assert image.size == (chart.width * 2, chart.height * 2)
    forest = forest_plot("Δ", ["a − b", "c − d"], [0.1, -0.02], [0.05, -0.1], [0.2, 0.03])
    assert forest.svg().count("<circle") == 2


def test_intervals_reference_lines_and_grouped_forest_rows():
    chart = bar_chart(
        "AUC",
        ["copy_paste", "diffusion"],
        [Series("AUC", [0.6, math.nan], lows=[0.4, math.nan], highs=[0.9, math.nan])],
        bounds=(0.0, 1.0),
        lines=[RefLine(0.5, "chance 0.5"), RefLine(math.nan, "no floor")],
    )
    svg = chart.svg()
    assert "chance 0.5" in svg and "no floor" not in svg and "n/a" in svg
    assert svg.count('stroke-dasharray="4 3"') == 1
    forest = forest_plot(
        "Δ Dice",
        ["a − real", "b − real", "a − real"],
        [0.1, -0.2, math.nan],
        [0.05, -0.3, math.nan],
        [0.2, -0.1, math.nan],
        groups=["budget 2", "budget 2", "budget 8"],
        notes=["p_holm 0.01", "p_holm 0.2", "p_holm n/a"],
    )
    svg = forest.svg()
    assert svg.count("<circle") == 2 and "budget 8" in svg and "p_holm 0.01" in svg
    assert svg.count(">budget 2<") == 1  # one heading per group
    assert Image.open(io.BytesIO(forest.png())).size == (forest.width * 2, forest.height * 2)


def test_image_grid_tiles_rows_and_columns():
    rng = np.random.default_rng(0)
    rows = [
        [rng.normal(size=(16, 16)), (rng.random((16, 16)) > 0.5).astype(float)] for _ in range(3)
    ]
    png = image_grid(rows, ["image", "mask"], ["a", "b", "c"], cell=40, mask_columns=(1,))
    image = Image.open(io.BytesIO(png))
    assert image.width > 2 * 40 and image.height > 3 * 40


def test_card_markdown_becomes_tables_lists_and_headings():
    text = "# Card\n\nSome `code` here.\n\n| a | b |\n|---|---:|\n| 1 | 2 |\n\n- one\n- two\n"
    out = markdown_to_html(text)
    assert "<h3>Card</h3>" in out and "<code>code</code>" in out
    assert "<th>a</th>" in out and "<td>2</td>" in out and out.count("<li>") == 2
    assert "<script" not in markdown_to_html("<script>alert(1)</script>")


# --- the report of the protocol's results (format synthlesion-evaluation/2) ------------------

RESULTS = Path(__file__).parent / "data" / "evaluation_results_v2.json"
CARD = "# Dataset card\n\n| split | cases |\n|---|---:|\n| test | 16 |\n"


def _results() -> dict:
    return json.loads(RESULTS.read_text(encoding="utf-8"))


def _tables(page: str) -> dict[str, str]:
    """Table id -> the table's HTML."""
    return {m.group(1): m.group(0) for m in re.finditer(r"<table id='([^']+)'>.*?</table>", page)}


def test_report_shows_every_panel_of_the_protocol(tmp_path):
    results = _results()
    path = write_report(tmp_path, results, {}, CARD)
    page = path.read_text(encoding="utf-8")
    tables = _tables(page)
    # arms per budget, with the threshold floor's row
    for budget in results["budgets"]:
        table = tables[f"arms-{budget}"]
        for key, arm in results["arms"].items():
            if key.endswith(f"@b{budget}"):
                name = key.rpartition("@b")[0]
                assert f"<td>{name}</td>" in table
                low, high = arm["dice_ci"]
                assert f"{arm['dice_mean']:.3f} [{low:.3f}, {high:.3f}]" in table
                assert f"{arm['positive_patch_share']:.3f}" in table
        floor = results["threshold_floor"][budget]
        assert "threshold floor" in table and f"{floor['dice_mean']:.3f}" in table
    assert "no upper reference in this run" in page
    # comparisons: one row each, with Holm's p; the forest plot groups them by budget
    rows = tables["comparisons"].count("<tr>") - 1
    assert rows == len(results["comparisons"])
    for c in results["comparisons"].values():
        assert f"{c['p_holm']:.3g}" in tables["comparisons"]
    forest = page[page.index("Paired per-case Dice difference (arm") - 400 :]
    assert "budget 2" in forest and "budget 8" in forest and "p_holm 0.00132" in forest
    # convergence
    assert "Real arm converged: <span class='bad'>no</span>" in page
    assert "-0.036" in tables["convergence"] and "40 → 80" in tables["convergence"]
    # realism, each figure with its floor
    realism = results["realism"]
    assert "mean fill (baseline)" in tables["repaint"]
    assert f"{realism['repaint']['diffusion']['psnr']:.2f}" in tables["repaint"]
    distribution = tables["realism-distribution"]
    assert "real vs real (floor)" in distribution
    assert f"{realism['kid_floor']['mean']:.4f}" in distribution
    assert f"{realism['classifier_auc_floor']['auc']:.3f}" in distribution
    assert f"{realism['texture_floor']['mean_ks']:.3f}" in distribution
    assert "<td>diffusion</td><td>0</td><td>–</td>" in distribution  # measured nothing
    assert "(NCC ≥ 0.90)" in tables["fidelity"]
    # the gate: 100% rejected, split between the manifest's gate and the segmenter
    gate = tables["gate"]
    assert "100%" in gate and "<td>handcrafted</td><td>32</td><td>32</td>" in gate
    assert "<td>5</td><td>27</td><td>0</td>" in gate  # manifest 5, segmenter 27, kept 0
    # data and guards of every cell
    cells = tables["cells"]
    for cell in results["cells"]:
        assert f"<td>{cell['name']}</td>" in cells
        assert cell["build"]["build_id"][:8] in cells
    assert cells.count("refused</span>") == len(results["cells"])
    assert "<td>synthetic-as-real</td>" in tables["guards"] and "passed" in tables["guards"]
    assert "<th>split</th>" in page  # the dataset card's table
    assert "channels 8, 16, 32, patches 32×32" in page  # the set-up
    # figures as PNG next to the report, nothing fetched from elsewhere
    for name in (
        "dice",
        "sensitivity_by_size_b2",
        "sensitivity_by_size_b8",
        "paired_dice",
        "convergence",
        "realism_kid",
        "realism_classifier_auc",
        "realism_texture",
    ):
        assert (tmp_path / "figures" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page and "<script" not in page
    assert any("diffusion" in line and "Holm" in line for line in verdict(results))


def _blank(value):
    """Every number of ``value`` as None (what jsonable makes of NaN)."""
    if isinstance(value, dict):
        return {k: _blank(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_blank(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return None
    return value


def test_missing_figures_read_as_a_dash(tmp_path):
    results = _results()
    results["upper_reference"] = None
    results["threshold_floor"] = {}
    results["convergence"] = {}
    results["realism"] = None
    results["gate"] = {}
    del results["seconds"]
    page = write_report(tmp_path / "a", results, {}, "").read_text(encoding="utf-8")
    assert "Realism was not measured" in page and "No convergence check" in page
    assert "no threshold floor in this run" in page
    # every number missing, NaN where JSON allows it, diffusion left out of the realism dicts
    results = _blank(_results())
    results["arms"]["real_balanced@b2"]["dice_mean"] = math.nan
    realism = _results()["realism"]
    for part in ("repaint", "fidelity", "kid", "classifier_auc", "texture", "lesions"):
        realism[part].pop("diffusion", None)
    del realism["kid_floor"]
    results["realism"] = realism
    results["cells"][0]["build"]["evaluation_guard"]["probe"] = {
        "probed": None,
        "refused": None,
        "message": "no synthetic case to probe with",
    }
    results["cells"][1]["build"] = {}
    page = write_report(tmp_path / "b", results, {}, CARD).read_text(encoding="utf-8")
    tables = _tables(page)
    assert "<td>real_balanced</td><td>real</td><td>–</td><td>–</td>" in tables["arms-b2"]
    assert "<td>diffusion</td><td>–</td>" in tables["repaint"]
    assert "no synthetic case to probe with" in tables["cells"]
    assert (tmp_path / "b" / "figures" / "paired_dice.png").is_file()
    # the upper reference, when there is one, is a row of every budget's table
    results = _results()
    results["upper_reference"] = results["arms"]["real_balanced@b8"] | {"dice_mean": 0.612}
    page = write_report(tmp_path / "c", results, {}, CARD).read_text(encoding="utf-8")
    assert all(
        "upper reference" in t and "0.612" in t
        for k, t in _tables(page).items()
        if k.startswith("arms-b")
    )


def test_example_grids_are_saved_next_to_the_report(tmp_path):
    rng = np.random.default_rng(1)
    row = {
        "case_id": "syn_a_00",
        "nearest_case": "real_b",
        "ncc": 0.42,
        "context": rng.normal(size=(24, 24)),
        "mask": (rng.random((24, 24)) > 0.7).astype(float),
        "synthetic": rng.normal(size=(24, 24)),
        "nearest": rng.normal(size=(24, 24)),
    }
    page = write_report(tmp_path, _results(), {"diffusion": [row, row]}, CARD).read_text()
    assert (tmp_path / "figures" / "grid_diffusion.png").is_file()
    assert page.count('src="data:image/png;base64,') == 1


def test_console_prints_each_arm_and_comparison():
    results = _results()
    table = arms_table(results)
    assert len(table) == 1 + len(results["arms"]) + len(results["threshold_floor"])
    line = next(x for x in table if x.strip().startswith("copy_paste@b8"))
    assert "0.006 [0.000, 0.022]" in line and "0.374" in line
    full = comparison_lines(results)
    assert len(full) == len(results["comparisons"])
    assert any("diffusion@b2 − copy_paste" in x and "p_holm 0.0208" in x for x in full)
    brief = comparison_lines(results, brief=True)
    assert brief and all("− real_balanced:" in x for x in brief)
    assert convergence_line(results).startswith("real arm converged: NO")
    results["upper_reference"] = results["arms"]["real_balanced@b8"]
    results["comparisons"]["diffusion@b8_vs_handcrafted"]["p_holm"] = None
    assert arms_table(results)[-1].strip().startswith("upper reference")
    assert "p_holm n/a" in comparison_lines(results)[-1]
    assert convergence_line({"convergence": {}}) == "convergence: not checked in this run"
