"""Integrity checks: one report row per problem, naming the case, the file and the problem.

``check_dataset(path)`` is what ``synthlesion check PATH`` runs. Each case is read once, fully
(gzip CRC verified), and checked for: unreadable, empty, truncated or corrupt files; 4D data
where 3D is expected; NaN/Inf voxels; qform/sform disagreement; image/mask shape, spacing,
origin, orientation and direction differences beyond a tolerance; mask values outside the
declared labels or fractional; an all-background mask (per policy); a lesion mostly outside the
body. Across cases: duplicate case ids, also ignoring letter case.

A mask stored in another axis order or with flipped axes on the image's very grid (image LPS,
mask RAS; or ``(X, Y, 1)`` for a 2D ``(X, Y)`` image) is no error: it is read the way
:func:`~synthlesion.data.io.load_mask_for` reads it (rearranged exactly onto the image grid) and
reported as a ``mask_axis_order`` warning, since tools that compare headers only reject it. A
grid that differs in any axis order is an error row per difference (``shape``, ``spacing``,
``origin``, ``orientation``, ``direction``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from synthlesion.data.cases import Case, safe_id_problem
from synthlesion.data.intensity import foreground_mask
from synthlesion.data.io import load_image
from synthlesion.data.sources import (
    duplicate_case_ids,
    load_cases,
    patient_ids_differing_in_case,
)
from synthlesion.data.synthetic_mark import header_mark
from synthlesion.data.volume import Volume, geometry_differences, try_align_to_grid
from synthlesion.errors import CaseSourceError, GeometryError, ImageReadError

Severity = Literal["error", "warning"]
EmptyMaskPolicy = Literal["error", "warn", "ignore"]


@dataclass(frozen=True)
class CheckOptions:
    """What the checks accept.

    Attributes:
        tolerance_mm: Largest image/mask difference in spacing, origin and direction, in mm
            (also the qform/sform tolerance).
        empty_mask: Policy for a mask with no foreground voxel at all: report it as an
            ``error`` (default), a ``warn``-ing that does not fail the check, or ``ignore`` it.
        outside_body_fraction: Report a lesion when more than this fraction of its voxels lies
            outside the scan's foreground (:func:`synthlesion.data.intensity.foreground_mask`:
            a constant background, else CT below -500 HU, other images below 5% of the 99th
            percentile).
        spatial_dims: Expected 2 or 3; ``None`` accepts either.
        workers: Threads reading cases in parallel (zlib releases the GIL).
    """

    tolerance_mm: float = 1e-3
    empty_mask: EmptyMaskPolicy = "error"
    outside_body_fraction: float = 0.5
    spatial_dims: int | None = None
    workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class Problem:
    """One report row."""

    case_id: str
    file: str
    code: str
    message: str
    severity: Severity = "error"


@dataclass
class CheckReport:
    """Result of a check: the rows and what was checked."""

    source: str
    n_cases: int
    problems: list[Problem]

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def ok(self) -> bool:
        """True when no row is an error (warnings do not fail a check)."""
        return not self.errors

    def to_text(self) -> str:
        lines = [
            f"{p.severity.upper():7s} {p.case_id}  {p.file}  [{p.code}] {p.message}"
            for p in self.problems
        ]
        n_err = len(self.errors)
        n_warn = len(self.problems) - n_err
        status = "clean" if not self.problems else f"{n_err} error(s), {n_warn} warning(s)"
        lines.append(f"checked {self.n_cases} case(s) from {self.source}: {status}")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(
            {
                "source": self.source,
                "n_cases": self.n_cases,
                "ok": self.ok,
                "problems": [asdict(p) for p in self.problems],
            },
            indent=2,
        )


def check_dataset(
    path: str | Path,
    *,
    options: CheckOptions | None = None,
    patient_pattern: str | None = None,
) -> CheckReport:
    """Check every case of a ``dataset.json``, manifest or folder (see :func:`load_cases`)."""
    options = options or CheckOptions()
    try:
        cases = load_cases(path, patient_pattern=patient_pattern, check_ids=False)
    except CaseSourceError as exc:
        return CheckReport(str(path), 0, [Problem("-", str(path), "source", str(exc))])
    return check_cases(cases, options=options, source=str(path))


def check_cases(
    cases: Sequence[Case], *, options: CheckOptions | None = None, source: str = "<cases>"
) -> CheckReport:
    """Check a list of cases; rows come out in case order."""
    options = options or CheckOptions()
    problems: list[Problem] = []
    for case in cases:
        for what, value in (("case id", case.case_id), ("patient id", case.patient_id)):
            problem = safe_id_problem(value)
            if problem is not None:
                problems.append(Problem(str(case.case_id), "-", "unsafe_id", f"{what} {problem}"))
    duplicated = {i for ids in duplicate_case_ids(cases) for i in ids}
    for ids in patient_ids_differing_in_case(cases):
        if set(ids) <= duplicated:  # patient ids taken from case ids already reported
            continue
        problems.append(
            Problem(
                ids[0],
                "-",
                "patient_id_case",
                f"patient ids differ only in letter case: {', '.join(ids)} (one patient for the "
                "guards, two for a split)",
            )
        )
    for ids in duplicate_case_ids(cases):
        problems.append(
            Problem(
                ids[0],
                "-",
                "duplicate_case_id",
                f"case id used {len(ids)} times (compared ignoring case): {', '.join(ids)}",
            )
        )
    if options.workers > 1 and len(cases) > 1:
        with ThreadPoolExecutor(options.workers) as pool:
            per_case = list(pool.map(lambda c: _check_case_safely(c, options), cases))
    else:
        per_case = [_check_case_safely(c, options) for c in cases]
    for rows in per_case:
        problems.extend(rows)
    return CheckReport(source, len(cases), problems)


def _check_case_safely(case: Case, options: CheckOptions) -> list[Problem]:
    """:func:`check_case`, and whatever one case holds becomes a row: the check finishes every
    case."""
    try:
        return check_case(case, options)
    except Exception as exc:  # noqa: BLE001 - reported as a row, the other cases go on
        return [
            Problem(
                case.case_id,
                str(case.image),
                "unreadable",
                f"the case could not be checked: {type(exc).__name__}: {exc}",
            )
        ]


def check_case(case: Case, options: CheckOptions | None = None) -> list[Problem]:
    """All problems of one case (its images and its mask)."""
    options = options or CheckOptions()
    problems: list[Problem] = []

    def add(file: Path | str, code: str, message: str, severity: Severity = "error") -> None:
        problems.append(Problem(case.case_id, str(file), code, message, severity))

    images: list[Volume] = []
    for path in case.images:
        volume = _read(path, options, add, case.origin == "real")
        if volume is None:
            continue
        if images:
            for code, message in geometry_differences(images[0], volume, options.tolerance_mm):
                add(
                    path,
                    f"channel_{code}",
                    f"channel differs from {case.images[0].name}: {message}",
                )
        images.append(volume)
    if case.mask is None:
        return problems
    mask = _read(case.mask, options, add, case.origin == "real")
    if mask is None:
        return problems
    if images:
        aligned, differences = try_align_to_grid(images[0], mask, options.tolerance_mm)
        for code, message in differences:
            add(case.mask, code, message)
        if aligned is not None:
            stored = aligned.meta.get("stored_axis_order")
            if stored is not None and stored is not mask.meta.get("stored_axis_order"):
                add(
                    case.mask,
                    "mask_axis_order",
                    f"mask is stored in another axis order ({stored['orientation']}, shape "
                    f"{tuple(stored['shape'])}) than the image ({images[0].orientation}, shape "
                    f"{images[0].shape}) on the same grid; synthlesion realigns it on read, "
                    "tools that compare headers only may not",
                    "warning",
                )
            mask = aligned
    values = _label_values(mask.array, set(case.labels))
    if values is None:
        if not np.all(np.isfinite(mask.array)):
            return problems  # already reported as non_finite
        fractional = mask.array[np.isfinite(mask.array) & (mask.array != np.round(mask.array))]
        example = ", ".join(f"{v:.4g}" for v in np.unique(fractional)[:5])
        add(
            case.mask,
            "fractional",
            f"{fractional.size} voxel(s) hold fractional label values (e.g. {example}); "
            "a mask must hold whole label values and is never rounded silently",
        )
        return problems
    declared = set(case.labels)
    undeclared = [int(v) for v in values if int(v) not in declared]
    if undeclared:
        add(
            case.mask,
            "undeclared_labels",
            f"values {undeclared} are not declared labels {sorted(declared)}",
        )
    if not any(v != 0 for v in values) and options.empty_mask != "ignore":
        add(
            case.mask,
            "empty_mask",
            "mask has no foreground voxel (all background)",
            "error" if options.empty_mask == "error" else "warning",
        )
    if images and images[0].shape == mask.shape:
        labels = case.lesion_labels
        lesion = mask.array == labels[0] if len(labels) == 1 else np.isin(mask.array, labels)
        n_lesion = int(lesion.sum())
        if n_lesion:
            body = foreground_mask(images[0].array, case.modality)
            outside = 1.0 - float(np.count_nonzero(lesion & body)) / n_lesion
            if outside > options.outside_body_fraction:
                add(
                    case.mask,
                    "lesion_outside_body",
                    f"{outside:.0%} of {n_lesion} lesion voxel(s) lie outside the body",
                )
    return problems


def _read(path: Path, options: CheckOptions, add, real: bool = True) -> Volume | None:  # noqa: ANN001
    try:
        volume = load_image(
            path,
            spatial_dims=options.spatial_dims,
            on_form_mismatch="sform",
            form_tolerance_mm=options.tolerance_mm,
        )
    except ImageReadError as exc:
        add(path, exc.code, exc.problem)
        return None
    except GeometryError as exc:
        add(path, "geometry", str(exc))
        return None
    if np.issubdtype(volume.array.dtype, np.floating):
        nan = int(np.isnan(volume.array).sum())
        inf = int(np.isinf(volume.array).sum())
        if nan or inf:
            add(path, "non_finite", f"{nan} NaN and {inf} Inf voxel(s)")
    difference = volume.meta.get("qform_sform_difference_mm")
    if difference is not None and difference > options.tolerance_mm:
        add(
            path,
            "qform_sform",
            f"qform and sform disagree by up to {difference:.3g} mm (sform used by nibabel; "
            "other tools use the qform)",
        )
    mark = header_mark(volume.header) if real and volume.header is not None else None
    if mark is not None:
        add(
            path,
            "synthetic_file",
            f"file carries the synthlesion synthetic mark (synthetic case {mark.get('case')}, "
            f"run {mark.get('run')}) but is listed as a real case",
        )
    return volume


def _label_values(array: np.ndarray, declared: set[int]) -> list[int] | None:
    """Distinct values of a label map (only the extremes when they bracket declared labels
    alone, which is the common case and needs no pass beyond min and max); ``None`` if any
    value is fractional or not finite."""
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            return None
    low, high = int(array.min()), int(array.max())
    if all(v in declared for v in range(low, high + 1)):
        return sorted({low, high})
    if np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.int64)
    if high - low < 1 << 16:
        counts = np.bincount(array.ravel().astype(np.int64) - low)
        return [int(v) + low for v in np.nonzero(counts)[0]]
    return [int(v) for v in np.unique(array)]
