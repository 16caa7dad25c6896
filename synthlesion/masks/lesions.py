"""What one lesion is: a connected tumour with all its sub-regions, never a speck.

A label map may give a lesion several classes (tumour sub-regions such as necrosis, edema and an
enhancing rim). A *lesion* is one connected component (face connectivity) of the union of all
lesion labels, so a tumour's sub-regions stay one lesion. Components of fewer than
:data:`MIN_LESION_VOXELS` voxels are specks (label noise, partial-volume remnants, resampling
debris), not lesions: they are neither counted, transplanted, measured nor trained around. This
module is the one home of that rule; the mask bank, the training crops and the quality
reference all use :func:`connected_lesions`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from synthlesion.data.cases import Case
from synthlesion.data.io import load_image

logger = logging.getLogger(__name__)

MIN_LESION_VOXELS = 10
"""Smallest connected component (in voxels, or pixels in 2D) that counts as a lesion."""


@dataclass(frozen=True, eq=False)
class ConnectedLesion:
    """One lesion of a label map.

    Attributes:
        box: Slices of its bounding box in the label map, one per axis.
        classes: uint8 array of the box's shape: 0 outside the lesion, ``k`` (1-based) where
            the lesion holds the ``k``-th of the lesion labels given.
        voxels: Number of voxels of the lesion (all sub-regions).
    """

    box: tuple[slice, ...]
    classes: np.ndarray
    voxels: int

    @property
    def mask(self) -> np.ndarray:
        """Boolean map of the lesion in its box."""
        return self.classes > 0

    @property
    def main_class(self) -> int:
        """The 1-based class holding most of its voxels."""
        counts = np.bincount(self.classes[self.classes > 0].astype(np.int64))
        return int(np.argmax(counts))

    def class_fractions(self, n_classes: int) -> np.ndarray:
        """Share of the lesion's voxels in each class, shape ``(n_classes,)``."""
        counts = np.bincount(
            self.classes[self.classes > 0].astype(np.int64), minlength=n_classes + 1
        )
        return counts[1:] / max(1, int(counts[1:].sum()))


def case_has_lesion(case: Case, lesion_values: Sequence[int]) -> bool:
    """Whether a case's label map holds a lesion voxel: healthy scans are recognised from their
    voxels, not from a listing (a ``has_lesion`` flag the voxels contradict is logged; the
    voxels win). A case without a mask has none."""
    if case.mask is None:
        return False
    array = load_image(case.mask).array
    found = bool(np.isin(array, list(lesion_values)).any())
    warn_if_listed_otherwise(case, found)
    return found


def warn_if_listed_otherwise(case: Case, found: bool) -> None:
    """Log a case whose listed ``has_lesion`` its voxels contradict (the voxels win)."""
    if case.has_lesion is not None and bool(case.has_lesion) != found:
        logger.warning(
            "case %s: listed has_lesion=%s but its label map %s %s lesion voxels",
            case.case_id,
            case.has_lesion,
            case.mask,
            "holds" if found else "holds no",
        )


def connected_lesions(
    labels: np.ndarray,
    lesion_labels: Sequence[int],
    *,
    min_voxels: int = MIN_LESION_VOXELS,
) -> Iterator[ConnectedLesion]:
    """Every lesion of a label map (see the module docstring), in label-map order.

    Args:
        labels: Integer label map, shape ``S``.
        lesion_labels: Label values that are lesion (sub-region) classes, in class order.
        min_voxels: Smaller components are specks and skipped.
    """
    values = [int(v) for v in lesion_labels]
    if not values:
        return
    lesion = np.isin(labels, values)
    if not lesion.any():
        return
    components, _ = ndimage.label(lesion)
    lookup = np.zeros(int(max(values)) + 1, dtype=np.uint8)
    for k, value in enumerate(values, start=1):
        if value >= 0:
            lookup[value] = k
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        if box is None:
            continue
        inside = components[box] == index
        voxels = int(inside.sum())
        if voxels < min_voxels:
            continue
        local = labels[box]
        classes = np.zeros(inside.shape, dtype=np.uint8)
        classes[inside] = lookup[np.clip(local[inside].astype(np.int64), 0, len(lookup) - 1)]
        yield ConnectedLesion(tuple(box), classes, voxels)


def class_depth_order(lesions: Sequence[ConnectedLesion], n_classes: int) -> tuple[int, ...]:
    """Lesion classes (1-based) from the outermost to the innermost, learned from real lesions.

    Each class's depth is the mean distance of its voxels to the lesion's outer border, divided
    by the lesion's deepest voxel; classes never seen come last. For brain tumours this gives
    edema, enhancing rim, necrotic core.
    """
    depth_sum = np.zeros(n_classes + 1)
    count = np.zeros(n_classes + 1)
    for lesion in lesions:
        inside = lesion.mask
        depth = ndimage.distance_transform_edt(np.pad(inside, 1))[
            tuple(slice(1, -1) for _ in inside.shape)
        ]
        depth = depth / max(float(depth.max()), 1.0)
        for k in range(1, n_classes + 1):
            where = lesion.classes == k
            if where.any():
                depth_sum[k] += float(depth[where].mean())
                count[k] += 1
    mean = np.where(count > 0, depth_sum / np.maximum(count, 1), np.inf)
    return tuple(int(k) for k in sorted(range(1, n_classes + 1), key=lambda k: (mean[k], k)))


def nest_classes(mask: np.ndarray, fractions: Sequence[float], order: Sequence[int]) -> np.ndarray:
    """Split a lesion into nested sub-regions: shells from the border inwards.

    Args:
        mask: Boolean lesion, shape ``P``.
        fractions: Share of voxels per class (1-based class ``k`` at index ``k - 1``).
        order: Classes from the outermost to the innermost (:func:`class_depth_order`).

    Returns:
        uint8 class map of shape ``P`` (0 outside): the outermost class takes the voxels
        nearest the border up to its share, the next one the following shell, and so on.
    """
    classes = np.zeros(mask.shape, dtype=np.uint8)
    inside = mask.astype(bool)
    if not inside.any():
        return classes
    if len(order) == 1:
        classes[inside] = order[0]
        return classes
    depth = ndimage.distance_transform_edt(np.pad(inside, 1))[
        tuple(slice(1, -1) for _ in inside.shape)
    ]
    coords = np.flatnonzero(inside)
    ranked = coords[np.argsort(depth.ravel()[coords], kind="stable")]
    shares = np.asarray([max(0.0, float(fractions[k - 1])) for k in order])
    shares = shares / shares.sum() if shares.sum() > 0 else np.full(len(order), 1 / len(order))
    bounds = np.round(np.cumsum(shares) * len(ranked)).astype(int)
    bounds[-1] = len(ranked)
    start = 0
    flat = classes.ravel()
    for k, stop in zip(order, bounds, strict=True):
        flat[ranked[start:stop]] = k
        start = stop
    return classes
