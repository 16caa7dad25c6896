"""Recipes: the field's orders as one-liners, on real files after a MONAI loading pipeline."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from synthlesion.augment import (
    APPLIED_KEY,
    AugmentationError,
    CheckGeometry,
    Compose,
    NormalizeIntensity,
    RandAffine,
    RandFlip,
    RandGamma,
    RandHUWindow,
    recipes,
)
from synthlesion.augment.recipes import RecipeError

REAL_MRI = os.path.join(os.path.dirname(nib.__file__), "tests", "data", "anatomical.nii")


@pytest.fixture(scope="module")
def real_case(tmp_path_factory) -> dict:
    """nibabel's anatomical MRI (LAS, 2 mm, int16) and a label map made from it."""
    folder = tmp_path_factory.mktemp("real")
    image = nib.load(REAL_MRI)
    data = np.asarray(image.dataobj).astype(np.float32)
    label = np.zeros(data.shape, dtype=np.uint8)
    label[data > np.percentile(data, 60)] = 1
    label[data > np.percentile(data, 97)] = 2  # the brightest voxels: "lesions"
    nib.save(nib.Nifti1Image(data, image.affine), folder / "t1 scan.nii.gz")
    nib.save(nib.Nifti1Image(label, image.affine), folder / "t1 scan_seg.nii.gz")
    return {"image": str(folder / "t1 scan.nii.gz"), "label": str(folder / "t1 scan_seg.nii.gz")}


def monai_loading(reorient: bool = True):
    from monai.transforms import Compose as MonaiCompose
    from monai.transforms import EnsureChannelFirstd, LoadImaged, Orientationd, Spacingd

    steps = [LoadImaged(["image", "label"]), EnsureChannelFirstd(["image", "label"])]
    if reorient:
        steps += [
            Orientationd(["image", "label"], axcodes="RAS"),
            Spacingd(["image", "label"], pixdim=(2.0, 2.0, 2.0), mode=("bilinear", "nearest")),
        ]
    return MonaiCompose(steps)


def test_monai_loading_then_recipe_on_real_files(real_case):
    item = monai_loading()(dict(real_case))
    assert isinstance(item["image"], MetaTensor)
    label_before = torch.as_tensor(item["label"]).round().to(torch.uint8)
    item["label"] = MetaTensor(label_before, affine=item["label"].affine, meta=item["label"].meta)
    affine_before = item["image"].affine.clone()
    pipe = recipes.multisite_mri("image", "label", spacing=(2.0, 2.0, 2.0), seed=0)
    out = pipe(item)
    assert isinstance(out["image"], MetaTensor) and isinstance(out["label"], MetaTensor)
    assert out["image"].shape == item["image"].shape
    assert set(torch.unique(out["label"]).tolist()) <= {0, 1, 2}
    assert out["label"].dtype == torch.uint8
    names = [r["name"] for r in out[APPLIED_KEY]]
    assert names[:2] == ["CheckGeometry", "NormalizeIntensity"]
    records = {r["name"]: r for r in out[APPLIED_KEY]}
    moved = bool(records["RandFlip"]["params"]["flip"].any()) or bool(
        records["RandAffine"]["applied"]
    )
    assert moved == (not torch.equal(out["image"].affine, affine_before))
    torch.testing.assert_close(out["image"].affine, out["label"].affine)
    # the normalisation ran on the loaded scan, before anything random: the head is z-scored
    head = item["image"] != 0
    assert head.any()


def test_recipe_refuses_data_not_reoriented(real_case):
    item = monai_loading(reorient=False)(dict(real_case))  # the file is LAS
    item["label"] = item["label"].round().to(torch.uint8)
    with pytest.raises(AugmentationError, match="key 'image'.*orientation LAS.*Orientationd"):
        recipes.default_3d("image", "label", modality="MR", roi_size=None)(item)
    wrong_spacing = monai_loading()(dict(real_case))
    wrong_spacing["label"] = wrong_spacing["label"].round().to(torch.uint8)
    with pytest.raises(AugmentationError, match="spacing.*Spacingd"):
        recipes.small_segmentation("image", "label", modality="MR", spacing=(1.0, 1.0, 1.0))(
            wrong_spacing
        )


