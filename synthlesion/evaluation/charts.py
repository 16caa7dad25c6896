"""Small plots drawn twice from one geometry: inline SVG for the report, PNG (PIL) for files.

A :class:`Canvas` records rectangles, lines, circles and text; :meth:`Canvas.svg` writes them
as an SVG element and :meth:`Canvas.png` paints them with PIL. :func:`bar_chart` draws means
with error bars (+-1 sd or a confidence interval), every seed's value as a dot and dashed
reference lines; :func:`forest_plot` draws paired differences with their confidence intervals,
grouped under headings; :func:`image_grid` tiles image crops.
"""

from __future__ import annotations

import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PALETTE = (
    "#4c72b0",
    "#dd8452",
    "#55a868",
    "#c44e52",
    "#8172b3",
    "#937860",
    "#da8bc3",
    "#8c8c8c",
    "#ccb974",
    "#64b5cd",
)
_ANCHOR = {"start": "lm", "middle": "mm", "end": "rm"}
# PIL's bundled font covers Latin-1 only: the PNG spells what it lacks (the SVG keeps it)
_PNG_TEXT = str.maketrans(
    {
        "\u2212": "-",  # minus
        "\u2013": "-",
        "\u2014": "-",
        "\u0394": "delta",
        "\u2192": "->",
        "\u00d7": "x",
        "\u2265": ">=",
        "\u2264": "<=",
    }
)


@dataclass
class Canvas:
    """A list of drawing operations in pixel coordinates (origin top left)."""

    width: int
    height: int
    ops: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def rect(
        self, x: float, y: float, w: float, h: float, fill: str, stroke: str | None = None
    ) -> None:
        self.ops.append(("rect", {"x": x, "y": y, "w": w, "h": h, "fill": fill, "stroke": stroke}))

    def line(
        self,
        x1: float,
        y1: float,
        x2: float,
        y2: float,
        color: str = "#333",
        width: float = 1.0,
        dash: bool = False,
    ) -> None:
        self.ops.append(
            (
                "line",
                {
                    "x1": x1,
                    "y1": y1,
                    "x2": x2,
                    "y2": y2,
                    "color": color,
                    "width": width,
                    "dash": dash,
                },
            )
        )

    def circle(self, cx: float, cy: float, r: float, fill: str) -> None:
        self.ops.append(("circle", {"cx": cx, "cy": cy, "r": r, "fill": fill}))

    def text(
        self,
        x: float,
        y: float,
        text: str,
        size: float = 12,
        anchor: str = "start",
        color: str = "#222",
    ) -> None:
        """Text vertically centred on ``y``; ``anchor`` is start, middle or end."""
        self.ops.append(
            ("text", {"x": x, "y": y, "text": text, "size": size, "anchor": anchor, "color": color})
        )

    def svg(self, title: str = "") -> str:
        parts = [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" '
            f'height="{self.height}" viewBox="0 0 {self.width} {self.height}" role="img" '
            f'aria-label="{html.escape(title)}" font-family="Helvetica, Arial, sans-serif">',
            f'<rect width="{self.width}" height="{self.height}" fill="#fff"/>',
        ]
        for kind, o in self.ops:
            if kind == "rect":
                stroke = f' stroke="{o["stroke"]}"' if o["stroke"] else ""
                parts.append(
                    f'<rect x="{o["x"]:.1f}" y="{o["y"]:.1f}" width="{o["w"]:.1f}" '
                    f'height="{o["h"]:.1f}" fill="{o["fill"]}"{stroke}/>'
                )
            elif kind == "line":
                dash = ' stroke-dasharray="4 3"' if o["dash"] else ""
                parts.append(
                    f'<line x1="{o["x1"]:.1f}" y1="{o["y1"]:.1f}" x2="{o["x2"]:.1f}" '
                    f'y2="{o["y2"]:.1f}" stroke="{o["color"]}" '
                    f'stroke-width="{o["width"]}"{dash}/>'
                )
            elif kind == "circle":
                parts.append(
                    f'<circle cx="{o["cx"]:.1f}" cy="{o["cy"]:.1f}" r="{o["r"]}" '
                    f'fill="{o["fill"]}"/>'
                )
            else:
                parts.append(
                    f'<text x="{o["x"]:.1f}" y="{o["y"]:.1f}" font-size="{o["size"]}" '
                    f'text-anchor="{o["anchor"]}" dominant-baseline="central" '
                    f'fill="{o["color"]}">{html.escape(o["text"])}</text>'
                )
        parts.append("</svg>")
        return "\n".join(parts)

    def png(self, scale: int = 2) -> bytes:
        image = Image.new("RGB", (self.width * scale, self.height * scale), "white")
        draw = ImageDraw.Draw(image)
        fonts: dict[int, Any] = {}
        for kind, o in self.ops:
            if kind == "rect":
                box = [
                    o["x"] * scale,
                    o["y"] * scale,
                    (o["x"] + o["w"]) * scale,
                    (o["y"] + o["h"]) * scale,
                ]
                draw.rectangle(box, fill=o["fill"], outline=o["stroke"])
            elif kind == "line":
                points = [(o["x1"] * scale, o["y1"] * scale), (o["x2"] * scale, o["y2"] * scale)]
                width = max(1, round(o["width"] * scale))
                if o["dash"]:
                    _dashed(draw, points, o["color"], width, 4 * scale, 3 * scale)
                else:
                    draw.line(points, fill=o["color"], width=width)
            elif kind == "circle":
                r = o["r"] * scale
                draw.ellipse(
                    [
                        o["cx"] * scale - r,
                        o["cy"] * scale - r,
                        o["cx"] * scale + r,
                        o["cy"] * scale + r,
                    ],
                    fill=o["fill"],
                )
            else:
                size = round(o["size"] * scale)
                font = fonts.get(size) or fonts.setdefault(size, ImageFont.load_default(size=size))
                draw.text(
                    (o["x"] * scale, o["y"] * scale),
                    o["text"].translate(_PNG_TEXT),
                    fill=o["color"],
                    font=font,
                    anchor=_ANCHOR[o["anchor"]],
                )
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
        return buffer.getvalue()


