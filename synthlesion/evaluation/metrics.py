"""Per-case segmentation metrics: Dice, lesion-wise detection by size, surface distances.

Lesions are connected components (full connectivity). A true lesion counts as detected when a
predicted lesion voxel overlaps it; a predicted component overlapping no true lesion is a false
positive. Sizes are equivalent diameters in mm (circle in 2D, sphere in 3D) binned by
``size_bins_mm``. Surface distances come from ``monai.metrics`` (95th-percentile Hausdorff and
symmetric average surface distance, in mm); where a case has a lesion and the prediction has
none they are set to the image diagonal in mm (a miss is as far off as it gets), and where the
case has no lesion they are undefined (NaN).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import ndimage


def size_bin_names(edges_mm: Sequence[float]) -> list[str]:
    """``[20, 30]`` -> ``["<20mm", "20-30mm", ">=30mm"]``."""
    edges = [float(e) for e in edges_mm]
    names = [f"<{edges[0]:g}mm"] if edges else []
    names += [f"{a:g}-{b:g}mm" for a, b in zip(edges[:-1], edges[1:], strict=True)]
    names.append(f">={edges[-1]:g}mm" if edges else "all")
    return names


def equivalent_diameter_mm(voxels: int, spacing: Sequence[float]) -> float:
    """Diameter of the circle (2D) or sphere (3D) with the component's area/volume."""
    dims = len(spacing)
    size = voxels * float(np.prod(spacing))
    if dims == 2:
        return 2.0 * math.sqrt(size / math.pi)
    return (6.0 * size / math.pi) ** (1.0 / 3.0)


def _bin(diameter: float, edges: Sequence[float]) -> int:
    return int(np.searchsorted(np.asarray(edges, dtype=float), diameter, side="right"))


@dataclass
class CaseMetrics:
    """Scores of one test case.

    Attributes:
        case_id: The case.
        has_lesion: Whether the reference holds a lesion voxel.
        dice: Lesion Dice (NaN for a case without lesion).
        hd95_mm, assd_mm: Surface distances (see the module docstring).
        lesions: True lesions per size bin.
        detected: Detected true lesions per size bin.
        false_positives: False-positive components per size bin (by their own size).
        predicted_voxels, reference_voxels: Lesion voxel counts.
    """

    case_id: str
    has_lesion: bool
    dice: float
    hd95_mm: float
    assd_mm: float
    lesions: list[int] = field(default_factory=list)
    detected: list[int] = field(default_factory=list)
    false_positives: list[int] = field(default_factory=list)
    predicted_voxels: int = 0
    reference_voxels: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            k: (None if isinstance(v, float) and math.isnan(v) else v)
            for k, v in asdict(self).items()
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CaseMetrics:
        values = {
            k: (math.nan if v is None and k in ("dice", "hd95_mm", "assd_mm") else v)
            for k, v in data.items()
        }
        return cls(**values)


