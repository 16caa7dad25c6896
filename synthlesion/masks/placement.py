"""Where a lesion may be placed in a scan, and placing one there.

Where lesions may go is one :class:`PlacementRegion`, resolved by :func:`placement_region` in
this order, the first that applies:

1. an explicit region given by the user (a mask of the scan's grid, e.g. a brain mask, or a
   label value of the scan's label map);
2. the organ labels of the label map (the labels that are neither background nor lesion);
3. the scan's foreground (:func:`synthlesion.data.intensity.foreground_mask`: voxels that differ
   from a constant background, else the body by intensity), holes filled.

Never the whole volume: a scan with a lesion-only label map still keeps its lesions inside the
head. :class:`PlacementConstraint` then erodes the region by a border margin and keeps new
lesions away from existing ones. Sampling, the hand-crafted generator and the healthy-tissue
blobs of training all use this one rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from synthlesion.data.boxes import depth_inside, distance_from
from synthlesion.data.intensity import foreground_mask
from synthlesion.errors import SynthlesionError

RegionSource = Literal["user", "label", "organ", "foreground"]


class PlacementError(SynthlesionError):
    """No allowed position for a lesion (or the mask does not fit the scan)."""


@dataclass(frozen=True, eq=False)
class PlacementRegion:
    """Where lesions may lie in one scan.

    Attributes:
        mask: Boolean map, shape ``S`` (the scan's grid); existing lesions are inside it.
        source: How it was resolved: ``"user"`` (a region mask), ``"label"`` (a label value
            given by the user), ``"organ"`` (the organ labels) or ``"foreground"``.
        detail: The rule in words, for reports and manifests.
    """

    mask: np.ndarray
    source: RegionSource
    detail: str

    def to_dict(self) -> dict[str, object]:
        """Facts recorded with a synthetic case."""
        return {"source": self.source, "detail": self.detail, "voxels": int(self.mask.sum())}


def placement_region(
    labels: np.ndarray | None,
    image: np.ndarray,
    *,
    user_region: np.ndarray | None = None,
    region_label: int | None = None,
    organ_labels: Sequence[int] = (),
    lesion_labels: Sequence[int] = (),
    modality: str = "unknown",
    where: str = "scan",
) -> PlacementRegion:
    """Resolve the :class:`PlacementRegion` of one scan (see the module docstring for the order).

    Args:
        labels: The scan's label map, shape ``S`` (``None`` when it has none).
        image: The scan (first channel), shape ``S``, in image units.
        user_region: A user's region mask on the scan's grid (non-zero = allowed).
        region_label: A label value of ``labels`` that is the region.
        organ_labels: Organ label values (empty: no organ label).
        lesion_labels: Lesion label values; existing lesions count as inside the region.
        modality: ``"CT"`` picks the HU body rule for the foreground.
        where: The scan's name for error messages (file and case).

    Raises:
        PlacementError: a region that does not fit the scan, or is empty.
    """
    shape = tuple(image.shape)
    lesions = (
        np.isin(labels, list(lesion_labels))
        if labels is not None and len(lesion_labels)
        else np.zeros(shape, dtype=bool)
    )
    if user_region is not None:
        if tuple(user_region.shape) != shape:
            raise PlacementError(
                f"{where}: region mask shape {tuple(user_region.shape)} does not fit the scan "
                f"{shape}"
            )
        mask, source, detail = user_region != 0, "user", "the user's region mask"
    elif region_label is not None:
        if labels is None:
            raise PlacementError(f"{where}: region label {region_label} needs a label map")
        mask, source, detail = labels == region_label, "label", f"label {region_label}"
    elif labels is not None and len(organ_labels):
        mask = np.isin(labels, list(organ_labels)) | lesions
        source, detail = "organ", f"organ label(s) {sorted(int(v) for v in organ_labels)}"
    else:
        mask = foreground_mask(image, modality) | lesions
        source, detail = "foreground", "the scan's foreground (no organ label)"
    if not mask.any():
        raise PlacementError(f"{where}: the placement region ({detail}) is empty")
    return PlacementRegion(np.asarray(mask, dtype=bool), source, detail)  # type: ignore[arg-type]


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
        self,
        labels: np.ndarray | None,
        image: np.ndarray | None,
        spacing: Sequence[float],
        region: PlacementRegion | np.ndarray | None = None,
    ) -> np.ndarray:
        """Boolean map of voxels where a lesion voxel may lie.

        Args:
            labels: Label map of the target scan, shape ``S`` (needed for tissue and lesion
                rules).
            image: Target image, shape ``S`` (needed for ``intensity_range``).
            spacing: Voxel size in mm per axis.
            region: The scan's :class:`PlacementRegion` (or its boolean map); replaces
                ``tissue_labels`` when given. Eroded by ``min_border_distance_mm``.
        """
        shape = labels.shape if labels is not None else image.shape  # type: ignore[union-attr]
        allowed = np.ones(shape, dtype=bool)
        if region is not None or self.tissue_labels:
            if region is not None:
                tissue = region.mask if isinstance(region, PlacementRegion) else region
                tissue = tissue.astype(bool, copy=True)
            elif labels is None:
                raise PlacementError("a tissue constraint needs the scan's label map")
            else:
                tissue = np.isin(labels, self.tissue_labels) | np.isin(
                    labels, self.existing_lesion_labels
                )
            if self.min_border_distance_mm > 0:
                tissue = depth_inside(tissue, spacing) > self.min_border_distance_mm
            allowed &= tissue
        if self.intensity_range is not None:
            if image is None:
                raise PlacementError("an intensity constraint needs the image")
            low, high = self.intensity_range
            allowed &= (image >= low) & (image <= high)
        if labels is not None and self.existing_lesion_labels:
            lesions = np.isin(labels, self.existing_lesion_labels)
            keep_away(allowed, lesions, self.min_lesion_distance_mm, spacing)
        return allowed


def keep_away(
    allowed: np.ndarray, lesions: np.ndarray, distance_mm: float, spacing: Sequence[float]
) -> None:
    """Forbid, in place, every voxel of ``allowed`` within ``distance_mm`` of ``lesions``
    (worked out in a box around the lesions: the cost follows them, not the scan)."""
    near = distance_from(lesions, distance_mm, spacing)
    if near is not None:
        box, distance = near
        allowed[box] &= distance > distance_mm


def place_mask(
    patch: np.ndarray,
    allowed: np.ndarray,
    rng: np.random.Generator,
    *,
    max_tries: int = 200,
) -> tuple[np.ndarray, tuple[int, ...]]:
    """Put a lesion ``patch`` at a random position where all its voxels are allowed.

    Args:
        patch: Boolean lesion mask, or uint8 class map (0 outside), cropped to its bounding
            box, shape ``P`` (same number of axes as ``allowed``).
        allowed: Boolean map from :meth:`PlacementConstraint.allowed`, shape ``S``.
        rng: Generator that draws the position.
        max_tries: Candidate positions tried before giving up.

    Returns:
        The full-size mask (shape ``S``, ``patch``'s dtype: boolean, or the class values) and
        the patch's corner index.

    Raises:
        PlacementError: The patch is larger than the scan or no position was allowed.
    """
    values = np.asarray(patch)
    patch = values > 0
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
            full = np.zeros(allowed.shape, dtype=values.dtype)
            full[tuple(coords.T)] = values[tuple(offsets.T)]
            return full, corner
    raise PlacementError(
        f"no position among {min(max_tries, candidates.size)} tried keeps the whole lesion "
        "inside the allowed region"
    )
