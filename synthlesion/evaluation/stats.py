"""Spread over seeds and paired comparisons between arms.

Every arm is trained with the same seeds and scored on the same test cases, so arms are
compared case by case: each case's metric is averaged over the seeds, the per-case differences
(arm minus reference) get a percentile bootstrap confidence interval of their mean (cases
resampled with a seeded generator) and a two-sided Wilcoxon signed-rank test (scipy).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from synthlesion.evaluation.metrics import CaseMetrics


def over_seeds(per_seed: Mapping[int, Mapping[str, float]]) -> dict[str, dict[str, Any]]:
    """``{metric: {"mean", "sd", "values"}}`` over seeds (sd with ddof=1; NaNs left out)."""
    keys: list[str] = []
    for row in per_seed.values():
        keys += [k for k in row if k not in keys]
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        values = [float(per_seed[s].get(key, math.nan)) for s in sorted(per_seed)]
        finite = [v for v in values if not math.isnan(v)]
        out[key] = {
            "mean": float(np.mean(finite)) if finite else math.nan,
            "sd": float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0 if finite else math.nan,
            "values": values,
        }
    return out


def _case_means(
    per_seed: Mapping[int, Sequence[CaseMetrics]], metric: str, seeds: Sequence[int]
) -> dict[str, float]:
    sums: dict[str, list[float]] = {}
    for seed in seeds:
        for case in per_seed[seed]:
            value = float(getattr(case, metric))
            if not math.isnan(value):
                sums.setdefault(case.case_id, []).append(value)
    return {case: float(np.mean(v)) for case, v in sums.items() if len(v) == len(seeds)}


def paired_comparison(
    arm: Mapping[int, Sequence[CaseMetrics]],
    reference: Mapping[int, Sequence[CaseMetrics]],
    *,
    metric: str = "dice",
    bootstrap: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Compare two arms case by case on ``metric`` (a :class:`CaseMetrics` field).

    Returns:
        ``{"metric", "cases", "mean_diff", "ci_low", "ci_high", "wilcoxon_p", "wins",
        "losses", "ties", "seed_diffs"}``: per-case differences averaged over the seeds both
        arms share; ``seed_diffs`` are the differences of the per-seed means.
    """
    from scipy.stats import wilcoxon

    seeds = sorted(set(arm) & set(reference))
    a = _case_means(arm, metric, seeds)
    b = _case_means(reference, metric, seeds)
    cases = sorted(set(a) & set(b))
    diffs = np.array([a[c] - b[c] for c in cases], dtype=float)
    result: dict[str, Any] = {"metric": metric, "cases": len(cases), "seeds": seeds}
    if diffs.size == 0:
        return {
            **result,
            "mean_diff": math.nan,
            "ci_low": math.nan,
            "ci_high": math.nan,
            "wilcoxon_p": math.nan,
            "wins": 0,
            "losses": 0,
            "ties": 0,
            "seed_diffs": [],
        }
    rng = np.random.default_rng([seed, 5])
    draws = rng.integers(0, diffs.size, size=(bootstrap, diffs.size))
    means = diffs[draws].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    if np.allclose(diffs, 0):
        p_value = 1.0
    else:
        p_value = float(wilcoxon(diffs, zero_method="wilcox", alternative="two-sided").pvalue)
    seed_diffs = []
    for s in seeds:
        va = [getattr(c, metric) for c in arm[s] if not math.isnan(getattr(c, metric))]
        vb = [getattr(c, metric) for c in reference[s] if not math.isnan(getattr(c, metric))]
        if va and vb:
            seed_diffs.append(float(np.mean(va) - np.mean(vb)))
    return {
        **result,
        "mean_diff": float(diffs.mean()),
        "ci_low": float(low),
        "ci_high": float(high),
        "wilcoxon_p": p_value,
        "wins": int((diffs > 1e-12).sum()),
        "losses": int((diffs < -1e-12).sum()),
        "ties": int((np.abs(diffs) <= 1e-12).sum()),
        "seed_diffs": seed_diffs,
    }


__all__ = ["over_seeds", "paired_comparison"]
