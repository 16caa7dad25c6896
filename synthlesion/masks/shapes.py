"""Lesion shapes: a bank of real lesions, their jittered transplants, and procedural ellipsoids.

Every resampling of a mask here is nearest-neighbour on a boolean array: a mask never turns
into fractions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from synthlesion.data.cases import Case
from synthlesion.data.io import image_grid, load_mask_for
from synthlesion.masks.lesions import (
    MIN_LESION_VOXELS,
    ConnectedLesion,
    class_depth_order,
    connected_lesions,
)
from synthlesion.masks.placement import PlacementError
from synthlesion.storage import sha256_file

MAX_ROTATION_DEG = 30.0  # beyond this a transplanted lesion no longer follows anatomy


@dataclass(frozen=True, eq=False)
class BankLesion:
    """One connected lesion cut from a real case, with its sub-regions.

    Attributes:
        patch: uint8 class map cropped to the lesion's bounding box, shape ``P``: 0 outside,
            ``k`` where the lesion holds its ``k``-th lesion class (one class for a plain
            lesion; necrosis / edema / enhancing rim for a brain tumour).
        spacing: Voxel size of ``patch`` in mm.
        source_case: Case id it was cut from.
        source_patient: That case's patient id.
        mask_sha256: sha256 of the source mask file (provenance; reuse across splits is a guard).
        volume_mm3: Lesion volume, all sub-regions (area in mm^2 for 2D).
    """

    patch: np.ndarray
    spacing: tuple[float, ...]
    source_case: str
    source_patient: str
    mask_sha256: str
    volume_mm3: float


class MaskBank:
    """Real lesions from training cases, to transplant into other scans.

    Args:
        lesions: The lesions.
        n_classes: K, the number of lesion classes of the patches.
    """

    def __init__(self, lesions: Sequence[BankLesion], n_classes: int = 1) -> None:
        if not lesions:
            raise PlacementError("the mask bank is empty: no lesion in the given cases")
        self.lesions = list(lesions)
        self.n_classes = int(n_classes)
        self._order: tuple[int, ...] | None = None

    @classmethod
    def from_cases(
        cls,
        cases: Iterable[Case],
        *,
        lesion_labels: Sequence[int] | None = None,
        min_voxels: int = MIN_LESION_VOXELS,
    ) -> MaskBank:
        """Cut every lesion (:func:`~synthlesion.masks.lesions.connected_lesions`: one connected
        tumour with all its sub-regions, specks skipped) out of the cases' masks.

        Args:
            cases: Labelled cases (real, training split).
            lesion_labels: Lesion label values in class order; ``None`` takes each case's own
                (:attr:`Case.lesion_labels`).
            min_voxels: Smaller components are specks, not lesions.
        """
        lesions = []
        n_classes = len(lesion_labels) if lesion_labels is not None else 1
        for case in cases:
            if case.mask is None:
                continue
            values = tuple(lesion_labels) if lesion_labels is not None else case.lesion_labels
            n_classes = max(n_classes, len(values))
            mask = load_mask_for(image_grid(case.image), case.mask)  # the image's grid
            array = mask.array
            if array.dtype.kind == "f":
                array = np.rint(array).astype(np.int64)  # integer-valued float label maps
            digest = None
            voxel = float(np.prod(mask.spacing))
            for lesion in connected_lesions(array, values, min_voxels=min_voxels):
                digest = digest or sha256_file(case.mask)
                lesions.append(
                    BankLesion(
                        lesion.classes,
                        mask.spacing,
                        case.case_id,
                        case.patient_id,
                        digest,
                        float(lesion.voxels) * voxel,
                    )
                )
        return cls(lesions, n_classes)

    def volumes_mm3(self) -> np.ndarray:
        """Volumes of the bank's lesions (for drawing procedural sizes)."""
        return np.array([lesion.volume_mm3 for lesion in self.lesions])

    def draw(self, rng: np.random.Generator) -> BankLesion:
        return self.lesions[int(rng.integers(len(self.lesions)))]

    def class_order(self) -> tuple[int, ...]:
        """Lesion classes from the outermost to the innermost, as the real lesions nest them."""
        if self._order is None:
            connected = [
                ConnectedLesion(tuple(slice(0, n) for n in b.patch.shape), b.patch, 0)
                for b in self.lesions
            ]
            self._order = class_depth_order(connected, self.n_classes)
        return self._order

    def draw_fractions(self, rng: np.random.Generator) -> np.ndarray:
        """The class proportions of one real lesion, drawn at random (shape ``(K,)``)."""
        patch = self.draw(rng).patch
        counts = np.bincount(patch[patch > 0].astype(np.int64), minlength=self.n_classes + 1)
        return counts[1 : self.n_classes + 1] / max(1, int(counts[1:].sum()))


