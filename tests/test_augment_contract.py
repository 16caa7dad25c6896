"""Contract every augmentation transform passes, in 2D and 3D.

* a batch equals each element done alone with the same (recorded) parameters;
* labels keep their dtype and value set;
* a seed reproduces the output;
* device and dtype are kept;
* ``p=0`` is the identity;
* intensity transforms leave labels byte-identical (the very same tensors).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from synthlesion.augment import (
    APPLIED_KEY,
    Compose,
    HistogramMatching,
    LesionCopyPaste,
    LesionCutMix,
    LesionMixup,
    Params,
    RandAffine,
    RandBiasField,
    RandContrastBrightness,
    RandCropByLabel,
    RandCutout,
    RandElastic,
    RandFlip,
    RandGamma,
    RandGaussianNoise,
    RandGhosting,
    RandHistogramShift,
    RandHUWindow,
    RandLowResolution,
    RandMotion,
    RandRicianNoise,
    RandSpike,
    Transform,
)

SHAPES = {2: (20, 22), 3: (12, 14, 16)}
LABELS = ("label", "parts")


def make_batch(nd: int, batch: int = 3, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Smooth 2-channel images, a uint8 label map (0 background, 1 tissue, 2 lesion) and a
    2-channel int64 label map."""
    gen = torch.Generator().manual_seed(seed)
    shape = SHAPES[nd]
    axes = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape], indexing="ij")
    images, tissue, parts = [], [], []
    for b in range(batch):
        shift = torch.rand(nd, generator=gen) * 0.4 - 0.2
        r2 = sum((a - s) ** 2 for a, s in zip(axes, shift, strict=True))
        base = torch.stack([torch.cos(2 * axes[0] + b) + axes[-1], torch.sin(3 * axes[1] - b)])
        base = base + 0.05 * torch.randn(base.shape, generator=gen)
        lab = (r2 < 0.6).to(torch.uint8) + (r2 < 0.02 + 0.02 * b).to(torch.uint8)
        images.append(base + 0.5 * (lab > 1))
        tissue.append(lab[None])
        parts.append(torch.stack([(axes[0] > shift[0]).long() * 3, (r2 < 0.3).long()]))
    return {
        "image": torch.stack(images).to(dtype),
        "label": torch.stack(tissue),
        "parts": torch.stack(parts),
        "spacing": (1.0, 1.5) if nd == 2 else (1.0, 1.2, 1.5),
    }


FACTORIES: dict[str, Callable[[], Transform]] = {
    "affine": lambda: RandAffine(
        "image", LABELS, rotate=(-15, 15), scale=(0.9, 1.1), shear=(-0.05, 0.05), translate=(-2, 2)
    ),
    "elastic": lambda: RandElastic("image", LABELS, control_points=4, max_displacement=(0.5, 1.5)),
    "flip": lambda: RandFlip("image", LABELS, axes=None),
    "fused": lambda: _Fused(),
    "gaussian_noise": lambda: RandGaussianNoise("image", LABELS, std=(0.01, 0.1)),
    "rician_noise": lambda: RandRicianNoise("image", LABELS, std=(0.01, 0.1)),
    "bias_field": lambda: RandBiasField("image", LABELS, coefficients=(-0.3, 0.3), order=3),
    "gamma": lambda: RandGamma("image", LABELS),
    "contrast_brightness": lambda: RandContrastBrightness("image", LABELS),
    "hu_window": lambda: RandHUWindow("image", LABELS, center=0.0, width=3.0, center_shift=(-1, 1)),
    "histogram_matching": lambda: HistogramMatching(
        "image", LABELS, reference=torch.linspace(-2, 2, 500) ** 3, strength=(0.5, 1.0)
    ),
    "histogram_shift": lambda: RandHistogramShift("image", LABELS),
    "low_resolution": lambda: RandLowResolution("image", LABELS, factor=(1.0, 3.0)),
    "ghosting": lambda: RandGhosting("image", LABELS, num_ghosts=(2, 4)),
    "spike": lambda: RandSpike("image", LABELS, num_spikes=(1, 2)),
    "motion": lambda: RandMotion("image", LABELS, num_transforms=(1, 2)),
    "crop_by_label": lambda: RandCropByLabel("image", LABELS, roi_size=(6, 6), num_samples=2),
    "mixup": lambda: LesionMixup("image", LABELS, lam=(0.3, 0.9)),
    "cutout": lambda: RandCutout(
        "image",
        LABELS,
        num_holes=(1, 3),
        size=(2.0, 5.0),
        fill="noise",
        lesion_key="label",
        lesion_values=(2,),
        max_lesion_share=0.2,
    ),
    "cutmix": lambda: LesionCutMix(
        "image", LABELS, size=(0.3, 0.6), lesion_key="label", lesion_values=(2,), min_fragment=3
    ),
    "copy_paste": lambda: LesionCopyPaste(
        "image",
        LABELS,
        lesion_key="label",
        tissue_key="label",
        tissue_values=(1,),
        lesion_values=(2,),
        max_tries=50,
    ),
}
SPATIAL = {"affine", "elastic", "flip", "fused"}
INTENSITY = {
    "gaussian_noise", "rician_noise", "bias_field", "gamma", "contrast_brightness", "hu_window",
    "histogram_matching", "histogram_shift", "low_resolution", "ghosting", "spike", "motion",
}  # fmt: skip
CROSS_SAMPLE = {"mixup", "copy_paste", "cutmix"}


