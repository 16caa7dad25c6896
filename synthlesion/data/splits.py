"""Patient-level splits, locked by a content hash.

All scans of one patient land on one side. The splits file is JSON carrying the sha256 of its
own content; loading refuses an edited file and any patient listed on two sides. A synthetic
case inherits the side of its source patient (the dataset builder enforces that).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from synthlesion.data.cases import Case
from synthlesion.data.sources import patient_ids_differing_in_case, require_unique_case_ids
from synthlesion.data.synthetic_mark import marked_files
from synthlesion.errors import SplitError
from synthlesion.storage import atomic_write_json, canonical_json_hash

logger = logging.getLogger(__name__)

FORMAT = "synthlesion-splits/1"
SIDES = ("train", "val", "test")


@dataclass(frozen=True)
class Splits:
    """Which patients (and so which cases) belong to train, val and test.

    Attributes:
        sides: Side name -> sorted patient ids.
        cases: Case id -> patient id, for every case the splits were made from.
        folds: For k-fold splits, the patient ids of each fold (train+val patients only);
            ``None`` for a single hold-out split.
        seed: Seed used to draw the split.
        method: ``"holdout"`` or ``"kfold"``.
    """

    sides: Mapping[str, tuple[str, ...]]
    cases: Mapping[str, str]
    folds: tuple[tuple[str, ...], ...] | None = None
    seed: int = 0
    method: str = "holdout"
    _side_of: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        both: dict[str, list[str]] = {}
        for side, patients in self.sides.items():
            for patient in patients:
                if patient in seen and seen[patient] != side:
                    both.setdefault(patient, [seen[patient]]).append(side)
                seen[patient] = side
        if both:
            listed = "; ".join(f"{p} in {' and '.join(s)}" for p, s in sorted(both.items()))
            raise SplitError(f"patients on two sides of the split: {listed}")
        object.__setattr__(self, "_side_of", seen)

    def side_of_patient(self, patient_id: str) -> str | None:
        """``"train"``, ``"val"``, ``"test"``, or ``None`` for a patient not in the splits."""
        return self._side_of.get(patient_id)

    def side_of_case(self, case_id: str) -> str | None:
        patient = self.cases.get(case_id)
        return None if patient is None else self.side_of_patient(patient)

    def patients(self, side: str) -> tuple[str, ...]:
        return tuple(self.sides.get(side, ()))

    def case_ids(self, side: str) -> list[str]:
        """Case ids on ``side``, in sorted order."""
        members = set(self.patients(side))
        return sorted(c for c, p in self.cases.items() if p in members)

    def select(self, cases: Iterable[Case], side: str) -> list[Case]:
        """The cases on ``side`` (checks first that ``cases`` match these splits)."""
        cases = list(cases)
        self.require_matches(cases)
        members = set(self.patients(side))
        return [c for c in cases if c.patient_id in members]

    def for_fold(self, index: int) -> Splits:
        """The hold-out view of fold ``index``: that fold is val, the other folds train."""
        if self.folds is None:
            raise SplitError("these splits have no folds")
        if not 0 <= index < len(self.folds):
            raise SplitError(f"fold {index} does not exist (0..{len(self.folds) - 1})")
        train = tuple(sorted(p for i, f in enumerate(self.folds) if i != index for p in f))
        return Splits(
            {"train": train, "val": tuple(self.folds[index]), "test": self.patients("test")},
            dict(self.cases),
            None,
            self.seed,
            f"kfold[{index}]",
        )

    def require_matches(self, cases: Sequence[Case]) -> None:
        """Raise :class:`SplitError` unless every real case is in the splits with its patient."""
        problems = []
        for case in cases:
            if case.origin != "real":
                continue
            recorded = self.cases.get(case.case_id)
            if recorded is None:
                problems.append(f"case {case.case_id} is not in the splits file")
            elif recorded != case.patient_id:
                problems.append(
                    f"case {case.case_id} belongs to patient {case.patient_id} in the dataset but "
                    f"to {recorded} in the splits file"
                )
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise SplitError(
                "splits file does not match the dataset: " + "; ".join(problems[:5]) + more
            )

    def to_json_dict(self) -> dict:
        body = {
            "format": FORMAT,
            "method": self.method,
            "seed": self.seed,
            "sides": {side: list(self.sides.get(side, ())) for side in SIDES},
            "folds": [list(f) for f in self.folds] if self.folds is not None else None,
            "cases": dict(sorted(self.cases.items())),
        }
        return {**body, "sha256": canonical_json_hash(body)}

    @property
    def sha256(self) -> str:
        return self.to_json_dict()["sha256"]


def split_patients(
    cases: Sequence[Case],
    *,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    folds: int | None = None,
    seed: int = 0,
    stratify: bool = True,
) -> Splits:
    """Split cases by patient into train/val/test (or k folds plus test).

    Args:
        cases: Real cases; several may share a patient.
        fractions: Shares of patients for train, val and test (summing to 1). With ``folds``,
            only the test share is used; the rest is divided into folds.
        folds: Number of folds for cross-validation, or ``None`` for one hold-out split.
        seed: Seed of the draw (same cases and seed, same split).
        stratify: Balance patients with and without lesions across sides, where cases say
            ``has_lesion``.

    Raises:
        SplitError: bad fractions, too few patients, synthetic cases (tagged, or files that
            carry the synthetic mark), duplicate ids.
    """
    require_unique_case_ids(cases, "split")
    clashes = patient_ids_differing_in_case(cases)
    if clashes:
        raise SplitError(
            "patient ids differ only in letter case ("
            + "; ".join(" vs ".join(g) for g in clashes[:3])
            + "): one patient for the guards, two for a split; write them alike"
        )
    synthetic = [c.case_id for c in cases if c.origin != "real"]
    if synthetic:
        raise SplitError(f"splits are drawn over real cases only; synthetic: {synthetic[:5]}")
    marked = marked_files(cases)
    if marked:
        listed = "; ".join(f"{case} ({path})" for case, path, _ in marked[:5])
        raise SplitError(
            f"{len(marked)} file(s) listed as real carry the synthlesion synthetic mark: "
            f"{listed}; splits are drawn over real cases only (remove the synthetic files or "
            "give them through their manifest)"
        )
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise SplitError(
            f"fractions must be three non-negative shares summing to 1, got {fractions}"
        )
    if folds is not None and folds < 2:
        raise SplitError(f"folds must be at least 2, got {folds}")
    flags: dict[str, list[bool | None]] = {}
    for case in cases:
        flags.setdefault(case.patient_id, []).append(case.has_lesion)
    patients = {
        p: True if any(f is True for f in fs) else False if all(f is False for f in fs) else None
        for p, fs in flags.items()
    }
    if not patients:
        raise SplitError("no cases to split")
    strata: dict[object, list[str]] = {}
    for patient in sorted(patients):
        key = patients[patient] if stratify else None
        strata.setdefault(key, []).append(patient)
    rng = np.random.default_rng(seed)
    shares = (
        [fractions[2]] + [(1 - fractions[2]) / folds] * folds
        if folds is not None
        else list(fractions)
    )
    bins: list[list[str]] = [[] for _ in shares]
    for key in sorted(strata, key=repr):
        members = strata[key]
        order = rng.permutation(len(members))
        counts = _largest_remainder([s * len(members) for s in shares])
        start = 0
        for b, count in enumerate(counts):
            bins[b].extend(members[i] for i in order[start : start + count])
            start += count
    _fill_empty(bins, shares)
    case_map = {c.case_id: c.patient_id for c in cases}
    if folds is None:
        sides = {side: tuple(sorted(b)) for side, b in zip(SIDES, bins, strict=True)}
        for side, members in sides.items():
            if len(members) < 2:
                logger.warning(
                    "split side %s holds %d patient(s): too few to train or evaluate on "
                    "(%d patients in all; more data or other fractions)",
                    side,
                    len(members),
                    len(patients),
                )
        return Splits(sides, case_map, None, seed, "holdout")
    test = tuple(sorted(bins[0]))
    fold_lists = tuple(tuple(sorted(b)) for b in bins[1:])
    train = tuple(sorted(p for f in fold_lists for p in f))
    return Splits({"train": train, "val": (), "test": test}, case_map, fold_lists, seed, "kfold")


def require_listed_files(cases: Sequence[Case]) -> None:
    """Raise :class:`SplitError` unless every image and mask the cases list exists (a split
    is locked only over data that is there)."""
    missing = [
        f"{c.case_id}: {path}"
        for c in cases
        for path in (*c.images, *([c.mask] if c.mask is not None else []))
        if not Path(path).exists()
    ]
    if missing:
        raise SplitError(
            f"{len(missing)} listed file(s) do not exist, so the split is not locked: "
            + "; ".join(missing[:5])
            + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
        )


def save_splits(splits: Splits, path: str | Path) -> str:
    """Write the locked splits file (atomically); returns its sha256."""
    data = splits.to_json_dict()
    atomic_write_json(path, data)
    return data["sha256"]


def load_splits(path: str | Path) -> Splits:
    """Read a splits file, refusing one whose content hash does not match or that is malformed."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SplitError(f"{path}: splits file does not exist") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SplitError(f"{path}: cannot read splits file ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SplitError(f"{path}: not a synthlesion splits file (format {FORMAT})")
    recorded = data.pop("sha256", None)
    if recorded != canonical_json_hash(data):
        raise SplitError(
            f"{path}: content does not match its sha256 (the file was edited after it was "
            "locked); make a new split instead of editing this one"
        )
    try:
        folds = data.get("folds")
        return Splits(
            {side: tuple(data["sides"].get(side, ())) for side in SIDES},
            dict(data["cases"]),
            tuple(tuple(f) for f in folds) if folds is not None else None,
            int(data["seed"]),
            str(data["method"]),
        )
    except SplitError as exc:
        raise SplitError(f"{path}: {exc}") from None
    except (KeyError, TypeError, AttributeError) as exc:
        raise SplitError(f"{path}: malformed splits file ({exc})") from None


def _largest_remainder(targets: Sequence[float]) -> list[int]:
    counts = [int(np.floor(t)) for t in targets]
    remaining = int(round(sum(targets))) - sum(counts)
    order = sorted(range(len(targets)), key=lambda i: (targets[i] - counts[i], -i), reverse=True)
    for i in order[:remaining]:
        counts[i] += 1
    return counts


def _fill_empty(bins: list[list[str]], shares: Sequence[float]) -> None:
    """Give each bin with a positive share at least one patient, taken from the largest bin."""
    for b, share in enumerate(shares):
        if share > 0 and not bins[b]:
            donor = max(range(len(bins)), key=lambda i: len(bins[i]))
            if len(bins[donor]) > 1:
                bins[b].append(bins[donor].pop())
