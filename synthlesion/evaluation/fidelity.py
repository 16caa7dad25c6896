"""Fidelity of synthetic lesions: intensity statistics, mask adherence, memorisation.

* Intensity statistics: per lesion, the mean and spread inside it and its contrast to the
  surrounding organ (image units, HU for CT); each distribution is compared with the real
  training lesions' by the 1-Wasserstein distance, also divided by the real spread. The same
  distance between the real *test* lesions and the real training lesions is the floor two
  real samples already show.
* Mask adherence: a segmenter trained on real data only looks at each synthetic case; the share
  of synthetic lesion voxels it marks as lesion (and of synthetic lesions it touches) says
  whether the lesion painted inside the mask looks like a lesion there. Its sensitivity on the
  real test lesions is the yardstick.
* Memorisation: each synthetic lesion's crop (centred on the lesion, normalised intensities) is
  compared by normalised correlation with every real training lesion's crop; the nearest real
  lesion is kept for the report and a correlation at or above the threshold flags a near-copy.
  Real training lesions compared with each other (other cases) give the floor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.stats import wasserstein_distance

from synthlesion.evaluation.config import FidelityConfig
from synthlesion.evaluation.segmenter import ArrayCase, TrainedSegmenter
from synthlesion.pipelines.quality import lesion_statistics

STATS = ("mean", "std", "contrast")


@dataclass(frozen=True, eq=False)
class Lesion:
    """One connected lesion of one case.

    Attributes:
        case_id: The case.
        index: Component number in the case.
        mask: Boolean mask of this lesion, shape ``S``.
        stats: ``mean``, ``std``, ``contrast`` in image units.
        crop: Normalised image crop centred on the lesion.
        centre: Centre voxel (rounded centroid).
        image: The whole normalised image the lesion is in (a reference, for display crops).
    """

    case_id: str
    index: int
    mask: np.ndarray
    stats: Mapping[str, float]
    crop: np.ndarray
    centre: tuple[int, ...]
    image: np.ndarray | None = None


def crop_at(array: np.ndarray, centre: Sequence[int], size: int) -> np.ndarray:
    """A ``size``-sided crop centred at ``centre`` (edge-padded; clipped to thin axes)."""
    sizes = [min(size, n) for n in array.shape]
    half = [s // 2 for s in sizes]
    padded = np.pad(array, [(h, s - h) for h, s in zip(half, sizes, strict=True)], mode="edge")
    box = tuple(slice(c, c + s) for c, s in zip(centre, sizes, strict=True))
    return padded[box]


def lesions_of(
    case: ArrayCase, lesion: np.ndarray, tissue: np.ndarray, crop_size: int
) -> list[Lesion]:
    """Every connected component of ``lesion`` in ``case`` with its statistics and crop."""
    out = []
    spacing = case.spacing[: case.image.ndim]
    raw = case.raw if case.raw is not None else case.image
    components, count = ndimage.label(
        lesion, ndimage.generate_binary_structure(lesion.ndim, lesion.ndim)
    )
    for index in range(1, count + 1):
        one = components == index
        s = lesion_statistics(raw, one, spacing, tissue=tissue)
        centre = tuple(int(round(c)) for c in ndimage.center_of_mass(one))
        out.append(
            Lesion(
                case.case_id,
                index,
                one,
                {"mean": s.mean, "std": s.std, "contrast": s.contrast},
                crop_at(case.image, centre, crop_size),
                centre,
                case.image,
            )
        )
    return out


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised (Pearson) correlation of two equally shaped crops (0 for a flat crop)."""
    x = a.astype(np.float64).ravel() - a.mean()
    y = b.astype(np.float64).ravel() - b.mean()
    denom = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y / denom) if denom > 0 else 0.0


def _distance(
    sample: Sequence[Mapping[str, float]], real: Sequence[Mapping[str, float]]
) -> dict[str, dict[str, float]]:
    out = {}
    for stat in STATS:
        a = np.array([s[stat] for s in sample if math.isfinite(s[stat])])
        b = np.array([s[stat] for s in real if math.isfinite(s[stat])])
        if a.size == 0 or b.size == 0:
            out[stat] = {
                "mean": math.nan,
                "real_mean": math.nan,
                "w1": math.nan,
                "w1_over_sd": math.nan,
            }
            continue
        w1 = float(wasserstein_distance(a, b))
        sd = float(b.std()) if b.size > 1 else abs(float(b.mean())) * 0.1
        out[stat] = {
            "mean": float(a.mean()),
            "real_mean": float(b.mean()),
            "w1": w1,
            "w1_over_sd": w1 / max(sd, 1e-6),
        }
    return out


@dataclass
class GeneratorFidelity:
    """The fidelity figures of one generator's synthetic lesions (see the module docstring)."""

    name: str
    lesions: int
    intensity: dict[str, dict[str, float]]
    adherence: dict[str, float]
    memorisation: dict[str, Any]
    examples: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "lesions": self.lesions,
            "intensity": self.intensity,
            "adherence": self.adherence,
            "memorisation": self.memorisation,
            "examples": [
                {k: v for k, v in e.items() if not isinstance(v, np.ndarray)} for e in self.examples
            ],
        }


