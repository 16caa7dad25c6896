"""Spatial transforms: fusion into one grid, label exactness, physical spacing, bounds, inverses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synthlesion.augment import (
    APPLIED_KEY,
    AnatomyBoundError,
    Compose,
    RandAffine,
    RandElastic,
    RandFlip,
    invert,
)
from synthlesion.augment import grid as grid_module
from synthlesion.augment import warp as warp_module
from synthlesion.augment.base import BatchInfo
from synthlesion.augment.grid import upsample
from synthlesion.augment.warp import _exact_flips, composite_voxel_grid, flip_per_axis


def smooth_image(shape: tuple[int, ...], batch: int = 2) -> torch.Tensor:
    axes = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape], indexing="ij")
    img = torch.cos(1.5 * axes[0]) + 0.5 * torch.sin(2 * axes[1]) + 0.3 * axes[-1]
    return img[None, None].repeat(batch, 1, *([1] * len(shape))).contiguous()


def disk_label(
    shape: tuple[int, ...], spacing: tuple[float, ...], radius_mm: float
) -> torch.Tensor:
    axes = torch.meshgrid(
        *[(torch.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)],
        indexing="ij",
    )
    return (sum(a**2 for a in axes) < radius_mm**2).to(torch.uint8)[None, None]


def test_upsample_matches_interpolate() -> None:
    coarse = torch.randn(2, 5, 6, 7, 3, dtype=torch.float64)
    ours = upsample(coarse, (17, 19, 23))
    ref = F.interpolate(
        coarse.movedim(-1, 1), size=(17, 19, 23), mode="trilinear", align_corners=True
    ).movedim(1, -1)
    torch.testing.assert_close(ours, ref)


def _count_samplings(monkeypatch: pytest.MonkeyPatch, sampler: str) -> list[tuple]:
    """Record (spatial shape, mode) of every full resampling the chosen sampler makes."""
    calls: list[tuple] = []
    if sampler == "torch":
        real = F.grid_sample

        def counting(input, grid, mode="bilinear", **kwargs):
            calls.append((tuple(grid.shape[1:-1]), mode))
            return real(input, grid, mode=mode, **kwargs)

        monkeypatch.setattr(grid_module.F, "grid_sample", counting)
    else:
        pytest.importorskip("numba")
        real_native = warp_module.warp_sample

        def counting_native(source, coarse, *, mode, **kwargs):
            calls.append((tuple(source.shape[2:]), "bilinear" if mode == "linear" else mode))
            return real_native(source, coarse, mode=mode, **kwargs)

        monkeypatch.setattr(warp_module, "warp_sample", counting_native)
    return calls


@pytest.mark.parametrize("sampler", ["torch", "native"])
def test_fused_pipeline_samples_once(monkeypatch: pytest.MonkeyPatch, sampler: str) -> None:
    """Affine + elastic + flip: one linear sampling for images, one nearest for labels."""
    calls = _count_samplings(monkeypatch, sampler)
    shape = (16, 18, 20)
    image = smooth_image(shape, batch=2)
    label = disk_label(shape, (1, 1, 1), 5).repeat(2, 1, 1, 1, 1)
    pipe = Compose(
        [
            RandAffine("image", "label", rotate=(-10, 10), sampler=sampler),
            RandElastic("image", "label", control_points=5, max_displacement=1.5, sampler=sampler),
            RandFlip("image", "label", axes=(0, 1), sampler=sampler),
        ],
        seed=0,
    )
    out = pipe({"image": image, "label": label})
    full = [c for c in calls if c[0] == shape]
    assert sorted(mode for _, mode in full) == ["bilinear", "nearest"]
    assert [r["name"] for r in out[APPLIED_KEY]] == ["RandAffine", "RandElastic", "RandFlip"]


@pytest.mark.parametrize("sampler", ["torch", "native"])
def test_unfused_compose_resamples_each_time(monkeypatch: pytest.MonkeyPatch, sampler: str) -> None:
    calls = _count_samplings(monkeypatch, sampler)
    image = smooth_image((12, 12))
    pipe = Compose(
        [
            RandAffine("image", sampler=sampler),
            RandElastic("image", control_points=4, max_displacement=1.0, sampler=sampler),
        ],
        fuse=False,
        seed=0,
    )
    pipe({"image": image})
    assert len([c for c in calls if c[0] == (12, 12)]) == 2  # full-resolution samplings


def test_fused_close_to_sequential_on_smooth_image() -> None:
    shape = (32, 32, 32)
    image = smooth_image(shape)
    parts = [
        RandAffine("image", rotate=(-10, 10), scale=(0.9, 1.1)),
        RandElastic("image", control_points=5, max_displacement=2.0),
    ]
    fused = Compose(parts, seed=3)({"image": image})
    seq = Compose(parts, fuse=False, seed=3)({"image": image})
    interior = (slice(None), slice(None)) + (slice(6, -6),) * 3
    assert (fused["image"] - seq["image"])[interior].abs().max() < 0.05


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int64, torch.bool])
def test_labels_exact_values_several_channels(dtype: torch.dtype) -> None:
    shape = (20, 24)
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 6 if dtype != torch.bool else 2, (3, 2, *shape), generator=gen)
    labels = labels.to(dtype)
    image = smooth_image(shape, batch=3)
    t = RandAffine("image", "seg", rotate=(-20, 20), scale=(0.8, 1.2), seed=1)
    out = t({"image": image, "seg": labels})
    assert out["seg"].dtype == dtype and out["seg"].shape == labels.shape
    assert set(out["seg"].unique().tolist()) <= set(labels.unique().tolist()) | {0}
    # nearest neighbour: every output voxel copies some input voxel of the same sample/channel
    for b in range(3):
        for c in range(2):
            assert set(out["seg"][b, c].unique().tolist()) <= set(
                labels[b, c].unique().tolist()
            ) | {0}


def test_large_integer_labels_survive() -> None:
    labels = torch.full((1, 1, 10, 10), 2**25 + 1, dtype=torch.int64)
    labels[..., :5] = 0
    t = RandAffine(None, "seg", rotate=5, scale=1.0, seed=0, validate=False)
    out = t({"seg": labels})
    assert set(out["seg"].unique().tolist()) <= {0, 2**25 + 1}


def test_flip_alone_is_exact() -> None:
    image = torch.randn(4, 2, 7, 8, 9)
    label = torch.randint(0, 3, (4, 1, 7, 8, 9))
    t = RandFlip("image", "label", axes=(0, 2), flip_probability=0.5, seed=2)
    out = t({"image": image, "label": label})
    flips = out[APPLIED_KEY][0]["params"]["flip"]
    for b in range(4):
        dims = [2 + a for a in range(3) if flips[b, a]]
        assert not flips[b, 1]
        want = image[b : b + 1].flip(dims) if dims else image[b : b + 1]
        assert torch.equal(out["image"][b : b + 1], want)


def test_device_flip_path_equals_the_grouped_flips() -> None:
    """The accelerator path (no host read of the flips) gives the same exact copies."""
    gen = torch.Generator().manual_seed(4)
    image = torch.randn(6, 2, 5, 6, 7, generator=gen)
    label = torch.randint(0, 4, (6, 1, 5, 6, 7), generator=gen, dtype=torch.uint8)
    flips = torch.rand(6, 3, generator=gen) < 0.5
    grouped = _exact_flips({"image": image, "label": label}, flips)
    for key, x in (("image", image), ("label", label)):
        out = flip_per_axis(x, flips)
        assert out.dtype == x.dtype and torch.equal(out, grouped[key])


def test_rotation_is_physical_on_anisotropic_grid() -> None:
    """A physical disk stays a disk when rotated in mm, on 1 x 2.5 mm pixels."""
    spacing = (1.0, 2.5)
    shape = (101, 41)
    disk = disk_label(shape, spacing, 30.0)
    rotated = RandAffine(None, "label", rotate=25.0, scale=1.0, seed=0)(
        {"label": disk, "spacing": spacing}
    )["label"]
    inter = (rotated & disk).sum().item()
    union = (rotated | disk).sum().item()
    assert inter / union > 0.93
    # the same rotation in voxel units (isotropic assumption) distorts it clearly
    voxel = RandAffine(None, "label", rotate=25.0, scale=1.0, seed=0)({"label": disk})["label"]
    assert (voxel & disk).sum().item() / (voxel | disk).sum().item() < 0.85


def test_translation_in_mm() -> None:
    image = torch.zeros(1, 1, 21, 21)
    image[0, 0, 10, 10] = 5.0
    out = RandAffine("image", rotate=0, scale=1.0, translate=((4.0, 4.0), (-6.0, -6.0)), seed=0)(
        {"image": image, "spacing": (2.0, 3.0)}
    )["image"]
    idx = torch.nonzero(out[0, 0] > 2.5)[0].tolist()
    assert idx == [12, 8]  # 4 mm / 2 mm = 2 voxels, -6 mm / 3 mm = -2 voxels


@pytest.mark.parametrize(
    "kwargs",
    [{"rotate": 45}, {"rotate": (-40, 10)}, {"scale": (0.5, 1.0)}, {"scale": 1.6}, {"shear": 0.5}],
)
def test_anatomy_bounds_refuse(kwargs: dict) -> None:
    with pytest.raises(AnatomyBoundError) as err:
        RandAffine("image", **kwargs)
    assert "allow_extreme" in str(err.value)
    RandAffine("image", allow_extreme=True, **kwargs)  # asked for: accepted


def test_elastic_folding_bound() -> None:
    image = smooth_image((16, 16))
    t = RandElastic("image", control_points=6, max_displacement=5.0, seed=0)
    with pytest.raises(AnatomyBoundError, match="fold"):
        t({"image": image})
    RandElastic("image", control_points=6, max_displacement=5.0, allow_extreme=True, seed=0)(
        {"image": image}
    )


def test_elastic_peak_displacement_in_mm() -> None:
    info = BatchInfo(2, (30, 30, 30), torch.device("cpu"), torch.float32,
                     torch.tensor([[1.0, 1.0, 2.0]] * 2, dtype=torch.float64))  # fmt: skip
    t = RandElastic("image", control_points=5, max_displacement=(3.0, 3.0), seed=0)
    field = t.sample(info).values["displacement"]
    peak = field.abs().flatten(2).amax(-1)
    torch.testing.assert_close(peak, torch.full((2, 3), 3.0, dtype=field.dtype))


# --- inverses (hypothesis) ------------------------------------------------------------------------


def _map_roundtrip(cls, values, info, points):
    return cls.inverse_map_points(values, cls.map_points(values, points, info), info)


@settings(max_examples=25, deadline=None)
@given(
    angles=st.lists(st.floats(-30, 30), min_size=3, max_size=3),
    scales=st.lists(st.floats(0.7, 1.4), min_size=3, max_size=3),
    shear=st.lists(st.floats(-0.3, 0.3), min_size=3, max_size=3),
    shift=st.lists(st.floats(-10, 10), min_size=3, max_size=3),
)
def test_affine_map_inverse_property(angles, scales, shear, shift) -> None:
    values = {
        "rotation": torch.tensor([angles], dtype=torch.float64),
        "scale": torch.tensor([scales], dtype=torch.float64),
        "shear": torch.tensor([shear], dtype=torch.float64),
        "translation": torch.tensor([shift], dtype=torch.float64),
    }
    info = BatchInfo(1, (10, 10, 10), torch.device("cpu"), torch.float32,
                     torch.ones(1, 3, dtype=torch.float64))  # fmt: skip
    points = torch.randn(1, 4, 5, 6, 3, dtype=torch.float64) * 20
    torch.testing.assert_close(_map_roundtrip(RandAffine, values, info, points), points)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), amplitude=st.floats(0.1, 2.0), nd=st.sampled_from([2, 3]))
def test_elastic_map_inverse_property(seed: int, amplitude: float, nd: int) -> None:
    shape = (24,) * nd
    info = BatchInfo(2, shape, torch.device("cpu"), torch.float32,
                     torch.ones(2, nd, dtype=torch.float64))  # fmt: skip
    t = RandElastic("image", control_points=6, max_displacement=amplitude, seed=seed)
    values = t.sample(info).values
    points = (torch.rand(2, 5, 5, *([1] * (nd - 2)), nd, dtype=torch.float64) - 0.5) * 20
    back = _map_roundtrip(RandElastic, values, info, points)
    assert (back - points).abs().max() < 1e-3


def _interior(nd: int, margin: int):
    return (slice(None), slice(None)) + (slice(margin, -margin),) * nd


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    nd=st.sampled_from([2, 3]),
    rotate=st.floats(0, 20),
    scale=st.floats(0.0, 0.15),
    amplitude=st.floats(0.0, 1.5),
    spacing=st.lists(st.floats(0.7, 2.0), min_size=3, max_size=3),
)
def test_transform_then_inverse_returns_input(seed, nd, rotate, scale, amplitude, spacing) -> None:
    """Composition with its inverse gives the input back, within tolerance, in the interior."""
    shape = (40, 44) if nd == 2 else (24, 26, 28)
    image = smooth_image(shape)
    data = {"image": image, "spacing": tuple(spacing[:nd])}
    pipe = Compose(
        [
            RandAffine("image", rotate=(-rotate, rotate), scale=(1 - scale, 1 + scale)),
            RandElastic("image", control_points=5, max_displacement=amplitude),
            RandFlip("image", axes=None),
        ],
        seed=seed,
    )
    out = pipe(data)
    if rotate > 5:
        assert (out["image"] - image).abs().max() > 0.05  # it did move
    back = invert(out, "image", padding_mode="border")
    margin = 9 if nd == 3 else 12
    err = (back["image"] - image)[_interior(nd, margin)].abs().max().item()
    assert err < 0.03


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), nd=st.sampled_from([2, 3]))
def test_label_inverse_of_flips_is_exact(seed: int, nd: int) -> None:
    label = torch.randint(0, 4, (3, 1) + ((9, 10) if nd == 2 else (5, 6, 7)))
    out = RandFlip(None, "label", seed=seed)({"label": label})
    back = invert(out, (), "label")
    assert torch.equal(back["label"], label)


def test_composite_grid_identity_when_nothing_applied() -> None:
    info = BatchInfo(2, (8, 9), torch.device("cpu"), torch.float32,
                     torch.ones(2, 2, dtype=torch.float64))  # fmt: skip
    t = RandAffine("image", p=0.0, seed=0)
    p = t.sample(info)
    voxel = composite_voxel_grid([(RandAffine, p.values, p.applied)], info)
    corners = torch.tensor([[0.0, 0.0], [0.0, 8.0], [7.0, 0.0], [7.0, 8.0]], dtype=voxel.dtype)
    torch.testing.assert_close(voxel[0].reshape(-1, 2), corners)


def test_single_item_spacing_and_records_collate() -> None:
    from torch.utils.data import default_collate

    item = {"image": smooth_image((10, 12), batch=1)[0], "spacing": (1.0, 2.0)}
    t = RandAffine("image", spatial_dims=2, seed=0)
    outs = [t(item) for _ in range(3)]
    batch = default_collate(outs)
    assert batch["image"].shape == (3, 1, 10, 12)
    rec = batch[APPLIED_KEY][0]
    assert rec["params"]["rotation"].shape == (3, 1)
    back = invert(batch, "image")
    assert back["image"].shape == (3, 1, 10, 12)
    assert math.isfinite(back["image"].sum().item())


@pytest.mark.parametrize("nd", [2, 3])
def test_image_and_label_stay_aligned(nd: int) -> None:
    """One grid for both: the warped label matches the warped image's edges (MONAI#3317)."""
    shape = (40, 44) if nd == 2 else (24, 26, 28)
    label = disk_label(shape, (1.0,) * nd, 8.0).repeat(2, 1, *([1] * nd))
    image = label.float() * 10 + 1
    pipe = Compose(
        [
            RandAffine("image", "label", rotate=(-20, 20), scale=(0.8, 1.2)),
            RandElastic("image", "label", control_points=5, max_displacement=1.5),
        ],
        seed=4,
    )
    out = pipe({"image": image, "label": label})
    warped_mask = out["image"] > 6
    agree = (warped_mask == (out["label"] == 1)).float().mean().item()
    assert agree > 0.995
    assert not torch.equal(out["label"], label)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    nd=st.sampled_from([2, 3]),
    jitter=st.floats(0.0, 4.0),
    fill=st.sampled_from(["blob", "full", "empty", "edge"]),
)
def test_sparse_label_sampling_equals_full_grid_sample(seed, nd, jitter, fill) -> None:
    from synthlesion.augment.grid import dense_grid, sample_labels

    gen = torch.Generator().manual_seed(seed)
    shape = (17, 19) if nd == 2 else (11, 13, 15)
    coarse = (4, 5) if nd == 2 else (4, 4, 5)
    nodes = torch.stack(
        torch.meshgrid(*[torch.linspace(0, n - 1, c) for n, c in zip(shape, coarse, strict=True)],
                       indexing="ij"), -1)  # fmt: skip
    voxel = (nodes[None] + jitter * torch.randn((2, *coarse, nd), generator=gen)).double()
    labels = torch.zeros((2, 2, *shape), dtype=torch.int16)
    if fill == "blob":
        centre = [int(torch.randint(0, n, (1,), generator=gen)) for n in shape]
        labels[(slice(None), 0) + tuple(slice(max(c - 2, 0), c + 2) for c in centre)] = 3
        labels[(1, 1) + tuple(slice(c, c + 1) for c in centre)] = 7
    elif fill == "full":
        labels = torch.randint(0, 4, labels.shape, generator=gen).to(torch.int16)
    elif fill == "edge":
        labels[(slice(None), slice(None)) + (0,) * nd] = 5
    grid = dense_grid(voxel, shape, torch.float32)
    want = F.grid_sample(labels.float(), grid, mode="nearest", padding_mode="zeros",
                         align_corners=True).to(torch.int16)  # fmt: skip
    got = sample_labels(labels, grid, voxel)
    assert got.dtype == torch.int16
    assert torch.equal(got, want)
