"""Label-aware transforms: crop by label, lesion mixup, lesion copy-paste."""

from __future__ import annotations

import pytest
import torch

from synthlesion.augment import (
    APPLIED_KEY,
    AugmentationError,
    Compose,
    LesionCopyPaste,
    LesionMixup,
    RandCropByLabel,
    RandGamma,
)


def scene(nd: int = 3, batch: int = 4, size: int = 24, seed: int = 0):
    """Tissue (label 1) disks/balls with small lesions (label 2); image tissue 1.0, lesion 2.0."""
    gen = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * nd, indexing="ij")
    images, labels = [], []
    for _ in range(batch):
        centre = size / 2 + (torch.rand(nd, generator=gen) - 0.5) * 4
        spot = size / 2 + (torch.rand(nd, generator=gen) - 0.5) * 6
        tissue = sum((a - c) ** 2 for a, c in zip(axes, centre, strict=True)) < (0.4 * size) ** 2
        lesion = sum((a - c) ** 2 for a, c in zip(axes, spot, strict=True)) < 2.5**2
        lab = tissue.to(torch.uint8) + (lesion & tissue).to(torch.uint8)
        img = 0.2 + 0.8 * tissue.float() + 1.0 * (lab == 2).float()
        img = img + 0.05 * torch.randn(img.shape, generator=gen)
        images.append(img[None])
        labels.append(lab[None])
    return {"image": torch.stack(images), "label": torch.stack(labels)}


