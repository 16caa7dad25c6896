"""Lesion-protecting cutout and CutMix: the protections hold for any drawn parameters."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from synthlesion.augment import (
    APPLIED_KEY,
    AugmentationError,
    LesionCutMix,
    LesionMixup,
    RandCutout,
)

SHAPES = {2: (48, 40), 3: (20, 22, 18)}


def lesion_scene(nd: int, seed: int, batch: int = 4, lesions: int = 3) -> dict:
    """Images, a label map (1 tissue, 2 lesion) with a few ellipsoid lesions per sample."""
    rng = np.random.default_rng(seed)
    shape = SHAPES[nd]
    grid = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    label = np.zeros((batch, 1, *shape), dtype=np.uint8)
    label[:, :, 2:-2] = 1
    for b in range(batch):
        for _ in range(int(rng.integers(0, lesions + 1))):
            centre = [rng.uniform(3, n - 3) for n in shape]
            radius = [rng.uniform(1.5, 5.0) for _ in shape]
            r2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radius, strict=True))
            label[b, 0][r2 <= 1] = 2
    image = rng.normal(size=(batch, 2, *shape)).astype(np.float32) + 3.0 * (label == 2)
    return {"image": torch.from_numpy(image), "label": torch.from_numpy(label)}


def components(mask: np.ndarray) -> list[np.ndarray]:
    labels, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    return [labels == i for i in range(1, n + 1)]


@pytest.mark.parametrize("nd", [2, 3])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    holes=st.integers(1, 6),
    low=st.floats(1.0, 8.0),
    extra=st.floats(0.0, 12.0),
    share=st.floats(0.0, 0.5),
)
def test_cutout_never_covers_more_than_the_share_of_any_lesion(nd, seed, holes, low, extra, share):
    data = lesion_scene(nd, seed)
    t = RandCutout("image", "label", num_holes=(1, holes), size=(low, low + extra), fill=-7.0,
                   lesion_key="label", lesion_values=(2,), max_lesion_share=share, max_tries=8,
                   seed=seed)  # fmt: skip
    out = t(data)
    assert torch.equal(out["label"], data["label"])  # labels never change
    params = out[APPLIED_KEY][-1]["params"]
    for b in range(4):
        hidden = (out["image"][b] == -7.0).all(0).numpy()
        holes_b = [r for r in params["holes"][b].tolist() if r[0] >= 0]
        # every placed hole is filled, nothing else is
        expected = np.zeros(SHAPES[nd], dtype=bool)
        for r in holes_b:
            expected[tuple(slice(a, z) for a, z in zip(r[:nd], r[nd:], strict=True))] = True
        assert np.array_equal(hidden, expected)
        for lesion in components(data["label"][b, 0].numpy() == 2):
            assert (hidden & lesion).sum() <= share * lesion.sum() + 1e-9


def test_cutout_protects_boxes_too():
    data = lesion_scene(2, 3)
    boxes = torch.tensor([[[10.0, 10.0, 30.0, 30.0]]] * 4, dtype=torch.float64)
    t = RandCutout("image", num_holes=4, size=(4.0, 10.0), fill=-7.0, box_key="boxes",
                   box_format="xyxy_voxel", max_lesion_share=0.05, seed=1)  # fmt: skip
    out = t(dict(data, boxes=boxes))
    hidden = (out["image"] == -7.0).all(1)
    assert (hidden[:, 10:30, 10:30].float().mean((1, 2)) <= 0.05).all()
    assert hidden.any()


def test_impossible_cutout_is_reported_per_sample_not_retried_forever(caplog):
    data = lesion_scene(2, 0)
    data["label"][:, :, 4:-4, 4:-4] = 2  # one lesion almost everywhere
    t = RandCutout("image", "label", num_holes=2, size=30.0, lesion_key="label",
                   lesion_values=(2,), max_lesion_share=0.01, max_tries=5, seed=0)  # fmt: skip
    with caplog.at_level(logging.WARNING):
        out = t(data)
    assert "key 'label'" in caplog.text and "samples [0, 1, 2, 3]" in caplog.text
    assert out[APPLIED_KEY][-1]["params"]["unplaced"].tolist() == [2, 2, 2, 2]
    assert torch.equal(out["image"], data["image"])
    strict = RandCutout("image", "label", num_holes=2, size=30.0, lesion_key="label",
                        lesion_values=(2,), max_lesion_share=0.01, max_tries=5,
                        on_failure="raise", seed=0)  # fmt: skip
    with pytest.raises(AugmentationError, match="RandCutout: key 'label'.*samples"):
        strict(data)


def test_cutout_fills():
    data = lesion_scene(2, 1)
    for fill in ("mean", "noise", 0.0):
        t = RandCutout("image", num_holes=1, size=10.0, fill=fill, seed=2)
        out = t(data)
        changed = (out["image"] != data["image"]).any(1)
        assert changed.any()
    with pytest.raises(AugmentationError, match="fill"):
        RandCutout("image", fill="zero")
    with pytest.raises(AugmentationError, match="box_format not named"):
        RandCutout("image", box_key="boxes")


@pytest.mark.parametrize("nd", [2, 3])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), low=st.floats(0.1, 0.6), fragment=st.integers(0, 30))
def test_cutmix_labels_exact_and_no_small_fragments(nd, seed, low, fragment):
    data = lesion_scene(nd, seed)
    onehot = torch.nn.functional.one_hot(torch.arange(4) % 3, 3).double()
    t = LesionCutMix("image", "label", size=(low, min(1.0, low + 0.3)), lesion_values=(2,),
                     min_fragment=fragment, scalar_keys="y", seed=seed)  # fmt: skip
    out = t(dict(data, y=onehot))
    params = out[APPLIED_KEY][-1]["params"]
    volume = float(np.prod(SHAPES[nd]))
    for b in range(4):
        j = int(params["partner"][b])
        patch = params["patch"][b].tolist()
        if not bool(out[APPLIED_KEY][-1]["applied"][b]):
            assert torch.equal(out["label"][b], data["label"][b])
            assert torch.equal(out["y"][b], onehot[b])
            continue
        region = (slice(None),) + tuple(
            slice(a, z) for a, z in zip(patch[:nd], patch[nd:], strict=True)
        )
        inside = torch.zeros_like(data["label"][b], dtype=torch.bool)
        inside[region] = True
        # labels copied exactly: the partner's inside, the sample's own outside
        assert torch.equal(out["label"][b], torch.where(inside, data["label"][j], data["label"][b]))
        assert torch.equal(out["image"][b], torch.where(inside, data["image"][j], data["image"][b]))
        lam = inside.sum().item() / volume
        torch.testing.assert_close(out["y"][b], (1 - lam) * onehot[b] + lam * onehot[j])
        # no lesion cut into a piece under min_fragment
        for lesion, keep in (
            (data["label"][b, 0] == 2, ~inside[0]),
            (data["label"][j, 0] == 2, inside[0]),
        ):
            for comp in components(lesion.numpy()):
                kept = int((torch.from_numpy(comp) & keep).sum())
                assert kept in (0, int(comp.sum())) or kept >= fragment


def test_cutmix_boxes_follow_the_patch():
    data = lesion_scene(2, 5, lesions=2)
    boxes = torch.full((4, 4, 4), float("nan"), dtype=torch.float64)
    for b in range(4):  # one box per lesion component
        for n, comp in enumerate(components(data["label"][b, 0].numpy() == 2)[:4]):
            idx = np.argwhere(comp)
            boxes[b, n] = torch.tensor([*idx.min(0), *(idx.max(0) + 1)], dtype=torch.float64)
    t = LesionCutMix("image", "label", size=(0.3, 0.6), lesion_values=(2,), min_fragment=0,
                     box_keys="boxes", box_format="xyxy_voxel", box_mask_key="label", seed=4)  # fmt: skip
    out = t(dict(data, boxes=boxes))
    assert out["boxes"].shape == (4, 8, 4)
    for b in range(4):
        lesion = out["label"][b, 0] == 2
        covered = torch.zeros_like(lesion)
        for row in out["boxes"][b]:
            if torch.isnan(row).any():
                continue
            lo, hi = row[:2].long().tolist(), row[2:].long().tolist()
            assert lesion[lo[0] : hi[0], lo[1] : hi[1]].any()  # every box holds lesion voxels
            covered[lo[0] : hi[0], lo[1] : hi[1]] = True
        assert not (lesion & ~covered).any()  # every lesion voxel lies in some box
    with pytest.raises(AugmentationError, match="voxel boxes"):
        LesionCutMix("image", "label", box_keys="boxes", box_format="xyxy_world")


def test_integer_scalar_labels_are_refused_naming_the_key():
    data = lesion_scene(2, 0)
    t = LesionCutMix("image", "label", scalar_keys="grade", seed=0)
    with pytest.raises(AugmentationError, match="key 'grade'.*one-hot"):
        t(dict(data, grade=torch.tensor([0, 1, 2, 1])))


def test_mixup_mixes_scalar_labels_with_the_pixel_weight():
    data = lesion_scene(2, 2, lesions=3)
    y = torch.tensor([0.0, 1.0, 0.0, 1.0])
    image_mix = LesionMixup("image", "label", lam=0.3, region="image", scalar_keys="y", seed=0)
    out = image_mix(dict(data, y=y))
    partner = out[APPLIED_KEY][-1]["params"]["partner"]
    torch.testing.assert_close(out["y"], 0.7 * y + 0.3 * y[partner])
    lesion_mix = LesionMixup("image", "label", lam=0.5, region="lesion", lesion_values=(2,),
                             scalar_keys="y", seed=0)  # fmt: skip
    out = lesion_mix(dict(data, y=y))
    partner = out[APPLIED_KEY][-1]["params"]["partner"]
    share = (data["label"][:, 0] == 2).flatten(1).double().mean(1)[partner]
    w = (0.5 * share).float()
    torch.testing.assert_close(out["y"], (1 - w) * y + w * y[partner])
