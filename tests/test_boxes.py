"""The set-up, gates and placement work in boxes around the lesions: the same answers as the
whole-scan computation, for masks anywhere (touching the scan's edge included)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from synthlesion.data.boxes import bounding_box, depth_inside, distance_from, margin_voxels
from synthlesion.masks.placement import keep_away
from synthlesion.pipelines.quality import lesion_statistics, ring_width_mm, seam_score


def _blobs(shape, seed, count=3, edge=False):
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, bool)
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    for k in range(count):
        centre = [0 if (edge and k == 0 and a == 0) else rng.integers(0, n) for a, n in
                  enumerate(shape)]  # fmt: skip
        radius = rng.uniform(1.5, 4.0)
        mask |= sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2
    return mask


CASES = [((40, 36, 20), (0.8, 0.9, 2.5)), ((64, 48), (1.0, 0.7)), ((30, 30, 1), (1.0, 1.0, 3.0))]


def _whole_scan_statistics(image, mask, spacing, ring_mm=3.0, tissue=None):
    """The former whole-scan computation, kept here as the reference."""
    outside = ndimage.distance_transform_edt(~mask, sampling=spacing)
    ring = (outside > 0) & (outside <= ring_width_mm(spacing, ring_mm))
    if tissue is not None and (ring & tissue).any():
        ring &= tissue
    values = image[mask].astype(np.float64)
    ring_values = image[ring].astype(np.float64)
    return values.mean(), values.std(), ring_values.mean(), int(mask.sum())


@pytest.mark.parametrize(("shape", "spacing"), CASES)
@pytest.mark.parametrize("seed", range(4))
def test_boxed_statistics_gates_and_placement_equal_the_whole_scan(shape, spacing, seed):
    rng = np.random.default_rng(seed)
    image = rng.normal(40, 15, shape)
    mask = _blobs(shape, seed, edge=seed % 2 == 0)
    tissue = _blobs(shape, seed + 100, count=2) | mask if seed % 3 else None
    got = lesion_statistics(image, mask, spacing, tissue=tissue)
    mean, std, ring_mean, voxels = _whole_scan_statistics(image, mask, spacing, tissue=tissue)
    assert (got.mean, got.std, got.voxels) == pytest.approx((mean, std, voxels), abs=1e-12)
    assert got.ring_mean == pytest.approx(ring_mean, abs=1e-12)

    synthetic = image + 30 * ndimage.binary_dilation(mask)
    region = ndimage.binary_dilation(mask, iterations=2)
    whole = _whole_scan_seam(image, synthetic, region)
    assert seam_score(image, synthetic, region) == pytest.approx(whole, rel=1e-12)

    for distance in (0.0, 2.0, 5.0, 11.0):
        allowed = rng.random(shape) > 0.2
        expected = allowed & (ndimage.distance_transform_edt(~mask, sampling=spacing) > distance)
        keep_away(allowed, mask, distance, spacing)
        assert np.array_equal(allowed, expected)
        box, near = distance_from(mask, distance, spacing)
        full = ndimage.distance_transform_edt(~mask, sampling=spacing)
        within = full <= distance
        outside_box = np.ones(shape, bool)
        outside_box[box] = False
        assert not (within & outside_box).any()  # nothing within the distance left the box
        assert np.allclose(near[within[box]], full[box][within[box]])

    tissue_all = _blobs(shape, seed + 7, count=4, edge=True)
    expected_depth = ndimage.distance_transform_edt(tissue_all, sampling=spacing)
    assert np.allclose(depth_inside(tissue_all, spacing), expected_depth)


def _whole_scan_seam(source, synthetic, region):
    boundary = region & ~ndimage.binary_erosion(region)
    boundary |= ndimage.binary_dilation(region) & ~region
    axes = [a for a, n in enumerate(source.shape) if n >= 2]

    def gradient(a):
        parts = np.gradient(a.astype(np.float64), axis=axes)
        return np.sqrt(sum(p**2 for p in parts))

    return float(gradient(synthetic)[boundary].mean()) / max(
        float(gradient(source)[boundary].mean()), 1e-6
    )


def test_bounding_box_pads_per_axis_clips_and_says_none_for_an_empty_mask():
    mask = np.zeros((10, 8), bool)
    assert bounding_box(mask) is None and distance_from(mask, 3.0, (1.0, 1.0)) is None
    assert not depth_inside(mask, (1.0, 1.0)).any()
    mask[2:4, 6] = True
    assert bounding_box(mask) == (slice(2, 4), slice(6, 7))
    assert bounding_box(mask, (1, 3)) == (slice(1, 5), slice(3, 8))
    assert margin_voxels(3.0, (1.0, 2.5)) == (4, 3)
    with pytest.raises(ValueError, match="pad"):
        bounding_box(mask, (1, 2, 3))
