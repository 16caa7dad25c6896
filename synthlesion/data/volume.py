"""The volume object every part of synthlesion passes around, and geometry comparisons."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from synthlesion.errors import GeometryError


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


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"
