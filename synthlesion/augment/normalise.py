"""The deterministic steps that open a pipeline: a geometry check and intensity normalisation.

Normalising after a random transform makes the augmentation depend on the normalisation's
statistics of the augmented image (a known trap): :class:`~synthlesion.augment.Compose`
refuses a normalisation placed after a random transform.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from synthlesion.augment.base import AugmentationError, BatchInfo, BatchView, Params, Transform
from synthlesion.augment.geometry import spatial_affine
from synthlesion.augment.intensity import IntensityTransform

logger = logging.getLogger(__name__)

NORMALISATION_MODES = ("zscore", "percentile", "window")
AXIS_CODES = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}


class NormalizeIntensity(IntensityTransform):
    """Per-sample, per-channel intensity normalisation (deterministic).

    Modes: ``"zscore"`` (``(x - mean) / std``, over the voxels ``> 0`` with ``nonzero``: MRI
    with a zero background), ``"percentile"`` (``percentiles`` mapped to 0 and 1, clipped),
    ``"window"`` (a fixed window ``(low, high)``, e.g. HU ``(-160, 240)``, mapped to [0, 1],
    clipped: CT).

    Args:
        keys: Images.
        label_keys: Label maps (checked only, never changed).
        mode: One of :data:`NORMALISATION_MODES`.
        percentiles: ``(low, high)`` in percent for ``"percentile"``.
        window: ``(low, high)`` image values for ``"window"`` (HU for CT).
        nonzero: ``"zscore"`` statistics over non-zero voxels only (zeros stay 0).
    """

    is_random = False
    is_normalisation = True
    fusable = False

    def __init__(
        self,
        keys: str | Sequence[str],
        label_keys: str | Sequence[str] = (),
        *,
        mode: str = "zscore",
        percentiles: tuple[float, float] = (0.5, 99.5),
        window: tuple[float, float] | None = None,
        nonzero: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, label_keys, **kwargs)
        if self.p != 1.0:
            raise AugmentationError(
                f"p={self.p}: a normalisation applies to every sample (p=1); normalising some "
                "samples only leaves the others on another scale",
                transform=self.name,
            )
        if mode not in NORMALISATION_MODES:
            raise AugmentationError(
                f"mode={mode!r} not in {NORMALISATION_MODES}", transform=self.name
            )
        if mode == "window" and (window is None or not window[0] < window[1]):
            raise AugmentationError(
                f"mode='window' needs window=(low, high) with low < high, got {window!r}",
                transform=self.name,
            )
        if not 0 <= percentiles[0] < percentiles[1] <= 100:
            raise AugmentationError(
                f"percentiles={percentiles!r} must satisfy 0 <= low < high <= 100",
                transform=self.name,
            )
        self.mode = mode
        self.percentiles = (float(percentiles[0]), float(percentiles[1]))
        self.window = (float(window[0]), float(window[1])) if window is not None else None
        self.nonzero = bool(nonzero)

    def draw(self, info: BatchInfo, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {}

    def apply_tensor(self, x, values, extras):
        flat = x.reshape(x.shape[0], x.shape[1], -1).to(
            torch.float32 if x.dtype != torch.float64 else x.dtype
        )
        shape = (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2)
        if self.mode == "window":
            low, high = self.window
            return ((x - low) / (high - low)).clamp(0, 1)
        if self.mode == "percentile":
            if bool(torch.isnan(flat).any()):
                raise AugmentationError(
                    "NaN voxels: percentiles are undefined; fix or mask the scan first",
                    key=", ".join(self.keys),
                    transform=self.name,
                )
            low = percentile(flat, self.percentiles[0]).view(shape)
            high = percentile(flat, self.percentiles[1]).view(shape)
            span = torch.where(high > low, high - low, torch.ones_like(high))
            return ((x - low) / span).clamp(0, 1).to(x.dtype)
        if self.nonzero:
            mask = flat != 0
            count = mask.sum(-1).clamp_min(1)
            mean = (flat * mask).sum(-1) / count
            var = (((flat - mean[..., None]) * mask) ** 2).sum(-1) / count
            std = var.sqrt().clamp_min(1e-8)
            out = (x - mean.view(shape)) / std.view(shape)
            return torch.where(x != 0, out, torch.zeros_like(out)).to(x.dtype)
        mean = flat.mean(-1).view(shape)
        std = flat.std(-1, unbiased=False).clamp_min(1e-8).view(shape)
        return ((x - mean) / std).to(x.dtype)


def percentile(flat: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(flat, q / 100, dim=-1)`` (linear interpolation), exact, computed from
    the tail alone (``topk``) when the percentile lies in the outer quarter: several times
    faster than a sort of every voxel."""
    n = flat.shape[-1]
    pos = q / 100 * (n - 1)
    lo = int(pos)
    w = pos - lo
    if n < 8 or (q > 25 and q < 75):  # kthvalue: no size limit (quantile stops at 2^24)
        below = torch.kthvalue(flat, lo + 1, dim=-1).values
        above = torch.kthvalue(flat, min(lo + 2, n), dim=-1).values
        return below + (above - below) * w
    if q <= 25:
        vals = torch.topk(flat, min(lo + 2, n), dim=-1, largest=False, sorted=True).values
        below, above = vals[..., lo], vals[..., min(lo + 1, n - 1)]
    else:
        rank = n - 1 - lo  # position of the lower neighbour counted from the top
        vals = torch.topk(flat, min(rank + 1, n), dim=-1, largest=True, sorted=True).values
        below, above = vals[..., rank], vals[..., max(rank - 1, 0)]
    return below + (above - below) * w


