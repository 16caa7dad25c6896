"""The volume object every part of synthlesion passes around, and geometry comparisons.

Two volumes share a *grid* when every voxel centre lies at the same world position (RAS+ mm).
:func:`geometry_differences` compares two grids axis by axis; :func:`align_to_grid` also accepts
a grid stored in another axis order or with flipped axes (an LPS image with an RAS mask) and
rearranges the voxels onto the reference grid exactly, without interpolation.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from synthlesion.errors import GeometryError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Volume:
    """An image or mask on a voxel grid placed in world space.

    Attributes:
        array: Voxel values, shape ``(X, Y)`` for 2D or ``(X, Y, Z)`` for 3D, in the dtype of
            the file (CT in HU stays ``int16``).
        affine: 4x4 voxel-to-world matrix, world in RAS+ millimetres (NIfTI convention).
        header: The NIfTI header the volume came from (or will be written with), if any.
        source: The file or folder it was read from, if any.
        meta: Free-form extra facts from the reader (DICOM tags, form codes).
    """

    array: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header | None = None
    source: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise GeometryError(f"{self.source}: affine must be 4x4, got {affine.shape}")
        object.__setattr__(self, "affine", affine)

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape of the voxel grid."""
        return tuple(int(s) for s in self.array.shape)

    @property
    def spatial_dims(self) -> int:
        """2 or 3."""
        return self.array.ndim

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each array axis."""
        sizes = np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))
        return tuple(float(s) for s in sizes[: self.spatial_dims])

    @property
    def origin(self) -> tuple[float, float, float]:
        """World position (RAS mm) of the centre of voxel 0."""
        return tuple(float(v) for v in self.affine[:3, 3])  # type: ignore[return-value]

    @property
    def orientation(self) -> str:
        """Orientation code such as ``"RAS"`` or ``"LPS"`` (the direction each axis points to)."""
        return "".join(nib.orientations.aff2axcodes(self.affine))

    def with_array(self, array: np.ndarray) -> Volume:
        """A new volume with the same geometry and header and another voxel array."""
        if tuple(array.shape) != self.shape:
            raise GeometryError(
                f"{self.source}: new array shape {tuple(array.shape)} != volume shape {self.shape}"
            )
        return Volume(array, self.affine.copy(), self.header, self.source, dict(self.meta))


def geometry_differences(
    image: Volume, mask: Volume, tolerance_mm: float = 1e-3
) -> list[tuple[str, str]]:
    """List how two volumes' voxel grids disagree.

    Args:
        image: The reference volume.
        mask: The volume that must share its grid.
        tolerance_mm: Largest allowed difference in spacing, origin and direction (mm, and
            mm per voxel for direction columns).

    Returns:
        ``(code, message)`` pairs; empty when both share one grid. Codes are ``shape``,
        ``spacing``, ``origin``, ``orientation`` and ``direction``.
    """
    problems: list[tuple[str, str]] = []
    if image.shape != mask.shape:
        problems.append(("shape", f"mask shape {mask.shape} != image shape {image.shape}"))
        return problems
    spacing_diff = np.abs(np.subtract(image.spacing, mask.spacing)).max()
    if spacing_diff > tolerance_mm:
        problems.append(
            (
                "spacing",
                f"mask spacing {_fmt(mask.spacing)} mm != image spacing "
                f"{_fmt(image.spacing)} mm (max difference {spacing_diff:.4g} mm)",
            )
        )
    if image.orientation != mask.orientation:
        problems.append(
            (
                "orientation",
                f"mask orientation {mask.orientation} != image orientation {image.orientation}",
            )
        )
    else:
        direction_diff = np.abs(image.affine[:3, :3] - mask.affine[:3, :3]).max()
        if direction_diff > tolerance_mm and spacing_diff <= tolerance_mm:
            problems.append(
                (
                    "direction",
                    f"mask direction matrix differs from the image's by up to "
                    f"{direction_diff:.4g} mm per voxel",
                )
            )
    origin_diff = float(np.abs(image.affine[:3, 3] - mask.affine[:3, 3]).max())
    if origin_diff > tolerance_mm:
        problems.append(
            (
                "origin",
                f"mask origin {_fmt(mask.origin)} mm != image origin "
                f"{_fmt(image.origin)} mm (max difference {origin_diff:.4g} mm)",
            )
        )
    return problems


def require_same_geometry(image: Volume, mask: Volume, tolerance_mm: float = 1e-3) -> None:
    """Raise :class:`GeometryError` unless ``mask`` lies on ``image``'s voxel grid."""
    problems = geometry_differences(image, mask, tolerance_mm)
    if problems:
        detail = "; ".join(message for _, message in problems)
        raise GeometryError(f"{mask.source} does not match {image.source}: {detail}")


