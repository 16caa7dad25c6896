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


# --- the protocol's statistics: several patient splits x seeds x cases ----------------------

# per-case scores of one arm: {(split, seed): {case_id: value}}
Scores = Mapping[tuple[str, int], Mapping[str, float]]


def _table(scores: Scores) -> dict[str, dict[int, dict[str, float]]]:
    """``{split: {seed: {case: value}}}`` with NaNs left out."""
    table: dict[str, dict[int, dict[str, float]]] = {}
    for (split, seed), cases in scores.items():
        row = {c: float(v) for c, v in cases.items() if v is not None and not math.isnan(v)}
        table.setdefault(split, {})[seed] = row
    return table


def _paired_arrays(
    a: Scores, b: Scores | None
) -> dict[str, tuple[list[int], list[str], np.ndarray]]:
    """Per split: seeds, cases and a ``(seeds, cases)`` array of ``a`` (minus ``b``) on the
    seeds and cases both arms hold."""
    ta = _table(a)
    tb = _table(b) if b is not None else None
    out = {}
    for split in sorted(ta):
        seeds = sorted(ta[split])
        if tb is not None:
            seeds = [s for s in seeds if s in tb.get(split, {})]
        if not seeds:
            continue
        cases = set.intersection(*(set(ta[split][s]) for s in seeds))
        if tb is not None:
            cases &= set.intersection(*(set(tb[split][s]) for s in seeds))
        ordered = sorted(cases)
        if not ordered:
            continue
        values = np.array([[ta[split][s][c] for c in ordered] for s in seeds], dtype=float)
        if tb is not None:
            values -= np.array([[tb[split][s][c] for c in ordered] for s in seeds], dtype=float)
        out[split] = (seeds, ordered, values)
    return out


def hierarchical_bootstrap(
    a: Scores, b: Scores | None = None, *, resamples: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Mean of an arm's per-case scores (or of the paired differences ``a - b``) with a 95%
    percentile interval from a hierarchical bootstrap: patient splits are resampled, then,
    within each drawn split, seeds and cases (every level with replacement, one seeded
    generator). The point estimate is the mean over splits of the per-split mean over seeds and
    cases.

    Returns:
        ``{"mean", "ci": [low, high], "splits", "seeds", "cases"}`` (cases: per split, summed).
    """
    arrays = _paired_arrays(a, b)
    if not arrays:
        return {"mean": math.nan, "ci": [math.nan, math.nan], "splits": 0, "seeds": 0, "cases": 0}
    blocks = list(arrays.values())
    mean = float(np.mean([v.mean() for _, _, v in blocks]))
    rng = np.random.default_rng([seed, 17])
    draws = np.empty(resamples)
    for r in range(resamples):
        picked = rng.integers(len(blocks), size=len(blocks))
        total = 0.0
        for index in picked:
            values = blocks[index][2]
            seeds = rng.integers(values.shape[0], size=values.shape[0])
            cases = rng.integers(values.shape[1], size=values.shape[1])
            total += float(values[np.ix_(seeds, cases)].mean())
        draws[r] = total / len(picked)
    low, high = np.percentile(draws, [2.5, 97.5])
    return {
        "mean": mean,
        "ci": [float(low), float(high)],
        "splits": len(blocks),
        "seeds": max(v.shape[0] for _, _, v in blocks),
        "cases": int(sum(v.shape[1] for _, _, v in blocks)),
    }


def protocol_comparison(
    a: Scores, b: Scores, *, resamples: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Arm ``a`` against arm ``b`` on the cases both were scored on.

    The paired per-case differences, averaged over seeds and over the splits whose test side
    holds the case (one value per case: patient splits overlap, and a case counted once per
    split would be several "independent" pairs), get a two-sided Wilcoxon signed-rank p value;
    the mean difference gets the hierarchical bootstrap interval of
    :func:`hierarchical_bootstrap`. ``p_holm`` is added by :func:`holm`.

    Returns:
        ``{"mean_diff", "ci_low", "ci_high", "p_wilcoxon", "pairs", "wins", "losses"}``.
    """
    from scipy.stats import wilcoxon

    boot = hierarchical_bootstrap(a, b, resamples=resamples, seed=seed)
    per_case: dict[str, list[float]] = {}
    for _, cases, values in _paired_arrays(a, b).values():
        for case, value in zip(cases, values.mean(axis=0), strict=True):
            per_case.setdefault(case, []).append(float(value))
    diffs = np.array([np.mean(v) for v in per_case.values()], dtype=float)
    if diffs.size == 0 or np.allclose(diffs, 0):
        p_value = 1.0 if diffs.size else math.nan
    else:
        p_value = float(wilcoxon(diffs, zero_method="wilcox", alternative="two-sided").pvalue)
    return {
        "mean_diff": boot["mean"],
        "ci_low": boot["ci"][0],
        "ci_high": boot["ci"][1],
        "p_wilcoxon": p_value,
        "pairs": int(diffs.size),
        "wins": int((diffs > 1e-12).sum()),
        "losses": int((diffs < -1e-12).sum()),
    }


def holm(p_values: Mapping[str, float]) -> dict[str, float]:
    """Holm-Bonferroni adjusted p values (step-down, monotone, capped at 1); NaNs stay NaN and
    do not count as tests."""
    finite = sorted((p, k) for k, p in p_values.items() if not math.isnan(p))
    m = len(finite)
    adjusted: dict[str, float] = {k: math.nan for k, p in p_values.items() if math.isnan(p)}
    running = 0.0
    for rank, (p, key) in enumerate(finite):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[key] = running
    return adjusted


__all__ = [
    "Scores",
    "hierarchical_bootstrap",
    "holm",
    "over_seeds",
    "paired_comparison",
    "protocol_comparison",
]
