"""Quality gates for synthetic lesions, recorded per lesion and never dropped silently.

Three figures per lesion:

* intensity statistics inside the mask (mean, spread) against the real lesions of the training
  split, as z-scores (outliers rejected);
* contrast: mean inside the mask minus mean in a ring of tissue around it;
* seam score: mean gradient magnitude on the paste boundary in the synthetic image divided by
  the same in the source image (1 = no visible seam).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

from synthlesion.data.boxes import bounding_box, distance_from, margin_voxels
from synthlesion.data.cases import Case
from synthlesion.data.io import load_image, load_mask_for
from synthlesion.masks.lesions import ConnectedLesion, connected_lesions


@dataclass(frozen=True)
class LesionStats:
    """Intensity facts of one lesion, in image units (HU for CT).

    Attributes:
        mean: Mean inside the mask.
        std: Standard deviation inside the mask.
        ring_mean: Mean in the ring around the mask.
        contrast: ``mean - ring_mean``.
        voxels: Number of voxels in the mask.
    """

    mean: float
    std: float
    ring_mean: float
    contrast: float
    voxels: int


def lesion_statistics(
    image: np.ndarray,
    mask: np.ndarray,
    spacing: Sequence[float],
    *,
    ring_mm: float = 3.0,
    tissue: np.ndarray | None = None,
) -> LesionStats:
    """Statistics of the voxels inside ``mask`` and of a ring around it.

    Args:
        image: Image, shape ``S``.
        mask: Boolean lesion mask, shape ``S``.
        spacing: Voxel size in mm.
        ring_mm: Ring thickness around the mask, in mm (at least 1.5 voxels, see
            :func:`ring_width_mm`).
        tissue: Optional boolean map the ring is restricted to (e.g. the organ).
    """
    width = ring_width_mm(spacing, ring_mm)
    near = distance_from(mask, width, spacing)  # in a box around the lesion (cost follows it)
    if near is None:
        raise ValueError("lesion statistics need a non-empty mask")
    box, outside = near
    inside = outside == 0
    ring = (outside > 0) & (outside <= width)
    if tissue is not None:
        local = np.asarray(tissue)[box].astype(bool)
        if (ring & local).any():
            ring &= local
    crop = image[box]
    values = crop[inside].astype(np.float64)
    ring_values = crop[ring].astype(np.float64)
    ring_mean = float(ring_values.mean()) if ring_values.size else float("nan")
    return LesionStats(
        float(values.mean()),
        float(values.std()),
        ring_mean,
        float(values.mean()) - ring_mean,
        int(inside.sum()),
    )


def ring_width_mm(spacing: Sequence[float], ring_mm: float = 3.0) -> float:
    """Width of the ring around a lesion: ``ring_mm``, or 1.5 voxels where voxels are coarser
    (a ring thinner than a voxel would be empty)."""
    return max(float(ring_mm), 1.5 * max(float(s) for s in spacing))


def seam_score(source: np.ndarray, synthetic: np.ndarray, paste_region: np.ndarray) -> float:
    """Gradient magnitude on the boundary of ``paste_region`` in ``synthetic`` over ``source``.

    Values near 1 mean the pasted region blends in; a visible seam gives values well above 1.
    Computed in a box around the region (the same figure as over the whole scan).
    """
    box = bounding_box(paste_region, 3)  # the boundary and its gradient stencil lie inside
    if box is None:
        return 1.0
    region = np.asarray(paste_region)[box].astype(bool)
    source, synthetic = source[box], synthetic[box]
    boundary = region & ~ndimage.binary_erosion(region)
    boundary |= ndimage.binary_dilation(region) & ~region
    if not boundary.any():
        return 1.0

    def gradient(array: np.ndarray) -> np.ndarray:
        # along the axes with two or more voxels only (a 2D slice stored as (X, Y, 1))
        axes = [a for a, n in enumerate(array.shape) if n >= 2]
        if not axes:
            return np.zeros(array.shape)
        parts = np.gradient(array.astype(np.float64), axis=axes)
        parts = list(parts) if isinstance(parts, (list, tuple)) else [parts]
        return np.sqrt(sum(p**2 for p in parts))

    before = float(gradient(source)[boundary].mean())
    after = float(gradient(synthetic)[boundary].mean())
    return after / max(before, 1e-6)


def scan_lesion_statistics(
    image: np.ndarray,
    labels: np.ndarray,
    lesion_labels: Sequence[int],
    organ_labels: Sequence[int],
    spacing: Sequence[float],
    lesions: Iterable[ConnectedLesion] | None = None,
) -> list[LesionStats]:
    """:func:`lesion_statistics` of every lesion of one scan, each in a box around it.

    Args:
        image: The scan's first channel, shape ``S``.
        labels: Its label map, shape ``S``.
        lesion_labels: Lesion label values.
        organ_labels: Label values the ring is restricted to (empty: no restriction).
        spacing: Voxel size in mm.
        lesions: The scan's :func:`~synthlesion.masks.lesions.connected_lesions`, when known.
    """
    found = connected_lesions(labels, lesion_labels) if lesions is None else lesions
    tissue = np.isin(labels, list(organ_labels)) if len(organ_labels) else None
    pad = margin_voxels(ring_width_mm(spacing), spacing)
    out = []
    for lesion in found:
        box = tuple(
            slice(max(0, b.start - m), min(n, b.stop + m))
            for b, m, n in zip(lesion.box, pad, labels.shape, strict=True)
        )
        inside = np.zeros([b.stop - b.start for b in box], dtype=bool)
        inside[tuple(slice(b.start - o.start, b.stop - o.start) for b, o in
                     zip(lesion.box, box, strict=True))] = lesion.mask  # fmt: skip
        out.append(
            lesion_statistics(
                image[box], inside, spacing, tissue=tissue[box] if tissue is not None else None
            )
        )
    return out


@dataclass(frozen=True)
class RealLesionReference:
    """Statistics of the real lesions of the training split, the yardstick of the gates."""

    means: tuple[float, ...]
    stds: tuple[float, ...]
    contrasts: tuple[float, ...]

    @classmethod
    def from_cases(
        cls,
        cases: Iterable[Case],
        *,
        organ_labels: Sequence[int] = (1,),
        lesion_labels: Sequence[int] | None = None,
    ) -> RealLesionReference:
        """Measure every lesion (:func:`~synthlesion.masks.lesions.connected_lesions`: a tumour
        with its sub-regions, specks skipped) of the given (real, training) cases, on their
        first channel. Each lesion is measured in a box around it, so the cost follows the
        lesions, not the scans."""
        means, stds, contrasts = [], [], []
        for case in cases:
            if case.mask is None or case.origin != "real":
                continue
            image = load_image(case.image)
            labels = np.asarray(load_mask_for(image, case.mask).array)
            values = case.lesion_labels if lesion_labels is None else tuple(lesion_labels)
            for stats in scan_lesion_statistics(
                image.array, labels, values, organ_labels, image.spacing
            ):
                means.append(stats.mean)
                stds.append(stats.std)
                contrasts.append(stats.contrast)
        if not means:
            raise ValueError("no real lesion found to build the quality reference from")
        return cls(tuple(means), tuple(stds), tuple(contrasts))

    def zscores(self, stats: LesionStats) -> dict[str, float]:
        """How many real-lesion standard deviations ``stats`` lies from the real lesions."""

        def z(value: float, sample: tuple[float, ...]) -> float:
            array = np.asarray(sample)
            spread = float(array.std()) if array.size > 1 else abs(float(array.mean())) * 0.1
            return (value - float(array.mean())) / max(spread, 1e-6)

        return {
            "z_mean": z(stats.mean, self.means),
            "z_std": z(stats.std, self.stds),
            "z_contrast": z(stats.contrast, self.contrasts),
        }


@dataclass(frozen=True)
class QualityGate:
    """Acceptance thresholds.

    Attributes:
        max_abs_z: Largest allowed |z| of mean, spread and contrast against real lesions.
        max_seam: Largest allowed seam score.
        min_abs_contrast: Smallest allowed |contrast| (image units) between lesion and ring.
        min_contrast_fraction: With a reference of real lesions, the smallest allowed
            |contrast| is also this share of the real lesions' median |contrast| (untouched
            tissue presented as a lesion has a contrast near 0 and fails).
        min_reference_lesions: Below this many real lesions in the reference, the z bound
            widens by ``sqrt(min_reference_lesions / n)`` (a spread measured on three lesions
            would otherwise refuse most honest variation; gross outliers still fail).
    """

    max_abs_z: float = 3.0
    max_seam: float = 2.0
    min_abs_contrast: float = 0.0
    min_contrast_fraction: float = 0.2
    min_reference_lesions: int = 10

    def z_bound(self, reference: RealLesionReference | None) -> float:
        """The largest allowed |z|: ``max_abs_z``, widened for a small reference."""
        n = len(reference.means) if reference is not None else 0
        if 0 < n < self.min_reference_lesions:
            return self.max_abs_z * math.sqrt(self.min_reference_lesions / n)
        return self.max_abs_z

    def contrast_floor(self, reference: RealLesionReference | None) -> float:
        """The smallest |contrast| a lesion must show (image units)."""
        floor = float(self.min_abs_contrast)
        if reference is not None and reference.contrasts:
            typical = float(np.median(np.abs(np.asarray(reference.contrasts))))
            floor = max(floor, self.min_contrast_fraction * typical)
        return floor


@dataclass(frozen=True)
class QualityResult:
    """The recorded outcome for one synthetic lesion."""

    passed: bool
    reasons: tuple[str, ...]
    stats: LesionStats
    zscores: dict[str, float] = field(default_factory=dict)
    seam: float = 1.0

    def to_dict(self) -> dict:
        """JSON-ready values; a value that is not finite is recorded as ``null`` (strict JSON)
        and has already failed the gate."""
        return {
            "passed": self.passed,
            "reasons": list(self.reasons),
            **{f"lesion_{k}": _finite_or_none(v) for k, v in asdict(self.stats).items()},
            **{k: _finite_or_none(v) for k, v in self.zscores.items()},
            "seam": _finite_or_none(self.seam),
        }


def _finite_or_none(value: float | int) -> float | int | None:
    return value if np.isfinite(value) else None


def evaluate_lesion(
    source: np.ndarray,
    synthetic: np.ndarray,
    lesion: np.ndarray,
    paste_region: np.ndarray,
    spacing: Sequence[float],
    reference: RealLesionReference | None,
    gate: QualityGate | None = None,
    tissue: np.ndarray | None = None,
) -> QualityResult:
    """Measure one synthetic lesion and decide whether it passes the gate."""
    gate = gate or QualityGate()
    stats = lesion_statistics(synthetic, lesion, spacing, tissue=tissue)
    zscores = reference.zscores(stats) if reference is not None else {}
    seam = seam_score(source, synthetic, paste_region)
    # every figure must be finite: a NaN compares False with any threshold and would pass
    figures = {**{f"lesion_{k}": v for k, v in asdict(stats).items()}, **zscores, "seam": seam}
    reasons = [f"{k} is not finite ({v})" for k, v in figures.items() if not np.isfinite(v)]
    bound = gate.z_bound(reference)
    reasons += [
        f"{k}={v:.2f} beyond {bound:.2f}"
        for k, v in zscores.items()
        if np.isfinite(v) and abs(v) > bound
    ]
    if seam > gate.max_seam:
        reasons.append(f"seam={seam:.2f} above {gate.max_seam}")
    floor = gate.contrast_floor(reference)
    if np.isfinite(stats.contrast) and abs(stats.contrast) < floor:
        reasons.append(f"|contrast|={abs(stats.contrast):.2f} below {floor:.2f}")
    return QualityResult(not reasons, tuple(reasons), stats, zscores, seam)