def test_default_3d_crops_by_label_last_and_updates_affines(real_case):
    item = monai_loading()(dict(real_case))
    item["label"] = item["label"].round().to(torch.uint8)
    pipe = recipes.default_3d("image", "label", modality="MR", roi_size=(16, 16, 16), seed=1)
    crops = pipe(item)
    assert isinstance(crops, list) and len(crops) == 2
    for crop in crops:
        assert crop["image"].shape[1:] == (16, 16, 16)
        assert crop[APPLIED_KEY][-1]["name"] == "RandCropByLabel"
        start = crop[APPLIED_KEY][-1]["params"]["start"]
        assert isinstance(crop["image"], MetaTensor)
        assert start is not None


@pytest.mark.parametrize(
    "name,modality,nd",
    [(name, modality, nd)
     for name, modality in [("small_segmentation", "CT"), ("small_segmentation", "MR"),
                            ("multisite_mri", "MR"), ("multiprotocol_ct", "CT")]
     for nd in (2, 3)] + [("default_3d", "CT", 3), ("default_3d", "MR", 3),
                          ("xray_classification", "XR", 2)],
)  # fmt: skip
def test_every_recipe_runs_on_a_batch(name, modality, nd):
    gen = torch.Generator().manual_seed(0)
    shape = (4, 1) + ((48, 40) if nd == 2 else (20, 22, 18))
    image = torch.randn(shape, generator=gen) * 200 + (0 if modality == "CT" else 500)
    label = (torch.rand(shape, generator=gen) > 0.9).to(torch.uint8)
    kwargs = {} if name in ("default_3d", "xray_classification") else {"spatial_dims": nd}
    if name in ("small_segmentation", "default_3d"):
        kwargs["modality"] = modality
    if name == "default_3d":
        kwargs["roi_size"] = (8, 8, 8)
    label_keys = () if name == "xray_classification" else "label"
    pipe = recipes.RECIPES[name]("image", label_keys, seed=0, **kwargs)
    batch = {"image": image, "label": label, "grade": torch.arange(4.0)}
    out = pipe(batch)
    crops = out["image"].shape[0] // 4  # per-scan labels follow the crops of their scan
    assert torch.equal(out["grade"], torch.arange(4.0).repeat_interleave(crops))
    assert torch.isfinite(out["image"]).all()
    assert out["label"].dtype == torch.uint8
    assert set(torch.unique(out["label"]).tolist()) <= {0, 1}


def test_recipes_refuse_modalities_they_do_not_fit():
    with pytest.raises(
        RecipeError, match="recipes.multiprotocol_ct: key 'scan'.*MR does not fit.*multisite_mri"
    ):
        recipes.multiprotocol_ct("scan", "seg", modality="MR")
    with pytest.raises(RecipeError, match="key 'image'.*CT does not fit.*XR"):
        recipes.xray_classification("image", modality="CT")
    with pytest.raises(RecipeError, match="modality 'PET'|modality='PET'"):
        recipes.small_segmentation(modality="PET")
    with pytest.raises(RecipeError, match="spatial_dims=2"):
        recipes._check("default_3d", ("image",), "CT", ("CT",), 2, (3,))


def test_compose_refuses_normalisation_after_a_random_transform():
    with pytest.raises(
        AugmentationError,
        match="NormalizeIntensity normalises intensities after the random transform RandGamma",
    ):
        Compose([RandGamma("image"), NormalizeIntensity("image")])
    with pytest.raises(AugmentationError, match="RandHUWindow normalises"):
        Compose([RandFlip("image"), RandHUWindow("image")])
    # deterministic steps before the normalisation are fine
    Compose([CheckGeometry("image"), NormalizeIntensity("image"), RandGamma("image")])


