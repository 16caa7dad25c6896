"""Intensity normalisation to [-1, 1] and back, one definition for training and sampling.

CT is windowed in Hounsfield units (a fixed window, so HU keep their meaning across scans);
MRI and other modalities without absolute units are scaled between two percentiles of the
scan's foreground. Normalisation always happens before any augmentation. A scan of several
channels (MRI sequences, CT phases) is normalised channel by channel.

The scan's foreground (:func:`foreground_mask`) is defined once here and used by the
normalisation, the checks and the placement of lesions: where the scan has a constant
background (skull-stripped, z-scored MRI whose background is one exact value), every voxel that
differs from it; otherwise CT above -500 HU, and other images above 5 % of their 99th
percentile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

from synthlesion.errors import ConfigError

CT_BODY_THRESHOLD_HU = -500.0
OTHER_BODY_FRACTION = 0.05  # of the 99th percentile, for MRI and other non-CT images
CONSTANT_BACKGROUND_SHARE = 0.5  # of the border voxels holding one exact value


def background_value(image: np.ndarray) -> float | None:
    """The scan's constant background value, when it has one.

    The most frequent exact value on the faces of the grid, when at least half of the face
    voxels hold it (skull-stripped or masked scans, z-scored scans with a constant background);
    ``None`` for scans whose background is noise (raw MRI, CT air).

    Args:
        image: Voxel values, shape ``S`` (2D or 3D).
    """
    faces = np.concatenate(
        [
            np.take(image, index, axis=axis).ravel()
            for axis in range(image.ndim)
            for index in (0, -1)
        ]
    )
    if faces.size == 0:
        return None
    values, counts = np.unique(faces, return_counts=True)
    top = int(np.argmax(counts))
    if counts[top] < CONSTANT_BACKGROUND_SHARE * faces.size:
        return None
    value = float(values[top])
    return value if np.isfinite(value) else None


def foreground_mask(
    image: np.ndarray, modality: str = "unknown", *, fill: bool = True
) -> np.ndarray:
    """Boolean map of the scan's foreground (the body, the head), shape ``S``.

    Rules, in order: a constant background (:func:`background_value`) -> every voxel that
    differs from it; CT -> above -500 HU; anything else -> above 5 % of the 99th percentile.
    With ``fill``, holes (closed cavities: air in the bowel, ventricles at a threshold) are
    filled slice by slice and in 3D.

    Args:
        image: Voxel values, shape ``S``; for several channels pass one (or the union of the
            channels' masks).
        modality: ``"CT"`` uses the HU rule when there is no constant background.
        fill: Fill enclosed holes.
    """
    constant = background_value(image)
    if constant is not None:
        mask = image != constant
    elif modality.upper() == "CT":
        mask = image > CT_BODY_THRESHOLD_HU
    else:
        sample = image.ravel()[:: max(1, image.size // 500_000)]
        sample = sample[np.isfinite(sample)] if sample.dtype.kind == "f" else sample
        if sample.size == 0:
            return np.zeros(image.shape, dtype=bool)
        mask = image > OTHER_BODY_FRACTION * float(np.percentile(sample, 99))
    if fill and mask.any():
        mask = ndimage.binary_fill_holes(mask)
    return mask


@dataclass(frozen=True)
class IntensityNormaliser:
    """Map image values to [-1, 1] and back.

    Attributes:
        mode: ``"window"`` (fixed window in image units, for CT in HU) or ``"percentile"``
            (per-scan percentiles, for MRI).
        window: ``(low, high)`` in image units for ``"window"`` (e.g. ``(-200, 300)`` HU).
        percentiles: ``(low, high)`` percentiles for ``"percentile"`` (e.g. ``(0.5, 99.5)``).
        clip: Clip normalised values to [-1, 1].
        windows: ``"window"`` mode with several channels (CT phases): one ``(low, high)`` per
            channel, in channel order; empty uses ``window`` for every channel.
    """

    mode: Literal["window", "percentile"] = "window"
    window: tuple[float, float] = (-200.0, 300.0)
    percentiles: tuple[float, float] = (0.5, 99.5)
    clip: bool = True
    windows: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in ("window", "percentile"):
            raise ConfigError(f"intensity mode must be 'window' or 'percentile', got {self.mode!r}")
        object.__setattr__(
            self, "windows", tuple((float(lo), float(hi)) for lo, hi in self.windows)
        )
        pairs = [self.window, *self.windows] if self.mode == "window" else [self.percentiles]
        for low, high in pairs:
            if not high > low:
                raise ConfigError(f"intensity {self.mode} needs low < high, got ({low}, {high})")

    def window_of(self, channel: int) -> tuple[float, float]:
        """The window of ``channel`` (``windows[channel]``, else ``window``)."""
        if not self.windows:
            return float(self.window[0]), float(self.window[1])
        if not 0 <= channel < len(self.windows):
            raise ConfigError(
                f"intensity windows name {len(self.windows)} channel(s); channel {channel} has none"
            )
        return self.windows[channel]

    @classmethod
    def for_modality(cls, modality: str) -> IntensityNormaliser:
        """CT: a soft-tissue window of [-200, 300] HU; anything else: 0.5/99.5 percentiles."""
        if modality.upper() == "CT":
            return cls("window", (-200.0, 300.0))
        return cls("percentile", percentiles=(0.5, 99.5))

    def range_of(self, image: np.ndarray, channel: int = 0) -> tuple[float, float]:
        """The ``(low, high)`` image values that map to -1 and +1 for this ``image`` (the
        ``channel``-th channel of its case).

        Percentiles are taken over the foreground (:func:`foreground_mask`), so a constant
        background (z-scored MRI) or an air margin does not pull the low end.
        """
        if self.mode == "window":
            return self.window_of(channel)
        inside = foreground_mask(image, fill=False)
        values = image[inside] if inside.any() else image.ravel()
        values = values.ravel()[:: max(1, values.size // 500_000)]
        low, high = np.percentile(values, self.percentiles)
        return float(low), float(max(high, low + 1e-6))

    def normalise(
        self, image: np.ndarray, value_range: tuple[float, float] | None = None, channel: int = 0
    ) -> np.ndarray:
        """Image values -> float32 in [-1, 1] (clipped when ``clip``); ``channel`` picks the
        window when none is given."""
        low, high = value_range or self.range_of(image, channel)
        out = (image.astype(np.float32) - low) / (high - low) * 2.0 - 1.0
        return np.clip(out, -1.0, 1.0) if self.clip else out

    def denormalise(self, values: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
        """[-1, 1] -> image values (float64); ``value_range`` from :meth:`range_of`."""
        low, high = value_range
        return (values.astype(np.float64) + 1.0) / 2.0 * (high - low) + low