def align_to_grid(reference: Volume, other: Volume, tolerance_mm: float = 1e-3) -> Volume:
    """Return ``other`` on ``reference``'s voxel grid when both grids are the same up to axis order.

    A mask stored in another axis order or with flipped axes (image LPS, mask RAS, or any
    permutation/flip of the three axes) describes the same grid when, after permuting and
    flipping its axes, its spacing, direction and origin match the reference's within
    ``tolerance_mm`` (the same comparison as :func:`geometry_differences`). Its voxels are then
    rearranged exactly (a transpose and flips, never an interpolation). A 2D volume ``(X, Y)``
    and a 3D volume ``(X, Y, 1)`` are the same grid too (only the in-plane axes and the origin
    are compared, a 2D volume has no slice axis).

    Args:
        reference: The grid to land on (usually the image), shape ``(X, Y)`` or ``(X, Y, Z)``.
        other: The volume to rearrange (usually the mask).
        tolerance_mm: Largest difference in spacing and origin (mm) and in direction columns
            (mm per voxel).

    Returns:
        ``other`` itself when it already lies on the grid (no copy). Otherwise a new volume with
        ``reference.shape``, the voxels of ``other`` at the same world positions, the affine of
        ``reference``, ``other``'s header with that affine and shape (form codes kept) and, when
        axes were permuted or flipped, ``meta["stored_axis_order"]`` describing how ``other`` was
        stored (``orientation``, ``shape``, ``axes``: the stored axis of each reference axis,
        ``flipped``: per reference axis).

    Raises:
        GeometryError: The grids differ (shape, spacing, origin, orientation or direction),
            whatever the axis order; the message names both files and each difference.
    """
    aligned, problems = try_align_to_grid(reference, other, tolerance_mm)
    if aligned is None:
        detail = "; ".join(message for _, message in problems)
        raise GeometryError(f"{other.source} does not match {reference.source}: {detail}")
    return aligned


def try_align_to_grid(
    reference: Volume, other: Volume, tolerance_mm: float = 1e-3
) -> tuple[Volume | None, list[tuple[str, str]]]:
    """:func:`align_to_grid` without raising.

    Returns:
        ``(aligned, [])`` on success, else ``(None, problems)`` with the ``(code, message)``
        pairs of :func:`geometry_differences` for the closest axis order (codes ``shape``,
        ``spacing``, ``origin``, ``orientation``, ``direction``).
    """
    if reference.shape == other.shape and not geometry_differences(reference, other, tolerance_mm):
        return other, []
    ref_array_3d = reference.shape + (1,) * (3 - reference.spatial_dims)
    other_array = other.array.reshape(other.shape + (1,) * (3 - other.spatial_dims))
    # A 2D volume's third affine column is not an axis of its grid: compare in-plane axes only.
    n_compared = 2 if 2 in (reference.spatial_dims, other.spatial_dims) else 3
    best: tuple[float, tuple[int, ...], tuple[bool, ...], np.ndarray] | None = None
    for axes in itertools.permutations(range(3)):
        if tuple(other_array.shape[a] for a in axes) != ref_array_3d:
            continue
        for flipped in itertools.product((False, True), repeat=3):
            affine = _permuted_affine(other.affine, ref_array_3d, axes, flipped)
            if n_compared == 2:
                affine[:3, 2] = reference.affine[:3, 2]
            column_diff = float(np.abs(affine[:3, :3] - reference.affine[:3, :3]).max())
            origin_diff = float(np.abs(affine[:3, 3] - reference.affine[:3, 3]).max())
            if column_diff <= tolerance_mm and origin_diff <= tolerance_mm:
                return _rearranged(reference, other, other_array, axes, flipped), []
            if best is None or column_diff < best[0]:
                best = (column_diff, axes, flipped, affine)
    return None, _closest_differences(reference, other, other_array, best, tolerance_mm)


