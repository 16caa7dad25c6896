"""Formatting and reading helpers of the evaluation report (:mod:`synthlesion.evaluation.report`).

Values of ``results.json`` as HTML text (numbers with a fixed count of decimals or significant
digits, signed differences, intervals, ``mean ± sd``, coloured yes/no; a missing figure reads
"–"), the HTML table of every section, base64 for embedded PNG, and the accessors that read the
budgets, arms, comparisons, generators and synthetic-case totals out of the results.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

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


def _steps(value: Any) -> str:
    """The segmenter's steps: one number, or per budget (``1600 (4 labelled), 3200 (16)``)."""
    if isinstance(value, Mapping):
        if len(set(value.values())) == 1:
            return _fmt(next(iter(value.values())))
        return ", ".join(f"{_fmt(v)} at {_budget_title(str(k))}" for k, v in value.items())
    return _fmt(value)


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
    """``"b4"`` -> ``"budget 4 (labelled lesion patients per split)"``."""
    if budget == "all":
        return "every lesion scan labelled"
    count = budget[1:] if budget.startswith("b") else budget
    return f"budget {count} (labelled lesion patient{'' if count == '1' else 's'} per split)"


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
