"""The evaluation protocol's cells: every patient split x every labelled budget.

A *cell* is one locked patient split with the train side cut down to a budget of labelled
lesion scans (a nested, seeded draw: the scans of a small budget are among those of a larger
one); the healthy train scans, the val side and the test side are kept whole. Each cell gets
its own real-case list (``dataset.json``) and splits file, so every generator of the cell is
fitted or trained on exactly the budget's labelled scans and nothing else. The upper-reference
cell of a split labels every lesion scan of its train side.

Everything a cell needs is checked here, before any training: budgets larger than a split's
train side, a test side with too few lesion scans.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from synthlesion.data.cases import Case
from synthlesion.data.splits import SIDES, SplitError, Splits, load_splits, save_splits
from synthlesion.evaluation.config import EvaluateConfig
from synthlesion.evaluation.errors import EvaluationConfigError
from synthlesion.masks.lesions import case_has_lesion
from synthlesion.storage import atomic_write_json

logger = logging.getLogger(__name__)

ALL = "all"


@dataclass(frozen=True)
class Cell:
    """One patient split with one labelled budget.

    Attributes:
        split: The split's name (``s0``, ``s1``, ... in config order).
        splits_file: The locked splits file it comes from.
        budget: Labelled lesion scans of the train side (``None``: all of them).
        reference: Whether this is the all-labelled upper reference (real arm only).
        labelled: The labelled lesion patients of the train side, in draw order.
    """

    split: str
    splits_file: Path
    budget: int | None
    reference: bool
    labelled: tuple[str, ...]

    @property
    def budget_name(self) -> str:
        return ALL if self.budget is None else str(self.budget)

    @property
    def budget_label(self) -> str:
        """``b4`` for a budget of 4 labelled lesion patients, ``all`` for every one."""
        return ALL if self.budget is None else f"b{self.budget}"

    @property
    def name(self) -> str:
        if self.reference:
            return f"{self.split}-upper"
        return f"{self.split}-{self.budget_label}"


def lesion_flags(cases: Sequence[Case]) -> dict[str, bool]:
    """Case id -> whether its mask holds a lesion, read from the mask (a source's
    ``has_lesion`` is not trusted: a wrong flag would turn an unlabelled lesion patient into a
    healthy negative); the flag is used only for a case without a mask."""
    flags = {}
    for case in cases:
        if case.mask is not None:
            found = case_has_lesion(case, case.lesion_labels)
            if case.has_lesion is not None and bool(case.has_lesion) != found:
                logger.warning(
                    "case %s: has_lesion says %s, its mask %s a lesion (the mask decides)",
                    case.case_id,
                    case.has_lesion,
                    "holds" if found else "holds no",
                )
            flags[case.case_id] = found
        else:
            flags[case.case_id] = bool(case.has_lesion)
    return flags


def plan_cells(config: EvaluateConfig, cases: Sequence[Case]) -> list[Cell]:
    """Every cell of the run, checked before anything trains.

    Raises:
        EvaluationConfigError: a budget exceeds a split's labelled lesion scans, or a test side
            holds fewer lesion scans than ``protocol.min_test_lesion_cases``.
    """
    flags = lesion_flags(cases)
    patients_with_lesion: dict[str, bool] = {}
    for case in cases:
        patients_with_lesion[case.patient_id] = patients_with_lesion.get(
            case.patient_id, False
        ) or flags.get(case.case_id, False)
    budgets = config.protocol.budgets
    cells: list[Cell] = []
    seen: dict[str, Path] = {}
    for index, path in enumerate(config.splits):
        splits = load_splits(path)
        if splits.sha256 in seen:
            raise EvaluationConfigError(
                f"{path}: the same split as {seen[splits.sha256]} (equal content); a repeated "
                "split would count its cases twice and narrow every interval"
            )
        seen[splits.sha256] = Path(path)
        try:
            splits.require_matches(list(cases))
        except SplitError as exc:
            raise SplitError(f"{path}: does not fit {config.data}: {exc}") from None
        name = f"s{index}"
        lesion_patients = [p for p in splits.patients("train") if patients_with_lesion.get(p)]
        test_lesion = sum(flags.get(c, False) for c in splits.case_ids(config.test_split))
        if test_lesion < config.protocol.min_test_lesion_cases:
            raise EvaluationConfigError(
                f"{path}: the {config.test_split} side holds {test_lesion} lesion scan(s), the "
                f"protocol's statistics need at least {config.protocol.min_test_lesion_cases} "
                "(protocol.min_test_lesion_cases)"
            )
        if not lesion_patients:
            raise EvaluationConfigError(f"{path}: the train side holds no lesion scan")
        too_big = [b for b in budgets or () if b > len(lesion_patients)]
        if too_big:
            raise EvaluationConfigError(
                f"{path}: budget(s) {too_big} exceed the {len(lesion_patients)} lesion "
                "patients of the train side (protocol.budgets)"
            )
        rng = np.random.default_rng([config.metrics.seed, 23, index])
        order = tuple(lesion_patients[i] for i in rng.permutation(len(lesion_patients)))
        for budget in budgets or (None,):
            labelled = order if budget is None else order[:budget]
            cells.append(Cell(name, Path(path), budget, False, labelled))
        if config.protocol.upper_reference and budgets and max(budgets) < len(order):
            cells.append(Cell(name, Path(path), None, True, order))
    return cells


def write_cell_data(
    cell: Cell, cases: Sequence[Case], data: Path, folder: Path
) -> tuple[Path, Path]:
    """Write the cell's real-case list and splits into ``folder``.

    The list keeps every case of the split except the train side's unlabelled lesion scans
    (those outside the budget), with absolute file paths, in the source's label and channel
    names.

    Returns:
        ``(dataset.json, splits.json)`` of the cell.
    """
    splits = load_splits(cell.splits_file)
    flags = lesion_flags(cases)
    labelled = set(cell.labelled)
    patients_with_lesion: dict[str, bool] = {}
    for case in cases:
        patients_with_lesion[case.patient_id] = patients_with_lesion.get(
            case.patient_id, False
        ) or flags.get(case.case_id, False)

    def kept(patient: str) -> bool:
        side = splits.side_of_patient(patient)
        if side is None:
            return False
        return side != "train" or not patients_with_lesion.get(patient) or patient in labelled

    chosen = [c for c in cases if kept(c.patient_id)]
    first = chosen[0]
    spec = {
        "name": f"synthlesion-evaluation-{cell.name}",
        "description": f"real cases of {data} for cell {cell.name} (budget {cell.budget_name})",
        "labels": {str(k): v for k, v in sorted(first.labels.items())},
        "modality": {str(i): m for i, m in enumerate(first.modalities or (first.modality,))},
        "training": [
            {
                "image": [str(Path(p).resolve()) for p in c.images],
                "label": str(Path(c.mask).resolve()) if c.mask is not None else None,
                "case_id": c.case_id,
                "patient_id": c.patient_id,
                "has_lesion": flags.get(c.case_id),
            }
            for c in chosen
        ],
    }
    folder.mkdir(parents=True, exist_ok=True)
    dataset = folder / "dataset.json"
    text = json.dumps(spec, indent=1, sort_keys=True)
    if not dataset.is_file() or dataset.read_text(encoding="utf-8") != text:
        atomic_write_json(dataset, spec)
    sides = {side: tuple(p for p in splits.patients(side) if kept(p)) for side in SIDES}
    kept_ids = {c.case_id for c in chosen}
    cell_splits = Splits(
        sides,
        {c: p for c, p in splits.cases.items() if c in kept_ids},
        None,
        splits.seed,
        f"{splits.method} (budget {cell.budget_name})",
    )
    splits_path = folder / "splits.json"
    save_splits(cell_splits, splits_path)
    return dataset, splits_path


__all__ = ["ALL", "Cell", "lesion_flags", "plan_cells", "write_cell_data"]