def jitter_mask(
    patch: np.ndarray,
    source_spacing: Sequence[float],
    target_spacing: Sequence[float],
    rng: np.random.Generator,
    *,
    rotation_deg: float = 20.0,
    scale: tuple[float, float] = (0.8, 1.25),
    elastic_mm: float = 1.0,
) -> np.ndarray:
    """Resample a lesion patch onto a target voxel size with a random rotation, scale and
    elastic jitter, by nearest neighbour (sub-region classes are carried over exactly).

    Args:
        patch: Boolean lesion patch or uint8 class map (0 outside), shape ``P`` (2D or 3D).
        source_spacing: ``patch`` voxel size in mm.
        target_spacing: Output voxel size in mm.
        rng: Draws the rotation (uniform in ``[-rotation_deg, rotation_deg]`` about each axis),
            the isotropic scale and the elastic field.
        rotation_deg: Largest rotation; at most 30 degrees.
        scale: Range of the isotropic scale factor.
        elastic_mm: Standard deviation of the smooth displacement, in mm.

    Returns:
        Patch on the target grid, cropped to its bounding box, of ``patch``'s dtype (boolean
        or the same class values).
    """
    if abs(rotation_deg) > MAX_ROTATION_DEG:
        raise ValueError(
            f"rotation_deg {rotation_deg} exceeds the anatomical bound {MAX_ROTATION_DEG}"
        )
    dims = patch.ndim
    src = np.asarray(source_spacing[:dims], dtype=float)
    dst = np.asarray(target_spacing[:dims], dtype=float)
    rotation = _random_rotation(dims, math.radians(rotation_deg), rng)
    factor = float(rng.uniform(*scale))
    extent_mm = np.asarray(patch.shape) * src
    half_out = np.ceil((np.linalg.norm(extent_mm) * factor / 2 + 3 * elastic_mm + 1) / dst).astype(
        int
    )
    axes = [np.arange(-h, h + 1) * d for h, d in zip(half_out, dst, strict=True)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=0).reshape(dims, -1)  # mm, centred
    if elastic_mm > 0:
        coarse = rng.normal(0, elastic_mm, size=(dims, *[max(2, 2 * h // 4 + 1) for h in half_out]))
        zoom = [(2 * h + 1) / c for h, c in zip(half_out, coarse.shape[1:], strict=True)]
        field = np.stack([ndimage.zoom(c, zoom, order=1) for c in coarse])
        field = field[(slice(None), *[slice(0, 2 * h + 1) for h in half_out])]
        grid = grid + field.reshape(dims, -1)
    source_mm = rotation.T @ grid / factor
    centre = (np.asarray(patch.shape) - 1) / 2
    coords = source_mm / src[:, None] + centre[:, None]
    values = ndimage.map_coordinates(
        patch.astype(np.uint8), coords, order=0, mode="constant", cval=0
    )
    out = values.reshape([2 * h + 1 for h in half_out]).astype(patch.dtype)
    return _crop(out)


def procedural_mask(
    rng: np.random.Generator,
    spacing: Sequence[float],
    volume_mm3: float,
    *,
    irregularity: float = 0.25,
    max_axis_ratio: float = 1.6,
) -> np.ndarray:
    """A smoothly deformed ellipsoid (ellipse in 2D) of about ``volume_mm3``.

    Args:
        rng: Draws axis ratios, orientation and the deformation field.
        spacing: Voxel size in mm; its length sets 2D or 3D.
        volume_mm3: Target volume (area in mm^2 for 2D).
        irregularity: Amplitude of the smooth radial deformation (0 = a plain ellipsoid).
        max_axis_ratio: Largest ratio between two semi-axes.

    Returns:
        Boolean patch cropped to its bounding box.
    """
    dims = len(spacing)
    spacing_arr = np.asarray(spacing, dtype=float)
    ratios = np.exp(rng.uniform(-0.5, 0.5, dims) * math.log(max_axis_ratio))
    unit = math.pi if dims == 2 else 4.0 / 3.0 * math.pi
    base = (volume_mm3 / (unit * float(np.prod(ratios)))) ** (1.0 / dims)
    radii = base * ratios
    rotation = _random_rotation(dims, math.pi, rng)
    half = np.ceil(radii.max() * (1 + 2 * irregularity) / spacing_arr + 1).astype(int)
    axes = [np.arange(-h, h + 1) * s for h, s in zip(half, spacing_arr, strict=True)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=0)
    local = np.tensordot(rotation.T, grid, axes=1)
    radius = np.sqrt(sum((local[i] / radii[i]) ** 2 for i in range(dims)))
    noise = ndimage.gaussian_filter(rng.normal(0, 1, radius.shape), sigma=max(1.0, half.min() / 2))
    noise /= noise.std() + 1e-8
    inside = radius <= 1.0 + irregularity * noise * 0.5
    labelled, count = ndimage.label(inside)
    if count == 0:
        raise PlacementError(
            f"procedural lesion of {volume_mm3:.1f} mm^3 vanished at spacing {spacing}"
        )
    sizes = ndimage.sum(inside, labelled, index=range(1, count + 1))
    largest = labelled == (int(np.argmax(sizes)) + 1)
    return _crop(ndimage.binary_fill_holes(largest))


def _random_rotation(dims: int, max_angle: float, rng: np.random.Generator) -> np.ndarray:
    if dims == 2:
        a = rng.uniform(-max_angle, max_angle)
        return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    rotation = np.eye(3)
    for axis in range(3):
        a = rng.uniform(-max_angle, max_angle)
        i, j = [k for k in range(3) if k != axis]
        step = np.eye(3)
        step[i, i] = step[j, j] = math.cos(a)
        step[i, j], step[j, i] = -math.sin(a), math.sin(a)
        rotation = step @ rotation
    return rotation


def _crop(mask: np.ndarray) -> np.ndarray:
    if not mask.any():
        return mask
    box = ndimage.find_objects((mask > 0).astype(np.uint8))[0]
    return mask[box].copy()
