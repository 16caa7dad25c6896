"""Batched classical augmentations for 2D and 3D medical images, on any device.

Transforms draw per-sample parameters from their own generator, then apply them to a whole
batch ``(B, C, *spatial)`` (or a single item ``(C, *spatial)``) held in a MONAI-style dict.
Consecutive spatial transforms fuse into one sampling grid in :class:`Compose`.
"""

from __future__ import annotations

from synthlesion.augment import recipes  # noqa: E402  (the recipes build on everything above)
from synthlesion.augment.base import (
    APPLIED_KEY,
    SPACING_KEY,
    AnatomyBoundError,
    AugmentationError,
    BatchInfo,
    Params,
    Transform,
)
from synthlesion.augment.compose import Compose
from synthlesion.augment.cutout import LesionCutMix, RandCutout
from synthlesion.augment.geometry import BOX_FORMATS, POINT_FORMATS, GeometryKeys
from synthlesion.augment.intensity import (
    HistogramMatching,
    IntensityTransform,
    RandBiasField,
    RandContrastBrightness,
    RandGamma,
    RandGaussianNoise,
    RandHistogramShift,
    RandHUWindow,
    RandLowResolution,
    RandRicianNoise,
)
from synthlesion.augment.kspace import RandGhosting, RandMotion, RandSpike
from synthlesion.augment.label_aware import LesionCopyPaste, LesionMixup, RandCropByLabel
from synthlesion.augment.normalise import CheckGeometry, NormalizeIntensity
from synthlesion.augment.spatial import (
    RandAffine,
    RandElastic,
    RandFlip,
    SpatialTransform,
    invert,
)
from synthlesion.augment.tta import TestTimeAugmentation, TTAResult

__all__ = [
    "APPLIED_KEY",
    "SPACING_KEY",
    "AnatomyBoundError",
    "AugmentationError",
    "BOX_FORMATS",
    "BatchInfo",
    "CheckGeometry",
    "Compose",
    "GeometryKeys",
    "HistogramMatching",
    "IntensityTransform",
    "LesionCopyPaste",
    "LesionCutMix",
    "LesionMixup",
    "NormalizeIntensity",
    "POINT_FORMATS",
    "Params",
    "RandAffine",
    "RandBiasField",
    "RandContrastBrightness",
    "RandCropByLabel",
    "RandCutout",
    "RandElastic",
    "RandFlip",
    "RandGamma",
    "RandGaussianNoise",
    "RandGhosting",
    "RandHUWindow",
    "RandHistogramShift",
    "RandLowResolution",
    "RandMotion",
    "RandRicianNoise",
    "RandSpike",
    "SpatialTransform",
    "TTAResult",
    "TestTimeAugmentation",
    "Transform",
    "invert",
    "recipes",
]
