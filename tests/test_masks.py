"""Target masks: procedural shapes, jittered transplants, placement constraints."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import AFFINE, ct_image, lesion_mask, write_dataset

from synthlesion.data.sources import load_cases
from synthlesion.masks import (
    MaskBank,
    PlacementConstraint,
    PlacementError,
    jitter_mask,
    place_mask,
    procedural_mask,
)


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.8, 0.8, 2.5)])
def test_procedural_mask_has_the_asked_size_and_is_binary(spacing):
    rng = np.random.default_rng(0)
    target = 400.0 if len(spacing) == 2 else 3000.0
    volumes = []
    for _ in range(10):
        mask = procedural_mask(rng, spacing, target)
        assert mask.dtype == bool and mask.ndim == len(spacing)
        volumes.append(mask.sum() * np.prod(spacing))
    assert 0.6 * target < np.median(volumes) < 1.4 * target


def test_jitter_keeps_shape_on_identity_and_is_nearest():
    patch = procedural_mask(np.random.default_rng(1), (1.0, 1.0, 1.0), 2000.0)
    same = jitter_mask(
        patch,
        (1, 1, 1),
        (1, 1, 1),
        np.random.default_rng(0),
        rotation_deg=0,
        scale=(1.0, 1.0),
        elastic_mm=0,
    )
    assert same.shape == patch.shape and (same == patch).all()
    moved = jitter_mask(patch, (1, 1, 1), (1.0, 1.0, 2.0), np.random.default_rng(0))
    assert moved.dtype == bool
    ratio = moved.sum() * 2.0 / patch.sum()
    assert 0.4 < ratio < 2.2  # scale in [0.8, 1.25] cubed, and a resampling
    with pytest.raises(ValueError, match="anatomical bound"):
        jitter_mask(patch, (1, 1, 1), (1, 1, 1), np.random.default_rng(0), rotation_deg=90)


def test_placement_respects_tissue_border_and_existing_lesions():
    shape = (40, 40, 20)
    labels = np.zeros(shape, np.uint8)
    labels[5:35, 5:35, 2:18] = 1
    labels[8:12, 8:12, 8:12] = 2
    constraint = PlacementConstraint(
        tissue_labels=(1,), min_border_distance_mm=2.0, min_lesion_distance_mm=5.0
    )
    allowed = constraint.allowed(labels, None, (1.0, 1.0, 1.0))
    patch = procedural_mask(np.random.default_rng(2), (1.0, 1.0, 1.0), 150.0)
    for seed in range(5):
        full, corner = place_mask(patch, allowed, np.random.default_rng(seed))
        assert full.sum() == patch.sum()
        assert (labels[full] == 1).all()
        assert allowed[full].all()
    with pytest.raises(PlacementError):
        place_mask(np.ones((30, 30, 30), bool), allowed, np.random.default_rng(0))
    with pytest.raises(PlacementError, match="label map"):
        constraint.allowed(None, np.zeros(shape), (1, 1, 1))


def test_intensity_range_constraint():
    image = np.zeros((30, 30))
    image[10:20, 10:20] = 50
    constraint = PlacementConstraint(
        tissue_labels=(), intensity_range=(40, 60), existing_lesion_labels=()
    )
    allowed = constraint.allowed(None, image, (1.0, 1.0))
    full, _ = place_mask(np.ones((3, 3), bool), allowed, np.random.default_rng(0))
    assert (image[full] == 50).all()


def test_bank_from_real_cases(tmp_path):
    mask = lesion_mask()
    mask[2:5, 2:5, 2:5] = 1  # a second, separate lesion
    mask[20:22, 2:4, 2:4] = 1  # a speck of 8 voxels: not a lesion
    path = write_dataset(tmp_path / "ds", {"a": (ct_image(), mask), "b": (ct_image(), None)})
    bank = MaskBank.from_cases(load_cases(path))
    assert len(bank.lesions) == 2
    assert {lesion.source_case for lesion in bank.lesions} == {"a"}
    spacing = tuple(np.sqrt((AFFINE[:3, :3] ** 2).sum(0)))
    assert bank.lesions[0].spacing == pytest.approx(spacing)
    assert sorted(bank.volumes_mm3()) == pytest.approx(
        sorted([27 * 2.5, lesion_mask().sum() * 2.5])
    )
    assert bank.draw(np.random.default_rng(0)) in bank.lesions
