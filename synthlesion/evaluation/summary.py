"""Pool the protocol's cells into the figures of ``results.json``.

Per budget and arm: the mean lesion Dice with a hierarchical-bootstrap interval (patient
splits, then seeds and cases), lesion-wise sensitivity and false positives per case by size,
and what the arm's batches held (the share of patches with a lesion voxel and of lesion
voxels). Comparisons: every arm against the reference (real) arm, and every diffusion arm
against copy-paste and hand-crafted, as paired per-case differences (averaged over seeds) with
the bootstrap interval, a Wilcoxon signed-rank p and Holm's correction over all comparisons of
the run. The convergence check compares the real arm with twice its steps; the floor and the
upper reference are scored like arms. Budgets read ``b4`` (four labelled lesion scans) or
``all``; arm keys ``<arm>@<budget>``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from synthlesion import __version__
from synthlesion.config import config_to_dict
from synthlesion.evaluation.cell import DOUBLED, CellOutcome
from synthlesion.evaluation.config import EvaluateConfig
from synthlesion.evaluation.metrics import size_bin_names
from synthlesion.evaluation.protocol import Cell
from synthlesion.evaluation.stats import Scores, hierarchical_bootstrap, holm, protocol_comparison

RESULTS_FORMAT = "synthlesion-evaluation/2"


def _scores(outcomes: Sequence[CellOutcome], arm: str) -> dict[tuple[str, int], dict[str, float]]:
    out: dict[tuple[str, int], dict[str, float]] = {}
    for o in outcomes:
        for seed, run in o.runs.get(arm, {}).items():
            out[(o.cell.split, seed)] = {c.case_id: c.dice for c in run["cases"] if c.has_lesion}
    return out


def _floor_scores(outcomes: Sequence[CellOutcome]) -> dict[tuple[str, int], dict[str, float]]:
    return {
        (o.cell.split, 0): {c.case_id: c.dice for c in o.floor["cases"] if c.has_lesion}
        for o in outcomes
        if o.floor is not None
    }


def _mean_of(rows: Sequence[dict[str, Any]], key: str) -> float:
    values = [float(r[key]) for r in rows if r.get(key) is not None]
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def _arm_figures(
    outcomes: Sequence[CellOutcome], arm: str, bins: Sequence[str], resamples: int, seed: int
) -> dict[str, Any]:
    runs = [r for o in outcomes for r in o.runs.get(arm, {}).values()]
    boot = hierarchical_bootstrap(_scores(outcomes, arm), resamples=resamples, seed=seed)
    summaries = [r["summary"] for r in runs]
    batches = [r["batches"] for r in runs]
    figures: dict[str, Any] = {
        "kind": runs[0]["kind"] if runs else None,
        "runs": len(runs),
        "dice_mean": boot["mean"],
        "dice_ci": boot["ci"],
        "dice_sd_over_runs": float(np.std([s["dice"] for s in summaries], ddof=1))
        if len(summaries) > 1
        else math.nan,
        "positive_patch_share": _mean_of(batches, "positive_patch_share"),
        "lesion_pixel_share": _mean_of(batches, "lesion_pixel_share"),
        "new_lesion_patches": float(np.sum([b.get("new_lesion_patches", 0) for b in batches])),
        # share of the lesion patches that came from the arm's own new lesions: 0 means the
        # arm trained on real lesions only (every synthetic case failed the gate, or no paste
        # found a place) and is the real arm under another name
        "new_lesion_share": _mean_of(batches, "new_lesion_share"),
        "sensitivity": _mean_of(summaries, "sensitivity"),
        "fp_per_case": _mean_of(summaries, "fp_per_case"),
        "hd95_mm": _mean_of(summaries, "hd95_mm"),
        "by_size": {
            name: {
                "sensitivity": _mean_of(summaries, f"sensitivity[{name}]"),
                "fp_per_case": _mean_of(summaries, f"fp_per_case[{name}]"),
            }
            for name in bins
        },
        "loss_last": _mean_of(runs, "loss_last"),
        "seconds": float(np.sum([r["seconds"] for r in runs])),
    }
    return figures


PLATEAU_GAIN = 0.02  # val Dice a doubled budget may add and still count as a plateau


def _convergence(
    config: EvaluateConfig, outcomes: Sequence[CellOutcome], real: str, budget_key: str
) -> dict[str, Any]:
    once = _scores(outcomes, real)
    twice = _scores(outcomes, real + DOUBLED)
    resamples, seed = config.metrics.bootstrap, config.metrics.seed
    delta = protocol_comparison(twice, once, resamples=resamples, seed=seed) if twice else None
    plateau = None
    once_runs = [r for o in outcomes for r in o.runs.get(real, {}).values()]
    twice_runs = [r for o in outcomes for r in o.runs.get(real + DOUBLED, {}).values()]
    curves = [r["validation"] for r in once_runs if r["validation"]]
    if curves:
        # the validation Dice has plateaued when twice the steps finds no better weights
        # (the best val Dice of the doubled runs against the runs of the budget)
        best = float(np.mean([max(v for _, v in c) for c in curves]))
        doubled = [r["validation"] for r in twice_runs if r["validation"]]
        best_twice = float(np.mean([max(v for _, v in c) for c in doubled])) if doubled else None
        plateau = {
            "val_dice_best": best,
            "val_dice_best_doubled": best_twice,
            "val_dice_last": float(np.mean([c[-1][1] for c in curves])),
            "gain_when_doubled": None if best_twice is None else best_twice - best,
            "plateaued": None if best_twice is None else best_twice - best < PLATEAU_GAIN,
            "selected_step_share": float(
                np.mean([r.get("selected_step", r["steps"]) / r["steps"] for r in once_runs])
            ),
        }
    return {
        "budget": budget_key,
        "steps": config.segmenter.steps_for(budget_key.removeprefix("b")),
        "doubled_steps": 2 * config.segmenter.steps_for(budget_key.removeprefix("b")),
        "test_dice_change_when_doubled": delta["mean_diff"] if delta else None,
        "ci": [delta["ci_low"], delta["ci_high"]] if delta else None,
        "within_tolerance": abs(delta["mean_diff"]) < config.protocol.convergence_tolerance
        if delta
        else None,
        "validation": plateau,
    }


def summarise_protocol(
    config: EvaluateConfig, cells: Sequence[Cell], outcomes: Sequence[CellOutcome]
) -> dict[str, Any]:
    """Every figure of the run (see the module docstring)."""
    bins = size_bin_names(config.metrics.size_bins_mm)
    resamples, seed = config.metrics.bootstrap, config.metrics.seed
    reference = config.reference_arm
    real = next(a.name for a in config.arms if a.kind == "real")
    budgets = sorted({o.cell.budget_label for o in outcomes if not o.cell.reference}, key=_order)
    arms: dict[str, Any] = {}
    pairs: list[tuple[str, str, str]] = []  # (budget, arm, against)
    convergence = {}
    floors = {}
    for budget in budgets:
        group = [o for o in outcomes if o.cell.budget_label == budget and not o.cell.reference]
        for arm in config.arms:
            arms[f"{arm.name}@{budget}"] = _arm_figures(group, arm.name, bins, resamples, seed)
            if arm.name != reference:
                pairs.append((budget, arm.name, reference))
        for arm in config.arms:
            if arm.kind == "diffusion":
                pairs += [
                    (budget, arm.name, other.name)
                    for other in config.arms
                    if other.kind in ("copy_paste", "handcrafted")
                    and (budget, arm.name, other.name) not in pairs
                ]
        if config.protocol.convergence_check:
            convergence[budget] = _convergence(config, group, real, budget)
        floor = _floor_scores(group)
        if floor:
            boot = hierarchical_bootstrap(floor, resamples=resamples, seed=seed)
            floors[budget] = {
                "dice_mean": boot["mean"],
                "dice_ci": boot["ci"],
                "thresholds": [o.floor["threshold"] for o in group if o.floor is not None],
                "sensitivity": _mean_of(
                    [o.floor["summary"] for o in group if o.floor], "sensitivity"
                ),
                "fp_per_case": _mean_of(
                    [o.floor["summary"] for o in group if o.floor], "fp_per_case"
                ),
            }
    upper = [o for o in outcomes if o.cell.reference]
    upper_figures = _arm_figures(upper, real, bins, resamples, seed) if upper else None
    comparisons: dict[str, Any] = {}
    for budget, arm, against in pairs:
        group = [o for o in outcomes if o.cell.budget_label == budget and not o.cell.reference]
        key = f"{arm}@{budget}_vs_{against}"
        figures = arms.get(f"{arm}@{budget}", {})
        comparisons[key] = {
            "budget": budget,
            "arm": arm,
            "against": against,
            "arm_new_lesion_share": figures.get("new_lesion_share"),
            **protocol_comparison(
                _scores(group, arm), _scores(group, against), resamples=resamples, seed=seed
            ),
        }
    adjusted = holm({k: v["p_wilcoxon"] for k, v in comparisons.items()})
    for key, value in adjusted.items():
        comparisons[key]["p_holm"] = value
    gate = _pooled_gate(config, outcomes)
    realism = _pooled_realism(outcomes)
    converged = [c.get("within_tolerance") for c in convergence.values()]
    plateaus = [(c.get("validation") or {}).get("plateaued") for c in convergence.values()]
    shares = [
        a["positive_patch_share"]
        for a in arms.values()
        if not math.isnan(a["positive_patch_share"])
    ]
    largest = budgets[-1] if budgets else None
    return {
        "format": RESULTS_FORMAT,
        "synthlesion_version": __version__,
        "out_dir": str(config.out_dir),
        "test_split": config.test_split,
        "seeds": list(config.seeds),
        "splits": [str(s) for s in config.splits],
        "budgets": budgets,
        "size_bins": bins,
        "reference_arm": reference,
        "segmenter": config_to_dict(config.segmenter),
        "budget_steps": {b: config.segmenter.steps_for(b.removeprefix("b")) for b in budgets},
        # None where no convergence check ran (not checked is not "no")
        "real_converged": (
            all(c is True for c in converged) and all(p is not False for p in plateaus)
        )
        if converged
        else None,
        "convergence": convergence,
        "convergence_tolerance": config.protocol.convergence_tolerance,
        "arms": arms,
        "positive_patch_share_spread": float(max(shares) - min(shares)) if shares else None,
        "upper_reference": upper_figures,
        "upper_reference_dice": upper_figures["dice_mean"] if upper_figures else None,
        "threshold_floor": floors,
        "threshold_floor_dice": floors[largest]["dice_mean"] if largest in floors else None,
        "comparisons": comparisons,
        "gate": gate,
        "realism": realism,
        "cells": [
            {
                "name": o.cell.name,
                "split": o.cell.split,
                "budget": o.cell.budget_label,
                "reference": o.cell.reference,
                "data": o.data,
                "build": o.build,
            }
            for o in outcomes
        ],
    }


def _order(budget: str) -> float:
    return math.inf if budget == "all" else float(budget[1:])


def _pooled_gate(config: EvaluateConfig, outcomes: Sequence[CellOutcome]) -> dict[str, Any]:
    keys = ("cases", "rejected", "rejected_by_manifest_gate", "rejected_by_segmenter", "kept")
    totals: dict[str, dict[str, int]] = {}
    for o in outcomes:
        for kind, record in o.gate.items():
            got = totals.setdefault(kind, dict.fromkeys(keys, 0))
            for key in keys:
                got[key] += int(record.get(key, 0))
    out: dict[str, Any] = {
        "rejected_share": {
            k: (t["rejected"] / t["cases"] if t["cases"] else 0.0) for k, t in totals.items()
        },
        "min_dice": config.gate.min_dice,
        "applied": config.gate.apply and not config.include_rejected,
    }
    for key in keys:
        out[key] = {k: t[key] for k, t in totals.items()}
    return out


def _pooled_realism(outcomes: Sequence[CellOutcome]) -> dict[str, Any] | None:
    """Mean over the cells that measured realism of every numeric leaf."""
    records = [o.realism for o in outcomes if o.realism]
    if not records:
        return None

    def merge(values: list[Any]) -> Any:
        if all(isinstance(v, dict) for v in values):
            keys = [k for k in values[0] if all(k in v for v in values)]
            return {k: merge([v[k] for v in values]) for k in keys}
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
            return float(np.mean(finite)) if finite else math.nan
        return values[0]

    pooled = merge(records)
    # counts add up over the cells (the figures above are means over them)
    pooled["lesions"] = {
        k: int(sum(r.get("lesions", {}).get(k, 0) for r in records))
        for k in (records[0].get("lesions") or {})
    }
    pooled["cells"] = [o.cell.name for o in outcomes if o.realism]
    return pooled


__all__ = ["RESULTS_FORMAT", "Scores", "summarise_protocol"]