def _surface(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> tuple[float, float]:
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    if not ref.any():
        return math.nan, math.nan
    if not pred.any():
        diagonal = float(np.linalg.norm(np.asarray(ref.shape) * np.asarray(spacing)))
        return diagonal, diagonal
    y_pred = torch.from_numpy(np.stack([~pred, pred]))[None].float()
    y = torch.from_numpy(np.stack([~ref, ref]))[None].float()
    spacing = [float(s) for s in spacing]
    with warnings.catch_warnings():  # MONAI's own deprecation notice about its internals
        warnings.simplefilter("ignore", FutureWarning)
        hd = compute_hausdorff_distance(
            y_pred, y, include_background=False, percentile=95, spacing=spacing
        )
        asd = compute_average_surface_distance(
            y_pred, y, include_background=False, symmetric=True, spacing=spacing
        )
    return float(hd.reshape(-1)[0]), float(asd.reshape(-1)[0])


def case_metrics(
    case_id: str,
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    size_bins_mm: Sequence[float],
) -> CaseMetrics:
    """Score one prediction against its reference.

    Args:
        case_id: The case.
        pred: Boolean predicted lesion mask, shape ``S``.
        ref: Boolean reference lesion mask, shape ``S``.
        spacing: Voxel size in mm (one value per axis of ``S``).
        size_bins_mm: Size bin edges (equivalent diameter, mm).
    """
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    spacing = tuple(float(s) for s in spacing[: ref.ndim])
    n_bins = len(size_bins_mm) + 1
    lesions, detected, false_pos = [0] * n_bins, [0] * n_bins, [0] * n_bins
    structure = ndimage.generate_binary_structure(ref.ndim, ref.ndim)
    ref_cc, n_ref = ndimage.label(ref, structure)
    for index, box in enumerate(ndimage.find_objects(ref_cc), start=1):
        one = ref_cc[box] == index
        b = _bin(equivalent_diameter_mm(int(one.sum()), spacing), size_bins_mm)
        lesions[b] += 1
        detected[b] += int(pred[box][one].any())
    pred_cc, _ = ndimage.label(pred, structure)
    for index, box in enumerate(ndimage.find_objects(pred_cc), start=1):
        one = pred_cc[box] == index
        if not ref[box][one].any():
            false_pos[_bin(equivalent_diameter_mm(int(one.sum()), spacing), size_bins_mm)] += 1
    inter = int(np.logical_and(pred, ref).sum())
    total = int(pred.sum()) + int(ref.sum())
    dice = 2.0 * inter / total if n_ref else math.nan
    hd95, assd = _surface(pred, ref, spacing)
    return CaseMetrics(
        case_id,
        bool(n_ref),
        dice,
        hd95,
        assd,
        lesions,
        detected,
        false_pos,
        int(pred.sum()),
        int(ref.sum()),
    )


def summarise(cases: Sequence[CaseMetrics], bin_names: Sequence[str]) -> dict[str, float]:
    """One run's figures over its test cases.

    Keys: ``dice`` (mean over lesion cases), ``case_dice`` (mean over all cases, a case
    without lesion scoring 1 when nothing is predicted and 0 otherwise), ``hd95_mm``,
    ``assd_mm`` (mean over lesion cases), ``sensitivity`` (detected / true lesions),
    ``fp_per_case``, per bin ``sensitivity[bin]`` and ``fp_per_case[bin]``, and the counts
    ``test_cases`` and ``test_lesions``.
    """
    lesion_cases = [c for c in cases if c.has_lesion]
    out: dict[str, float] = {
        "dice": _mean([c.dice for c in lesion_cases]),
        "case_dice": _mean(
            [c.dice if c.has_lesion else float(c.predicted_voxels == 0) for c in cases]
        ),
        "hd95_mm": _mean([c.hd95_mm for c in lesion_cases]),
        "assd_mm": _mean([c.assd_mm for c in lesion_cases]),
    }
    lesions = np.sum([c.lesions for c in cases], axis=0) if cases else np.zeros(len(bin_names))
    detected = np.sum([c.detected for c in cases], axis=0) if cases else np.zeros(len(bin_names))
    fps = np.sum([c.false_positives for c in cases], axis=0) if cases else np.zeros(len(bin_names))
    n = max(len(cases), 1)
    out["sensitivity"] = float(detected.sum() / lesions.sum()) if lesions.sum() else math.nan
    out["fp_per_case"] = float(fps.sum() / n)
    for i, name in enumerate(bin_names):
        out[f"sensitivity[{name}]"] = float(detected[i] / lesions[i]) if lesions[i] else math.nan
        out[f"fp_per_case[{name}]"] = float(fps[i] / n)
    out["test_cases"] = float(len(cases))
    out["test_lesions"] = float(lesions.sum())
    return out


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


__all__ = [
    "CaseMetrics",
    "case_metrics",
    "equivalent_diameter_mm",
    "size_bin_names",
    "jsonable",
    "summarise",
]


def jsonable(value: Any) -> Any:
    """``value`` with numpy scalars, paths and :class:`CaseMetrics` made JSON-ready; a float
    that is not finite becomes ``None`` (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, CaseMetrics):
        return value.to_dict()
    if hasattr(value, "__fspath__"):
        return str(value)
    return value
