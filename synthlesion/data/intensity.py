"""Intensity normalisation to [-1, 1] and back, one definition for training and sampling.

CT is windowed in Hounsfield units (a fixed window, so HU keep their meaning across scans);
MRI and other modalities without absolute units are scaled between two percentiles of the
scan's foreground. Normalisation always happens before any augmentation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from synthlesion.errors import ConfigError


@dataclass(frozen=True)
class IntensityNormaliser:
    """Map image values to [-1, 1] and back.

    Attributes:
        mode: ``"window"`` (fixed window in image units, for CT in HU) or ``"percentile"``
            (per-scan percentiles, for MRI).
        window: ``(low, high)`` in image units for ``"window"`` (e.g. ``(-200, 300)`` HU).
        percentiles: ``(low, high)`` percentiles for ``"percentile"`` (e.g. ``(0.5, 99.5)``).
        clip: Clip normalised values to [-1, 1].
    """

    mode: Literal["window", "percentile"] = "window"
    window: tuple[float, float] = (-200.0, 300.0)
    percentiles: tuple[float, float] = (0.5, 99.5)
    clip: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("window", "percentile"):
            raise ConfigError(f"intensity mode must be 'window' or 'percentile', got {self.mode!r}")
        low, high = self.window if self.mode == "window" else self.percentiles
        if not high > low:
            raise ConfigError(f"intensity {self.mode} needs low < high, got ({low}, {high})")

    @classmethod
    def for_modality(cls, modality: str) -> IntensityNormaliser:
        """CT: a soft-tissue window of [-200, 300] HU; anything else: 0.5/99.5 percentiles."""
        if modality.upper() == "CT":
            return cls("window", (-200.0, 300.0))
        return cls("percentile", percentiles=(0.5, 99.5))

    def range_of(self, image: np.ndarray) -> tuple[float, float]:
        """The ``(low, high)`` image values that map to -1 and +1 for this ``image``."""
        if self.mode == "window":
            return float(self.window[0]), float(self.window[1])
        values = image[image > 0] if np.any(image > 0) else image.ravel()
        values = values.ravel()[:: max(1, values.size // 500_000)]
        low, high = np.percentile(values, self.percentiles)
        return float(low), float(max(high, low + 1e-6))

    def normalise(
        self, image: np.ndarray, value_range: tuple[float, float] | None = None
    ) -> np.ndarray:
        """Image values -> float32 in [-1, 1] (clipped when ``clip``)."""
        low, high = value_range or self.range_of(image)
        out = (image.astype(np.float32) - low) / (high - low) * 2.0 - 1.0
        return np.clip(out, -1.0, 1.0) if self.clip else out

    def denormalise(self, values: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
        """[-1, 1] -> image values (float64); ``value_range`` from :meth:`range_of`."""
        low, high = value_range
        return (values.astype(np.float64) + 1.0) / 2.0 * (high - low) + low
