"""Bad input gets a typed error that names the key and the problem."""

from __future__ import annotations

import pytest
import torch

from synthlesion.augment import (
    AnatomyBoundError,
    AugmentationError,
    Compose,
    RandAffine,
    RandElastic,
    RandGaussianNoise,
    RandMotion,
)
from synthlesion.errors import SynthlesionError


def batch(shape=(2, 1, 10, 12, 14)):
    image = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    label = (image > 0.5).to(torch.uint8)
    return {"image": image, "label": label}


def test_errors_are_synthlesion_errors() -> None:
    assert issubclass(AugmentationError, SynthlesionError)
    assert issubclass(AnatomyBoundError, AugmentationError)


def test_mask_given_as_image() -> None:
    data = batch()
    with pytest.raises(AugmentationError, match="label_keys") as err:
        RandGaussianNoise("label")(data)
    assert err.value.key == "label" and "'label'" in str(err.value)
    data["mask_as_float"] = data["label"].float()
    with pytest.raises(AugmentationError, match="only the values 0 and 1") as err:
        RandAffine("mask_as_float")(data)
    assert err.value.key == "mask_as_float"


def test_image_given_as_label() -> None:
    data = batch()
    with pytest.raises(AugmentationError, match="non-integer") as err:
        RandAffine(None, "image")(data)
    assert err.value.key == "image"
    data["ct"] = torch.randint(-1000, 1000, (2, 1, 10, 12, 14)).to(torch.int16)
    with pytest.raises(AugmentationError, match="negative") as err:
        RandAffine("image", "ct")(data)
    assert err.value.key == "ct"
    gen = torch.Generator().manual_seed(0)  # an MRI with integral intensities, as floats
    data["big"] = torch.randint(0, 4000, (2, 1, 10, 12, 14), generator=gen).float()
    with pytest.raises(AugmentationError, match="looks like an image"):
        RandAffine("image", "big")(data)
    # FreeSurfer-style labels (up to 2035) as MONAI's LoadImaged gives them (float32) are labels
    aseg = torch.zeros((2, 1, 10, 12, 14))
    aseg[:, :, 2:5] = 2035.0
    aseg[:, :, 6:8] = 17.0
    out = RandAffine("image", "aseg", rotate=(10, 10))({**batch(), "aseg": aseg})
    assert set(torch.unique(out["aseg"]).tolist()) <= {0.0, 17.0, 2035.0}


def test_mismatched_shapes_in_one_item() -> None:
    data = batch()
    data["label"] = data["label"][..., :-1]
    with pytest.raises(AugmentationError, match="does not match key 'image'") as err:
        RandAffine("image", "label")(data)
    assert err.value.key == "label"
    data = batch()
    data["label"] = data["label"][:1]
    with pytest.raises(AugmentationError, match="batch and spatial"):
        RandAffine("image", "label")(data)


def test_unknown_key() -> None:
    with pytest.raises(AugmentationError, match="unknown key") as err:
        RandAffine("image", "segmentation")(batch())
    assert err.value.key == "segmentation" and "label" in str(err.value)
    out = RandAffine("image", "segmentation", allow_missing_keys=True, seed=0)(batch())
    assert out["image"].shape == (2, 1, 10, 12, 14)


def test_angle_beyond_bound() -> None:
    with pytest.raises(AnatomyBoundError, match="rotate=-35"):
        RandAffine("image", rotate=(-35, 35))
    with pytest.raises(AnatomyBoundError, match="degrees"):
        RandMotion("image", degrees=(0, 40))


def test_batch_on_another_device_than_the_generator() -> None:
    t = RandAffine("image", device="cpu", seed=0, validate=False)
    meta = {"image": torch.empty(2, 1, 8, 8, 8, device="meta")}
    with pytest.raises(AugmentationError, match="generator is on cpu") as err:
        t(meta)
    assert err.value.key == "image"


def test_generator_follows_first_batch_then_refuses_others() -> None:
    t = RandGaussianNoise("image", seed=0)
    t(batch())
    t.validate = False  # meta tensors hold no values to check
    with pytest.raises(AugmentationError, match="set_random_state"):
        t({"image": torch.empty(2, 1, 8, 8, device="meta")})


def test_bad_shapes_and_settings() -> None:
    with pytest.raises(AugmentationError, match="spatial_dims"):
        RandAffine("image")({"image": torch.randn(8, 8, 8)})
    with pytest.raises(AugmentationError, match="neither"):
        RandAffine("image", spatial_dims=2)({"image": torch.randn(1, 1, 1, 8, 8, 8)})
    with pytest.raises(AugmentationError, match="p="):
        RandAffine("image", p=1.5)
    with pytest.raises(AugmentationError, match="both as image and label"):
        RandAffine("image", "image")
    with pytest.raises(AugmentationError, match="low > high"):
        RandGaussianNoise("image", std=(0.2, 0.1))
    with pytest.raises(AugmentationError, match="control_points"):
        RandElastic("image", control_points=2)
    with pytest.raises(AugmentationError, match="spacing"):
        RandAffine("image", seed=0)({**batch(), "spacing": (1.0, -1.0, 1.0)})
    with pytest.raises(AugmentationError, match="backend"):
        Compose([RandAffine("image")], backend="jit")
    with pytest.raises(AugmentationError, match="dict"):
        RandAffine("image")([torch.zeros(1)])
    with pytest.raises(AugmentationError, match="torch.Tensor"):
        RandAffine("image")({"image": [1, 2, 3]})


def test_numpy_input_is_accepted() -> None:
    data = {k: v.numpy() for k, v in batch().items()}
    out = RandAffine("image", "label", seed=0)(data)
    assert isinstance(out["image"], torch.Tensor) and out["label"].dtype == torch.uint8
