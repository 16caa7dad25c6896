"""Realism metrics against ground truth (synthlesion.evaluation.realism / radiomics)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from synthlesion.evaluation.realism import (
    classifier_two_sample_test,
    copy_paste_fill,
    feature_distribution_distances,
    kid,
    mean_fill,
    repaint_scores,
    texture_shape_features,
)
from synthlesion.pipelines.quality import lesion_statistics


def ball(shape, centre, radius) -> np.ndarray:
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2


def smooth_image(shape, seed=0) -> np.ndarray:
    """A [0, 1] image with structure (a blurred random field)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=shape), 2.0)
    return (field - field.min()) / (field.max() - field.min())


# --------------------------------------------------------------------------- repaint_scores


@pytest.mark.parametrize("shape", [(48, 40), (24, 20, 16)])
def test_identical_repaint_is_perfect(shape):
    truth = smooth_image(shape)
    mask = ball(shape, [s // 2 for s in shape], 5)
    scores = repaint_scores(truth, truth.copy(), mask)
    assert scores["mse"] == 0.0
    assert scores["psnr"] == math.inf
    assert scores["ssim"] == pytest.approx(1.0, abs=1e-9)


def test_noisy_repaint_scores_worse_than_close_one():
    rng = np.random.default_rng(1)
    truth = smooth_image((64, 64))
    mask = ball(truth.shape, (32, 32), 10)
    close = truth + rng.normal(0, 0.01, truth.shape)
    noisy = truth + rng.normal(0, 0.2, truth.shape)
    good, bad = repaint_scores(truth, close, mask), repaint_scores(truth, noisy, mask)
    assert good["mse"] < bad["mse"]
    assert good["psnr"] > bad["psnr"]
    assert good["ssim"] > bad["ssim"]
    # only the mask counts: changes outside it do not move the scores
    outside = np.where(mask, close, 0.0)
    assert repaint_scores(truth, outside, mask) == pytest.approx(good)


def test_repaint_normalisation_removes_a_common_scale():
    rng = np.random.default_rng(2)
    truth = smooth_image((20, 24, 18))
    mask = ball(truth.shape, (10, 12, 9), 5)
    painted = np.clip(truth + rng.normal(0, 0.05, truth.shape), 0, 1)
    base = repaint_scores(truth, painted, mask)
    scaled = repaint_scores(truth * 0.37, painted * 0.37, mask)
    for key in ("mse", "psnr", "ssim"):
        assert scaled[key] == pytest.approx(base[key], rel=1e-9)


def test_repaint_small_image_and_bad_input():
    truth = smooth_image((5, 4))
    mask = np.zeros(truth.shape, bool)
    mask[1:4, 1:3] = True
    assert repaint_scores(truth, truth, mask)["ssim"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="differ"):
        repaint_scores(truth, truth[:, :3], mask)
    with pytest.raises(ValueError, match="empty"):
        repaint_scores(truth, truth, np.zeros_like(mask))
    with pytest.raises(ValueError, match="not positive"):
        repaint_scores(-truth - 1, truth, mask)


# --------------------------------------------------------------------------- mean_fill


@pytest.mark.parametrize(
    ("shape", "spacing"), [((40, 36), (0.8, 0.8)), ((24, 22, 14), (1.0, 1.0, 2.5))]
)
def test_mean_fill_sets_mask_to_ring_mean(shape, spacing):
    rng = np.random.default_rng(3)
    image = rng.normal(40, 10, shape).astype(np.int16)
    mask = ball(shape, [s // 2 for s in shape], 4)
    filled = mean_fill(image, mask, spacing)
    expected = lesion_statistics(image, mask, spacing).ring_mean
    assert np.allclose(filled[mask], expected, rtol=1e-6)
    assert np.array_equal(filled[~mask], image[~mask])
    assert filled.dtype.kind == "f"


def test_mean_fill_ring_restricted_to_tissue():
    image = np.zeros((40, 40))
    image[:, 20:] = 100.0
    mask = ball(image.shape, (20, 20), 4)
    tissue = np.zeros(image.shape, bool)
    tissue[:, 20:] = True
    assert np.allclose(mean_fill(image, mask, (1, 1), tissue=tissue)[mask], 100.0)
    assert 30 < mean_fill(image, mask, (1, 1))[mask].mean() < 70


def test_mean_fill_cost_follows_the_lesion(monkeypatch):
    """The distance transform only ever sees a box around the lesion, however large the
    image (a timing ratio would be flaky on a shared machine; this is the cause of cost)."""
    seen = []
    from synthlesion.data import boxes  # where the boxed distance transform runs

    transform = boxes.ndimage.distance_transform_edt

    def spy(array, *args, **kwargs):
        seen.append(np.shape(array))
        return transform(array, *args, **kwargs)

    monkeypatch.setattr(boxes.ndimage, "distance_transform_edt", spy)
    for size in (64, 1024):
        image = np.zeros((size, size), np.float32)
        mask = np.zeros((size, size), bool)
        mask[30:34, 30:35] = True
        mean_fill(image, mask, (1.0, 1.0))
    assert len(seen) == 2
    assert seen[0] == seen[1]
    assert max(seen[1]) <= 4 + 2 * (3 + 1) + 1


def test_mean_fill_rejects_bad_input():
    image = np.zeros((10, 10))
    with pytest.raises(ValueError, match="empty"):
        mean_fill(image, np.zeros((10, 10), bool), (1, 1))
    with pytest.raises(ValueError, match="shape"):
        mean_fill(image, np.ones((10, 9), bool), (1, 1))
    with pytest.raises(ValueError, match="ring"):
        mean_fill(image, np.ones((10, 10), bool), (1, 1))
    with pytest.raises(ValueError, match="spacing"):
        mean_fill(image, ball((10, 10), (5, 5), 2), (1, 1, 1))


# --------------------------------------------------------------------------- copy_paste_fill


def test_copy_paste_fill_pastes_contrast_matched_donor():
    rng = np.random.default_rng(4)
    image = rng.normal(50, 2, (40, 40))
    mask = ball(image.shape, (12, 14), 5)
    donor = rng.normal(200, 2, (30, 34))
    donor_mask = ball(donor.shape, (18, 15), 5)
    donor[donor_mask] += 60  # a lesion 60 above its surroundings

    filled = copy_paste_fill(image, mask, donor, donor_mask, spacing=(1, 1))
    assert np.array_equal(filled[~mask], image[~mask])
    target_ring = lesion_statistics(image, mask, (1, 1)).ring_mean
    assert filled[mask].mean() - target_ring == pytest.approx(60, abs=2)
    # same-size lesions centred on their centroids: the donor's texture lands voxel for voxel
    rows, cols = np.nonzero(mask)
    offset = filled[rows, cols] - donor[rows + 18 - 12, cols + 15 - 14]
    assert np.ptp(offset) < 1e-9

    raw = copy_paste_fill(image, mask, donor, donor_mask, match="none")
    assert raw[mask].mean() == pytest.approx(260, abs=1)
    scaled = copy_paste_fill(image, mask, donor, donor_mask, match="mean_std")
    assert np.array_equal(scaled[~mask], image[~mask])


def test_copy_paste_fill_3d_larger_target_and_edge_donor():
    rng = np.random.default_rng(5)
    image = rng.normal(0, 1, (20, 20, 12))
    mask = ball(image.shape, (10, 10, 6), 4)
    donor = rng.normal(0, 1, (16, 16, 10))
    donor_mask = ball(donor.shape, (1, 1, 1), 2)  # at the corner: the crop leaves the image
    filled = copy_paste_fill(image, mask, donor, donor_mask, spacing=(1, 1, 2))
    assert np.all(np.isfinite(filled))
    assert np.array_equal(filled[~mask], image[~mask])
    with pytest.raises(ValueError, match="match"):
        copy_paste_fill(image, mask, donor, donor_mask, match="histogram")
    with pytest.raises(ValueError, match="2D"):
        copy_paste_fill(image, mask, donor[..., 0], donor_mask[..., 0])


# --------------------------------------------------------------------------- kid


def test_kid_near_zero_for_one_distribution_and_positive_for_shifted():
    rng = np.random.default_rng(6)
    a = rng.normal(size=(400, 64))
    b = rng.normal(size=(400, 64))
    same, same_std = kid(a, b, subsets=50, subset_size=100, seed=0)
    shifted, _ = kid(a, b + 0.5, subsets=50, subset_size=100, seed=0)
    assert abs(same) < 0.05
    assert same_std > 0
    assert shifted > 0.5
    assert shifted > 20 * abs(same)
    assert kid(a, b, subsets=5, seed=3) == kid(a, b, subsets=5, seed=3)


def test_kid_rejects_bad_input():
    with pytest.raises(ValueError, match="2 rows"):
        kid(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="dimensions"):
        kid(np.zeros((5, 4)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="subset_size"):
        kid(np.zeros((5, 4)), np.zeros((5, 4)), subset_size=6)


# --------------------------------------------------------------------------- classifier test


def disk_crops(n, brightness, seed, size=32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    crops = np.empty((n, size, size), np.float32)
    for i in range(n):
        centre = rng.uniform(size / 2 - 3, size / 2 + 3, 2)
        radius = rng.uniform(5, 9)
        disk = ball((size, size), centre, radius)
        crops[i] = np.where(disk, brightness, 0.0) + rng.normal(0, 0.3, (size, size))
    return crops


def test_classifier_cannot_tell_one_distribution_apart():
    result = classifier_two_sample_test(
        disk_crops(200, 1.0, seed=1), disk_crops(230, 1.0, seed=2), seed=0
    )
    assert result["n_a"] == result["n_b"] == 200
    assert result["folds"] == 5
    assert result["ci_low"] <= 0.5 <= result["ci_high"]
    assert abs(result["auc"] - 0.5) < 0.1


def test_classifier_tells_bright_from_dark_disks():
    result = classifier_two_sample_test(
        disk_crops(100, 1.0, seed=3), disk_crops(100, 0.3, seed=4), seed=0
    )
    assert result["auc"] > 0.9
    assert result["ci_low"] <= result["auc"] <= result["ci_high"]


def test_classifier_is_deterministic_and_works_in_3d():
    import torch

    rng = np.random.default_rng(7)
    a = rng.normal(0, 1, (12, 8, 8, 8)).astype(np.float32)
    b = rng.normal(0.5, 1, (12, 8, 8, 8)).astype(np.float32)
    state = torch.random.get_rng_state()
    first = classifier_two_sample_test(a, b, folds=3, epochs=2, seed=5)
    second = classifier_two_sample_test(a, b, folds=3, epochs=2, seed=5)
    assert first == second
    assert torch.equal(state, torch.random.get_rng_state())  # global state untouched
    with pytest.raises(ValueError, match="folds"):
        classifier_two_sample_test(a[:2], b, folds=3)
    with pytest.raises(ValueError, match="shapes differ"):
        classifier_two_sample_test(a, b[:, :4], folds=3)


# --------------------------------------------------------------------------- features


def test_disk_is_more_compact_than_square_and_elongation():
    image = np.random.default_rng(8).normal(0, 1, (64, 64))
    disk = ball(image.shape, (32, 32), 14)
    square = np.zeros(image.shape, bool)
    square[19:45, 19:45] = True
    bar = np.zeros(image.shape, bool)
    bar[30:34, 10:54] = True
    fd = texture_shape_features(image, disk, (0.5, 0.5))
    fs = texture_shape_features(image, square, (0.5, 0.5))
    fb = texture_shape_features(image, bar, (0.5, 0.5))
    assert fd["shape_compactness"] > fs["shape_compactness"] + 0.03
    assert fs["shape_compactness"] > fb["shape_compactness"]
    assert fd["shape_size"] == pytest.approx(disk.sum() * 0.25)
    assert fd["shape_equivalent_diameter_mm"] == pytest.approx(14, rel=0.05)
    assert fd["shape_elongation"] > 0.95 and fb["shape_elongation"] < 0.2
    assert fs["shape_solidity"] == pytest.approx(1.0)


def test_glcm_contrast_checkerboard_above_flat_patch():
    mask = np.zeros((24, 24), bool)
    mask[4:20, 4:20] = True
    checker = (np.indices((24, 24)).sum(axis=0) % 2).astype(float)
    flat = np.full((24, 24), 3.0)
    flat[0, 0] = 100.0  # outside the mask: must not enter the GLCM
    fc = texture_shape_features(checker, mask, (1, 1))
    ff = texture_shape_features(flat, mask, (1, 1))
    assert fc["glcm_contrast"] > 10 * (ff["glcm_contrast"] + 1e-3)
    assert ff["glcm_contrast"] == 0.0
    assert ff["glcm_homogeneity"] == pytest.approx(1.0)
    assert ff["intensity_std"] == 0.0 and ff["intensity_skewness"] == 0.0


def test_features_in_3d_and_on_degenerate_masks():
    rng = np.random.default_rng(9)
    image = rng.normal(0, 1, (20, 20, 10))
    features = texture_shape_features(image, ball(image.shape, (10, 10, 5), 4), (1, 1, 2))
    assert all(np.isfinite(v) for v in features.values())
    assert 0.7 < features["shape_compactness"] <= 1.0

    flat = np.zeros(image.shape, bool)
    flat[5:12, 6:9, 4] = True  # one slice thick
    line = np.zeros(image.shape, bool)
    line[3:15, 7, 2] = True
    for mask in (flat, line):
        values = texture_shape_features(image, mask, (0.7, 0.7, 3.0))
        assert all(np.isfinite(v) for v in values.values()), values
        assert values["shape_solidity"] == pytest.approx(1.0)

    single = np.zeros(image.shape, bool)
    single[4, 4, 4] = True
    values = texture_shape_features(image, single, (1, 1, 1))
    glcm = {k for k, v in values.items() if not np.isfinite(v)}
    assert glcm == {k for k in values if k.startswith("glcm_")}  # nan only where undefined
    with pytest.raises(ValueError, match="empty"):
        texture_shape_features(image, np.zeros(image.shape, bool), (1, 1, 1))


def test_feature_distribution_distances():
    rng = np.random.default_rng(10)
    reference = [{"a": x, "b": y} for x, y in rng.normal(size=(100, 2))]
    identical = feature_distribution_distances(reference, reference)
    assert identical["mean_ks"] == 0.0
    assert identical["mean_wasserstein_sd"] == 0.0
    shifted = [{"a": row["a"] + 3, "b": row["b"] + 3, "c": 1.0} for row in reference]
    shifted[0]["a"] = float("nan")
    far = feature_distribution_distances(reference, shifted)
    assert set(far["features"]) == {"a", "b"}  # "c" absent from the reference
    assert far["features"]["a"]["n_other"] == 99
    assert far["mean_ks"] > 0.8
    assert far["mean_wasserstein_sd"] == pytest.approx(3, rel=0.15)
    with pytest.raises(ValueError, match="non-empty"):
        feature_distribution_distances([], reference)
