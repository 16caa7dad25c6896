"""The field's usual augmentation choices, as named one-liners returning a :class:`Compose`.

Every recipe keeps the order the field requires:

1. geometry first: a check that the data were reoriented (RAS) and resampled to the
   recipe's spacing at loading (MONAI ``Orientationd`` / ``Spacingd``; plain tensors pass);
2. intensity normalisation before anything random (CT: a HU window; MRI: z-score over the
   head; X-ray: percentiles);
3. spatial transforms (fused into one resampling; labels nearest neighbour);
4. intensity transforms (never touching labels);
5. in 3D, crop by label last (patches centred on lesions and background).

Bounds follow the anatomy: rotations of at most 15-20 degrees, scales 0.85-1.25, no 90 degree
turns; flips only where left and right are interchangeable for the task (never for chest
X-rays, whose heart side matters).

=========================  ============  =================================================
recipe                     modalities    for
=========================  ============  =================================================
``small_segmentation``     CT, MR        few labelled scans (nnU-Net's heavy default)
``xray_classification``    XR (2D)       radiograph classification / detection
``multisite_mri``          MR            scanners and sites that differ (bias, contrast)
``multiprotocol_ct``       CT            kernels, doses and slice thicknesses that differ
``default_3d``             CT, MR        a moderate 3D default
=========================  ============  =================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from synthlesion.augment.base import AugmentationError, Transform, as_keys
from synthlesion.augment.compose import Compose
from synthlesion.augment.cutout import RandCutout
from synthlesion.augment.intensity import (
    RandBiasField,
    RandContrastBrightness,
    RandGamma,
    RandGaussianNoise,
    RandHistogramShift,
    RandHUWindow,
    RandLowResolution,
    RandRicianNoise,
)
from synthlesion.augment.kspace import RandGhosting, RandMotion
from synthlesion.augment.label_aware import RandCropByLabel
from synthlesion.augment.normalise import CheckGeometry, NormalizeIntensity
from synthlesion.augment.spatial import RandAffine, RandElastic, RandFlip

MODALITIES = ("CT", "MR", "XR")
ALTERNATIVES = {
    "CT": "small_segmentation, multiprotocol_ct or default_3d",
    "MR": "small_segmentation, multisite_mri or default_3d",
    "XR": "xray_classification",
}


class RecipeError(AugmentationError):
    """A recipe asked for data it does not fit."""


def _check(
    recipe: str,
    keys: tuple[str, ...],
    modality: str,
    fits: Sequence[str],
    spatial_dims: int,
    dims: Sequence[int],
) -> None:
    name = f"recipes.{recipe}"
    if not keys:
        raise RecipeError("no image keys given", transform=name)
    if modality not in MODALITIES:
        raise RecipeError(f"modality={modality!r} not in {MODALITIES}", key=keys[0], transform=name)
    if modality not in fits:
        raise RecipeError(
            f"modality {modality} does not fit this recipe (it is for {', '.join(fits)}); "
            f"for {modality} use recipes.{ALTERNATIVES[modality]}",
            key=keys[0],
            transform=name,
        )
    if spatial_dims not in dims:
        raise RecipeError(
            f"spatial_dims={spatial_dims} does not fit this recipe ({' or '.join(map(str, dims))}D "
            "data)",
            key=keys[0],
            transform=name,
        )


def _keys(keys: Any, label_keys: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return as_keys(keys, "keys", "recipes"), as_keys(label_keys, "label_keys", "recipes")


def _normalise(modality: str, keys, label_keys, window, common) -> Transform:
    if modality == "CT":
        return NormalizeIntensity(keys, label_keys, mode="window", window=window, **common)
    if modality == "MR":
        return NormalizeIntensity(keys, label_keys, mode="zscore", nonzero=True, **common)
    return NormalizeIntensity(keys, label_keys, mode="percentile", **common)


def _opening(keys, label_keys, spatial_dims, spacing, common) -> list[Transform]:
    return [
        CheckGeometry(
            keys, label_keys, orientation="RAS" if spatial_dims == 3 else None,
            expected_spacing=spacing,
            **common,
        )
    ]  # fmt: skip


def _crop(keys, label_keys, spatial_dims, roi_size, num_samples, common) -> list[Transform]:
    if spatial_dims != 3 or roi_size is None:
        return []
    if not label_keys:
        raise RecipeError("crop by label needs a label key", transform="recipes")
    return [
        RandCropByLabel(
            keys, label_keys, roi_size=roi_size, num_samples=num_samples, pos=1.0, neg=1.0,
            **common,
        )
    ]  # fmt: skip


def _common(spatial_dims: int, spacing: Sequence[float] | None) -> dict[str, Any]:
    out: dict[str, Any] = {"spatial_dims": spatial_dims}
    if spacing is not None:
        out["spacing"] = tuple(spacing)
    return out


def small_segmentation(
    keys: str | Sequence[str] = "image",
    label_keys: str | Sequence[str] = "label",
    *,
    modality: str = "CT",
    spatial_dims: int = 3,
    spacing: Sequence[float] | None = None,
    window: tuple[float, float] = (-160.0, 240.0),
    roi_size: Sequence[int] | None = None,
    num_samples: int = 2,
    seed: int | None = None,
) -> Compose:
    """nnU-Net's heavy default for few labelled scans (CT or MRI, 2D or 3D).

    Geometry check; normalisation (CT: ``window`` HU to [0, 1]; MRI: z-score over non-zero
    voxels); mirroring on every axis, rotation +-15 deg, scale 0.85-1.25 and a mild elastic
    deformation (one resampling); Gaussian noise, contrast/brightness, gamma, simulated low
    resolution; in 3D with ``roi_size``, crops centred half on lesions.

    Args:
        keys, label_keys: Images and label maps.
        modality: ``"CT"`` or ``"MR"``.
        spatial_dims: 2 or 3.
        spacing: Voxel size (mm) the data were resampled to (checked against the metadata;
            used for the mm settings of items without metadata).
        window: CT window in HU.
        roi_size, num_samples: Patch size (voxels) and patches per volume (3D).
        seed: Seeds every transform.
    """
    keys, label_keys = _keys(keys, label_keys)
    _check("small_segmentation", keys, modality, ("CT", "MR"), spatial_dims, (2, 3))
    common = _common(spatial_dims, spacing)
    transforms = [
        *_opening(keys, label_keys, spatial_dims, spacing, common),
        _normalise(modality, keys, label_keys, window, common),
        RandFlip(keys, label_keys, axes=None, **common),
        RandAffine(keys, label_keys, rotate=(-15, 15), scale=(0.85, 1.25), p=0.3, **common),
        RandElastic(
            keys, label_keys, control_points=5, max_displacement=(0.0, 2.0), p=0.2, **common
        ),  # fmt: skip
        RandGaussianNoise(keys, label_keys, std=(0.0, 0.1), p=0.15, **common),
        RandContrastBrightness(
            keys, label_keys, contrast=(0.75, 1.25), brightness=(-0.1, 0.1), p=0.15, **common
        ),  # fmt: skip
        RandGamma(keys, label_keys, log_gamma=(-0.35, 0.4), p=0.3, **common),
        RandLowResolution(keys, label_keys, factor=(1.0, 2.0), p=0.25, **common),
        *_crop(keys, label_keys, spatial_dims, roi_size, num_samples, common),
    ]
    return Compose(transforms, seed=seed)


def xray_classification(
    keys: str | Sequence[str] = "image",
    label_keys: str | Sequence[str] = (),
    *,
    modality: str = "XR",
    spacing: Sequence[float] | None = None,
    box_keys: str | Sequence[str] | None = None,
    box_format: str | None = None,
    lesion_key: str | None = None,
    seed: int | None = None,
) -> Compose:
    """Radiograph classification (and detection with ``box_keys``), 2D.

    Percentile normalisation; rotation +-10 deg, scale 0.9-1.1, translation +-10 mm (no flips:
    the heart's side matters); contrast/brightness, gamma, Gaussian noise; a lesion-protecting
    cutout (the boxes, or ``lesion_key``'s lesions, are never hidden beyond 10%). Scalar labels
    pass through untouched; boxes move with the image.

    Args:
        keys, label_keys: Images (``(C, H, W)`` or ``(B, C, H, W)``) and label maps.
        modality: ``"XR"`` only.
        spacing: Pixel size in mm (None: from the metadata, else 1 mm).
        box_keys, box_format: Boxes of findings (e.g. ``"xyxy_voxel"``).
        lesion_key: A label map of lesions to protect from cutout.
        seed: Seeds every transform.
    """
    keys, label_keys = _keys(keys, label_keys)
    _check("xray_classification", keys, modality, ("XR",), 2, (2,))
    box_keys = as_keys(box_keys, "box_keys", "recipes")
    if box_keys and box_format not in ("xyxy_voxel", None):
        raise RecipeError(
            f"box_format={box_format!r}: the recipe's cutout protects voxel boxes ('xyxy_voxel')",
            key=box_keys[0],
            transform="recipes.xray_classification",
        )
    common = _common(2, spacing)
    geometry = {"box_keys": box_keys, "box_format": box_format} if box_keys else {}
    transforms = [
        _normalise("XR", keys, label_keys, None, common),
        RandAffine(
            keys,
            label_keys,
            rotate=(-10, 10),
            scale=(0.9, 1.1),
            translate=(-10, 10),
            padding_mode="zeros",
            p=0.8,
            **geometry,
            **common,
        ),  # fmt: skip
        RandContrastBrightness(
            keys, label_keys, contrast=(0.8, 1.2), brightness=(-0.1, 0.1), p=0.5, **common
        ),  # fmt: skip
        RandGamma(keys, label_keys, log_gamma=(-0.2, 0.2), p=0.3, **common),
        RandGaussianNoise(keys, label_keys, std=(0.0, 0.03), p=0.3, **common),
        RandCutout(
            keys,
            label_keys,
            num_holes=(1, 3),
            size=(16.0, 48.0),
            fill=0.0,
            lesion_key=lesion_key,
            box_key=box_keys[0] if box_keys else None,
            box_format=box_format if box_keys else None,
            max_lesion_share=0.1,
            p=0.5,
            **common,
        ),  # fmt: skip
    ]
    return Compose(transforms, seed=seed)


def multisite_mri(
    keys: str | Sequence[str] = "image",
    label_keys: str | Sequence[str] = "label",
    *,
    modality: str = "MR",
    spatial_dims: int = 3,
    spacing: Sequence[float] | None = None,
    roi_size: Sequence[int] | None = None,
    num_samples: int = 2,
    seed: int | None = None,
) -> Compose:
    """MRI from several scanners and sites: the appearance varies more than the anatomy.

    Z-score over the head; left-right flip, rotation +-15 deg, scale 0.9-1.1; bias field,
    gamma, histogram shift (contrast between sequences' vendors), Rician noise, low
    resolution, ghosting and motion; 3D crops by label.
    """
    keys, label_keys = _keys(keys, label_keys)
    _check("multisite_mri", keys, modality, ("MR",), spatial_dims, (2, 3))
    common = _common(spatial_dims, spacing)
    transforms = [
        *_opening(keys, label_keys, spatial_dims, spacing, common),
        _normalise("MR", keys, label_keys, None, common),
        RandFlip(keys, label_keys, axes=0, **common),
        RandAffine(keys, label_keys, rotate=(-15, 15), scale=(0.9, 1.1), p=0.5, **common),
        RandBiasField(keys, label_keys, coefficients=(-0.4, 0.4), order=3, p=0.5, **common),
        RandGamma(keys, label_keys, log_gamma=(-0.3, 0.3), p=0.5, **common),
        RandHistogramShift(keys, label_keys, p=0.3, **common),
        RandRicianNoise(keys, label_keys, std=(0.0, 0.05), p=0.3, **common),
        RandLowResolution(keys, label_keys, factor=(1.0, 2.0), p=0.2, **common),
        RandGhosting(keys, label_keys, p=0.1, **common),
        RandMotion(keys, label_keys, p=0.1, **common),
        *_crop(keys, label_keys, spatial_dims, roi_size, num_samples, common),
    ]
    return Compose(transforms, seed=seed)


def multiprotocol_ct(
    keys: str | Sequence[str] = "image",
    label_keys: str | Sequence[str] = "label",
    *,
    modality: str = "CT",
    spatial_dims: int = 3,
    spacing: Sequence[float] | None = None,
    center: float = 40.0,
    width: float = 400.0,
    roi_size: Sequence[int] | None = None,
    num_samples: int = 2,
    seed: int | None = None,
) -> Compose:
    """CT from several kernels, doses and slice thicknesses.

    A jittered HU window (centre +-20 HU, width x0.9-1.1; it is the normalisation, so it
    comes first), rotation +-15 deg, scale 0.9-1.1, elastic; Gaussian noise (dose), low
    resolution (slice thickness, kernel), contrast; 3D crops by label.
    """
    keys, label_keys = _keys(keys, label_keys)
    _check("multiprotocol_ct", keys, modality, ("CT",), spatial_dims, (2, 3))
    common = _common(spatial_dims, spacing)
    transforms = [
        *_opening(keys, label_keys, spatial_dims, spacing, common),
        RandHUWindow(keys, label_keys, center=center, width=width, **common),
        RandAffine(keys, label_keys, rotate=(-15, 15), scale=(0.9, 1.1), p=0.5, **common),
        RandElastic(
            keys, label_keys, control_points=5, max_displacement=(0.0, 2.0), p=0.2, **common
        ),  # fmt: skip
        RandGaussianNoise(keys, label_keys, std=(0.0, 0.05), p=0.5, **common),
        RandLowResolution(keys, label_keys, factor=(1.0, 2.5), p=0.3, **common),
        RandContrastBrightness(
            keys, label_keys, contrast=(0.85, 1.15), brightness=(-0.05, 0.05), p=0.3, **common
        ),  # fmt: skip
        *_crop(keys, label_keys, spatial_dims, roi_size, num_samples, common),
    ]
    return Compose(transforms, seed=seed)


def default_3d(
    keys: str | Sequence[str] = "image",
    label_keys: str | Sequence[str] = "label",
    *,
    modality: str = "CT",
    spacing: Sequence[float] | None = None,
    window: tuple[float, float] = (-160.0, 240.0),
    roi_size: Sequence[int] | None = (96, 96, 96),
    num_samples: int = 2,
    seed: int | None = None,
) -> Compose:
    """A moderate 3D default (CT or MRI): normalisation, flips, rotation +-10 deg, scale
    0.9-1.1, noise, gamma, crops by label (``roi_size`` voxels)."""
    keys, label_keys = _keys(keys, label_keys)
    _check("default_3d", keys, modality, ("CT", "MR"), 3, (3,))
    common = _common(3, spacing)
    transforms = [
        *_opening(keys, label_keys, 3, spacing, common),
        _normalise(modality, keys, label_keys, window, common),
        RandFlip(keys, label_keys, axes=None, **common),
        RandAffine(keys, label_keys, rotate=(-10, 10), scale=(0.9, 1.1), p=0.3, **common),
        RandGaussianNoise(keys, label_keys, std=(0.0, 0.05), p=0.2, **common),
        RandGamma(keys, label_keys, log_gamma=(-0.2, 0.2), p=0.2, **common),
        *_crop(keys, label_keys, 3, roi_size, num_samples, common),
    ]
    return Compose(transforms, seed=seed)


RECIPES = {
    f.__name__: f
    for f in (small_segmentation, xray_classification, multisite_mri, multiprotocol_ct, default_3d)
}