def test_compose_refuses_a_label_interpolated_linearly():
    with pytest.raises(AugmentationError, match="key 'seg'.*label key elsewhere"):
        Compose([RandAffine(["image", "seg"]), RandGamma("image", label_keys="seg")])
    with pytest.raises(AugmentationError, match="key 'liver_mask'.*named like a label map"):
        Compose([RandAffine(["image", "liver_mask"])])
    Compose([RandAffine("image", "liver_mask")])  # as a label key: nearest, fine


def test_normalize_intensity_modes():
    x = torch.tensor([[[-1000.0, -160.0, 40.0, 240.0, 1000.0]]])
    window = NormalizeIntensity("image", mode="window", window=(-160, 240), spatial_dims=1 + 1)
    out = window({"image": x[None]})["image"][0]
    torch.testing.assert_close(out, torch.tensor([[[0.0, 0.0, 0.5, 1.0, 1.0]]]))
    z = NormalizeIntensity("image", mode="zscore", nonzero=True)
    img = torch.zeros(1, 1, 8, 8)
    img[..., 2:6, 2:6] = torch.arange(1.0, 17.0).view(4, 4)
    out = z({"image": img})["image"]
    inside = out[..., 2:6, 2:6]
    assert abs(float(inside.mean())) < 1e-5 and abs(float(inside.std(unbiased=False)) - 1) < 1e-4
    assert (out[..., 0, :] == 0).all()
    with pytest.raises(AugmentationError, match="window"):
        NormalizeIntensity("image", mode="window")


def test_torchio_subject_through_a_recipe(real_case):
    tio = pytest.importorskip("torchio")
    from synthlesion.augment.interop import TorchIOAdapter

    subject = tio.Subject(
        t1=tio.ScalarImage(real_case["image"]), seg=tio.LabelMap(real_case["label"]), grade=2.0
    )
    subject = tio.ToCanonical()(subject)  # RAS, as the recipe's geometry check asks
    pipe = TorchIOAdapter(recipes.multisite_mri("t1", "seg", spacing=(2.0, 2.0, 2.0), seed=3))
    out = pipe(subject)
    assert isinstance(out, tio.Subject)
    assert out["t1"].shape == subject["t1"].shape
    assert out["grade"] == 2.0
    assert set(torch.unique(out["seg"].data).tolist()) <= {0, 1, 2}
    np.testing.assert_allclose(out["t1"].affine, out["seg"].affine)

    def world_centroid(s):  # of the "lesions": the anatomy keeps its world position
        idx = (s["seg"].data[0] == 2).nonzero().double().mean(0).numpy()
        return s["seg"].affine[:3, :3] @ idx + s["seg"].affine[:3, 3]

    assert np.abs(world_centroid(out) - world_centroid(subject)).max() < 4.0  # 2 voxels


def test_monai_dataloader_batch_then_synthlesion_on_the_batch(real_case):
    from monai.data import DataLoader, Dataset

    loading = monai_loading()
    dataset = Dataset([dict(real_case), dict(real_case)], transform=loading)
    batch = next(iter(DataLoader(dataset, batch_size=2, num_workers=0)))
    assert isinstance(batch["image"], MetaTensor) and batch["image"].is_batch
    batch["label"] = batch["label"].round().to(torch.uint8)  # still a batched MetaTensor
    before = batch["image"].affine.clone()
    out = Compose([NormalizeIntensity("image", mode="zscore", nonzero=True),
                   RandAffine("image", "label", rotate=(10, 10), p=1.0)], seed=0)(batch)  # fmt: skip
    assert out["image"].shape == batch["image"].shape and out["image"].is_batch
    assert out["image"].affine.shape == (2, 4, 4)
    assert not torch.allclose(out["image"].affine, before)
    torch.testing.assert_close(out["label"].affine, out["image"].affine)


@pytest.mark.parametrize("q", [0.0, 0.5, 3.0, 25.0, 50.0, 90.0, 99.5, 100.0])
def test_percentile_matches_torch_quantile(q):
    from synthlesion.augment.normalise import percentile

    x = torch.randn(3, 2, 1001, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(percentile(x, q), torch.quantile(x, q / 100, dim=-1))
