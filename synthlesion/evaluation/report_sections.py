"""The sections of the evaluation report (:mod:`synthlesion.evaluation.report`) but realism.

Each builds the HTML (and the chart, where it has one) of one part of the page from
``results.json``: the set-up; the arms per labelled budget with the threshold floor and the
upper reference, and their Dice and sensitivity charts; the paired comparisons and their forest
plot; the convergence check; the quality gate; the data and guard records of every cell. The
realism section is in :mod:`synthlesion.evaluation.report_realism`.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

from synthlesion.evaluation.charts import Canvas, RefLine, Series, bar_chart, forest_plot
from synthlesion.evaluation.report_format import (
    _arm_names,
    _arms_of,
    _budget_title,
    _budgets,
    _built_totals,
    _ci,
    _comparisons,
    _dict,
    _fmt,
    _g,
    _get,
    _join,
    _kept_totals,
    _mean_ci,
    _num,
    _ok,
    _pair,
    _signed,
    _steps,
    _table,
    _yes_no,
)


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
        f"({', '.join(html.escape(b) for b in budgets) or '–'}: labelled lesion patients of each split's "
        f"train side) × {len(seeds)} seed{'s' if len(seeds) != 1 else ''} "
        f"({_join(seeds, ', ')}); every cell is scored on its real "
        f"<b>{html.escape(str(results.get('test_split', 'test')))}</b> side "
        f"({counts(test)} scans, {counts(lesion)} with a lesion; "
        f"{html.escape(', '.join(modality) or '–')}), read only through the dataset package's "
        "evaluation guard. Every arm trains MONAI "
        f"<code>{_fmt(seg.get('network'))}</code> (channels "
        f"{_join(seg.get('channels'), ', ')}, patches {_join(seg.get('patch_size'), '×')}) for "
        f"{_steps(results.get('budget_steps'))} steps of {_fmt(seg.get('batch_size'))}, with "
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
        missing.append(
            "no threshold floor in this run (the rule needs an organ label, or it was turned "
            "off with protocol.threshold_floor)"
        )
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
                html.escape(str(c["arm"]))
                + (
                    " <span class='bad'>(trained on no lesion of its own)</span>"
                    if c.get("arm_new_lesion_share") == 0
                    else ""
                ),
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
        f"<p>Real arm converged: {_yes_no(results.get('real_converged'))} (the rule: at every "
        "budget, doubling the steps changes the mean test Dice by less than the tolerance, "
        "and its best validation Dice no longer rises"
        + ("" if results.get("real_converged") is not False else "; not met here, see below")
        + ").</p>"
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
                f"{_fmt(val.get('val_dice_best'))} → {_fmt(val.get('val_dice_best_doubled'))}",
                _signed(val.get("gain_when_doubled")),
                _fmt(val.get("selected_step_share"), 2),
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
            "best val Dice → doubled",
            "val gain",
            "selected step (share of budget)",
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
        + "<p class='note'>The real arm with twice the steps on the same cells (branched off "
        "the same run: the common stable-rate steps are trained once); Δ is its paired test "
        "Dice change with the hierarchical-bootstrap interval. Each run keeps the weights of "
        "its best validation Dice; the validation figures are the mean over runs of that best "
        "(plateaued: twice the steps adds less than 0.02) and where in the budget it lay.</p>",
        chart,
    )


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