def orientation_code(affine: np.ndarray) -> str:
    """Axis codes (e.g. ``"RAS"``) of a voxel-to-world affine (world in RAS+ as in NIfTI and
    MONAI), like nibabel's ``aff2axcodes``."""
    import nibabel as nib

    return "".join(nib.orientations.aff2axcodes(affine))


class CheckGeometry(Transform):
    """Refuse images whose metadata show another orientation or spacing than the recipe's.

    A recipe's random transforms assume the data were reoriented and resampled first (MONAI's
    ``Orientationd`` / ``Spacingd`` at loading); this check (deterministic, no resampling)
    makes that order an error when broken, instead of silently anisotropic rotations. Items
    without an affine in their metadata (plain tensors) pass: their ``spacing`` entry is used
    as given.

    Args:
        keys: Images and label maps to check (all keys are read only).
        label_keys: Label maps.
        orientation: Expected axis codes, e.g. ``"RAS"`` (None: not checked).
        expected_spacing: Expected voxel size in mm per axis (None: not checked).
        tolerance: Relative tolerance on the spacing.
    """

    is_random = False

    def __init__(
        self,
        keys: str | Sequence[str] | None,
        label_keys: str | Sequence[str] = (),
        *,
        orientation: str | None = "RAS",
        expected_spacing: Sequence[float] | None = None,
        tolerance: float = 0.01,
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, label_keys, **kwargs)
        if orientation is not None and (
            len(orientation) not in (2, 3)
            or any(c not in AXIS_CODES for c in orientation.upper())
            or len({AXIS_CODES[c][0] for c in orientation.upper()}) != len(orientation)
        ):
            raise AugmentationError(
                f"orientation={orientation!r} is not axis codes like 'RAS'", transform=self.name
            )
        self.orientation = orientation.upper() if orientation is not None else None
        self.expected_spacing = (
            tuple(float(s) for s in expected_spacing) if expected_spacing is not None else None
        )
        self.tolerance = float(tolerance)

    def draw(self, info: BatchInfo, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {}

    def apply_view(self, view: BatchView, params: Params) -> None:
        nd = view.info.spatial_dims
        for key in (*view.images, *view.labels):
            affine = view.affine(key)
            if affine is None:
                continue
            meta = getattr(view.meta_tensors.get(key), "meta", None) or view.data.get(
                f"{key}_meta_dict", {}
            )
            lps = str(meta.get("space", "RAS")).upper().endswith("LPS")
            batch = affine.double().cpu().numpy()
            for a in batch[None] if batch.ndim == 2 else batch:
                if lps and a.shape[0] == 4:  # MONAI's ITK reader: world in LPS; codes are RAS+
                    a = np.diag([-1.0, -1.0, 1.0, 1.0]) @ a
                self._check_one(a, nd, key)

    def _check_one(self, a: np.ndarray, nd: int, key: str) -> None:
        """Check one ``(d+1, d+1)`` spatial affine."""
        if self.orientation is not None and nd == 3:
            code = orientation_code(
                spatial_affine(torch.from_numpy(a), nd, key, self.name)[0].numpy()
            )
            if code != self.orientation:
                raise AugmentationError(
                    f"orientation {code}, the recipe expects {self.orientation}: reorient "
                    f"first (MONAI: Orientationd(keys, axcodes={self.orientation!r}); "
                    "TorchIO: tio.ToCanonical())",
                    key=key,
                    transform=self.name,
                )
        if self.expected_spacing is not None:
            spacing = np.sqrt((a[: min(3, a.shape[0] - 1), :nd] ** 2).sum(0))
            expected = np.array(self.expected_spacing[:nd])
            if len(self.expected_spacing) != nd or not np.allclose(
                spacing, expected, rtol=self.tolerance
            ):
                raise AugmentationError(
                    f"voxel spacing {tuple(np.round(spacing, 4))} mm, the recipe expects "
                    f"{self.expected_spacing} mm: resample first (MONAI: Spacingd(keys, "
                    f"pixdim={self.expected_spacing}))",
                    key=key,
                    transform=self.name,
                )
