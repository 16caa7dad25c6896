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


def test_the_gate_rejects_untouched_healthy_tissue_presented_as_a_lesion(tmp_path):
    """44 of 48 untouched healthy-liver disks used to pass as lesions: with a reference of real
    lesions the contrast floor refuses them, while real lesions of the phantom pass it."""
    from scipy import ndimage

    from synthlesion.data.phantom import make_phantom_dataset
    from synthlesion.data.sources import load_cases

    dataset = make_phantom_dataset(
        tmp_path / "ph", kind="ct", spatial_dims=2, n_patients=16, size=96, seed=3
    )
    cases = load_cases(dataset)
    from synthlesion.data.io import load_image

    lesion_cases = [c for c in cases if c.has_lesion]
    healthy = [c for c in cases if not c.has_lesion]
    reference = RealLesionReference.from_cases(lesion_cases[:6], organ_labels=(1,))
    gate = QualityGate()
    assert gate.contrast_floor(reference) > 5.0  # HU: a fifth of the typical |contrast|
    rng = np.random.default_rng(0)
    untouched_passed = tried = by_floor = 0
    for case in healthy:
        image = load_image(case.image)
        organ = load_image(case.mask).array == 1
        inner = ndimage.binary_erosion(organ, iterations=6)
        where = np.argwhere(inner)
        for _ in range(4):
            centre = where[rng.integers(len(where))]
            disk = blob(organ.shape, tuple(centre), radius=3) & organ
            result = evaluate_lesion(
                image.array, image.array, disk, disk, image.spacing, reference, gate, tissue=organ
            )
            tried += 1
            untouched_passed += result.passed
            by_floor += any(r.startswith("|contrast|") for r in result.reasons)
    assert tried >= 20 and untouched_passed <= 0.1 * tried
    assert by_floor >= 0.8 * tried  # the contrast floor alone refuses most of them
    real_passed = 0
    for case in lesion_cases[6:]:
        image = load_image(case.image)
        labels = load_image(case.mask).array
        lesion = labels == 2
        result = evaluate_lesion(
            image.array, image.array, lesion, lesion, image.spacing, reference, gate,
            tissue=labels == 1,
        )  # fmt: skip
        real_passed += not any(r.startswith("|contrast|") for r in result.reasons)
    assert real_passed >= 0.7 * len(lesion_cases[6:])  # rimmed lesions can have little net contrast


def test_the_seam_score_of_a_slice_stored_with_a_third_axis_of_one():
    rng = np.random.default_rng(1)
    source = (60 + rng.normal(0, 5, (40, 40)))[..., None]  # (X, Y, 1): one slice as a volume
    region = blob(radius=8)[..., None]
    hard = source.copy()
    hard[region] += 80
    assert seam_score(source, source, region) == pytest.approx(1.0)
    assert seam_score(source, hard, region) > 2.0
