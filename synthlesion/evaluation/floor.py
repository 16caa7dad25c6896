"""The threshold floor: a rule with no network, every learned arm must beat it.

The rule marks as lesion the organ voxels whose lightly smoothed intensity (Gaussian, one voxel)
lies more than ``t`` image units (HU for CT) from the organ's median intensity. ``t`` is fitted
on the budget's labelled lesion scans (the value of a grid over the observed deviations that
gives the best mean Dice), so the floor learns from exactly the labels the arms see. Without an
organ label the rule is undefined and the floor is not scored.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from synthlesion.evaluation.metrics import case_metrics, jsonable, size_bin_names, summarise
from synthlesion.evaluation.segmenter import ArrayCase
from synthlesion.storage import atomic_write_json

logger = logging.getLogger(__name__)


def deviation(case: ArrayCase, organ_values: Sequence[int]) -> np.ndarray | None:
    """``|smoothed x - organ median|`` inside the organ (0 outside), in image units; ``None``
    when the case has no organ voxel."""
    raw = case.raw if case.raw is not None else case.image
    organ = np.isin(case.label, organ_values) if organ_values else None
    if organ is None or not organ.any():
        return None
    smooth = ndimage.gaussian_filter(raw.astype(np.float64), 1.0)
    out = np.abs(smooth - float(np.median(raw[organ])))
    out[~organ] = 0.0
    return out


def fit_threshold(
    cases: Sequence[ArrayCase], lesion_values: Sequence[int], organ_values: Sequence[int]
) -> tuple[float, float] | None:
    """``(t, train Dice)`` maximising the mean Dice over the lesion-bearing ``cases``."""
    pairs = []
    for case in cases:
        truth = np.isin(case.label, lesion_values)
        dev = deviation(case, [*organ_values, *lesion_values])
        if truth.any() and dev is not None:
            pairs.append((dev, truth))
    if not pairs:
        return None
    values = np.concatenate([d[t] for d, t in pairs])
    grid = np.unique(np.quantile(values, np.linspace(0.02, 0.9, 45)))
    best = (float(grid[0]), -1.0)
    for t in grid:
        dice = np.mean([2 * ((d > t) & g).sum() / ((d > t).sum() + g.sum()) for d, g in pairs])
        if dice > best[1]:
            best = (float(t), float(dice))
    return best


def threshold_floor(
    pool: Any, test_cases: Sequence[ArrayCase], size_bins_mm: Sequence[float], folder: Path
) -> dict[str, Any] | None:
    """Fit the rule on the pool's labelled real cases, score it on the test cases, write
    ``floor.json``; ``None`` without an organ label."""
    organ = tuple(pool.organ_values)
    if not organ:
        logger.info("threshold floor: no organ label, not scored")
        return None
    fitted = fit_threshold(pool.real, pool.lesion_values, organ)
    if fitted is None:
        return None
    t, train_dice = fitted
    scored = []
    for case in test_cases:
        dev = deviation(case, [*organ, *pool.lesion_values])
        pred = dev > t if dev is not None else np.zeros(case.label.shape, bool)
        scored.append(
            case_metrics(
                case.case_id,
                pred,
                np.isin(case.label, pool.lesion_values),
                case.spacing,
                size_bins_mm,
            )
        )
    record = {
        "threshold": t,
        "train_dice": train_dice,
        "summary": summarise(scored, size_bin_names(size_bins_mm)),
        "cases": scored,
    }
    atomic_write_json(folder / "floor.json", jsonable(record))
    return record


__all__ = ["deviation", "fit_threshold", "threshold_floor"]
