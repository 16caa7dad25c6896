"""Where a lesion may be placed in a scan, and placing one there."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from synthlesion.errors import SynthlesionError


class PlacementError(SynthlesionError):
    """No allowed position for a lesion (or the mask does not fit the scan)."""


@dataclass(frozen=True)
class PlacementConstraint:
    """Rules for where a new lesion may go.

    Attributes:
        tissue_labels: Label values of the tissue or organ the lesion must lie inside; empty
            means anywhere inside ``intensity_range`` (or anywhere at all).
        intensity_range: ``(low, high)`` image values (HU for CT) the lesion's voxels must lie
            in, or ``None``.
        min_border_distance_mm: Distance every lesion voxel keeps from the tissue's border.
        min_lesion_distance_mm: Distance every lesion voxel keeps from existing lesions.
        existing_lesion_labels: Label values of lesions already in the scan.
    """

    tissue_labels: tuple[int, ...] = (1,)
    intensity_range: tuple[float, float] | None = None
    min_border_distance_mm: float = 2.0
    min_lesion_distance_mm: float = 5.0
    existing_lesion_labels: tuple[int, ...] = (2,)

    def allowed(
        self, labels: np.ndarray | None, image: np.ndarray | None, spacing: Sequence[float]
    ) -> np.ndarray:
        """Boolean map of voxels where a lesion voxel may lie.

        Args:
            labels: Label map of the target scan, shape ``S`` (needed for tissue and lesion
                rules).
            image: Target image, shape ``S`` (needed for ``intensity_range``).
            spacing: Voxel size in mm per axis.
        """
        shape = labels.shape if labels is not None else image.shape  # type: ignore[union-attr]
        allowed = np.ones(shape, dtype=bool)
        if self.tissue_labels:
            if labels is None:
                raise PlacementError("a tissue constraint needs the scan's label map")
            tissue = np.isin(labels, self.tissue_labels) | np.isin(
                labels, self.existing_lesion_labels
            )
            if self.min_border_distance_mm > 0:
                inside = ndimage.distance_transform_edt(tissue, sampling=spacing)
                tissue = inside > self.min_border_distance_mm
            allowed &= tissue
        if self.intensity_range is not None:
            if image is None:
                raise PlacementError("an intensity constraint needs the image")
            low, high = self.intensity_range
            allowed &= (image >= low) & (image <= high)
        if labels is not None and self.existing_lesion_labels:
            lesions = np.isin(labels, self.existing_lesion_labels)
            if lesions.any():
                away = ndimage.distance_transform_edt(~lesions, sampling=spacing)
                allowed &= away > self.min_lesion_distance_mm
        return allowed


def place_mask(
    patch: np.ndarray,
    allowed: np.ndarray,
    rng: np.random.Generator,
    *,
    max_tries: int = 200,
) -> tuple[np.ndarray, tuple[int, ...]]:
    """Put a binary lesion ``patch`` at a random position where all its voxels are allowed.

    Args:
        patch: Binary lesion mask cropped to its bounding box, shape ``P`` (same number of
            axes as ``allowed``).
        allowed: Boolean map from :meth:`PlacementConstraint.allowed`, shape ``S``.
        rng: Generator that draws the position.
        max_tries: Candidate positions tried before giving up.

    Returns:
        The full-size boolean mask (shape ``S``) and the patch's corner index.

    Raises:
        PlacementError: The patch is larger than the scan or no position was allowed.
    """
    patch = patch.astype(bool)
    if patch.ndim != allowed.ndim or any(
        p > s for p, s in zip(patch.shape, allowed.shape, strict=True)
    ):
        raise PlacementError(f"lesion patch {patch.shape} does not fit a scan of {allowed.shape}")
    if not patch.any():
        raise PlacementError("lesion patch is empty")
    # Corners where the patch's centre voxel lands on an allowed voxel, then an exact check.
    centre = tuple(s // 2 for s in patch.shape)
    valid = np.zeros_like(allowed)
    region = tuple(
        slice(c, s - (p - c) + 1)
        for c, s, p in zip(centre, allowed.shape, patch.shape, strict=True)
    )
    valid[region] = allowed[region]
    candidates = np.flatnonzero(valid)
    if candidates.size == 0:
        raise PlacementError("no allowed position for the lesion (allowed region too small)")
    offsets = np.argwhere(patch)
    for index in rng.choice(candidates, size=min(max_tries, candidates.size), replace=False):
        point = np.unravel_index(index, allowed.shape)
        corner = tuple(int(p - c) for p, c in zip(point, centre, strict=True))
        coords = offsets + np.asarray(corner)
        if allowed[tuple(coords.T)].all():
            full = np.zeros(allowed.shape, dtype=bool)
            full[tuple(coords.T)] = True
            return full, corner
    raise PlacementError(
        f"no position among {min(max_tries, candidates.size)} tried keeps the whole lesion "
        "inside the allowed region"
    )
