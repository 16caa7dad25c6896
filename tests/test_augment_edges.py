"""Edge cases a new user and an adversarial review found in boxes, metadata, recipes and
the regional transforms (each was a silent wrong result or a raw traceback)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Flip
from scipy import ndimage

from synthlesion.augment import (
    APPLIED_KEY,
    AugmentationError,
    Compose,
    LesionCutMix,
    LesionMixup,
    NormalizeIntensity,
    RandAffine,
    RandCropByLabel,
    RandCutout,
    RandFlip,
    RandGamma,
    RandGaussianNoise,
    recipes,
)
from synthlesion.augment.normalise import percentile


def test_a_plain_3d_item_with_a_meta_dict_is_one_3d_item():
    affine = np.diag([1.0, 1.0, 2.5, 1.0])
    item = {"image": torch.rand(1, 24, 20, 10), "image_meta_dict": {"affine": affine}}
    out = RandAffine("image", rotate=(20, 20), seed=0)(item)
    assert out[APPLIED_KEY][-1]["params"]["rotation"].shape == (3,)  # three planes: 3D
    assert out[APPLIED_KEY][-1]["params"]["spacing"].tolist() == [1.0, 1.0, 2.5]


def test_an_axis_of_one_voxel_keeps_the_affine_invertible_like_monai():
    affine = torch.diag(torch.tensor([0.5, 0.7, 2.0, 1.0], dtype=torch.float64))
    x = MetaTensor(torch.rand(1, 32, 32, 1), affine=affine)
    ours = RandFlip("img", axes=(0, 1), flip_probability=1.0, seed=0)({"img": x})["img"]
    theirs = Flip(spatial_axis=(0, 1))(MetaTensor(torch.rand(1, 32, 32, 1), affine=affine))
    torch.testing.assert_close(ours.affine.double(), theirs.affine.double())


def test_a_stack_of_metatensors_is_not_taken_for_a_4d_item():
    stacked = torch.stack([MetaTensor(torch.rand(1, 16, 16, 8)) for _ in range(2)])
    with pytest.raises(AugmentationError, match="key 'img'.*spatial_dims"):
        RandAffine("img", seed=0)({"img": stacked})
    out = RandAffine("img", seed=0, spatial_dims=3)({"img": stacked})  # said explicitly: fine
    assert out["img"].shape == stacked.shape


def test_spacing_of_a_coronal_2d_slice_reads_every_world_axis():
    affine = torch.tensor(
        [[0.5, 0, 0, 0], [0, 0, 0, 7], [0, 3, 0, 0], [0, 0, 0, 1]], dtype=torch.float64
    )
    x = MetaTensor(torch.rand(1, 1, 16, 16), affine=affine[None])
    x.is_batch = True
    out = RandAffine("img", rotate=(5, 5), seed=0)({"img": x})
    assert out[APPLIED_KEY][-1]["params"]["spacing"][0].tolist() == [0.5, 3.0]
    recipes.xray_classification("img")({"img": x})  # no refusal of the slice's affine


def test_crops_of_a_batch_repeat_its_per_scan_entries():
    x = torch.rand(2, 1, 16, 16, 8)
    lab = torch.zeros(2, 1, 16, 16, 8, dtype=torch.uint8)
    lab[:, :, 4:8, 4:8, 2:4] = 1
    data = {"image": x, "label": lab, "y": torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
            "case_id": ["a", "b"]}  # fmt: skip
    out = RandCropByLabel("image", "label", roi_size=(8, 8, 4), num_samples=3, seed=0)(data)
    assert out["image"].shape[0] == 6
    assert out["y"].argmax(1).tolist() == [0, 0, 0, 1, 1, 1]
    assert out["case_id"] == ["a", "a", "a", "b", "b", "b"]


def test_compose_refuses_labels_fed_to_any_image_transform():
    with pytest.raises(AugmentationError, match="key 'lesion'.*label key elsewhere"):
        Compose([RandAffine("image", "lesion"), RandGaussianNoise(["image", "lesion"])])
    for name in ("label", "label_map", "gt", "seg0", "liver-mask"):
        with pytest.raises(AugmentationError, match="named like a label map"):
            Compose([RandGaussianNoise(["image", name])])
    # a normalisation of another key after a random transform is fine; of the same key, not
    Compose([RandGaussianNoise("image"), NormalizeIntensity("image2")])
    with pytest.raises(AugmentationError, match="normalises intensities after"):
        Compose([RandGaussianNoise("image"), NormalizeIntensity("image")])
    with pytest.raises(AugmentationError, match="p=0.5"):
        NormalizeIntensity("image", p=0.5)


def test_compose_refuses_boxes_that_miss_a_spatial_transform():
    with pytest.raises(AugmentationError, match="key 'box'.*not RandAffine"):
        Compose([RandFlip("img", box_keys="box", box_format="xyxy_voxel"), RandAffine("img")])


def test_flagged_boxes_survive_later_transforms():
    kw = {"box_keys": "b", "box_format": "xyxy_voxel", "outside": "flag"}
    pipe = Compose([
        RandAffine("image", translate=((-30, -30), (-30, -30)), rotate=0, scale=1.0, seed=0,
                   allow_extreme=True, **kw),
        RandGaussianNoise("image"),
        RandGamma("image"),
    ])  # fmt: skip
    boxes = torch.tensor([[[0.0, 0, 6, 6], [20, 20, 60, 60]]] * 2, dtype=torch.float64)
    out = pipe({"image": torch.rand(2, 1, 64, 64) + 1, "b": boxes})
    assert out["b_inside"].tolist() == [[False, True]] * 2
    again = RandAffine("image", rotate=(5, 5), seed=1, **kw)(out)  # no refusal of the flagged
    assert again["b_inside"].tolist() == [[False, True]] * 2  # once outside, stays flagged


def test_world_boxes_stay_put_under_rotations_and_flips():
    affine = torch.tensor(
        [[0.9, -0.4, 0, 3], [0.4, 0.9, 0, -5], [0, 0, 2.5, 1], [0, 0, 0, 1]], dtype=torch.float64
    )  # oblique
    item = {"image": MetaTensor(torch.rand(1, 40, 40, 12), affine=affine),
            "boxes": torch.tensor([[0.0, 0.0, 5.0, 8.0, 9.0, 12.0]], dtype=torch.float64)}  # fmt: skip
    kw = {"box_keys": "boxes", "box_format": "xyzxyz_world"}
    out = Compose([RandFlip("image", flip_probability=1.0, **kw),
                   RandAffine("image", rotate=(10, 10), **kw)], seed=0)(item)  # fmt: skip
    torch.testing.assert_close(out["boxes"], item["boxes"])


def test_xray_recipe_refuses_world_boxes_at_construction():
    with pytest.raises(AugmentationError, match="key 'boxes'.*voxel boxes"):
        recipes.xray_classification("image", box_keys="boxes", box_format="xyxy_world")


def test_torchio_int16_scans_and_crops_through_the_adapter():
    tio = pytest.importorskip("torchio")
    from synthlesion.augment.interop import TorchIOAdapter

    data = torch.randint(0, 1000, (1, 24, 24, 12), dtype=torch.int16)
    seg = (data > 800).to(torch.uint8)
    subject = tio.Subject(t1=tio.ScalarImage(tensor=data), seg=tio.LabelMap(tensor=seg))
    out = TorchIOAdapter(recipes.multisite_mri("t1", "seg", seed=0))(subject)
    assert out["t1"].data.is_floating_point()
    crop = TorchIOAdapter(recipes.default_3d("t1", "seg", modality="MR", roi_size=(8, 8, 8)))
    with pytest.raises(AugmentationError, match="crops"):
        crop(subject)


def test_cutout_holes_never_span_the_whole_image():
    out = RandCutout("image", num_holes=1, size=(16.0, 48.0), spacing=(0.3125, 0.3125),
                     seed=0)({"image": torch.rand(8, 1, 64, 64) + 1})  # fmt: skip
    holes = out[APPLIED_KEY][-1]["params"]["holes"][:, 0]
    assert ((holes[:, 2:] - holes[:, :2]) <= 32).all()
    assert ((out["image"] == 0).flatten(1).float().mean(1) <= 0.25 + 1e-6).all()


def test_cutout_protects_touching_lesions_of_different_labels_apart():
    label = torch.zeros(1, 1, 40, 40, dtype=torch.uint8)
    label[:, :, 5:35, 5:35] = 1  # a big lesion
    label[:, :, 35:38, 10:13] = 2  # a small one touching it
    image = torch.rand(1, 1, 40, 40) + 1
    for seed in range(40):
        out = RandCutout("image", "label", num_holes=3, size=(3.0, 8.0), lesion_key="label",
                         max_lesion_share=0.1, fill=0.0, seed=seed)(
            {"image": image, "label": label}
        )  # fmt: skip
        hidden = out["image"][0, 0] == 0
        small = label[0, 0] == 2
        assert hidden[small].float().mean() <= 0.1 + 1e-9


def test_cutmix_never_leaves_a_small_connected_piece():
    yy, xx = np.mgrid[:48, :48]
    ring = ((yy - 24) ** 2 + (xx - 24) ** 2 <= 100) & ((yy - 24) ** 2 + (xx - 24) ** 2 >= 49)
    label = torch.from_numpy(np.stack([ring] * 4)[:, None].astype(np.uint8))
    image = torch.rand(4, 1, 48, 48)
    for seed in range(15):
        out = LesionCutMix("image", "label", size=(0.2, 0.5), min_fragment=15, seed=seed)(
            {"image": image, "label": label}
        )
        params = out[APPLIED_KEY][-1]["params"]
        for b in range(4):
            if not bool(out[APPLIED_KEY][-1]["applied"][b]):
                continue
            r = params["patch"][b].tolist()
            inside = np.zeros((48, 48), bool)
            inside[r[0] : r[2], r[1] : r[3]] = True
            for part in (ring & ~inside, ring & inside):
                pieces, n = ndimage.label(part, structure=np.ones((3, 3), bool))
                sizes = np.bincount(pieces.ravel())[1:]
                assert n == 0 or part.sum() == ring.sum() or sizes.min() >= 15


def test_box_of_an_instance_map_keeps_its_own_lesion():
    lab = torch.zeros(1, 1, 32, 32, dtype=torch.uint8)
    lab[0, 0, 14:22, 14:22] = 2  # a big lesion reaching into the box of ...
    for i in range(10, 18):
        lab[0, 0, i, i] = 1  # ... a thin diagonal one (more voxels of 2 than of 1 in its box)
    boxes = torch.tensor([[[10.0, 10.0, 18.0, 18.0], [14.0, 14.0, 22.0, 22.0]]])
    out = RandFlip("img", "lab", flip_probability=0.0, box_keys="boxes", box_format="xyxy_voxel",
                   box_mask_key="lab")({"img": torch.rand(1, 1, 32, 32) + 1, "lab": lab,
                                        "boxes": boxes})  # fmt: skip
    torch.testing.assert_close(out["boxes"], boxes)


def test_percentile_refuses_nan_and_handles_huge_scans():
    x = torch.rand(1, 1, 16, 16)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(AugmentationError, match="NaN"):
        NormalizeIntensity("image", mode="percentile")({"image": x})
    big = torch.rand(1, 1, 2**24 + 10)
    assert 0.49 < float(percentile(big, 50.0)) < 0.51  # torch.quantile refuses this size


def test_scalar_labels_of_the_wrong_shape_are_a_clear_error():
    lab = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(AugmentationError, match="key 'y'.*shape"):
        LesionMixup("image", "label", scalar_keys="y", seed=0)(
            {"image": torch.rand(2, 1, 8, 8), "label": lab, "y": [[1.0, 0.0, 1.0]]}
        )


def test_crops_keep_world_boxes_and_earlier_flags():
    affine = torch.tensor(
        [[0.9, -0.4, 0, 3], [0.4, 0.9, 0, -5], [0, 0, 2.5, 1], [0, 0, 0, 1]], dtype=torch.float64
    )  # oblique: a round trip through voxel boxes would loosen the box
    label = torch.zeros(1, 40, 40, 12, dtype=torch.uint8)
    label[:, 10:20, 10:20, 4:8] = 1
    box = torch.tensor([[2.0, 6.0, 12.0, 9.0, 14.0, 20.0]], dtype=torch.float64)
    item = {"image": MetaTensor(torch.rand(1, 40, 40, 12), affine=affine),
            "label": MetaTensor(label, affine=affine), "boxes": box,
            "boxes_inside": torch.tensor([True])}  # fmt: skip
    crops = RandCropByLabel("image", "label", roi_size=(32, 32, 12), num_samples=2, pos=1.0,
                            neg=0.0, box_keys="boxes", box_format="xyzxyz_world",
                            outside="flag", seed=0)(item)  # fmt: skip
    for crop in crops:
        assert bool(crop["boxes_inside"][0])
        got = crop["boxes"][0]
        assert (got[:3] >= box[0, :3] - 1e-9).all() and (got[3:] <= box[0, 3:] + 1e-9).all()