def _dashed(
    draw: ImageDraw.ImageDraw,
    points: list[tuple[float, float]],
    color: str,
    width: int,
    on: float,
    off: float,
) -> None:
    (x1, y1), (x2, y2) = points
    length = math.hypot(x2 - x1, y2 - y1)
    if length == 0:
        return
    dx, dy = (x2 - x1) / length, (y2 - y1) / length
    position = 0.0
    while position < length:
        end = min(position + on, length)
        draw.line(
            [(x1 + dx * position, y1 + dy * position), (x1 + dx * end, y1 + dy * end)],
            fill=color,
            width=width,
        )
        position = end + off


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering ``[low, high]``."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        high = low + 1.0
    raw = (high - low) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = min((m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw), default=raw)
    start = math.floor(low / step + 1e-9) * step
    ticks = [round(start, 10)]
    while ticks[-1] < high - 1e-12:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


@dataclass(frozen=True)
class Series:
    """One bar per category: means, sds (error bars) and the per-seed values (dots).

    ``lows`` and ``highs``, when given, are the error bars' ends instead (an interval such as a
    95% CI, not symmetric about the mean); ``sds`` is then ignored.
    """

    name: str
    means: Sequence[float]
    sds: Sequence[float] = ()
    values: Sequence[Sequence[float]] = ()
    lows: Sequence[float] = ()
    highs: Sequence[float] = ()

    def interval(self, index: int) -> tuple[float, float] | None:
        """The error bar's ends for category ``index``, or ``None`` when it has none."""
        mean = self.means[index]
        if self.lows or self.highs:
            lo = self.lows[index] if index < len(self.lows) else math.nan
            hi = self.highs[index] if index < len(self.highs) else math.nan
            if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
                return None
            return float(lo), float(hi)
        sd = self.sds[index] if index < len(self.sds) else None
        if not sd or not math.isfinite(sd) or not math.isfinite(mean):
            return None
        return mean - sd, mean + sd