class _Fused(Transform):
    """Affine + elastic + flip through Compose (one grid), seen as one transform."""

    def __init__(self) -> None:
        super().__init__("image", LABELS)
        self.parts = [
            RandAffine("image", LABELS, rotate=(-10, 10), scale=(0.9, 1.1)),
            RandElastic("image", LABELS, control_points=4, max_displacement=1.0),
            RandFlip("image", LABELS, axes=0),
        ]
        self.compose = Compose(self.parts)

    def set_random_state(self, seed=None, device=None):
        for i, t in enumerate(self.parts):
            t.set_random_state(None if seed is None else seed + i, device)
        return self

    @property
    def p(self):  # noqa: D401 - the parts' p
        return self.parts[0].p

    @p.setter
    def p(self, value):
        for t in getattr(self, "parts", []):
            t.p = value

    def __call__(self, data):
        return self.compose(data)


def make(name: str, seed: int = 1) -> Transform:
    t = FACTORIES[name]()
    t.set_random_state(seed)
    return t


def crop_roi(nd: int) -> tuple[int, ...]:
    return (6,) * nd


def build(name: str, nd: int, seed: int = 1) -> Transform:
    if name == "crop_by_label":
        t = RandCropByLabel("image", LABELS, roi_size=crop_roi(nd), num_samples=2)
        return t.set_random_state(seed)
    return make(name, seed)


ALL = sorted(FACTORIES)
DIMS = [2, 3]


def _check_labels(out: dict, data: dict) -> None:
    for key in LABELS:
        assert out[key].dtype == data[key].dtype, key
        before = set(torch.unique(data[key]).tolist()) | {0}
        assert set(torch.unique(out[key]).tolist()) <= before, key


@pytest.mark.parametrize("nd", DIMS)
@pytest.mark.parametrize("name", ALL)
def test_labels_keep_dtype_and_value_set(name: str, nd: int) -> None:
    data = make_batch(nd)
    out = build(name, nd)(data)
    _check_labels(out, data)
    assert out["image"].dtype == data["image"].dtype
    assert out["image"].shape[1:2] == data["image"].shape[1:2]
    records = out[APPLIED_KEY]
    assert records and all(isinstance(r["params"], dict) for r in records)
    assert APPLIED_KEY not in data, "the input dict must not be changed"


@pytest.mark.parametrize("nd", DIMS)
@pytest.mark.parametrize("name", ALL)
def test_seed_reproduces(name: str, nd: int) -> None:
    data = make_batch(nd)
    t = build(name, nd, seed=7)
    first = t(data)
    t.set_random_state(7)
    second = t(data)
    for key in ("image",) + LABELS:
        assert torch.equal(first[key], second[key]), key
    other = build(name, nd, seed=8)(data)
    if name not in CROSS_SAMPLE:
        assert not torch.equal(first["image"], other["image"])


@pytest.mark.parametrize("nd", DIMS)
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtype_and_device_kept(name: str, nd: int, dtype: torch.dtype) -> None:
    data = make_batch(nd, dtype=dtype)
    out = build(name, nd)(data)
    assert out["image"].dtype == dtype
    for key in ("image",) + LABELS:
        assert out[key].device == data[key].device


@pytest.mark.parametrize("nd", DIMS)
@pytest.mark.parametrize("name", sorted(set(ALL) - {"crop_by_label"}))
def test_p0_is_identity(name: str, nd: int) -> None:
    data = make_batch(nd)
    t = build(name, nd)
    t.p = 0.0
    out = t(data)
    for key in ("image",) + LABELS:
        assert torch.equal(out[key], data[key]), key


def test_p0_crop_still_crops_but_ignores_labels() -> None:
    data = make_batch(3)
    t = build("crop_by_label", 3)
    t.p = 0.0
    out = t(data)
    assert out["image"].shape == (6, 2, 6, 6, 6)
    assert not bool(out[APPLIED_KEY][-1]["params"]["positive"].any())


