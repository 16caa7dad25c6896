"""The report's building blocks: charts drawn as SVG and PNG from one geometry, the image grid,
and the dataset card's Markdown."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from synthlesion.evaluation.charts import Series, bar_chart, forest_plot, image_grid, nice_ticks
from synthlesion.evaluation.report import markdown_to_html


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