@pytest.mark.parametrize("nd", [2, 3])
def test_crop_by_label_shapes_and_centres(nd: int) -> None:
    data = scene(nd)
    roi = (8,) * nd
    t = RandCropByLabel("image", "label", roi_size=roi, num_samples=3, pos=1, neg=0, seed=0)
    out = t(data)
    assert out["image"].shape == (12, 1) + roi and out["label"].shape == (12, 1) + roi
    assert bool((out[APPLIED_KEY][0]["params"]["positive"]).all())
    centre = tuple(slice(r // 2 - 1, r // 2 + 1) for r in roi)
    for crop in out["label"]:
        assert bool((crop[(0,) + centre] > 0).any()), "positive crops sit on foreground"


def test_crop_by_label_negative_and_ratio() -> None:
    data = scene(3, batch=2)
    out = RandCropByLabel("image", "label", roi_size=(4, 4, 4), num_samples=200, pos=1, neg=3,
                          seed=1)(data)  # fmt: skip
    positive = out[APPLIED_KEY][0]["params"]["positive"].float().mean().item()
    assert 0.15 < positive < 0.35
    neg_rows = ~out[APPLIED_KEY][0]["params"]["positive"].flatten()
    assert bool((out["label"][neg_rows][..., 1:3, 1:3, 1:3] == 0).any())


def test_crop_single_item_gives_a_list_and_keeps_pipeline_going() -> None:
    data = scene(2, batch=1)
    item = {k: v[0] for k, v in data.items()}
    pipe = Compose(
        [
            RandCropByLabel("image", "label", roi_size=(8, 8), num_samples=2, spatial_dims=2),
            RandGamma("image", "label", spatial_dims=2),
        ],
        seed=0,
    )
    out = pipe(item)
    assert isinstance(out, list) and len(out) == 2
    assert out[0]["image"].shape == (1, 8, 8)


def test_crop_roi_too_large() -> None:
    with pytest.raises(AugmentationError, match="roi_size"):
        RandCropByLabel("image", "label", roi_size=(40, 40), seed=0)(scene(2))


def test_crop_without_foreground_falls_back() -> None:
    data = scene(2, batch=2)
    data["label"] = torch.zeros_like(data["label"])
    out = RandCropByLabel("image", "label", roi_size=(6, 6), num_samples=2, pos=1, neg=0,
                          seed=0)(data)  # fmt: skip
    assert out["image"].shape == (4, 1, 6, 6)


@pytest.mark.parametrize("region", ["lesion", "image"])
def test_mixup_labels_are_a_union_never_a_blend(region: str) -> None:
    data = scene(3, batch=4)
    out = LesionMixup("image", "label", lam=(0.3, 0.7), region=region, lesion_values=(2,), seed=0)(
        data
    )
    partner = out[APPLIED_KEY][0]["params"]["partner"]
    assert bool((partner != torch.arange(4)).all())
    lab = out["label"]
    assert lab.dtype == torch.uint8 and set(lab.unique().tolist()) <= {0, 1, 2}
    for b in range(4):
        own, other = data["label"][b], data["label"][partner[b]]
        # the partner's lesion wins over tissue, the own lesion stays, background takes anything
        want = torch.where((other == 2) & (own != 2), other, own)
        if region == "image":
            want = torch.where(own == 0, other, want)
        assert torch.equal(lab[b], want)
        if region == "lesion":  # outside the partner's lesion the image is unchanged
            outside = other != 2
            assert torch.equal(out["image"][b][outside], data["image"][b][outside])


def test_mixup_single_sample_is_identity() -> None:
    data = scene(2, batch=1)
    out = LesionMixup("image", "label", seed=0)(data)
    assert torch.equal(out["image"], data["image"]) and torch.equal(out["label"], data["label"])


def _lesion(label: torch.Tensor) -> torch.Tensor:
    return label == 2


def test_copy_paste_inside_tissue_with_matched_intensity() -> None:
    data = scene(3, batch=4, size=28)
    # recipients' tissue is darker: matching must carry the lesion's contrast over
    data["image"][2:] = data["image"][2:] * 0.5
    t = LesionCopyPaste(
        "image", "label", lesion_key="label", tissue_key="label", tissue_values=(1,),
        lesion_values=(2,), max_tries=100, intensity_matching="mean", seed=0,
    )  # fmt: skip
    out = t(data)
    params = out[APPLIED_KEY][0]["params"]
    assert bool(out[APPLIED_KEY][0]["applied"].any())
    for b in range(4):
        if not out[APPLIED_KEY][0]["applied"][b]:
            assert torch.equal(out["image"][b], data["image"][b])
            continue
        new = _lesion(out["label"][b]) & ~_lesion(data["label"][b])
        assert bool(new.any())
        assert bool((data["label"][b][new] == 1).all()), "pasted only into tissue"
        j = int(params["partner"][b])
        donor_contrast = (
            data["image"][j][_lesion(data["label"][j])].mean()
            - data["image"][j][data["label"][j] == 1].mean()
        )
        recipient_tissue = data["image"][b][data["label"][b] == 1].mean()
        pasted = out["image"][b][new].mean()
        assert abs((pasted - recipient_tissue) - donor_contrast) < 0.15
        assert out["label"].dtype == torch.uint8


def test_copy_paste_separate_maps_and_no_room() -> None:
    data = scene(2, batch=2, size=20)
    lesion = (data["label"] == 2).to(torch.uint8)
    tissue = (data["label"] >= 1).to(torch.uint8)
    tissue[1] = 0  # the second scan has no tissue: nothing can be pasted there
    t = LesionCopyPaste(
        "image", ("lesion", "tissue"), lesion_key="lesion", tissue_key="tissue", seed=0,
        max_tries=50,
    )  # fmt: skip
    out = t({"image": data["image"], "lesion": lesion, "tissue": tissue})
    assert torch.equal(out["tissue"], tissue)
    assert torch.equal(out["image"][1], data["image"][1])
    assert not bool(out[APPLIED_KEY][0]["applied"][1])
    assert set(out["lesion"].unique().tolist()) <= {0, 1}


def test_copy_paste_requires_label_keys() -> None:
    with pytest.raises(AugmentationError, match="label_keys"):
        LesionCopyPaste("image", "label", lesion_key="lesion", tissue_key="label")
