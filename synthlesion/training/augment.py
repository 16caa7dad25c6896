"""Classical augmentation of the training crops on the device (``TrainConfig.augment``).

The crops arrive normalised (``data/intensity.py``), so augmentation never precedes the
normalisation. One ``synthlesion.augment.Compose`` moves the image, the region to fill and
the lesion channels together (one warp; the 0/1 masks as uint8 label maps, nearest
neighbour, so they stay exact and the lesion stays inside its region) and then changes the
image's intensities. Its generators are reseeded for every micro-batch from the run seed,
the process rank and the data position, so a resumed run draws what an uninterrupted one
would, and nothing needs saving in the checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from synthlesion.augment import (
    AugmentationError,
    Compose,
    RandAffine,
    RandBiasField,
    RandElastic,
    RandFlip,
    RandGamma,
    RandGaussianNoise,
    Transform,
)
from synthlesion.errors import ConfigError
from synthlesion.training.config import AugmentConfig

IMAGE = "image"
MASKS = ("region", "lesion")
_STREAM = 4  # after the model-init, dropout, noise and data streams of the loop


class CropAugmenter:
    """Augments batches of training crops ``{"image", "region", "lesion", ...}``.

    Args:
        config: The ``augment`` section.
        spatial_dims: 2 or 3.
        spacing: Crop voxel size in mm (``data.spacing``; None: 1 mm), for rotations and
            elastic displacements in physical units.
        seed: The run seed.
        rank: This process (each draws its own crops, so its own augmentations).
    """

    def __init__(
        self,
        config: AugmentConfig,
        spatial_dims: int,
        spacing: Sequence[float] | None,
        seed: int,
        rank: int = 0,
    ) -> None:
        self.seed, self.rank = int(seed), int(rank)
        mm = tuple(float(s) for s in spacing) if spacing else (1.0,) * spatial_dims
        common: dict[str, Any] = {"p": config.p, "spatial_dims": spatial_dims, "spacing": mm}
        parts: list[Transform] = []
        if config.rotate_deg > 0 or config.scale[0] != config.scale[1] or config.scale[0] != 1:
            rotate = (-config.rotate_deg, config.rotate_deg)
            parts.append(RandAffine(IMAGE, MASKS, rotate=rotate, scale=config.scale, **common))
        if config.elastic_mm > 0:
            parts.append(
                RandElastic(
                    IMAGE,
                    MASKS,
                    control_points=5,
                    max_displacement=(0.0, config.elastic_mm),
                    **common,
                )  # fmt: skip
            )
        if config.flip_axes:
            parts.append(RandFlip(IMAGE, MASKS, axes=config.flip_axes, **common))
        if config.noise_std > 0:
            parts.append(RandGaussianNoise(IMAGE, std=(0.0, config.noise_std), **common))
        if config.bias > 0:
            parts.append(RandBiasField(IMAGE, coefficients=(-config.bias, config.bias), **common))
        if config.gamma_log > 0:
            parts.append(
                RandGamma(IMAGE, log_gamma=(-config.gamma_log, config.gamma_log), **common)
            )
        self.compose = Compose(parts) if parts else None

    def check(self, roi_size: Sequence[int]) -> None:
        """Run once on a blank crop, so settings the transforms refuse (an elastic
        displacement that could fold the anatomy, ...) fail before the first step."""
        shape = (1, 1, *roi_size)
        blank = {
            IMAGE: torch.zeros(shape),
            "region": torch.zeros(shape),
            "lesion": torch.zeros(shape),
        }
        try:
            self(blank, 0, 0)
        except AugmentationError as exc:
            raise ConfigError(f"augment: {exc}") from None

    def __call__(self, batch: dict[str, Any], epoch: int, index: int) -> dict[str, Any]:
        """The batch with image, region and lesion augmented (other entries as they were).

        Args:
            batch: Crops on their device; ``image`` ``(B, 1, *roi)`` float, ``region``
                ``(B, 1, *roi)`` and ``lesion`` ``(B, K, *roi)`` holding 0/1.
            epoch, index: The data position of this micro-batch (seeds the draw).
        """
        if self.compose is None:
            return batch
        entropy = [self.seed, self.rank, _STREAM, int(epoch), int(index)]
        seed = int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 2)
        self.compose.set_random_state(seed, device=batch[IMAGE].device)
        masks = {key: (batch[key] > 0.5).to(torch.uint8) for key in MASKS}
        out = self.compose({IMAGE: batch[IMAGE], **masks})
        result = dict(batch)
        result[IMAGE] = out[IMAGE]
        for key in MASKS:
            result[key] = out[key].to(batch[key].dtype)
        return result
