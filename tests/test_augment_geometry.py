"""Boxes, points, scalar labels and affines follow every spatial transform and its inverse."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from monai.data import MetaTensor
from torch.utils.data import DataLoader, default_collate

from synthlesion.augment import (
    APPLIED_KEY,
    AugmentationError,
    Compose,
    RandAffine,
    RandCropByLabel,
    RandElastic,
    RandFlip,
    RandGaussianNoise,
    invert,
)

SHAPES = {2: (40, 44), 3: (24, 26, 28)}
FORMAT = {2: "xyxy_voxel", 3: "xyzxyz_voxel"}


def scene(nd: int, batch: int = 3, seed: int = 0) -> dict:
    """Images, a label map with two lesions per sample (label 2, 3) and their boxes."""
    gen = torch.Generator().manual_seed(seed)
    shape = SHAPES[nd]
    image = torch.randn((batch, 1, *shape), generator=gen)
    label = torch.zeros((batch, 1, *shape), dtype=torch.uint8)
    boxes = torch.full((batch, 3, 2 * nd), float("nan"), dtype=torch.float64)
    grid = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij")
    for b in range(batch):
        for n, value in enumerate((2, 3)):
            centre = [
                float(torch.randint(n_ // 3, 2 * n_ // 3, (1,), generator=gen)) for n_ in shape
            ]
            radius = [2.5 + n + b % 2] * nd
            r2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radius, strict=True))
            lesion = (r2 <= 1) & (label[b, 0] == 0)
            label[b, 0][lesion] = value
            idx = lesion.nonzero()
            boxes[b, n] = torch.cat([idx.amin(0), idx.amax(0) + 1]).to(torch.float64)
    return {"image": image, "label": label, "boxes": boxes, "spacing": (1.0,) * nd}


def lesion_box(label: torch.Tensor, value: int) -> torch.Tensor | None:
    idx = (label == value).nonzero()
    if idx.shape[0] == 0:
        return None
    return torch.cat([idx.amin(0), idx.amax(0) + 1]).to(torch.float64)


def spatial(nd: int, rotate: float, scale: float, shift: float, elastic: float, mask: bool):
    geometry = {"box_keys": "boxes", "box_format": FORMAT[nd], "point_keys": "points",
                "point_format": "voxel", "box_mask_key": "label" if mask else None}  # fmt: skip
    return Compose(
        [
            RandFlip("image", "label", axes=0, **geometry),
            RandAffine("image", "label", rotate=rotate, scale=scale, translate=shift, **geometry),
            RandElastic("image", "label", control_points=5, max_displacement=elastic, **geometry),
        ],
        seed=7,
    )


@pytest.mark.parametrize("nd", [2, 3])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rotate=st.floats(-30, 30),
    scale=st.floats(0.8, 1.25),
    shift=st.floats(-4, 4),
    elastic=st.floats(0, 2),
)
def test_boxes_from_mask_equal_the_transformed_lesions(nd, rotate, scale, shift, elastic):
    data = scene(nd)
    data["points"] = data["boxes"][:, :2, :nd].clone() + 1
    out = spatial(nd, rotate, scale, shift, elastic, mask=True)(data)
    for b in range(3):
        for n, value in enumerate((2, 3)):
            want = lesion_box(out["label"][b, 0], value)
            got = out["boxes"][b, n]
            if want is None:
                assert torch.isnan(got).all()
            else:
                torch.testing.assert_close(got, want)


@pytest.mark.parametrize("nd", [2, 3])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rotate=st.floats(-30, 30), scale=st.floats(0.8, 1.25), shift=st.floats(-4, 4))
def test_corner_boxes_contain_the_transformed_lesions(nd, rotate, scale, shift):
    data = scene(nd)
    data["points"] = data["boxes"][:, :2, :nd].clone()
    out = spatial(nd, rotate, scale, shift, 0.0, mask=False)(data)
    for b in range(3):
        for n, value in enumerate((2, 3)):
            want = lesion_box(out["label"][b, 0], value)
            if want is None:
                continue
            got = out["boxes"][b, n]
            assert not torch.isnan(got).any()
            assert (got[:nd] <= want[:nd] + 0.5).all() and (got[nd:] >= want[nd:] - 0.5).all()


@pytest.mark.parametrize("nd", [2, 3])
def test_points_follow_the_anatomy_and_invert_back(nd):
    data = scene(nd, batch=2)
    centroids = torch.stack(
        [(data["label"][b, 0] == 2).nonzero().double().mean(0) for b in range(2)]
    )[:, None]  # (B, 1, d)
    data["points"] = centroids.clone()
    pipe = spatial(nd, 20.0, 1.1, 2.0, 0.0, mask=True)
    out = pipe(data)
    moved = torch.stack([(out["label"][b, 0] == 2).nonzero().double().mean(0) for b in range(2)])
    assert (out["points"][:, 0] - moved).abs().max() < 0.6  # nearest resampling: half a voxel
    back = invert(out, "image", box_keys="boxes", box_format=FORMAT[nd], point_keys="points",
                  point_format="voxel")  # fmt: skip
    torch.testing.assert_close(back["points"], centroids, atol=1e-6, rtol=0)
    for b in range(2):  # boxes map back to boxes around the original lesions
        for n in range(2):
            assert (back["boxes"][b, n, :nd] <= data["boxes"][b, n, :nd] + 1e-6).all()
            assert (back["boxes"][b, n, nd:] >= data["boxes"][b, n, nd:] - 1e-6).all()


@pytest.mark.parametrize("nd", [2, 3])
def test_elastic_points_invert_back(nd):
    data = scene(nd, batch=2)
    data["points"] = data["boxes"][:, :2, :nd].clone() + 1
    out = spatial(nd, 10.0, 1.0, 0.0, 2.0, mask=False)(data)
    back = invert(out, "image", point_keys="points", point_format="voxel")
    torch.testing.assert_close(back["points"], data["points"], atol=1e-3, rtol=0)


@pytest.mark.parametrize("rule", ["drop", "flag"])
def test_boxes_and_points_that_leave_the_image(rule):
    data = scene(2, batch=1)
    data["points"] = torch.tensor([[[5.0, 5.0], [20.0, 22.0]]], dtype=torch.float64)
    t = RandAffine("image", "label", rotate=0.0, scale=1.0, translate=((30.0, 30.0), 0.0),
                   box_keys="boxes", box_format="xyxy_voxel", point_keys="points",
                   point_format="voxel", outside=rule, allow_extreme=True)  # fmt: skip
    out = t(data)
    # everything moved +30 voxels along axis 0 (40 long): the point at 20 leaves, 5 stays
    if rule == "drop":
        assert torch.isnan(out["points"][0, 1]).all()
        torch.testing.assert_close(
            out["points"][0, 0], torch.tensor([35.0, 5.0], dtype=torch.float64)
        )
    else:
        assert out["points_inside"].tolist() == [[True, False]]
        assert not torch.isnan(out["points"]).any()
    for n in range(2):
        lo = float(data["boxes"][0, n, 0]) + 30
        if lo >= 40:
            assert (
                torch.isnan(out["boxes"][0, n]).all()
                if rule == "drop"
                else not bool(out["boxes_inside"][0, n])
            )
        else:
            assert float(out["boxes"][0, n, 2]) <= 40  # clipped to the image


def test_bad_boxes_are_refused_naming_the_key():
    data = scene(2, batch=1)
    with pytest.raises(
        AugmentationError, match="box_format not named.*'boxes'|'boxes'.*box_format"
    ):
        RandFlip("image", "label", box_keys="boxes")
    with pytest.raises(AugmentationError, match="not in"):
        RandFlip("image", "label", box_keys="boxes", box_format="xywh")
    bad = dict(data, boxes=torch.tensor([[[1.0, 2.0, 50.0, 10.0]]]))
    with pytest.raises(AugmentationError, match="'boxes'.*outside the image"):
        RandFlip("image", "label", box_keys="boxes", box_format="xyxy_voxel")(bad)
    flipped = dict(data, boxes=torch.tensor([[[9.0, 2.0, 5.0, 10.0]]]))
    with pytest.raises(AugmentationError, match="hi < lo"):
        RandFlip("image", "label", box_keys="boxes", box_format="xyxy_voxel")(flipped)
    with pytest.raises(AugmentationError, match="does not fit 2D"):
        RandFlip("image", "label", box_keys="boxes", box_format="xyzxyz_voxel")(data)
    with pytest.raises(AugmentationError, match="world coordinates need the image's affine"):
        RandFlip("image", "label", box_keys="boxes", box_format="xyxy_world")(data)
    with pytest.raises(AugmentationError, match="shape"):
        RandFlip("image", "label", box_keys="boxes", box_format="xyxy_voxel")(
            dict(data, boxes=torch.zeros(1, 2, 3))
        )


def test_world_boxes_and_affines_follow_like_monai():
    """The affine becomes ``affine @ M`` (MONAI's convention: the anatomy keeps its world
    position), so a world point stays and a world box stays around its lesion."""
    data = scene(3, batch=1)
    affine = torch.tensor(
        [[-2.0, 0, 0, 30], [0, 1.5, 0, -10], [0, 0, 3.0, 5], [0, 0, 0, 1]], dtype=torch.float64
    )
    item = {
        "image": MetaTensor(data["image"][0], affine=affine),
        "label": MetaTensor(data["label"][0], affine=affine),
    }
    voxel_box = data["boxes"][0, :1]
    corners = torch.stack([voxel_box[0, :3] - 0.5, voxel_box[0, 3:] - 0.5])
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    item["boxes"] = torch.cat([world.amin(0), world.amax(0)])[None]
    centroid = (data["label"][0, 0] == 2).nonzero().double().mean(0)
    item["points"] = (affine[:3, :3] @ centroid + affine[:3, 3])[None]
    t = RandAffine("image", "label", rotate=(15, 15), translate=(3, 3), box_keys="boxes",
                   box_format="xyzxyz_world", point_keys="points", point_format="world",
                   box_mask_key="label")  # fmt: skip
    out = t(item)
    assert isinstance(out["image"], MetaTensor) and isinstance(out["label"], MetaTensor)
    new_affine = out["image"].affine.to(torch.float64)
    assert not torch.allclose(new_affine, affine)
    torch.testing.assert_close(out["label"].affine.to(torch.float64), new_affine)
    # the lesion's world centroid did not move (up to nearest resampling)
    moved = (out["label"][0] == 2).nonzero().double().mean(0)
    moved_world = new_affine[:3, :3] @ moved + new_affine[:3, 3]
    assert (moved_world - item["points"][0]).abs().max() < 2.0
    torch.testing.assert_close(out["points"], item["points"], atol=1e-6, rtol=0)
    # the world box still holds the lesion's voxels, in world mm
    idx = (out["label"][0] == 2).nonzero().double()
    pts = idx @ new_affine[:3, :3].T + new_affine[:3, 3]
    box = out["boxes"][0]
    assert (pts >= box[:3] - 1e-6).all() and (pts <= box[3:] + 1e-6).all()
    # the spacing came from the affine (mm): the rotation was isotropic in the patient
    assert out[APPLIED_KEY][-1]["params"]["spacing"].tolist() == [2.0, 1.5, 3.0]
    # and inverting restores the affine
    back = invert(out, "image", spatial_dims=3)
    torch.testing.assert_close(back["image"].affine.to(torch.float64), affine, atol=1e-9, rtol=0)


def test_meta_dict_affines_and_crops_update():
    data = scene(3, batch=1)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    item = {"image": data["image"][0], "label": data["label"][0],
            "image_meta_dict": {"affine": affine.copy()}}  # fmt: skip
    crop = RandCropByLabel("image", "label", roi_size=(8, 8, 8), num_samples=2, spatial_dims=3)
    items = crop(item)
    starts = items[0][APPLIED_KEY][-1]["params"]["start"]
    for j, it in enumerate(items):
        got = it["image_meta_dict"]["affine"]
        assert isinstance(got, np.ndarray)
        np.testing.assert_allclose(got[:3, 3], 2.0 * starts[j].numpy())
    assert np.array_equal(item["image_meta_dict"]["affine"], affine)  # the input is untouched


def test_monai_batched_metatensor_keeps_per_sample_affines():
    data = scene(2, batch=2)
    affines = torch.stack([torch.eye(4, dtype=torch.float64)] * 2)
    affines[1, 0, 3] = 7.0
    image = MetaTensor(data["image"], affine=affines)
    image.is_batch = True
    out = RandFlip("image", axes=0, flip_probability=1.0)({"image": image})
    got = out["image"].affine
    assert got.shape == (2, 4, 4) and out["image"].is_batch
    want = affines.clone()  # voxel x of the output is voxel 39 - x of the input
    want[:, 0, 0] = -1
    want[:, 0, 3] += 39
    torch.testing.assert_close(got.to(torch.float64), want, atol=1e-9, rtol=0)


class _Items(torch.utils.data.Dataset):
    def __init__(self, pipe):
        self.pipe = pipe

    def __len__(self):
        return 4

    def __getitem__(self, i):
        item = scene(2, batch=1, seed=i)
        item = {"image": item["image"][0], "label": item["label"][0], "grade": float(i),
                "onehot": torch.nn.functional.one_hot(torch.tensor(i % 3), 3).float(),
                "case_id": f"case-{i}"}  # fmt: skip
        return self.pipe(item)


def test_scalar_labels_pass_untouched_and_collate():
    pipe = Compose([
        RandFlip("image", "label", spatial_dims=2),
        RandAffine("image", "label", rotate=(-10, 10), spatial_dims=2),
        RandElastic("image", "label", max_displacement=1.0, spatial_dims=2),
        RandGaussianNoise("image", spatial_dims=2),
    ], seed=0)  # fmt: skip
    batch = next(iter(DataLoader(_Items(pipe), batch_size=4, collate_fn=default_collate)))
    assert batch["grade"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert batch["onehot"].argmax(1).tolist() == [0, 1, 2, 0]
    assert batch["case_id"] == ["case-0", "case-1", "case-2", "case-3"]
    assert batch["image"].shape == (4, 1, *SHAPES[2])


def test_batched_boxes_equal_each_element_alone():
    data = scene(2, batch=3)
    t = RandAffine("image", "label", rotate=(-20, 20), translate=(-3, 3), box_keys="boxes",
                   box_format="xyxy_voxel", box_mask_key="label", seed=3)  # fmt: skip
    out = t(data)
    from synthlesion.augment import Params

    params = Params.from_record(out[APPLIED_KEY][-1])
    for i in range(3):
        sub = {k: data[k][i : i + 1] for k in ("image", "label", "boxes")}
        alone = t.apply(dict(sub, spacing=data["spacing"]), params.select(i))
        torch.testing.assert_close(alone["boxes"], out["boxes"][i : i + 1], equal_nan=True)
        assert math.isfinite(float(alone["boxes"][0, 0, 0]))


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("batched", [True, False])
def test_crops_cut_boxes_and_points(nd, batched):
    data = scene(nd, batch=2)
    data["points"] = data["boxes"][:, :2, :nd].clone()
    roi = (12,) * nd
    crop = RandCropByLabel("image", "label", roi_size=roi, num_samples=3, box_keys="boxes",
                           box_format=FORMAT[nd], point_keys="points", point_format="voxel",
                           outside="flag", spatial_dims=None if batched else nd, seed=2)  # fmt: skip
    if batched:
        out = crop(data)
        crops = [{k: out[k][i] for k in ("image", "label", "boxes", "points", "boxes_inside")}
                 for i in range(6)]  # fmt: skip
        starts = out[APPLIED_KEY][-1]["params"]["start"].reshape(6, nd)
    else:
        crops, starts = [], []
        for b in range(2):
            item = {"image": data["image"][b], "label": data["label"][b],
                    "boxes": data["boxes"][b], "points": data["points"][b]}  # fmt: skip
            items = crop(item)
            crops += items
            starts += list(items[0][APPLIED_KEY][-1]["params"]["start"])
    for i, c in enumerate(crops):
        b = i // 3
        start = torch.as_tensor(starts[i], dtype=torch.float64)
        torch.testing.assert_close(c["points"], data["points"][b] - start)
        for n, value in enumerate((2, 3)):
            want = lesion_box(c["label"][0], value)
            got = c["boxes"][n]
            if want is None:  # the lesion is not in this crop (its box's corners may be)
                continue
            assert bool(c["boxes_inside"][n])
            # the clipped box equals the visible part of the lesion's box
            assert (got[:nd] <= want[:nd]).all() and (got[nd:] >= want[nd:]).all()
            assert (got[:nd] >= 0).all() and (got[nd:] <= torch.tensor(roi)).all()
