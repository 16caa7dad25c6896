"""The evaluation report: one self-contained HTML file plus its figures as PNG files.

It reads ``results.json`` of the protocol (format ``synthlesion-evaluation/2``, written by
:mod:`synthlesion.evaluation.summary`). Charts are inline SVG (and the same charts as PNG under
``figures/``); image grids are PNG, embedded as base64 and saved under ``figures/``; nothing is
fetched from elsewhere. Sections: the verdict in a few sentences; the set-up; per labelled
budget a table of the arms (Dice with its hierarchical-bootstrap interval, what the batches
held, lesion-wise sensitivity overall and by size, false positives), the threshold floor and
the upper reference; the paired comparisons (forest plot grouped by budget, Holm-corrected
p); the convergence check; realism (repaint, KID, the real-vs-synthetic classifier, texture,
adherence and memorisation, each against its real-vs-real floor) with example grids; the
quality gate; the data and guard records of every cell; the dataset card. A missing figure
reads "–".

This module holds the page: its style, the section order, the verdict, the example grids, the
dataset card (:func:`markdown_to_html`) and :func:`write_report`. The sections are built in
:mod:`synthlesion.evaluation.report_sections` and :mod:`synthlesion.evaluation.report_realism`;
the number and HTML formatting and the reading of ``results.json`` are in
:mod:`synthlesion.evaluation.report_format`.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from synthlesion.evaluation.charts import Canvas, image_grid
from synthlesion.evaluation.report_format import (
    _arms_of,
    _b64,
    _budget_title,
    _budgets,
    _ci,
    _comparisons,
    _dict,
    _fmt,
    _g,
    _generators,
    _get,
    _kept_totals,
    _kinds,
    _num,
    _ok,
    _signed,
    _steps,
)
from synthlesion.evaluation.report_realism import _realism_charts, _realism_tables
from synthlesion.evaluation.report_sections import (
    _arms_section,
    _comparisons_section,
    _convergence_section,
    _data_section,
    _dice_chart,
    _forest,
    _gate_section,
    _sensitivity_chart,
    _setup,
)
from synthlesion.storage import atomic_write_bytes, atomic_write_text

REPORT_FILE = "report.html"
FIGURES_DIR = "figures"

_CSS = """
body{font-family:Helvetica,Arial,sans-serif;margin:0;color:#222;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px;background:#fff}
h1{font-size:26px;margin:8px 0 4px}h2{font-size:20px;margin:34px 0 10px;border-bottom:1px solid
#ddd;padding-bottom:4px}h3{font-size:16px;margin:20px 0 8px}
.lead{font-size:15px;line-height:1.5;background:#eef4fb;border-left:4px solid #4c72b0;
padding:10px 14px;margin:14px 0}
table{border-collapse:collapse;margin:8px 0 14px;font-size:12px}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:right;white-space:nowrap}th{background:#f0f2f5}
td:first-child,th:first-child{text-align:left}
.figs{display:flex;flex-wrap:wrap;gap:14px}.figs figure{margin:0}
figcaption{font-size:12px;color:#555;max-width:560px}
.ok{color:#2a7a3b;font-weight:bold}.bad{color:#b23a3a;font-weight:bold}
code{background:#f0f2f5;padding:0 3px;font-size:12px}.card{font-size:13px}
.note{font-size:12px;color:#555}.wide{overflow-x:auto;max-width:100%}
tr.ref td{color:#555;font-style:italic;background:#fafafa}
details{font-size:12px;margin:6px 0}summary{cursor:pointer;color:#4c72b0}
"""


def markdown_to_html(text: str) -> str:
    """The Markdown subset of the dataset card: headings, tables, lists, paragraphs, code."""

    def inline(s: str) -> str:
        s = html.escape(s)
        s = re.sub(r"`([^`]*)`", r"<code>\1</code>", s)
        return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", s)

    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if not line:
            i += 1
            continue
        heading = re.match(r"(#{1,4}) (.*)", line)
        if heading:
            level = min(len(heading.group(1)) + 2, 6)
            out.append(f"<h{level}>{inline(heading.group(2))}</h{level}>")
            i += 1
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                    rows.append(cells)
                i += 1
            body = "".join(
                "<tr>"
                + "".join(
                    f"<{'th' if r == 0 else 'td'}>{inline(c)}</{'th' if r == 0 else 'td'}>"
                    for c in row
                )
                + "</tr>"
                for r, row in enumerate(rows)
            )
            out.append(f"<table>{body}</table>")
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{inline(lines[i][2:])}</li>")
                i += 1
            out.append(f"<ul>{''.join(items)}</ul>")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not lines[i].startswith(("#", "|", "- ")):
                para.append(lines[i].strip())
                i += 1
            out.append(f"<p>{inline(' '.join(para))}</p>")
    return "\n".join(out)


def verdict(results: Mapping[str, Any]) -> list[str]:
    """Plain sentences: each diffusion arm against the reference and the baselines per budget,
    and the caveats a reader must know (convergence, the threshold floor, the gate)."""
    kinds = _kinds(results)
    lines = []
    diffusion = [name for name, kind in kinds.items() if kind == "diffusion"]
    if not diffusion:
        lines.append("No diffusion arm in this run.")
    for c in _comparisons(results):
        if c["arm"] not in diffusion or not _ok(c.get("mean_diff")):
            continue
        diff, low, high = _num(c["mean_diff"]), _num(c.get("ci_low")), _num(c.get("ci_high"))
        sure = _ok(low) and _ok(high) and (low > 0 or high < 0)
        word = "higher than" if diff > 0 else "lower than"
        size = f"{abs(diff):.3f} {word}" if diff else "the same as"
        lines.append(
            f"Budget {c['budget']}: {c['arm']} scores a mean lesion Dice {size} "
            f"{c['against']} (paired difference {diff:+.3f}, 95% CI {_ci(low, high, 3, True)}, "
            f"Holm-corrected p = {_g(c.get('p_holm'))}, {_fmt(c.get('pairs'))} split×case "
            "pairs) — "
            + (
                "a difference the interval supports."
                if sure
                else "the interval includes zero: not a demonstrated difference."
            )
        )
    convergence = _dict(results.get("convergence"))
    if not convergence:
        lines.append("No convergence check in this run: the arms may be under-trained.")
    elif results.get("real_converged") is False:
        moved = ", ".join(
            f"{_signed(_get(c, 'test_dice_change_when_doubled'))} at {_budget_title(b)}"
            for b, c in convergence.items()
        )
        lines.append(
            f"The real arm did not converge in {_steps(results.get('budget_steps'))} steps "
            f"(doubling them changed its test Dice by {moved}, or its validation Dice was still "
            "moving): these are figures of under-trained segmenters."
        )
    floors = _dict(results.get("threshold_floor"))
    for budget, floor in floors.items():
        level = _num(_get(floor, "dice_mean"))
        below = [
            name
            for name, a in _arms_of(results, budget)
            if _ok(a.get("dice_mean")) and _num(a["dice_mean"]) < level
        ]
        if _ok(level) and below:
            lines.append(
                f"Budget {budget}: an intensity threshold scores Dice {level:.3f}; "
                f"{', '.join(below)} score{'s' if len(below) == 1 else ''} below it."
            )
    kept = _kept_totals(results)
    for generator, share in _dict(_get(results, "gate", "rejected_share")).items():
        if _num(share) >= 1.0:
            lines.append(
                f"The gate rejected every {generator} case: the arms using {generator} lesions "
                "trained without any of them."
            )
        elif kept.get(generator) == 0:
            lines.append(
                f"No {generator} case was kept for training (the gate rejected "
                f"{_fmt(_num(share) * 100, 0)}% of them): the arms using {generator} lesions "
                "trained without any of them."
            )
    return lines


def write_report(
    out: Path,
    results: Mapping[str, Any],
    examples: Mapping[str, Sequence[Mapping[str, Any]]],
    card: str,
) -> Path:
    """Write ``report.html`` and ``figures/*.png`` into ``out``; returns the report path.

    Args:
        out: The run folder.
        results: The results (format ``synthlesion-evaluation/2``).
        examples: Generator -> image rows (``context``, ``mask``, ``synthetic``, ``nearest``
            crops, ``case_id``, ``nearest_case``, ``ncc``); ``{}`` when resumed.
        card: The dataset card (Markdown).
    """
    out = Path(out)
    figures = out / FIGURES_DIR
    generators = _generators(results)

    def figure_html(charts: Sequence[tuple[str, str, Canvas | None]]) -> str:
        shown = []
        for key, caption, canvas in charts:
            if canvas is None:
                continue
            atomic_write_bytes(figures / f"{key}.png", canvas.png())
            shown.append(
                f"<figure>{canvas.svg(caption)}<figcaption>{html.escape(caption)} "
                f"(<code>{FIGURES_DIR}/{key}.png</code>)</figcaption></figure>"
            )
        return f"<div class='figs'>{''.join(shown)}</div>" if shown else ""

    arm_charts: list[tuple[str, str, Canvas | None]] = [
        (
            "dice",
            "Lesion Dice per arm and budget (mean; whiskers: 95% hierarchical-bootstrap CI "
            "over splits, seeds and cases); dashed: the upper reference",
            _dice_chart(results),
        )
    ]
    arm_charts += [
        (
            f"sensitivity_by_size_{budget}",
            f"Lesion-wise sensitivity by lesion size at {_budget_title(budget)}",
            _sensitivity_chart(results, budget),
        )
        for budget in _budgets(results)
        if re.fullmatch(r"[\w.-]+", budget)
    ]
    convergence_html, convergence_chart = _convergence_section(results)
    grids = []
    for kind, rows_ in (examples or {}).items():
        if not rows_ or not re.fullmatch(r"[\w.-]+", str(kind)):
            continue
        png = image_grid(
            [[r["context"], r["mask"], r["synthetic"], r["nearest"]] for r in rows_],
            ["context (source)", "target mask", "synthetic", "nearest real"],
            [
                f"{r.get('case_id')}\nnearest: {r.get('nearest_case')}\nNCC {_g(r.get('ncc'), 2)}"
                for r in rows_
            ],
            mask_columns=(1,),
        )
        atomic_write_bytes(figures / f"grid_{kind}.png", png)
        grids.append(
            f'<figure><img alt="{html.escape(str(kind))} lesion examples" '
            f'src="data:image/png;base64,{_b64(png)}"><figcaption>{html.escape(str(kind))}: '
            "the source scan before painting, the target mask, the synthetic lesion, and the "
            "real training lesion whose crop correlates best with it (normalised correlation, "
            f"NCC) (<code>{FIGURES_DIR}/grid_{html.escape(str(kind))}.png</code>)"
            "</figcaption></figure>"
        )
    realism = results.get("realism")
    if isinstance(realism, Mapping) and realism:
        realism_html = (
            _realism_tables(results, generators)
            + figure_html(_realism_charts(results, generators))
            + (
                f"<h3>Examples</h3><div class='figs'>{''.join(grids)}</div>"
                if grids
                else "<p class='note'>No example images (no synthetic lesion was measured).</p>"
            )
        )
    else:
        realism_html = "<p>Realism was not measured in this run.</p>" + (
            f"<div class='figs'>{''.join(grids)}</div>" if grids else ""
        )
    sha = results.get("config_sha256")
    results_path = Path(str(results.get("out_dir", "."))) / "results.json"
    body = [
        "<h1>synthlesion downstream evaluation</h1><p class='note'>results "
        f"<code>{html.escape(str(results_path))}</code> · format "
        f"<code>{_fmt(results.get('format'))}</code>"
        + (f" · config sha256 <code>{html.escape(str(sha)[:16])}</code>" if sha else "")
        + f" · synthlesion {_fmt(results.get('synthlesion_version'))} · "
        f"{_fmt(_num(results.get('seconds')), 0)} s</p>",
        "<div class='lead'>" + "<br>".join(html.escape(v) for v in verdict(results)) + "</div>",
        _setup(results),
        "<h2>Arms per labelled budget</h2>",
        _arms_section(results),
        figure_html(arm_charts),
        "<h2>Paired comparisons</h2>",
        figure_html(
            [
                (
                    "paired_dice",
                    "Paired per-case Dice difference per budget (mean and 95% "
                    "hierarchical-bootstrap CI; right: Holm-corrected p)",
                    _forest(results),
                )
            ]
        ),
        _comparisons_section(results),
        "<h2 id='convergence-check'>Convergence</h2>",
        convergence_html,
        figure_html(
            [
                (
                    "convergence",
                    "Real arm: paired test Dice change when its steps are doubled (95% CI)",
                    convergence_chart,
                )
            ]
        ),
        "<h2 id='realism'>Realism of the synthetic lesions</h2>",
        realism_html,
        "<h2>Quality gate</h2>",
        _gate_section(results, generators),
        "<h2 id='data'>Data and guards</h2>",
        _data_section(results),
        "<h2>Dataset card</h2>",
        f"<div class='card'>{markdown_to_html(card or '')}</div>",
    ]
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>synthlesion "
        f"evaluation</title><style>{_CSS}</style></head><body><main>{''.join(body)}"
        "</main></body></html>\n"
    )
    path = out / REPORT_FILE
    atomic_write_text(path, page)
    return path


__all__ = ["REPORT_FILE", "markdown_to_html", "verdict", "write_report"]