def _adherence(
    segmenter: TrainedSegmenter | None, items: Sequence[tuple[ArrayCase, list[Lesion]]], device: str
) -> dict[str, float]:
    if segmenter is None:
        return {"voxel_fraction": math.nan, "lesion_detection": math.nan}
    voxels = found = lesions = touched = 0
    fractions = []
    for case, found_lesions in items:
        if not found_lesions:
            continue
        pred = segmenter.predict(case.image, device)
        for lesion in found_lesions:
            hit = int(pred[lesion.mask].sum())
            size = int(lesion.mask.sum())
            voxels += size
            found += hit
            lesions += 1
            touched += int(hit > 0)
            fractions.append(hit / size)
    return {
        "voxel_fraction": found / voxels if voxels else math.nan,
        "mean_lesion_fraction": float(np.mean(fractions)) if fractions else math.nan,
        "lesion_detection": touched / lesions if lesions else math.nan,
    }


def _nearest(
    lesion: Lesion, real: Sequence[Lesion], exclude_case: str | None = None
) -> tuple[float, Lesion | None]:
    best, nearest = -1.0, None
    for other in real:
        if exclude_case is not None and other.case_id == exclude_case:
            continue
        if other.crop.shape != lesion.crop.shape:
            continue
        value = ncc(lesion.crop, other.crop)
        if value > best:
            best, nearest = value, other
    return best, nearest


def reference_fidelity(
    real_train: Sequence[Lesion],
    real_test: Sequence[Lesion],
    test_items: Sequence[tuple[ArrayCase, list[Lesion]]],
    segmenter: TrainedSegmenter | None,
    device: str = "cpu",
) -> dict[str, Any]:
    """The real-vs-real floor: test lesions against training lesions, training lesions
    against each other (other cases), and the real-only segmenter on the real test lesions."""
    nearest = [
        _nearest(lesion, real_train, exclude_case=lesion.case_id)[0] for lesion in real_train
    ]
    finite = [v for v in nearest if v > -1]
    return {
        "train_lesions": len(real_train),
        "test_lesions": len(real_test),
        "intensity_test_vs_train": _distance(
            [x.stats for x in real_test], [x.stats for x in real_train]
        ),
        "adherence_real_test": _adherence(segmenter, test_items, device),
        "nearest_ncc_train_vs_train": {
            "mean": float(np.mean(finite)) if finite else math.nan,
            "max": float(np.max(finite)) if finite else math.nan,
        },
    }


def generator_fidelity(
    name: str,
    items: Sequence[tuple[ArrayCase, list[Lesion]]],
    sources: Mapping[str, ArrayCase],
    real_train: Sequence[Lesion],
    segmenter: TrainedSegmenter | None,
    cfg: FidelityConfig,
    device: str = "cpu",
) -> GeneratorFidelity:
    """Fidelity of one generator's lesions.

    Args:
        name: Generator label (``diffusion``, ``handcrafted``).
        items: Synthetic cases with their synthetic lesions (not the source's own lesions).
        sources: Real cases by id (the scans the lesions were painted into).
        real_train: Real training lesions.
        segmenter: The real-only segmenter for adherence (``None``: not measured).
        cfg: Crop size, threshold, example rows.
        device: Inference device.
    """
    items = list(items)
    lesions = [lesion for _, found in items for lesion in found][: cfg.max_lesions]
    intensity = _distance([x.stats for x in lesions], [x.stats for x in real_train])
    adherence = _adherence(segmenter, items, device)
    scores = []
    examples = []
    by_case = {case.case_id: case for case, _ in items}
    for lesion in lesions:
        value, nearest = _nearest(lesion, real_train)
        scores.append((value, lesion, nearest))
    flagged = [(v, lesion, n) for v, lesion, n in scores if v >= cfg.memorisation_threshold]
    for value, lesion, nearest in scores[: cfg.grid_rows]:
        case = by_case[lesion.case_id]
        source = sources.get(case.source_case)
        context = source.image if source is not None else case.image
        size = cfg.grid_crop_size
        if nearest is not None and nearest.image is not None:
            near = crop_at(nearest.image, nearest.centre, size)
        else:
            near = np.zeros_like(crop_at(case.image, lesion.centre, size))
        examples.append(
            {
                "case_id": lesion.case_id,
                "source_case": case.source_case,
                "nearest_case": nearest.case_id if nearest is not None else None,
                "ncc": value,
                "context": crop_at(context, lesion.centre, size),
                "mask": crop_at(lesion.mask.astype(np.float32), lesion.centre, size),
                "synthetic": crop_at(case.image, lesion.centre, size),
                "nearest": near,
            }
        )
    values = [v for v, _, _ in scores if v > -1]
    memorisation = {
        "threshold": cfg.memorisation_threshold,
        "nearest_ncc_mean": float(np.mean(values)) if values else math.nan,
        "nearest_ncc_max": float(np.max(values)) if values else math.nan,
        "flagged": len(flagged),
        "flagged_cases": [lesion.case_id for _, lesion, _ in flagged][:20],
    }
    return GeneratorFidelity(name, len(lesions), intensity, adherence, memorisation, examples)


__all__ = [
    "GeneratorFidelity",
    "Lesion",
    "crop_at",
    "generator_fidelity",
    "lesions_of",
    "ncc",
    "reference_fidelity",
]
