"""Hand-crafted texture and shape features of one lesion (a small, dependency-light radiomics).

:func:`texture_shape_features` measures one lesion mask on one image, 2D ``(X, Y)`` or 3D
``(X, Y, Z)``, with one code path for both. Everything is computed inside the lesion's bounding
box, so the cost follows the lesion, not the scan. The features feed
:func:`synthlesion.evaluation.realism.feature_distribution_distances`, which compares the
feature distributions of real and synthetic lesions.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage, stats
from scipy.spatial import ConvexHull
from skimage.feature import graycomatrix, graycoprops
from skimage.measure import find_contours, marching_cubes, mesh_surface_area, regionprops

logger = logging.getLogger(__name__)

GLCM_LEVELS = 32
HISTOGRAM_BINS = 32
GLCM_PROPS = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation")
_ANGLES = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)


def texture_shape_features(
    image: np.ndarray,
    mask: np.ndarray,
    spacing: Sequence[float],
    *,
    slice_axis: int = -1,
) -> dict[str, float]:
    """First-order, GLCM texture and shape features of one lesion.

    Parameters
    ----------
    image : np.ndarray
        Image, shape ``S`` (2D ``(X, Y)`` or 3D ``(X, Y, Z)``), in image units (HU for CT).
    mask : np.ndarray
        Lesion mask, shape ``S``; non-zero is lesion. Must not be empty.
    spacing : Sequence[float]
        Voxel size in mm, one value per axis of ``S``.
    slice_axis : int, optional
        In 3D, the axis the GLCM slices are cut along (default ``-1``: axial slices of an
        ``(X, Y, Z)`` volume). Ignored in 2D.

    Returns
    -------
    dict[str, float]
        First order, on the mask's voxels (image units unless stated):

        * ``intensity_mean``, ``intensity_std``, ``intensity_p10``, ``intensity_p90``;
        * ``intensity_skewness``, ``intensity_kurtosis`` (excess kurtosis); both are set to 0
          when all voxels have one value (a convention; they are undefined there);
        * ``intensity_entropy``: Shannon entropy in bits of a 32-bin histogram spanning the
          mask's own min..max (0 for a constant lesion).

        GLCM (``skimage.feature.graycomatrix``/``graycoprops``), unitless:
        ``glcm_contrast``, ``glcm_dissimilarity``, ``glcm_homogeneity``, ``glcm_energy``,
        ``glcm_correlation``. The mask's voxels are quantised to 32 levels spanning the mask's
        own min..max; every voxel outside the mask is put on an extra level 0, the symmetric
        co-occurrence matrix is computed on the bounding box and row and column 0 are dropped,
        so only pairs of two mask voxels count. Distance 1 pixel, angles 0/45/90/135 degrees;
        each property is averaged over the angles that have at least one pair. In 3D each
        slice along ``slice_axis`` that crosses the mask is measured on its own and the slices
        are averaged weighted by their mask voxels (in-plane pixel distances, the slice spacing
        plays no part). The GLCM features are ``nan`` when no two mask voxels are neighbours
        in any slice (e.g. a single voxel) -- the only case a feature is ``nan``. A constant
        lesion gives contrast 0 and correlation 1 (skimage's convention).

        Shape, from the mask and the spacing:

        * ``shape_size``: area in mm^2 (2D) or volume in mm^3 (3D), voxel count times voxel
          size;
        * ``shape_equivalent_diameter_mm``: diameter of the disk / sphere of that size;
        * ``shape_compactness``: circularity ``4 pi A / P^2`` in 2D, sphericity
          ``pi^(1/3) (6 V)^(2/3) / S`` in 3D, with area/perimeter (volume/surface) taken from
          the marching-squares (marching-cubes) outline at level 0.5 in mm; 1 for a disk /
          ball, about ``pi / 4`` for a square;
        * ``shape_elongation``: ``sqrt(smallest / largest eigenvalue)`` of the covariance of
          the mask's coordinates in mm, each voxel counted as a uniform box (``s^2 / 12`` added
          per axis, so a single voxel or a one-voxel-thick line stays finite); 1 is round,
          near 0 is a needle;
        * ``shape_solidity``: voxels over voxels of the convex hull, ``regionprops``'
          definition; for masks whose voxel centres do not span all axes (a one-voxel-thick
          plane or line in 3D), where ``regionprops`` fails, the same hull of the voxels'
          face centres is computed here;
        * ``shape_surface_to_volume``: outline perimeter / outline area (2D) or surface /
          volume (3D) of the same outline, in 1/mm.

    Raises
    ------
    ValueError
        If ``image`` and ``mask`` shapes differ, the arrays are not 2D or 3D, ``spacing`` does
        not match, or the mask is empty.
    """
    image = np.asarray(image)
    mask = np.asarray(mask)
    if image.shape != mask.shape:
        raise ValueError(f"image shape {image.shape} and mask shape {mask.shape} differ")
    if image.ndim not in (2, 3):
        raise ValueError(f"texture_shape_features needs a 2D or 3D image, got {image.ndim}D")
    spacing = check_spacing(spacing, image.ndim)
    mask = mask != 0 if mask.dtype != bool else mask
    box = ndimage.find_objects(mask.view(np.uint8))
    if not box or box[0] is None:
        raise ValueError("texture_shape_features needs a non-empty mask")
    crop = image[box[0]].astype(np.float64)
    inside = mask[box[0]]
    values = crop[inside]
    if not np.all(np.isfinite(values)):
        raise ValueError("image has non-finite values inside the mask")
    features = _first_order(values)
    features.update(_glcm(crop, inside, values, slice_axis))
    features.update(_shape(inside, spacing))
    return features


def check_spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    """Voxel sizes in mm, one per axis (``None``: 1 mm); ``ValueError`` otherwise."""
    if spacing is None:
        return (1.0,) * ndim
    values = tuple(float(s) for s in spacing)
    if len(values) != ndim:
        raise ValueError(f"spacing has {len(values)} values for a {ndim}D image")
    if not all(np.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must be positive, got {values}")
    return values


def _first_order(values: np.ndarray) -> dict[str, float]:
    std = float(values.std())
    lo, hi = float(values.min()), float(values.max())
    if hi > lo:
        counts, _ = np.histogram(values, bins=HISTOGRAM_BINS, range=(lo, hi))
        p = counts[counts > 0] / values.size
        entropy = float(-(p * np.log2(p)).sum())
    else:
        entropy = 0.0
    constant = std <= 1e-12 * max(1.0, abs(float(values.mean())))
    return {
        "intensity_mean": float(values.mean()),
        "intensity_std": std,
        "intensity_skewness": 0.0 if constant else float(stats.skew(values)),
        "intensity_kurtosis": 0.0 if constant else float(stats.kurtosis(values)),
        "intensity_entropy": entropy,
        "intensity_p10": float(np.percentile(values, 10)),
        "intensity_p90": float(np.percentile(values, 90)),
    }


def _glcm(
    crop: np.ndarray, inside: np.ndarray, values: np.ndarray, slice_axis: int
) -> dict[str, float]:
    lo, hi = float(values.min()), float(values.max())
    levels = np.zeros(crop.shape, dtype=np.uint8)  # 0: outside the mask, dropped below
    if hi > lo:
        scaled = np.floor((values - lo) / (hi - lo) * GLCM_LEVELS)
        levels[inside] = np.clip(scaled, 0, GLCM_LEVELS - 1).astype(np.uint8) + 1
    else:
        levels[inside] = 1
    if levels.ndim == 2:
        slices = [levels]
    else:
        slices = list(np.moveaxis(levels, slice_axis, 0))
    totals = dict.fromkeys(GLCM_PROPS, 0.0)
    weight = 0.0
    for plane in slices:
        voxels = int(np.count_nonzero(plane))
        if voxels < 2:
            continue
        matrix = graycomatrix(plane, [1], _ANGLES, levels=GLCM_LEVELS + 1, symmetric=True)
        matrix = matrix[1:, 1:]  # only pairs of two mask voxels
        valid = matrix.sum(axis=(0, 1))[0] > 0
        if not valid.any():
            continue
        matrix = matrix[:, :, :, valid]
        for prop in GLCM_PROPS:
            totals[prop] += voxels * float(graycoprops(matrix, prop).mean())
        weight += voxels
    if weight == 0:
        return {f"glcm_{p}": float("nan") for p in GLCM_PROPS}
    return {f"glcm_{p}": totals[p] / weight for p in GLCM_PROPS}


def _shape(inside: np.ndarray, spacing: tuple[float, ...]) -> dict[str, float]:
    ndim = inside.ndim
    count = int(np.count_nonzero(inside))
    size = count * math.prod(spacing)
    if ndim == 2:
        diameter = 2.0 * math.sqrt(size / math.pi)
    else:
        diameter = (6.0 * size / math.pi) ** (1.0 / 3.0)
    outline_size, outline_boundary = _outline(inside, spacing)
    if ndim == 2:
        compactness = 4.0 * math.pi * outline_size / outline_boundary**2
    else:
        compactness = math.pi ** (1 / 3) * (6.0 * outline_size) ** (2 / 3) / outline_boundary
    coords = np.argwhere(inside) * np.asarray(spacing)
    covariance = np.atleast_2d(np.cov(coords.T, bias=True)) if count > 1 else np.zeros((ndim,) * 2)
    covariance = covariance + np.diag(np.asarray(spacing) ** 2 / 12.0)
    eigen = np.linalg.eigvalsh(covariance)
    return {
        "shape_size": float(size),
        "shape_equivalent_diameter_mm": float(diameter),
        "shape_compactness": float(compactness),
        "shape_elongation": float(math.sqrt(max(eigen[0], 0.0) / eigen[-1])),
        "shape_solidity": _solidity(inside),
        "shape_surface_to_volume": float(outline_boundary / outline_size),
    }


def _outline(inside: np.ndarray, spacing: tuple[float, ...]) -> tuple[float, float]:
    """(area, perimeter) in 2D or (volume, surface) in 3D of the level-0.5 outline, in mm."""
    padded = np.pad(inside, 1).astype(np.float32)
    if inside.ndim == 2:
        area = 0.0
        perimeter = 0.0
        for contour in find_contours(padded, 0.5, positive_orientation="high"):
            points = contour * np.asarray(spacing)
            x, y = points[:, 0], points[:, 1]
            area += 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
            perimeter += float(np.linalg.norm(np.diff(points, axis=0), axis=1).sum())
        return abs(area), perimeter
    verts, faces, _, _ = marching_cubes(padded, 0.5, spacing=spacing)
    triangles = verts[faces]
    volume = abs(
        float(
            np.einsum("ij,ij->i", triangles[:, 0], np.cross(triangles[:, 1], triangles[:, 2])).sum()
        )
        / 6.0
    )
    return volume, float(mesh_surface_area(verts, faces))


def _solidity(inside: np.ndarray) -> float:
    coords = np.argwhere(inside)
    spans_all_axes = (
        len(coords) > inside.ndim
        and np.linalg.matrix_rank(coords - coords.mean(axis=0)) == inside.ndim
    )
    if spans_all_axes:
        return float(regionprops(inside.astype(np.uint8))[0].solidity)
    # regionprops' convex hull fails for flat masks in 3D: the same definition (hull of the
    # voxels' face centres, voxels whose centres lie in it) computed directly
    offsets = np.concatenate([np.eye(inside.ndim) * 0.5, -np.eye(inside.ndim) * 0.5])
    points = np.unique((coords[:, None, :] + offsets).reshape(-1, inside.ndim), axis=0)
    hull = ConvexHull(points)
    grid = np.argwhere(np.ones(inside.shape, dtype=bool))
    within = np.all(grid @ hull.equations[:, :-1].T + hull.equations[:, -1] <= 1e-9, axis=1)
    return float(len(coords) / max(int(within.sum()), len(coords)))
