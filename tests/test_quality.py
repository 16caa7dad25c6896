"""Quality gates for synthetic lesions."""

from __future__ import annotations

import numpy as np
import pytest

from synthlesion.pipelines.quality import (
    QualityGate,
    RealLesionReference,
    evaluate_lesion,
    lesion_statistics,
    seam_score,
)


def blob(shape=(40, 40), centre=(20, 20), radius=5):
    grid = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2


def test_statistics_and_contrast():
    image = np.full((40, 40), 60.0)
    mask = blob()
    image[mask] = 30.0
    stats = lesion_statistics(image, mask, (1.0, 1.0))
    assert stats.mean == pytest.approx(30.0) and stats.ring_mean == pytest.approx(60.0)
    assert stats.contrast == pytest.approx(-30.0) and stats.voxels == mask.sum()
    with pytest.raises(ValueError):
        lesion_statistics(image, np.zeros_like(mask), (1.0, 1.0))


def test_seam_score_detects_a_hard_edge():
    rng = np.random.default_rng(0)
    source = 60 + rng.normal(0, 5, (40, 40))
    region = blob(radius=8)
    smooth = source.copy()
    assert seam_score(source, smooth, region) == pytest.approx(1.0)
    hard = source.copy()
    hard[region] += 80
    assert seam_score(source, hard, region) > 2.0


def test_gate_rejects_outliers_and_records_reasons():
    reference = RealLesionReference(means=(28, 30, 32), stds=(5, 6, 7), contrasts=(-28, -30, -32))
    rng = np.random.default_rng(1)
    source = 60 + rng.normal(0, 5, (40, 40))
    lesion = blob()
    region = blob(radius=7)
    good = source.copy()
    good[lesion] = 30 + rng.normal(0, 6, lesion.sum())
    result = evaluate_lesion(source, good, lesion, region, (1.0, 1.0), reference)
    assert result.passed, result.reasons
    bad = source.copy()
    bad[lesion] = 200.0
    result = evaluate_lesion(source, bad, lesion, region, (1.0, 1.0), reference, QualityGate())
    assert not result.passed
    assert any("z_mean" in r for r in result.reasons)
    record = result.to_dict()
    assert record["passed"] is False and "lesion_mean" in record and "seam" in record
