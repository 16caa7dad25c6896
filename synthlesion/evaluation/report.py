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
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from synthlesion.evaluation.charts import (
    Canvas,
    RefLine,
    Series,
    bar_chart,
    forest_plot,
    image_grid,
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


GENERATOR_ORDER = ("copy_paste", "handcrafted", "diffusion")


def _num(value: Any) -> float:
    """``value`` as a float; NaN for ``None``, booleans, strings and anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def _ok(value: Any) -> bool:
    return math.isfinite(_num(value))


def _get(mapping: Any, *keys: Any) -> Any:
    """``mapping[k1][k2]...``, or ``None`` where a level is missing or not a mapping."""
    for key in keys:
        if not isinstance(mapping, Mapping):
            return None
        mapping = mapping.get(key)
    return mapping


def _dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _fmt(value: Any, digits: int = 3) -> str:
    """A number with ``digits`` decimals, other values escaped; missing reads "–"."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _g(value: Any, digits: int = 3) -> str:
    """A number with ``digits`` significant digits (p values, small distances)."""
    return f"{_num(value):.{digits}g}" if _ok(value) else "–"


def _signed(value: Any, digits: int = 3) -> str:
    return f"{_num(value):+.{digits}f}" if _ok(value) else "–"


def _join(values: Any, sep: str) -> str:
    """The items of a list joined by ``sep`` (each as :func:`_fmt` writes it)."""
    if not isinstance(values, (list, tuple)) or not values:
        return _fmt(values)
    return sep.join(_fmt(v) for v in values)


def _ci(low: Any, high: Any, digits: int = 3, signed: bool = False) -> str:
    if not (_ok(low) and _ok(high)):
        return "–"
    form = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f"[{form.format(_num(low))}, {form.format(_num(high))}]"


def _pair(value: Any, index: int) -> Any:
    return value[index] if isinstance(value, (list, tuple)) and len(value) > index else None


def _mean_ci(mean: Any, ci: Any, digits: int = 3) -> str:
    if not _ok(mean):
        return "–"
    interval = _ci(_pair(ci, 0), _pair(ci, 1), digits)
    point = f"{_num(mean):.{digits}f}"
    return f"{point} {interval}" if interval != "–" else point


def _pm(stat: Mapping[str, Any] | None, digits: int = 3) -> str:
    """``mean ± sd`` of a ``{"mean", "sd"}`` record."""
    mean, sd = _get(stat, "mean"), _get(stat, "sd")
    if not _ok(mean):
        return "–"
    return (
        f"{_num(mean):.{digits}f} ± {_num(sd):.{digits}f}"
        if _ok(sd)
        else f"{_num(mean):.{digits}f}"
    )


def _yes_no(value: Any, good: bool = True) -> str:
    """yes/no coloured: green where the answer is the good one."""
    if value is None:
        return "–"
    cls = "ok" if bool(value) == good else "bad"
    return f"<span class='{cls}'>{'yes' if value else 'no'}</span>"


def _table(
    table_id: str,
    head: Sequence[str],
    rows: Sequence[Sequence[Any]],
    row_classes: Sequence[str] = (),
) -> str:
    """A table; cells are HTML (already escaped) or ``(html, class)``."""

    def cell(value: Any) -> str:
        if isinstance(value, tuple):
            return f"<td class='{value[1]}'>{value[0]}</td>" if value[1] else f"<td>{value[0]}</td>"
        return f"<td>{value}</td>"

    body = "".join(
        (f"<tr class='{row_classes[i]}'>" if i < len(row_classes) and row_classes[i] else "<tr>")
        + "".join(cell(c) for c in row)
        + "</tr>"
        for i, row in enumerate(rows)
    )
    header = "".join(f"<th>{h}</th>" for h in head)
    return f"<div class='wide'><table id='{table_id}'><tr>{header}</tr>{body}</table></div>"


def _split_key(key: str) -> tuple[str, str]:
    """``"real@b4"`` -> ``("real", "b4")``."""
    name, _, budget = key.rpartition("@")
    return (name, budget) if name else (key, "")


def _budgets(results: Mapping[str, Any]) -> list[str]:
    budgets = [str(b) for b in results.get("budgets") or []]
    for key in _dict(results.get("arms")):
        budget = _split_key(key)[1]
        if budget and budget not in budgets:
            budgets.append(budget)
    return budgets


def _arms_of(results: Mapping[str, Any], budget: str) -> list[tuple[str, Mapping[str, Any]]]:
    """``(arm name, figures)`` of one budget, in the results' order."""
    return [
        (_split_key(key)[0], _dict(figures))
        for key, figures in _dict(results.get("arms")).items()
        if _split_key(key)[1] == budget
    ]


def _arm_names(results: Mapping[str, Any]) -> list[str]:
    names: list[str] = []
    for key in _dict(results.get("arms")):
        name = _split_key(key)[0]
        if name not in names:
            names.append(name)
    return names


def _kinds(results: Mapping[str, Any]) -> dict[str, str]:
    """Arm name -> kind."""
    return {
        _split_key(key)[0]: str(_dict(figures).get("kind"))
        for key, figures in _dict(results.get("arms")).items()
    }


def _budget_title(budget: str) -> str:
    """``"b4"`` -> ``"budget 4 (labelled lesion scans per split)"``."""
    if budget == "all":
        return "every lesion scan labelled"
    count = budget[1:] if budget.startswith("b") else budget
    return f"budget {count} (labelled lesion scan{'' if count == '1' else 's'} per split)"


def _comparisons(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The comparisons as rows with their key's budget, arm and against filled in."""
    rows = []
    for key, c in _dict(results.get("comparisons")).items():
        c = dict(_dict(c))
        if "arm" not in c or "budget" not in c:
            left, _, against = key.partition("_vs_")
            name, budget = _split_key(left)
            c.setdefault("arm", name)
            c.setdefault("budget", budget)
            c.setdefault("against", against)
        c["budget"] = str(c["budget"])
        c["key"] = key
        rows.append(c)
    return rows


def _generators(results: Mapping[str, Any]) -> list[str]:
    """Every generator named by the arms, the realism record or the gate, in a fixed order."""
    found = {k for k in _kinds(results).values() if k in GENERATOR_ORDER}
    realism = _dict(results.get("realism"))
    for part in ("kid", "classifier_auc", "texture", "repaint", "fidelity"):
        found |= set(_dict(realism.get(part)))
    found |= set(_dict(realism.get("lesions"))) - {"held_out", "train"}
    found |= set(_dict(_get(results, "gate", "rejected_share")))
    found.discard("mean_fill")
    return [g for g in GENERATOR_ORDER if g in found] + sorted(found - set(GENERATOR_ORDER))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


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
            f"The real arm did not converge in {_fmt(results.get('budget_steps'))} steps "
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


def _kept_totals(results: Mapping[str, Any]) -> dict[str, int]:
    """Generator -> synthetic cases built and kept for training, summed over the cells."""
    totals: dict[str, int] = {}
    for cell in results.get("cells") or []:
        for generator, count in _dict(_get(cell, "data", "train_synthetic_kept")).items():
            if _ok(count):
                totals[generator] = totals.get(generator, 0) + int(count)
    return totals


def _built_totals(results: Mapping[str, Any]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for cell in results.get("cells") or []:
        for generator, count in _dict(_get(cell, "data", "train_synthetic")).items():
            if _ok(count):
                totals[generator] = totals.get(generator, 0) + int(count)
    return totals


def _setup(results: Mapping[str, Any]) -> str:
    seg = _dict(results.get("segmenter"))
    cells = [c for c in results.get("cells") or [] if isinstance(c, Mapping)]
    data = [_dict(c.get("data")) for c in cells if not c.get("reference")]
    test = sorted({d.get("test_cases") for d in data if _ok(d.get("test_cases"))})
    lesion = sorted({d.get("test_lesion_cases") for d in data if _ok(d.get("test_lesion_cases"))})
    modality = sorted({str(d["modality"]) for d in data if d.get("modality")})
    splits = results.get("splits") or []
    seeds = results.get("seeds") or []
    budgets = _budgets(results)
    spread = results.get("positive_patch_share_spread")

    def counts(values: Sequence[Any]) -> str:
        if not values:
            return "–"
        return str(values[0]) if values[0] == values[-1] else f"{values[0]}–{values[-1]}"

    return (
        "<h2>Set-up</h2><p>"
        f"{len(splits)} patient split{'s' if len(splits) != 1 else ''} × "
        f"{len(budgets)} labelled budget{'s' if len(budgets) != 1 else ''} "
        f"({', '.join(html.escape(b) for b in budgets) or '–'} lesion scans of each split's "
        f"train side) × {len(seeds)} seed{'s' if len(seeds) != 1 else ''} "
        f"({_join(seeds, ', ')}); every cell is scored on its real "
        f"<b>{html.escape(str(results.get('test_split', 'test')))}</b> side "
        f"({counts(test)} scans, {counts(lesion)} with a lesion; "
        f"{html.escape(', '.join(modality) or '–')}), read only through the dataset package's "
        "evaluation guard. Every arm trains MONAI "
        f"<code>{_fmt(seg.get('network'))}</code> (channels "
        f"{_join(seg.get('channels'), ', ')}, patches {_join(seg.get('patch_size'), '×')}) for "
        f"{_fmt(results.get('budget_steps'))} steps of {_fmt(seg.get('batch_size'))}, with "
        "the same share of patches holding a lesion voxel (target "
        f"{_fmt(seg.get('foreground_share'), 2)}; spread across the arms "
        f"{_g(spread, 2)}). Means pool the splits, seeds and test cases; intervals are 95% "
        "hierarchical-bootstrap intervals (splits, then seeds and cases); paired comparisons "
        "use a Wilcoxon signed-rank test with Holm's correction over every comparison of the "
        f"run. {len(cells)} cells in {_fmt(_num(results.get('seconds')), 0)} s.</p>"
    )


def _arm_row(name: str, kind: Any, figures: Mapping[str, Any], bins: Sequence[str]) -> list[str]:
    return [
        html.escape(name),
        _fmt(kind),
        _fmt(figures.get("runs")),
        _mean_ci(figures.get("dice_mean"), figures.get("dice_ci")),
        _fmt(figures.get("positive_patch_share")),
        _fmt(figures.get("lesion_pixel_share"), 4),
        _fmt(_num(figures.get("new_lesion_patches")), 0),
        _fmt(figures.get("sensitivity")),
        *[_fmt(_get(figures, "by_size", b, "sensitivity"), 2) for b in bins],
        _fmt(figures.get("fp_per_case"), 2),
        _fmt(figures.get("hd95_mm"), 1),
    ]


def _arms_section(results: Mapping[str, Any]) -> str:
    bins = [str(b) for b in results.get("size_bins") or []]
    head = [
        "arm",
        "kind",
        "runs",
        "Dice [95% CI]",
        "positive-patch share",
        "lesion-pixel share",
        "new lesion patches",
        "sensitivity",
        *[f"sens. {html.escape(b)}" for b in bins],
        "FP / case",
        "HD95 mm",
    ]
    upper = results.get("upper_reference")
    floors = _dict(results.get("threshold_floor"))
    parts = []
    for budget in _budgets(results):
        rows = [_arm_row(n, a.get("kind"), a, bins) for n, a in _arms_of(results, budget)]
        classes = [""] * len(rows)
        floor = _dict(floors.get(budget))
        if floor:
            rows.append(
                _arm_row(
                    "threshold floor",
                    "intensity rule",
                    {
                        "dice_mean": floor.get("dice_mean"),
                        "dice_ci": floor.get("dice_ci"),
                        "sensitivity": floor.get("sensitivity"),
                        "fp_per_case": floor.get("fp_per_case"),
                    },
                    bins,
                )
            )
            classes.append("ref")
        if isinstance(upper, Mapping):
            rows.append(_arm_row("upper reference", "real, every label", upper, bins))
            classes.append("ref")
        parts.append(
            f"<h3>Budget {html.escape(budget)}: {_budget_title(budget)}</h3>"
            + _table(f"arms-{html.escape(budget)}", head, rows, classes)
        )
    if not parts:
        parts.append("<p>No arm was scored.</p>")
    missing = []
    if not isinstance(upper, Mapping):
        missing.append("no upper reference in this run")
    if not floors:
        missing.append("no threshold floor in this run")
    return (
        "<div id='arms'>"
        + "".join(parts)
        + "</div><p class='note'>Dice: mean lesion Dice over the test scans with a lesion, "
        "pooled over splits, seeds and cases, with its 95% hierarchical-bootstrap interval. "
        "Positive-patch share: the share of training patches holding a lesion voxel (the arms "
        "are trained with the same share); lesion-pixel share: the share of lesion voxels in "
        "them; new lesion patches: patches whose lesion was pasted or painted. Sensitivity per "
        "connected lesion (any overlap detects it), by equivalent diameter; FP / case: "
        "false-positive components per test scan. Threshold floor: an intensity threshold "
        "(|x − organ median| > t inside the organ, t tuned on the train side) — an arm below "
        "it learnt less than a one-line rule. Upper reference: the real arm trained on every "
        "labelled scan of the train side."
        + (f" ({'; '.join(missing)}.)" if missing else "")
        + "</p>"
    )


def _dice_chart(results: Mapping[str, Any]) -> Canvas | None:
    budgets = _budgets(results)
    names = _arm_names(results)
    if not budgets or not names:
        return None
    arms = _dict(results.get("arms"))
    series = []
    for name in names:
        figures = [_dict(arms.get(f"{name}@{b}")) for b in budgets]
        series.append(
            Series(
                name,
                [_num(f.get("dice_mean")) for f in figures],
                lows=[_num(_pair(f.get("dice_ci"), 0)) for f in figures],
                highs=[_num(_pair(f.get("dice_ci"), 1)) for f in figures],
            )
        )
    floors = _dict(results.get("threshold_floor"))
    if floors:
        figures = [_dict(floors.get(b)) for b in budgets]
        series.append(
            Series(
                "threshold floor",
                [_num(f.get("dice_mean")) for f in figures],
                lows=[_num(_pair(f.get("dice_ci"), 0)) for f in figures],
                highs=[_num(_pair(f.get("dice_ci"), 1)) for f in figures],
            )
        )
    upper = _num(_get(results, "upper_reference", "dice_mean"))
    return bar_chart(
        "Lesion Dice per arm and labelled budget",
        [_budget_title(b) for b in budgets],
        series,
        y_label="lesion Dice (higher is better)",
        bounds=(0.0, 1.0),
        lines=[RefLine(upper, f"upper reference {upper:.3f}", "#b23a3a")] if _ok(upper) else [],
    )


def _sensitivity_chart(results: Mapping[str, Any], budget: str) -> Canvas | None:
    bins = [str(b) for b in results.get("size_bins") or []]
    arms = _arms_of(results, budget)
    if not bins or not arms:
        return None
    return bar_chart(
        f"Lesion-wise sensitivity by size, {_budget_title(budget)}",
        [name for name, _ in arms],
        [Series(b, [_num(_get(a, "by_size", b, "sensitivity")) for _, a in arms]) for b in bins],
        y_label="sensitivity (higher is better)",
        bounds=(0.0, 1.0),
    )


def _forest(results: Mapping[str, Any]) -> Canvas | None:
    rows = _comparisons(results)
    if not rows:
        return None
    order = {b: k for k, b in enumerate(_budgets(results))}
    rows.sort(key=lambda c: order.get(c["budget"], len(order)))  # stable: keeps the run's order
    return forest_plot(
        "Paired per-case Dice difference (arm − against)",
        [f"{c['arm']} − {c['against']}" for c in rows],
        [_num(c.get("mean_diff")) for c in rows],
        [_num(c.get("ci_low")) for c in rows],
        [_num(c.get("ci_high")) for c in rows],
        x_label="Δ lesion Dice (95% hierarchical-bootstrap CI)",
        groups=[_budget_title(str(c["budget"])) for c in rows],
        notes=[f"p_holm {_g(c.get('p_holm'))}" for c in rows],
        width=720,
    )


def _comparisons_section(results: Mapping[str, Any]) -> str:
    rows, classes = [], []
    for c in _comparisons(results):
        lo, hi = _num(c.get("ci_low")), _num(c.get("ci_high"))
        cls = "ok" if _ok(lo) and lo > 0 else "bad" if _ok(hi) and hi < 0 else ""
        p_holm = _num(c.get("p_holm"))
        rows.append(
            [
                html.escape(c["budget"]),
                html.escape(str(c["arm"])),
                html.escape(str(c["against"])),
                (_signed(c.get("mean_diff")), cls),
                _ci(lo, hi, 3, True),
                _g(c.get("p_wilcoxon")),
                (_g(p_holm), "ok" if _ok(p_holm) and p_holm < 0.05 else ""),
                f"{_fmt(c.get('wins'))} / {_fmt(c.get('losses'))} / {_fmt(c.get('pairs'))}",
            ]
        )
        classes.append("")
    if not rows:
        return "<p>No comparison in this run.</p>"
    return _table(
        "comparisons",
        [
            "budget",
            "arm",
            "against",
            "mean Δ Dice",
            "95% CI",
            "Wilcoxon p",
            "p_holm",
            "wins / losses / pairs",
        ],
        rows,
        classes,
    ) + (
        "<p class='note'>Per split and test case, each arm's Dice is averaged over the seeds; "
        "Δ = arm − against. Green Δ: the 95% interval lies above zero; red: below. p_holm: "
        "the Wilcoxon signed-rank p with Holm's correction over all comparisons of the run "
        "(green below 0.05). Pairs: split × case pairs; wins and losses count the pairs "
        "where the arm scored higher or lower.</p>"
    )


def _convergence_section(results: Mapping[str, Any]) -> tuple[str, Canvas | None]:
    convergence = _dict(results.get("convergence"))
    verdict_html = (
        f"<p>Real arm converged: {_yes_no(results.get('real_converged'))} (every budget: "
        "doubling the steps changes the test Dice by less than the tolerance, and the "
        "validation Dice is no longer moving).</p>"
    )
    if not convergence:
        return verdict_html + "<p>No convergence check in this run.</p>", None
    rows = []
    for budget, c in convergence.items():
        c = _dict(c)
        val = _dict(c.get("validation"))
        rows.append(
            [
                html.escape(str(budget)),
                f"{_fmt(c.get('steps'))} → {_fmt(c.get('doubled_steps'))}",
                _signed(c.get("test_dice_change_when_doubled")),
                _ci(_pair(c.get("ci"), 0), _pair(c.get("ci"), 1), 3, True),
                _yes_no(c.get("within_tolerance")),
                f"{_fmt(val.get('val_dice_previous'))} → {_fmt(val.get('val_dice_last'))}",
                _fmt(val.get("val_dice_best")),
                _signed(val.get("change")),
                _yes_no(val.get("plateaued")),
            ]
        )
    table = _table(
        "convergence",
        [
            "budget",
            "steps → doubled",
            "Δ test Dice when doubled",
            "95% CI",
            "within tolerance",
            "val Dice (last two checks)",
            "best val Dice",
            "val change",
            "plateaued",
        ],
        rows,
    )
    keys = list(convergence)
    chart = forest_plot(
        "Real arm: test Dice change when doubling the steps",
        [_budget_title(b) for b in keys],
        [_num(_get(convergence, b, "test_dice_change_when_doubled")) for b in keys],
        [_num(_pair(_get(convergence, b, "ci"), 0)) for b in keys],
        [_num(_pair(_get(convergence, b, "ci"), 1)) for b in keys],
        x_label="Δ lesion Dice, doubled − budgeted steps (95% CI)",
        signed_colors=False,
    )
    return (
        verdict_html
        + table
        + "<p class='note'>The real arm trained again with twice the steps on the same "
        "cells; Δ is its paired test Dice change with the hierarchical-bootstrap interval. "
        "The validation figures are the mean over runs of the last two validation checks "
        "(plateaued: they moved less than 0.02 and stay within 0.02 of the best).</p>",
        chart,
    )


def _realism_tables(results: Mapping[str, Any], generators: Sequence[str]) -> str:
    realism = _dict(results.get("realism"))
    lesions = _dict(realism.get("lesions"))
    cells = realism.get("cells") or ([realism["cell"]] if realism.get("cell") else [])
    intro = (
        f"<p>Measured in cell{'s' if len(cells) != 1 else ''} "
        f"{html.escape(', '.join(str(c) for c in cells)) or '–'} (the largest budget), "
        f"against {_fmt(_num(lesions.get('held_out')), 0)} held-out real lesions (val and "
        f"test) the generators never saw; {_fmt(_num(lesions.get('train')), 0)} labelled "
        "train lesions give the real-vs-real floors. Figures are means over those cells.</p>"
    )
    repaint = _dict(realism.get("repaint"))
    rows, classes = [], []
    for name in ["mean_fill", *generators]:
        r = _dict(repaint.get(name))
        rows.append(
            [
                "mean fill (baseline)" if name == "mean_fill" else html.escape(name),
                _fmt(_num(r.get("lesions")), 0),
                _fmt(r.get("mse"), 4),
                _fmt(r.get("psnr"), 2),
                _fmt(r.get("ssim"), 3),
            ]
        )
        classes.append("ref" if name == "mean_fill" else "")
    repaint_html = (
        "<h3>Repaint</h3>"
        + _table("repaint", ["painted by", "lesions", "MSE", "PSNR dB", "SSIM"], rows, classes)
        + "<p class='note'>Held-out real lesions blanked (mean fill of the tissue ring) and "
        "painted back into the same mask; scores inside the mask on images in [0, 1] (BraTS "
        "local-inpainting normalisation). Lower MSE, higher PSNR and SSIM are closer to the "
        "real lesion; the mean fill is the do-nothing baseline.</p>"
    )
    kid, auc, texture = (
        _dict(realism.get("kid")),
        _dict(realism.get("classifier_auc")),
        _dict(realism.get("texture")),
    )
    rows, classes = [], []
    for name in generators:
        a, t = _dict(auc.get(name)), _dict(texture.get(name))
        rows.append(
            [
                html.escape(name),
                _fmt(_num(lesions.get(name)), 0),
                _pm(_dict(kid.get(name)), 4),
                _fmt(a.get("auc")),
                _ci(a.get("ci_low"), a.get("ci_high")),
                _fmt(t.get("mean_ks")),
                _fmt(t.get("mean_wasserstein_sd")),
            ]
        )
        classes.append("")
    floor_auc, floor_texture = (
        _dict(realism.get("classifier_auc_floor")),
        _dict(realism.get("texture_floor")),
    )
    rows.append(
        [
            "real vs real (floor)",
            _fmt(_num(lesions.get("train")), 0),
            _pm(_dict(realism.get("kid_floor")), 4),
            _fmt(floor_auc.get("auc")),
            _ci(floor_auc.get("ci_low"), floor_auc.get("ci_high")),
            _fmt(floor_texture.get("mean_ks")),
            _fmt(floor_texture.get("mean_wasserstein_sd")),
        ]
    )
    classes.append("ref")
    distribution_html = (
        "<h3>Distribution, classifier and texture</h3>"
        + _table(
            "realism-distribution",
            [
                "lesions",
                "count",
                "KID (mean ± sd)",
                "classifier AUC",
                "AUC 95% CI",
                "texture mean KS",
                "mean W1 / sd",
            ],
            rows,
            classes,
        )
        + "<p class='note'>KID: kernel inception distance of lesion crops in the feature "
        "space of the real-only segmenter's bottleneck (lower is closer; floor: the labelled "
        "train lesions against the held-out ones). Classifier AUC: a cross-validated small "
        "CNN telling held-out real lesions from the generator's (0.5: indistinguishable; "
        "DeLong interval; floor: two halves of the held-out lesions). Texture: mean "
        "Kolmogorov–Smirnov statistic and Wasserstein distance (in units of the real sd) "
        "over first-order, GLCM and shape descriptors (floor: train against held-out).</p>"
    )
    fidelity = _dict(realism.get("fidelity"))
    rows = []
    for name in generators:
        f = _dict(fidelity.get(name))
        adh, mem = _dict(f.get("adherence")), _dict(f.get("memorisation"))
        rows.append(
            [
                html.escape(name),
                _fmt(adh.get("voxel_fraction"), 2),
                _fmt(adh.get("mean_lesion_fraction"), 2),
                _fmt(adh.get("lesion_detection"), 2),
                f"{_fmt(mem.get('nearest_ncc_mean'), 2)} / {_fmt(mem.get('nearest_ncc_max'), 2)}",
                f"{_fmt(_num(mem.get('flagged')), 0)} (NCC ≥ {_fmt(mem.get('threshold'), 2)})"
                if mem
                else "–",
            ]
        )
    fidelity_html = (
        "<h3>Adherence and memorisation</h3>"
        + _table(
            "fidelity",
            [
                "generator",
                "adherence: voxels found",
                "mean lesion fraction",
                "lesions found",
                "nearest NCC mean / max",
                "near-copies",
            ],
            rows,
        )
        + "<p class='note'>Adherence: the share of the painted lesion's voxels (per lesion, "
        "and of lesions touched) that the real-only segmenter marks. Memorisation: normalised "
        "correlation of each synthetic lesion's crop with the nearest real training lesion; "
        "at or above the threshold it counts as a near-copy.</p>"
    )
    return intro + repaint_html + distribution_html + fidelity_html


def _realism_charts(
    results: Mapping[str, Any], generators: Sequence[str]
) -> list[tuple[str, str, Canvas]]:
    realism = _dict(results.get("realism"))
    if not realism or not generators:
        return []
    kid, auc, texture = (
        _dict(realism.get("kid")),
        _dict(realism.get("classifier_auc")),
        _dict(realism.get("texture")),
    )
    kid_floor = _num(_get(realism, "kid_floor", "mean"))
    auc_floor = _num(_get(realism, "classifier_auc_floor", "auc"))
    ks_floor = _num(_get(realism, "texture_floor", "mean_ks"))
    charts = [
        (
            "realism_kid",
            "KID per generator (mean ± sd over subsets), dashed: the real-vs-real floor",
            bar_chart(
                "KID of lesion crops (lower is closer to real)",
                list(generators),
                [
                    Series(
                        "KID",
                        [_num(_get(kid, g, "mean")) for g in generators],
                        [_num(_get(kid, g, "sd")) for g in generators],
                    )
                ],
                lines=[RefLine(kid_floor, f"real floor {kid_floor:.4f}")] if _ok(kid_floor) else [],
            ),
        ),
        (
            "realism_classifier_auc",
            "Real-vs-synthetic classifier AUC per generator (95% DeLong CI); dashed: the "
            "real-vs-real floor and chance (0.5)",
            bar_chart(
                "Classifier AUC, real vs synthetic (0.5: indistinguishable)",
                list(generators),
                [
                    Series(
                        "AUC",
                        [_num(_get(auc, g, "auc")) for g in generators],
                        lows=[_num(_get(auc, g, "ci_low")) for g in generators],
                        highs=[_num(_get(auc, g, "ci_high")) for g in generators],
                    )
                ],
                bounds=(0.0, 1.0),
                lines=[
                    RefLine(0.5, "chance 0.5", "#888"),
                    *(
                        [RefLine(auc_floor, f"real floor {auc_floor:.3f}", "#2a7a3b")]
                        if _ok(auc_floor)
                        else []
                    ),
                ],
            ),
        ),
        (
            "realism_texture",
            "Texture and shape descriptors: mean KS statistic against the held-out lesions; "
            "dashed: the real-vs-real floor",
            bar_chart(
                "Texture / shape mean KS (lower is closer)",
                list(generators),
                [Series("mean KS", [_num(_get(texture, g, "mean_ks")) for g in generators])],
                bounds=(0.0, 1.0),
                lines=[RefLine(ks_floor, f"real floor {ks_floor:.3f}")] if _ok(ks_floor) else [],
            ),
        ),
    ]
    return charts


def _gate_section(results: Mapping[str, Any], generators: Sequence[str]) -> str:
    gate = _dict(results.get("gate"))
    shares = _dict(gate.get("rejected_share"))
    if not shares:
        return "<p>No synthetic case went through the gate in this run.</p>"
    cases, rejected = _dict(gate.get("cases")), _dict(gate.get("rejected"))
    by_manifest = _dict(gate.get("rejected_by_manifest_gate"))
    by_segmenter = _dict(gate.get("rejected_by_segmenter"))
    built, kept = _built_totals(results), _kept_totals(results)
    derived = False
    rows = []
    for name in [g for g in generators if g in shares] + [g for g in shares if g not in generators]:
        manifest, segmenter = by_manifest.get(name), by_segmenter.get(name)
        if segmenter is None and (name in built or name in kept):
            segmenter = built.get(name, 0) - kept.get(name, 0)
            derived = True
        if manifest is None and _ok(segmenter) and _ok(rejected.get(name)):
            manifest = int(_num(rejected[name]) - _num(segmenter))
            derived = True
        if _ok(manifest) and manifest < 0:
            manifest = None
        share = _num(shares.get(name))
        rows.append(
            [
                html.escape(name),
                _fmt(cases.get(name)),
                _fmt(rejected.get(name)),
                (f"{share * 100:.0f}%" if _ok(share) else "–", "bad" if share >= 0.5 else ""),
                _fmt(manifest),
                _fmt(segmenter),
                _fmt(kept.get(name)),
            ]
        )
    return (
        _table(
            "gate",
            [
                "generator",
                "synthetic cases",
                "rejected",
                "rejected share",
                "by the manifest's gate",
                "by the segmenter",
                "kept for training",
            ],
            rows,
        )
        + "<p class='note'>Every synthetic case of every cell goes through the generator's own "
        "quality gate (recorded in its manifest; a failed case is not built) and then the "
        "real-only segmenter of its cell must find the painted lesion; the rest are left out "
        "of training. Kept: summed over the cells."
        + (
            " The split between the two gates is derived from the cells' built and kept "
            "counts (results.json pools only the total), assuming rejected cases were left "
            "out of training."
            if derived
            else ""
        )
        + "</p>"
    )


def _probe_html(probe: Mapping[str, Any]) -> str:
    refused = probe.get("refused")
    if refused is True:
        return "<span class='ok'>refused</span>"
    if refused is None:
        return f"<span class='note'>{_fmt(probe.get('message') or 'not probed')}</span>"
    return "<span class='bad'>NOT refused</span>"


def _data_section(results: Mapping[str, Any]) -> str:
    cells = [c for c in results.get("cells") or [] if isinstance(c, Mapping)]
    if not cells:
        return "<p>No cell record in these results.</p>"
    rows, classes, messages = [], [], []
    pooled: dict[str, list[int]] = {}
    for cell in cells:
        data, build = _dict(cell.get("data")), _dict(cell.get("build"))
        guards = _dict(build.get("guards"))
        checked = sum(
            int(_num(g.get("checked"))) for g in guards.values() if _ok(_get(g, "checked"))
        )
        refused = sum(
            int(_num(g.get("violations"))) for g in guards.values() if _ok(_get(g, "violations"))
        )
        for name, g in guards.items():
            got = pooled.setdefault(name, [0, 0, 0])
            got[0] += 1
            got[1] += int(_num(_get(g, "checked"))) if _ok(_get(g, "checked")) else 0
            got[2] += int(_num(_get(g, "violations"))) if _ok(_get(g, "violations")) else 0
        ev = _dict(build.get("evaluation_guard"))
        probe = _dict(ev.get("probe"))
        if probe.get("message"):
            messages.append(
                f"<li><b>{_fmt(cell.get('name'))}</b>: {_probe_html(probe)} "
                f"<code>{_fmt(probe.get('probed'))}</code>: {_fmt(probe.get('message'))}</li>"
            )
        built, kept = _dict(data.get("train_synthetic")), _dict(data.get("train_synthetic_kept"))
        synthetic = ", ".join(
            f"{html.escape(str(k))} {_fmt(built.get(k, 0))} → {_fmt(kept.get(k))}"
            for k in sorted(set(built) | set(kept))
        )
        build_id = build.get("build_id")
        rows.append(
            [
                _fmt(cell.get("name")),
                _fmt(cell.get("split")),
                _fmt(cell.get("budget")) + (" (upper ref.)" if cell.get("reference") else ""),
                f"{_fmt(data.get('train_real'))} ({_fmt(data.get('train_real_lesion'))} + "
                f"{_fmt(data.get('train_real_healthy'))})",
                synthetic or "–",
                _fmt(data.get("val_cases")),
                f"{_fmt(data.get('test_cases'))} ({_fmt(data.get('test_lesion_cases'))})",
                f"<code>{_fmt(build_id[:8] if isinstance(build_id, str) else None)}</code>",
                (
                    f"{checked} / {refused}",
                    "ok" if guards and not refused else "bad" if refused else "",
                ),
                f"{_fmt(ev.get('cases_loaded'))}, {_yes_no(ev.get('all_real'))}, "
                f"{_fmt(ev.get('loader_passes'))}",
                _probe_html(probe) if probe else "–",
            ]
        )
        classes.append("ref" if cell.get("reference") else "")
    cells_html = _table(
        "cells",
        [
            "cell",
            "split",
            "budget",
            "train real (lesion + healthy)",
            "synthetic built → kept",
            "val",
            "test (lesion)",
            "build id",
            "guards checked / refused",
            "eval. loader (scans, all real, passes)",
            "live probe",
        ],
        rows,
        classes,
    )
    guard_rows = [
        [
            html.escape(name),
            str(n),
            str(checked),
            str(violations),
            ("passed", "ok") if not violations else ("refused", "bad"),
        ]
        for name, (n, checked, violations) in pooled.items()
    ]
    guards_html = (
        _table("guards", ["guard", "cells", "checked", "refused", "result"], guard_rows)
        if guard_rows
        else "<p>No guard record.</p>"
    )
    return (
        "<h3>Cells</h3>"
        + cells_html
        + "<p class='note'>Each cell's training set is its split's train side at its budget "
        "(lesion scans drawn nested, healthy scans all) plus the synthetic scans built from "
        "it; test and val are the split's real sides, read only through "
        "<code>EvaluationDataset.from_build</code> and <code>make_eval_loader</code> (anything "
        "synthetic by tag, file hash or voxels would have stopped the run). Live probe: a "
        "synthetic case of the build, relabelled as real, offered to the evaluation loader "
        "must be refused.</p>"
        + "<h3>Dataset build guards (all cells)</h3>"
        + guards_html
        + (
            f"<details><summary>Live probe of each cell: the synthetic case offered and the "
            f"loader's answer</summary><ul>{''.join(messages)}</ul></details>"
            if messages
            else ""
        )
    )


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
                else "<p class='note'>No example images (a resumed run keeps none).</p>"
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