@dataclass(frozen=True)
class RefLine:
    """A horizontal reference line across a bar chart (a floor, an upper reference)."""

    value: float
    label: str
    color: str = "#666"


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}".rstrip("0").rstrip(".")
    return f"{value:.3g}"


def _legend_rows(names: Sequence[str], left: float, right_edge: float) -> list[list[int]]:
    """Legend entries wrapped into rows that fit between ``left`` and ``right_edge``."""
    rows: list[list[int]] = [[]]
    x = left
    for k, name in enumerate(names):
        w = _label_width(name, 10) + 24
        if rows[-1] and x + w > right_edge:
            rows.append([])
            x = left
        rows[-1].append(k)
        x += w
    return rows


def _label_width(text: str, size: float) -> float:
    """A generous estimate of a label's width in pixels (Helvetica-like fonts)."""
    return 0.62 * size * len(text)


def bar_chart(
    title: str,
    categories: Sequence[str],
    series: Sequence[Series],
    *,
    y_label: str = "",
    width: int | None = None,
    height: int = 300,
    bounds: tuple[float | None, float | None] = (None, None),
    lines: Sequence[RefLine] = (),
) -> Canvas:
    """Grouped bars with error bars (+-1 sd or a given interval) and seed dots; NaN bars are
    marked ``n/a``; ``lines`` draws dashed horizontal reference lines with their labels.

    ``bounds`` clips error bars to the metric's range (e.g. ``(0, 1)`` for Dice).
    """

    def clip(v: float) -> float:
        lo, hi = bounds
        v = max(v, lo) if lo is not None else v
        return min(v, hi) if hi is not None else v

    n_cat, n_ser = len(categories), max(len(series), 1)
    group = max(84, 26 * n_ser + 30, max((_label_width(c, 11) + 12 for c in categories), default=0))
    left, right, bottom = 58, 16, 44
    width = width or round(
        max(left + right + group * max(n_cat, 1), left + right + _label_width(title, 14))
    )
    group = (width - left - right) / max(n_cat, 1)  # the categories share the width
    legend = n_ser > 1
    legend_rows = _legend_rows([s.name for s in series], left, width - right) if legend else []
    top = 34 + 16 * len(legend_rows) + (6 if legend else 0) + (14 if y_label else 0)
    height = max(height, top + bottom + 140)
    canvas = Canvas(width, height)
    canvas.text(left, 15, title, 14, "start", "#111")
    if y_label:
        canvas.text(8, top - 12, y_label, 10, "start", "#555")
    finite: list[float] = []
    for s in series:
        for c in range(len(s.means)):
            span = s.interval(c)
            finite += [clip(v) for v in span] if span else []
            finite.append(s.means[c])
    finite += [v for s in series for vs in s.values for v in vs]
    finite += [line.value for line in lines]
    finite = [v for v in finite if v is not None and math.isfinite(v)]
    low = min([0.0, *finite])
    high = max([*finite, low + 1e-9]) if finite else 1.0
    ticks = nice_ticks(low, high)
    y0, y1 = ticks[0], ticks[-1]
    plot_h = height - top - bottom

    def ypos(v: float) -> float:
        return top + plot_h * (1 - (v - y0) / (y1 - y0 or 1))

    for t in ticks:
        canvas.line(left, ypos(t), width - right, ypos(t), "#e3e3e3")
        canvas.text(left - 6, ypos(t), _fmt(t), 10, "end", "#555")
    canvas.line(
        left,
        ypos(0.0 if y0 <= 0 <= y1 else y0),
        width - right,
        ypos(0.0 if y0 <= 0 <= y1 else y0),
        "#888",
    )
    bar_w = min((group - 24) / n_ser, 72.0)
    for c, name in enumerate(categories):
        gx = left + c * group + (group - bar_w * n_ser) / 2
        for s_index, s in enumerate(series):
            color = PALETTE[s_index % len(PALETTE)] if n_ser > 1 else PALETTE[c % len(PALETTE)]
            x = gx + s_index * bar_w
            mean = s.means[c] if c < len(s.means) else math.nan
            if mean is None or not math.isfinite(mean):
                canvas.text(x + bar_w / 2, ypos(y0) - 8, "n/a", 9, "middle", "#888")
                continue
            base = ypos(max(y0, min(0.0, y1)))
            top_y = ypos(mean)
            canvas.rect(x + 2, min(base, top_y), bar_w - 4, abs(base - top_y), color)
            span = s.interval(c)
            if span is not None:
                cx = x + bar_w / 2
                lo, hi = clip(span[0]), clip(span[1])
                canvas.line(cx, ypos(lo), cx, ypos(hi), "#222", 1.4)
                for yy in (lo, hi):
                    canvas.line(cx - 5, ypos(yy), cx + 5, ypos(yy), "#222", 1.4)
            seeds = s.values[c] if c < len(s.values) else []
            for k, v in enumerate(seeds):
                if v is not None and math.isfinite(v):
                    offset = (k - (len(seeds) - 1) / 2) * 5
                    canvas.circle(x + bar_w / 2 + offset, ypos(v), 2.3, "#111")
        canvas.text(left + c * group + group / 2, height - bottom + 14, name, 11, "middle")
    for line in lines:
        if line.value is None or not math.isfinite(line.value):
            continue
        y = ypos(line.value)
        canvas.line(left, y, width - right, y, line.color, 1.4, dash=True)
        canvas.text(width - right - 2, y - 7, line.label, 10, "end", line.color)
    for r, row in enumerate(legend_rows):
        lx, ly = left, 32 + 16 * r
        for s_index in row:
            canvas.rect(lx, ly - 5, 10, 10, PALETTE[s_index % len(PALETTE)])
            canvas.text(lx + 14, ly, series[s_index].name, 10, "start", "#333")
            lx += _label_width(series[s_index].name, 10) + 24
    return canvas