@pytest.mark.parametrize("nd", DIMS)
@pytest.mark.parametrize("name", sorted(INTENSITY))
def test_intensity_leaves_labels_byte_identical(name: str, nd: int) -> None:
    data = make_batch(nd)
    out = build(name, nd)(data)
    for key in LABELS:
        assert out[key] is data[key]
    assert not torch.equal(out["image"], data["image"])


def _sub_batch(data: dict, rows: list[int]) -> dict:
    return {**{k: data[k][rows] for k in ("image",) + LABELS}, "spacing": data["spacing"]}


def _assert_same(got: dict, want: dict, context: tuple) -> None:
    torch.testing.assert_close(got["image"], want["image"], rtol=1e-5, atol=1e-5)
    for key in LABELS:
        assert torch.equal(got[key], want[key]), (context, key)


@pytest.mark.parametrize("nd", DIMS)
@pytest.mark.parametrize("name", sorted(set(ALL) - {"fused"}))
def test_batch_equals_each_element_alone(name: str, nd: int) -> None:
    data = make_batch(nd)
    t = build(name, nd)
    out = t(data)
    params = Params.from_record(out[APPLIED_KEY][-1])
    batch = data["image"].shape[0]
    per_item = out["image"].shape[0] // batch  # crops: K rows per volume
    for i in range(batch):
        rows = [i]
        sub = params.select(i)
        if name in CROSS_SAMPLE:  # the element alone with its partner, which stays unchanged
            j = int(params.values["partner"][i])
            if j != i:
                rows = [i, j]
                sub = params.select(torch.tensor(rows))
                sub.values["partner"] = torch.tensor([1, 1])
                sub.applied = torch.tensor([bool(params.applied[i]), False])
            else:
                sub.values["partner"] = torch.tensor([0])
        alone = t.apply(_sub_batch(data, rows), sub)
        got = {k: alone[k][:per_item] for k in ("image",) + LABELS}
        want = {k: out[k][i * per_item : (i + 1) * per_item] for k in ("image",) + LABELS}
        _assert_same(got, want, (name, i))


def _replay_fused(parts: list[Transform], records: list[dict], data: dict, i: int) -> dict:
    from synthlesion.augment.warp import warp_view

    view = parts[0].view(data)
    steps = []
    for part, record in zip(parts, records, strict=True):
        p = Params.from_record(record).select(i)
        steps.append((type(part), p.values, p.applied))
    warp_view(view, steps, parts[0].padding_mode)
    return view.finish()


@pytest.mark.parametrize("nd", DIMS)
def test_fused_batch_equals_each_element_alone(nd: int) -> None:
    data = make_batch(nd)
    t = build("fused", nd)
    out = t(data)
    records = out[APPLIED_KEY]
    assert [r["name"] for r in records] == ["RandAffine", "RandElastic", "RandFlip"]
    for i in range(data["image"].shape[0]):
        replay = _replay_fused(t.parts, records, _sub_batch(data, [i]), i)
        _assert_same(replay, {k: out[k][i : i + 1] for k in ("image",) + LABELS}, ("fused", i))


@pytest.mark.parametrize("nd", DIMS)
@pytest.mark.parametrize("name", ["affine", "elastic", "flip", "gamma", "gaussian_noise"])
def test_single_item_like_monai(name: str, nd: int) -> None:
    """One item (C, *spatial) with spatial_dims works as in a MONAI per-sample pipeline."""
    data = make_batch(nd, batch=1)
    item = {k: data[k][0] for k in ("image",) + LABELS}
    t = build(name, nd)
    t.spatial_dims = nd
    out = t(item)
    assert out["image"].shape == item["image"].shape
    assert out["label"].shape == item["label"].shape
    record = out[APPLIED_KEY][-1]
    assert record["applied"].ndim == 0


@pytest.mark.parametrize("nd", DIMS)
@pytest.mark.parametrize("name", sorted(set(ALL) - {"crop_by_label"}))
def test_partial_p_leaves_other_samples_untouched(name: str, nd: int) -> None:
    data = make_batch(nd, batch=6)
    t = build(name, nd, seed=11)
    t.p = 0.5
    out = t(data)
    applied = torch.zeros(6, dtype=torch.bool)
    for record in out[APPLIED_KEY]:
        applied |= record["applied"]
    assert 0 < int(applied.sum()) < 6 or name in CROSS_SAMPLE
    for b in range(6):
        if not applied[b]:
            for key in ("image",) + LABELS:
                assert torch.equal(out[key][b], data[key][b]), (name, key, b)
