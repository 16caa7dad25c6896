"""Lesion-centred views of one case for the reader page.

A view is a crop around one lesion: the whole slice in 2D (cropped to ``crop`` pixels around
the lesion when larger); in 3D a box of ``crop`` x ``crop`` voxels in-plane and
``2 * context_slices + 1`` along each axis is not enough for three orthogonal views, so the
crop is a cube of ``crop`` voxels (clipped to the scan), in which the page shows the three
orthogonal slices through the lesion centre and scrolls through neighbouring slices. Values are
the first channel's, float32; the default window is the modality's (CT: soft tissue, centre 40
HU width 400; otherwise the 1st to 99th percentile of the scan).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from synthlesion.data.cases import Case
from synthlesion.data.io import load_case_volumes
from synthlesion.reader_study.errors import StudyError

CT_WINDOW = (40.0, 400.0)  # centre, width in HU: soft tissue


@dataclass(frozen=True)
class View:
    """A rendered case (nothing in it names the case)."""

    voxels: np.ndarray  # float32 crop, (X, Y) or (X, Y, Z)
    outline: np.ndarray  # uint8 mask of the chosen lesion, same shape
    centre: tuple[int, ...]  # lesion centre inside the crop
    spacing: tuple[float, ...]
    window: tuple[float, float]  # centre, width
    value_range: tuple[float, float]
    spatial_dims: int
    lesion_voxels: int
    lesion_size_mm: float  # equivalent diameter in mm
    lesions_in_view: int = 1  # lesion components a reader sees in the crop

    def public(self) -> dict[str, Any]:
        """What the page gets: geometry and window only."""
        return {
            "shape": list(self.voxels.shape),
            "centre": list(self.centre),
            "spacing": [round(s, 4) for s in self.spacing],
            "window": [round(self.window[0], 3), round(self.window[1], 3)],
            "range": [round(self.value_range[0], 3), round(self.value_range[1], 3)],
            "dims": self.spatial_dims,
        }


def _lesion_mask(case: Case, mask: np.ndarray) -> np.ndarray:
    values = case.lesion_labels or tuple(v for v in case.labels if v != 0)
    return np.isin(mask, values)


def choose_lesion(
    case: Case, mask: np.ndarray, source_mask: np.ndarray | None, rng: np.random.Generator
) -> np.ndarray:
    """The lesion shown: for a synthetic case a painted one (lesion voxels the source scan did
    not have), else any; among several, one drawn with ``rng``, larger ones likelier."""
    lesion = _lesion_mask(case, mask)
    if source_mask is not None and source_mask.shape == mask.shape:
        painted = lesion & ~source_mask
        if painted.any():
            lesion = painted
    labels, count = ndimage.label(lesion, structure=np.ones((3,) * lesion.ndim, dtype=bool))
    if count == 0:
        raise StudyError(f"case {case.case_id}: no lesion voxel in its mask {case.mask}")
    sizes = np.bincount(labels.ravel())[1:].astype(float)
    pick = int(rng.choice(count, p=sizes / sizes.sum())) + 1
    return labels == pick


def render_view(
    case: Case,
    source: Case | None,
    *,
    crop: int = 96,
    context_slices: int = 12,
    seed: int = 0,
) -> View:
    """Read ``case`` (and, for a synthetic case, its source scan's mask) and render its view."""
    channels, mask = load_case_volumes(case)
    if mask is None:
        raise StudyError(f"case {case.case_id}: no mask; a reader study needs the lesion")
    image = channels[0]
    source_lesion = None
    if source is not None and source.mask is not None:
        try:
            _, source_mask = load_case_volumes(source)
            source_lesion = _lesion_mask(source, np.asarray(source_mask.array))
        except Exception:  # noqa: BLE001 - the source only refines the choice
            source_lesion = None
    array = np.asarray(image.array, dtype=np.float32)
    labels = np.asarray(mask.array)
    lesion = choose_lesion(case, labels, source_lesion, np.random.default_rng(seed))
    nd = array.ndim
    spacing = tuple(float(s) for s in np.sqrt((image.affine[:3, :nd] ** 2).sum(0)))
    centre = tuple(int(round(c)) for c in ndimage.center_of_mass(lesion))
    # the crop follows the lesion (four times its extent, at least 32 voxels, at most `crop`):
    # a whole slice would show every other lesion of the scan, and real scans hold more
    # lesions than healthy scans painted once (readers would count instead of look)
    extent = [int(s.stop - s.start) for s in ndimage.find_objects(lesion.astype(np.uint8))[0]]
    side = min(crop, max(32, 4 * max(extent)))
    size = [min(side, n) for n in array.shape]
    if nd == 3:
        size = [min(max(side, 2 * context_slices + 1), n) for n in array.shape]
    start = [
        min(max(c - s // 2, 0), n - s) for c, s, n in zip(centre, size, array.shape, strict=True)
    ]
    box = tuple(slice(a, a + s) for a, s in zip(start, size, strict=True))
    voxels = np.ascontiguousarray(array[box])
    outline = np.ascontiguousarray(lesion[box])
    everything = _lesion_mask(case, labels)[box]
    _, visible = ndimage.label(everything, structure=np.ones((3,) * nd, dtype=bool))
    modality = (case.modality or "").upper()
    if modality == "CT":
        window = CT_WINDOW
    else:
        low, high = np.percentile(array, [1, 99])
        window = (float(low + high) / 2, float(max(high - low, 1e-6)))
    volume = float(lesion.sum() * np.prod(spacing))
    diameter = (6 * volume / np.pi) ** (1 / 3) if nd == 3 else 2 * np.sqrt(volume / np.pi)
    return View(
        voxels=voxels,
        outline=outline.astype(np.uint8),
        centre=tuple(c - a for c, a in zip(centre, start, strict=True)),
        spacing=spacing,
        window=window,
        value_range=(float(voxels.min()), float(voxels.max())),
        spatial_dims=nd,
        lesion_voxels=int(lesion.sum()),
        lesion_size_mm=float(diameter),
        lesions_in_view=int(visible),
    )