def forest_plot(
    title: str,
    labels: Sequence[str],
    diffs: Sequence[float],
    lows: Sequence[float],
    highs: Sequence[float],
    *,
    x_label: str = "",
    width: int = 560,
    groups: Sequence[str] = (),
    notes: Sequence[str] = (),
    signed_colors: bool = True,
) -> Canvas:
    """Paired differences (points) with confidence intervals (whiskers) and a zero line.

    ``groups`` (one per row) inserts a heading row wherever the group changes; ``notes`` (one
    per row) are written in a column right of the plot (e.g. a p value). With
    ``signed_colors`` an interval above zero is green and one below is red; otherwise every
    row is blue.
    """
    row_h, top = 26, 44
    left = max(130, 16 + _label_width(max(labels, key=len, default=""), 11))
    note_w = _label_width(max(notes, key=len, default=""), 10) + 16 if notes else 0
    right = 30 + note_w
    width = max(width, round(left + right + 300))
    rows: list[tuple[str, int]] = []  # ("group", label index) or ("row", index)
    for i in range(len(labels)):
        if groups and i < len(groups) and (i == 0 or groups[i] != groups[i - 1]):
            rows.append(("group", i))
        rows.append(("row", i))
    height = top + row_h * max(len(rows), 1) + 40
    canvas = Canvas(width, height)
    canvas.text(12, 15, title, 14, "start", "#111")
    values = [v for v in (*diffs, *lows, *highs) if v is not None and math.isfinite(v)]
    span = max([abs(v) for v in values] + [0.01])
    ticks = nice_ticks(-span, span, 6)
    x0, x1 = ticks[0], ticks[-1]

    def xpos(v: float) -> float:
        return left + (width - left - right) * (v - x0) / (x1 - x0 or 1)

    bottom_y = top + row_h * len(rows)
    for t in ticks:
        canvas.line(xpos(t), top - 6, xpos(t), bottom_y, "#eee")
        canvas.text(xpos(t), bottom_y + 12, _fmt(t), 10, "middle", "#555")
    canvas.line(xpos(0), top - 6, xpos(0), bottom_y, "#888", 1.2, dash=True)
    if x_label:
        canvas.text((left + width - right) / 2, bottom_y + 30, x_label, 11, "middle", "#555")
    for r, (kind, i) in enumerate(rows):
        y = top + row_h * r + row_h / 2
        if kind == "group":
            if r:
                canvas.line(12, y - row_h / 2, width - 12, y - row_h / 2, "#ccc")
            canvas.text(12, y, groups[i], 12, "start", "#111")
            continue
        canvas.text(left - 10, y, labels[i], 11, "end")
        if notes and i < len(notes):
            canvas.text(width - note_w, y, notes[i], 10, "start", "#333")
        d, lo, hi = diffs[i], lows[i], highs[i]
        if d is None or not math.isfinite(d):
            canvas.text(xpos(0) + 6, y, "n/a", 10, "start", "#888")
            continue
        finite = lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi)
        color = "#4c72b0"
        if signed_colors:
            color = "#2a7a3b" if finite and lo > 0 else "#b23a3a" if finite and hi < 0 else "#555"
        if finite:
            canvas.line(xpos(lo), y, xpos(hi), y, color, 2)
            for xx in (lo, hi):
                canvas.line(xpos(xx), y - 5, xpos(xx), y + 5, color, 2)
        canvas.circle(xpos(d), y, 4.5, color)
    return canvas


