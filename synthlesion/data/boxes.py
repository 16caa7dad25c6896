"""Boxes around masks: the set-up, the gates and the placement work inside them, so their cost
follows the lesions, not the scan.

A distance of ``d`` mm from a mask never reaches past ``ceil(d / spacing) + 1`` voxels from its
bounding box on any axis, so a distance transform run in a box grown by
:func:`margin_voxels` gives exactly the whole-scan answer for every voxel within ``d`` of the
mask (and every voxel outside the box is farther than ``d``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def bounding_box(mask: np.ndarray, pad: int | Sequence[int] = 0) -> tuple[slice, ...] | None:
    """Slices of the box around ``mask``'s true voxels grown by ``pad`` voxels per axis (one
    number for every axis, or one per axis), clipped to the array; ``None`` for an empty mask.
    """
    mask = np.asarray(mask)
    pads = [int(p) for p in pad] if isinstance(pad, Sequence) else [int(pad)] * mask.ndim
    if len(pads) != mask.ndim:
        raise ValueError(f"pad {pads} does not fit a {mask.ndim}D mask")
    found = ndimage.find_objects((mask != 0).astype(np.uint8))
    if not found or found[0] is None:
        return None
    return tuple(
        slice(max(0, b.start - p), min(n, b.stop + p))
        for b, p, n in zip(found[0], pads, mask.shape, strict=True)
    )


def margin_voxels(distance_mm: float, spacing: Sequence[float]) -> tuple[int, ...]:
    """Voxels per axis that hold every point within ``distance_mm`` of a box's edge."""
    return tuple(int(math.ceil(max(float(distance_mm), 0.0) / float(s))) + 1 for s in spacing)


def distance_from(
    mask: np.ndarray, distance_mm: float, spacing: Sequence[float]
) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """The Euclidean distance (mm) to the nearest voxel of ``mask``, in the box around it
    grown by ``distance_mm``: ``(box, distances of the box's voxels)``; 0 on the mask. Every
    voxel outside the box lies farther than ``distance_mm``. ``None`` for an empty mask.

    Args:
        mask: Boolean map, shape ``S``.
        distance_mm: The distance that must be exact inside the box.
        spacing: Voxel size in mm per axis.
    """
    box = bounding_box(mask, margin_voxels(distance_mm, spacing))
    if box is None:
        return None
    inside = np.asarray(mask)[box] != 0
    return box, ndimage.distance_transform_edt(~inside, sampling=spacing)


def depth_inside(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """The distance (mm) of every voxel of ``mask`` to the nearest voxel outside it (0
    outside), computed in the box around the mask (shape ``S``, float64). Voxels on the array's
    edge measure to the nearest outside voxel within the array, as
    ``scipy.ndimage.distance_transform_edt`` does."""
    mask = np.asarray(mask) != 0
    depth = np.zeros(mask.shape, dtype=np.float64)
    box = bounding_box(mask, 1)
    if box is not None:
        depth[box] = ndimage.distance_transform_edt(mask[box], sampling=spacing)
    return depth


__all__ = ["bounding_box", "depth_inside", "distance_from", "margin_voxels"]
