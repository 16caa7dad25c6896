"""Test-time augmentation: augment, predict, invert, average."""

from __future__ import annotations

import pytest
import torch

from synthlesion.augment import (
    AugmentationError,
    RandAffine,
    RandElastic,
    RandFlip,
    RandGamma,
    TestTimeAugmentation,
)


def smooth(shape, batch=2, channels=2):
    axes = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape], indexing="ij")
    chans = [torch.cos(2 * axes[0] + c) + 0.5 * torch.sin(3 * axes[1]) * axes[-1] for c in range(
        channels)]  # fmt: skip
    img = torch.stack(chans)[None]
    return (img + torch.arange(batch).view(batch, 1, *([1] * len(shape)))).contiguous()


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


@pytest.mark.parametrize("shape", [(16, 18), (10, 12, 14)])
def test_identity_model_flips_exact(shape) -> None:
    image = torch.randn(3, 2, *shape, generator=torch.Generator().manual_seed(0))
    tta = TestTimeAugmentation([RandFlip("image")], num_augmentations=6, seed=0)
    result = tta(identity, image)
    assert torch.equal(result.mean, image)
    assert torch.equal(result.variance, torch.zeros_like(image))
    assert torch.equal(result.coverage, torch.full_like(image[:, :1], 6.0))
    flips = result.params[0].values["flip"]
    assert not bool(flips[:3].any()) and bool(flips[3:].any())  # copy 0 is the identity


@pytest.mark.parametrize("shape", [(48, 44), (24, 26, 28)])
def test_identity_model_affine_within_interpolation_tolerance(shape) -> None:
    image = smooth(shape)
    tta = TestTimeAugmentation(
        [RandFlip("image"), RandAffine("image", rotate=(-10, 10), scale=(0.9, 1.1))],
        num_augmentations=5,
        seed=1,
    )
    result = tta(identity, image, spacing=(1.0,) * len(shape))
    interior = (slice(None), slice(None)) + (slice(6, -6),) * len(shape)
    assert (result.mean - image)[interior].abs().max() < 0.03
    assert result.variance[interior].max() < 1e-3
    assert result.mean.shape == image.shape


def test_elastic_tta_inverts_within_tolerance() -> None:
    image = smooth((40, 40), batch=1, channels=1)
    tta = TestTimeAugmentation(
        [RandElastic("image", control_points=5, max_displacement=2.0)], num_augmentations=4, seed=2
    )
    result = tta(identity, image)
    interior = (slice(None), slice(None), slice(6, -6), slice(6, -6))
    assert (result.mean - image)[interior].abs().max() < 0.05


def test_uncertainty_of_a_non_equivariant_model() -> None:
    image = smooth((16, 16))

    def left_biased(x: torch.Tensor) -> torch.Tensor:  # not flip-equivariant
        ramp = torch.linspace(0, 1, x.shape[-1])
        return x * ramp

    result = TestTimeAugmentation([RandFlip("image", axes=1, flip_probability=1.0)],
                                  num_augmentations=2, seed=0)(left_biased, image)  # fmt: skip
    assert result.variance.max() > 0.01


def test_model_output_channels_and_chunks() -> None:
    image = smooth((12, 12, 12), batch=2)
    seen = []

    def model(x):
        seen.append(x.shape[0])
        return torch.cat([x.sum(1, keepdim=True), -x.sum(1, keepdim=True)], 1)

    tta = TestTimeAugmentation([RandFlip("image")], num_augmentations=4, chunk_size=3, seed=0)
    result = tta(model, image)
    assert result.mean.shape == (2, 2, 12, 12, 12)
    assert seen == [3, 3, 2]
    torch.testing.assert_close(result.mean[:, :1], image.sum(1, keepdim=True))


def test_tta_refuses_bad_models_and_transforms() -> None:
    image = smooth((8, 8))
    tta = TestTimeAugmentation([RandFlip("image")], num_augmentations=2, seed=0)
    with pytest.raises(AugmentationError, match="spatial shape"):
        tta(lambda x: x[..., :4], image)
    with pytest.raises(AugmentationError, match="spatial"):
        TestTimeAugmentation([RandGamma("image")])
    with pytest.raises(AugmentationError, match="floating"):
        tta(identity, image.long())