def _to_uint8(crop: np.ndarray, low: float, high: float) -> np.ndarray:
    scaled = (np.asarray(crop, dtype=np.float64) - low) / max(high - low, 1e-6)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def image_grid(
    rows: Sequence[Sequence[np.ndarray]],
    column_titles: Sequence[str],
    row_titles: Sequence[str] = (),
    *,
    cell: int = 112,
    mask_columns: Sequence[int] = (),
) -> bytes:
    """A PNG of image crops: one row per example, one column per view.

    Each row's crops share one display window, the 5th-95th percentile of the row's image
    crops without their clipped extremes (air, bone at the window's ends); columns in
    ``mask_columns`` show 0..1 masks. 3D crops show their
    middle slice along the last axis.
    """
    font = ImageFont.load_default(size=13)
    small = ImageFont.load_default(size=11)
    head, side, gap = 26, 150 if row_titles else 8, 6
    width = side + len(column_titles) * (cell + gap)
    height = head + len(rows) * (cell + gap) + 4
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for j, title in enumerate(column_titles):
        draw.text(
            (side + j * (cell + gap) + cell / 2, head / 2),
            title,
            fill="#111",
            font=font,
            anchor="mm",
        )
    for i, row in enumerate(rows):
        crops = [c[..., c.shape[-1] // 2] if c.ndim == 3 else c for c in row]
        shown = [c for j, c in enumerate(crops) if j not in mask_columns]
        values = np.concatenate([np.ravel(c) for c in shown]) if shown else np.zeros(1)
        inner = values[(values > values.min()) & (values < values.max())]  # drop clipped air
        low, high = np.percentile(inner if inner.size > 16 else values, [5, 95])
        y = head + i * (cell + gap)
        if i < len(row_titles):
            for k, line in enumerate(str(row_titles[i]).split("\n")[:4]):
                draw.text((6, y + 10 + 15 * k), line, fill="#333", font=small)
        for j, crop in enumerate(crops):
            lo, hi = (0.0, 1.0) if j in mask_columns else (float(low), float(high))
            tile = Image.fromarray(_to_uint8(crop, lo, hi).T)  # x to the right, y down
            tile = tile.resize((cell, cell), Image.NEAREST)
            image.paste(tile.convert("RGB"), (side + j * (cell + gap), y))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


__all__ = ["Canvas", "RefLine", "Series", "bar_chart", "forest_plot", "image_grid", "nice_ticks"]
