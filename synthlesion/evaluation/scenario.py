"""The scarce-label scenario the demo and the benchmark run on: a phantom whose train side holds
few labelled lesion scans and many healthy scans, with a test side large enough to measure.

:func:`split_by_counts` draws a patient-level split with a given number of lesion and healthy
patients on each side (``split_patients`` takes one set of fractions for both strata; here the
train side must be lesion-poor and the test side lesion-rich). The result is an ordinary locked
:class:`~synthlesion.data.splits.Splits` file.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from synthlesion.data.cases import Case
from synthlesion.data.phantom import make_phantom_dataset
from synthlesion.data.sources import load_cases
from synthlesion.data.splits import SIDES, Splits, save_splits
from synthlesion.evaluation.errors import EvaluationConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scenario:
    """Patients per side and kind for the scarce-label phantom.

    Attributes:
        lesion: Lesion patients on ``(train, val, test)``.
        healthy: Healthy patients on ``(train, val, test)``.
        size: In-plane voxels of the phantom.
        spatial_dims: 2 (axial slices) or 3.
        kind: ``"ct"`` or ``"mri"``.
        seed: Phantom and split seed.
        splits: Patient splits drawn (the protocol's repetitions), each with these counts.
        lesion_model: The phantom's lesions: ``"types"`` (several lesion types with rims,
            halos, mass effect and textures of their own) or ``"ellipsoid"`` (the older,
            simpler lesions, for reproducing older figures).
    """

    lesion: tuple[int, int, int] = (8, 4, 24)
    healthy: tuple[int, int, int] = (48, 4, 12)
    size: int = 64
    spatial_dims: int = 2
    kind: str = "ct"
    seed: int = 0
    splits: int = 1
    lesion_model: str = "types"

    @property
    def n_patients(self) -> int:
        return sum(self.lesion) + sum(self.healthy)


def split_by_counts(
    cases: list[Case],
    lesion: tuple[int, int, int],
    healthy: tuple[int, int, int],
    seed: int = 0,
) -> Splits:
    """A patient-level split with exact lesion/healthy patient counts per side.

    Args:
        cases: Real cases (``has_lesion`` set, as the phantom writes it).
        lesion: Lesion patients on train, val, test.
        healthy: Healthy patients on train, val, test.
        seed: Seed of the draw.

    Raises:
        EvaluationConfigError: fewer patients of a kind than asked for.
    """
    flags: dict[str, bool] = {}
    for case in cases:
        flags[case.patient_id] = flags.get(case.patient_id, False) or bool(case.has_lesion)
    rng = np.random.default_rng([seed, 7])
    sides: dict[str, list[str]] = {side: [] for side in SIDES}
    for want, counts in ((True, lesion), (False, healthy)):
        pool = sorted(p for p, f in flags.items() if f is want)
        if sum(counts) > len(pool):
            kind = "lesion" if want else "healthy"
            raise EvaluationConfigError(
                f"scenario: {sum(counts)} {kind} patients asked for, the dataset has {len(pool)}"
            )
        order = [pool[i] for i in rng.permutation(len(pool))]
        start = 0
        for side, count in zip(SIDES, counts, strict=True):
            sides[side].extend(order[start : start + count])
            start += count
        sides["train"].extend(order[start:])  # anything left over trains
    case_map = {c.case_id: c.patient_id for c in cases}
    return Splits(
        {s: tuple(sorted(p)) for s, p in sides.items()}, case_map, None, seed, "holdout-by-count"
    )


def make_scenario(out_dir: str | Path, scenario: Scenario) -> tuple[Path, list[Path]]:
    """Write the phantom (one scan per patient) and its locked patient splits.

    Returns:
        ``(dataset.json, [splits.json, splits-1.json, ...])`` (``scenario.splits`` files); an
        existing identical phantom is kept, an existing splits file is reused only if it
        matches the dataset.
    """
    out_dir = Path(out_dir)
    n_lesion = sum(scenario.lesion)
    dataset = make_phantom_dataset(
        out_dir / "phantom",
        kind=scenario.kind,  # type: ignore[arg-type]
        spatial_dims=scenario.spatial_dims,
        n_patients=scenario.n_patients,
        size=scenario.size,
        seed=scenario.seed,
        lesion_fraction=n_lesion / scenario.n_patients,
        followup_fraction=0.0,
        lesion_model=scenario.lesion_model,  # type: ignore[arg-type]
    )
    cases = load_cases(dataset)
    paths = []
    for index in range(scenario.splits):
        splits = split_by_counts(
            cases, scenario.lesion, scenario.healthy, seed=scenario.seed + 1000 * index
        )
        path = out_dir / ("splits.json" if index == 0 else f"splits-{index}.json")
        save_splits(splits, path)
        logger.info("scenario split %d: %s", index, describe_splits(splits, cases))
        paths.append(path)
    return dataset, paths


def describe_splits(splits: Splits, cases: list[Case]) -> str:
    """``train 8 lesion + 48 healthy scans, val ..., test ...``."""
    lesion = {c.case_id: bool(c.has_lesion) for c in cases}
    parts = []
    for side in SIDES:
        ids = splits.case_ids(side)
        n_les = sum(lesion.get(i, False) for i in ids)
        parts.append(f"{side} {n_les} lesion + {len(ids) - n_les} healthy scans")
    return ", ".join(parts)


def side_counts(splits: Splits, cases: list[Case]) -> Mapping[str, dict[str, int]]:
    """Lesion and healthy scan counts per side."""
    lesion = {c.case_id: bool(c.has_lesion) for c in cases}
    out = {}
    for side in SIDES:
        ids = splits.case_ids(side)
        n_les = sum(lesion.get(i, False) for i in ids)
        out[side] = {"lesion": n_les, "healthy": len(ids) - n_les}
    return out