def header_with_affine(
    header: nib.Nifti1Header | None, affine: np.ndarray, shape: tuple[int, ...]
) -> nib.Nifti1Header:
    """A copy of ``header`` describing ``affine`` and data ``shape``, form codes kept.

    The qform and sform are rewritten with ``affine`` under the codes the header already has
    (a code of 0 stays 0, 2 stays 2...), ``pixdim`` follows the affine's voxel sizes. Codes
    change only where the header could not hold the affine otherwise, with a logged warning:

    * no header, or both codes 0 and an affine that the header's voxel sizes alone do not give
      (nibabel's fallback affine): qform and sform code 1 (scanner);
    * a qform code > 0 and an affine with shears, which a qform cannot hold: qform code 0 (the
      sform holds the affine; it gets the qform's code if its own was 0).

    Args:
        header: The header to start from (``None``: a new NIfTI-1 header).
        affine: 4x4 voxel-to-world matrix, RAS+ mm.
        shape: Data shape to record, e.g. ``(X, Y, Z)``.
    """
    if header is None:
        fresh = nib.Nifti1Header()
        fresh["qform_code"] = 1
        fresh["sform_code"] = 1
        header = fresh
    elif isinstance(header, nib.Nifti1Header):
        header = header.copy()
    else:
        header = nib.Nifti1Header.from_header(header)
    affine = np.asarray(affine, dtype=np.float64)
    header.set_data_shape(shape)
    qcode, scode = int(header["qform_code"]), int(header["sform_code"])
    header.set_qform(affine, code=qcode)
    header.set_sform(affine, code=scode)
    if qcode == 0 and scode == 0:
        if corner_distance_mm(header.get_base_affine(), affine, shape) > 1e-3:
            logger.debug(
                "header has no qform/sform and its voxel sizes do not give the affine; "
                "writing both with code 1 (scanner)"
            )
            header.set_qform(affine, code=1)
            header.set_sform(affine, code=1)
    elif qcode > 0 and corner_distance_mm(header.get_qform(), affine, shape) > 1e-3:
        logger.warning(
            "affine has shears a qform cannot hold; qform code %d -> 0, sform holds the affine",
            qcode,
        )
        header.set_qform(affine, code=0)
        header.set_sform(affine, code=scode or qcode)
    return header


def _permuted_affine(
    affine: np.ndarray,
    ref_shape: tuple[int, ...],
    axes: tuple[int, ...],
    flipped: tuple[bool, ...],
) -> np.ndarray:
    """Affine of ``other`` re-expressed for reference indices: reference axis ``i`` is stored
    axis ``axes[i]``, reversed where ``flipped[i]``."""
    index = np.zeros((4, 4))
    index[3, 3] = 1.0
    for i, (a, flip) in enumerate(zip(axes, flipped, strict=True)):
        index[a, i] = -1.0 if flip else 1.0
        if flip:
            index[a, 3] = ref_shape[i] - 1
    return affine @ index


def _rearranged(
    reference: Volume,
    other: Volume,
    other_array: np.ndarray,
    axes: tuple[int, ...],
    flipped: tuple[bool, ...],
) -> Volume:
    moved = axes != (0, 1, 2) or any(flipped)
    array = np.transpose(other_array, axes)
    flip_axes = tuple(i for i, flip in enumerate(flipped) if flip)
    if flip_axes:
        array = np.flip(array, axis=flip_axes)
    array = array.reshape(reference.shape)
    if moved:
        array = np.ascontiguousarray(array)
    meta = dict(other.meta)
    if moved:
        meta["stored_axis_order"] = {
            "orientation": other.orientation,
            "shape": other.shape,
            "axes": list(axes),
            "flipped": list(flipped),
        }
    header = (
        header_with_affine(other.header, reference.affine, reference.shape)
        if other.header is not None
        else None
    )
    return Volume(array, reference.affine.copy(), header, other.source, meta)


def _closest_differences(
    reference: Volume,
    other: Volume,
    other_array: np.ndarray,
    best: tuple[float, tuple[int, ...], tuple[bool, ...], np.ndarray] | None,
    tolerance_mm: float,
) -> list[tuple[str, str]]:
    """Differences against the axis order whose directions match best (plain comparison when
    no axis order gives the reference's shape), so an origin shift reads as an origin shift."""
    if best is None:
        return geometry_differences(reference, other, tolerance_mm)
    _, axes, flipped, affine = best
    view = np.transpose(other_array, axes).reshape(reference.shape)
    problems = geometry_differences(reference, Volume(view, affine), tolerance_mm)
    if axes != (0, 1, 2) or any(flipped):
        note = f" (compared after matching its {other.orientation} axes to the image's)"
        problems = [(code, message + note) for code, message in problems]
        if reference.orientation != other.orientation:
            first = (
                "orientation",
                f"mask orientation {other.orientation} != image orientation "
                f"{reference.orientation}, and reordering its axes does not give the image grid",
            )
        else:
            first = ("shape", f"mask shape {other.shape} != image shape {reference.shape}")
        problems = [first, *(p for p in problems if p[0] != first[0])]
    return problems or [("direction", "the axes are no permutation or flip of the reference's")]


def corner_distance_mm(a: np.ndarray, b: np.ndarray, shape: tuple[int, ...]) -> float:
    """Largest distance (mm) between the world positions two affines give the grid's corners."""
    dims = list(shape[:3]) + [1] * (3 - min(3, len(shape)))
    corners = np.array(
        [
            [i, j, k, 1.0]
            for i in (0, dims[0] - 1)
            for j in (0, dims[1] - 1)
            for k in (0, dims[2] - 1)
        ]
    )
    diff = (corners @ np.asarray(a).T)[:, :3] - (corners @ np.asarray(b).T)[:, :3]
    return float(np.sqrt((diff**2).sum(axis=1)).max())


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"
