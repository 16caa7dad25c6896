"""The guards that keep synthetic data and evaluation patients out of the wrong places.

Each check works from content hashes, manifests and the locked splits, never from file names.
A :class:`ViolationSink` either raises the first violation (the default) or collects every one
(``report`` mode); it also counts what each guard checked, for the dataset card.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from array import array
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from synthlesion.data.cases import Case
from synthlesion.data.io import load_image
from synthlesion.data.sources import duplicate_case_ids
from synthlesion.data.splits import Splits, load_splits
from synthlesion.data.synthetic_mark import read_mark
from synthlesion.provenance.errors import (
    DuplicateCase,
    EvaluationPatientLeak,
    GeneratorLeak,
    GeneratorRecordError,
    GuardViolation,
    GuardViolations,
    PatientOnTwoSides,
    ReusedMask,
    SourceMismatch,
    SplitMismatch,
    SyntheticAsReal,
    SyntheticInEvaluation,
)
from synthlesion.provenance.identity import GeneratorRef, voxel_sha256
from synthlesion.provenance.manifest import ManifestRow
from synthlesion.provenance.record import verify_generator
from synthlesion.provenance.registry import SyntheticRegistry
from synthlesion.storage import sha256_file

logger = logging.getLogger(__name__)

EVAL_SIDES = ("val", "test")
GUARDS = (
    "patient-on-two-sides",
    "split-mismatch",
    "duplicate-case",
    "manifest-integrity",
    "unsafe-path",
    "source-mismatch",
    "evaluation-patient",
    "reused-mask",
    "generator-record",
    "generator-trained-on-evaluation",
    "synthetic-in-evaluation",
    "synthetic-as-real",
)


class ViolationSink:
    """Raise or collect guard violations, and count checks per guard.

    Args:
        collect: ``False`` raises the first violation; ``True`` keeps them all.
    """

    def __init__(self, collect: bool = False) -> None:
        self.collect = collect
        self.violations: list[GuardViolation] = []
        self.checks: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()

    def __call__(self, violation: GuardViolation) -> None:
        self.failures[violation.guard] += 1
        if not self.collect:
            raise violation
        logger.debug("guard violation: %s", violation)
        self.violations.append(violation)

    def checked(self, guard: str, count: int = 1) -> None:
        self.checks[guard] += count

    def raise_collected(self) -> None:
        """Raise the one violation, or :class:`GuardViolations` listing several."""
        if len(self.violations) == 1:
            raise self.violations[0]
        if self.violations:
            raise GuardViolations.of(self.violations)

    def summary(self) -> dict[str, dict[str, int]]:
        """Guard -> ``{"checked": n, "violations": n}``."""
        return {g: {"checked": self.checks[g], "violations": self.failures[g]} for g in GUARDS}


def load_splits_checked(path: str | Path) -> Splits:
    """Load a locked splits file, reporting a patient on two sides as :class:`PatientOnTwoSides`.

    Raises:
        PatientOnTwoSides: the file lists a patient on two sides (even if re-hashed).
        SplitError: the file is missing, malformed or edited.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        sides = raw["sides"]
        seen: dict[str, list[str]] = {}
        for side, patients in sides.items():
            for patient in patients:
                seen.setdefault(str(patient), []).append(str(side))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return load_splits(path)  # it explains the problem
    both = {p: s for p, s in seen.items() if len(set(s)) > 1}
    if both:
        listed = "; ".join(f"{p} in {' and '.join(s)}" for p, s in sorted(both.items()))
        raise PatientOnTwoSides(
            f"{path}: patients on two sides of the split: {listed}",
            patient_id=sorted(both)[0],
            path=path,
        )
    return load_splits(path)


@dataclass(frozen=True)
class RealCaseFacts:
    """A real case, its side and the sha256 of its files."""

    case: Case
    side: str
    image_sha256: tuple[str, ...]
    mask_sha256: str | None


def index_real_cases(
    cases: Sequence[Case], splits: Splits, sink: ViolationSink
) -> dict[str, RealCaseFacts]:
    """Place every real case on its side and hash its files, checking the split's integrity.

    Refuses: duplicate case ids; a case missing from the splits or under another patient
    there; a patient (also compared ignoring case) with cases on two sides; one image content
    under two ids on two sides; a case tagged synthetic among the real ones.
    """
    for ids in duplicate_case_ids(cases):
        sink(
            DuplicateCase(
                f"real cases: duplicate case ids (ignoring case): {', '.join(ids)}", case_id=ids[0]
            )
        )
    sink.checked("duplicate-case", len(cases))
    facts: dict[str, RealCaseFacts] = {}
    sides_of: dict[str, dict[str, str]] = {}
    for case in cases:
        sink.checked("split-mismatch")
        recorded = splits.cases.get(case.case_id)
        side = splits.side_of_case(case.case_id)
        if recorded is None or side is None:
            sink(
                SplitMismatch(
                    f"case {case.case_id} (patient {case.patient_id}) is not in the "
                    "locked splits file",
                    case_id=case.case_id,
                    patient_id=case.patient_id,
                )
            )
            continue
        if recorded != case.patient_id:
            sink(
                SplitMismatch(
                    f"case {case.case_id} belongs to patient {case.patient_id} in the dataset but to "
                    f"{recorded} in the splits file",
                    case_id=case.case_id,
                    patient_id=case.patient_id,
                )
            )
            continue
        if case.origin != "real":
            violation = SyntheticInEvaluation if side in EVAL_SIDES else SyntheticAsReal
            sink(
                violation(
                    f"case {case.case_id} among the real cases is tagged synthetic; "
                    "synthetic cases enter through manifests only",
                    case_id=case.case_id,
                    patient_id=case.patient_id,
                )
            )
            continue
        for key in (case.patient_id, "casefold:" + case.patient_id.casefold()):
            sides_of.setdefault(key, {}).setdefault(side, case.case_id)
        mask = sha256_file(case.mask) if case.mask is not None else None
        facts[case.case_id] = RealCaseFacts(
            case, side, tuple(sha256_file(p) for p in case.images), mask
        )
    for patient, sides in sorted(sides_of.items()):
        sink.checked("patient-on-two-sides")
        if len(sides) > 1:
            listed = ", ".join(f"{c} in {s}" for s, c in sorted(sides.items()))
            sink(
                PatientOnTwoSides(
                    f"patient {patient.removeprefix('casefold:')} has cases on two sides of the split "
                    f"({listed}); split by patient",
                    patient_id=patient.removeprefix("casefold:"),
                )
            )
    by_image: dict[str, RealCaseFacts] = {}
    for fact in facts.values():
        for digest in fact.image_sha256:
            other = by_image.setdefault(digest, fact)
            if other is not fact and other.side != fact.side:
                sink(
                    PatientOnTwoSides(
                        f"case {fact.case.case_id} ({fact.side}) and case {other.case.case_id} "
                        f"({other.side}) hold the same image file content (sha256 {digest[:12]}): "
                        "one scan under two ids on two sides",
                        case_id=fact.case.case_id,
                        patient_id=fact.case.patient_id,
                    )
                )
    return facts


class RowChecker:
    """Checks each synthetic row against the real data, the split and the mask provenance.

    Args:
        real: :func:`index_real_cases` output.
        sink: Where violations go.
        require_known_mask_source: Refuse a ``bank`` mask whose real source is unknown (its
            sha256 matches no real mask and the row names no known patient).
    """

    def __init__(
        self,
        real: Mapping[str, RealCaseFacts],
        splits: Splits,
        sink: ViolationSink,
        *,
        require_known_mask_source: bool = False,
    ) -> None:
        self.real = real
        self.splits = splits
        self.sink = sink
        self.require_known_mask_source = require_known_mask_source
        self.mask_owners: dict[str, list[RealCaseFacts]] = {}
        for fact in real.values():
            if fact.mask_sha256 is not None:
                self.mask_owners.setdefault(fact.mask_sha256, []).append(fact)
        self.mask_use: dict[str, dict[str, str]] = {}
        self.unknown_mask_sources = 0

    def check(self, row: ManifestRow, where: str) -> bool:
        """True when the row may go into training; violations go to the sink."""
        sink, case, patient = self.sink, row.case_id, row.source_patient
        sink.checked("source-mismatch")
        sink.checked("evaluation-patient")
        source = self.real.get(row.source_case)
        if source is None:
            side = self.splits.side_of_patient(patient)
            if side in EVAL_SIDES:
                sink(
                    EvaluationPatientLeak(
                        f"{where}: synthetic case {case} comes from patient {patient}, who is in "
                        f"{side}; refused for training",
                        case_id=case,
                        patient_id=patient,
                    )
                )
            else:
                sink(
                    SourceMismatch(
                        f"{where}: synthetic case {case}: source case "
                        f"{row.source_case} is not among the real cases",
                        case_id=case,
                        patient_id=patient,
                    )
                )
            return False
        true_patient = source.case.patient_id
        if source.side in EVAL_SIDES or self.splits.side_of_patient(patient) in EVAL_SIDES:
            eval_patient = true_patient if source.side in EVAL_SIDES else patient
            side = (
                source.side if source.side in EVAL_SIDES else self.splits.side_of_patient(patient)
            )
            sink(
                EvaluationPatientLeak(
                    f"{where}: synthetic case {case} was painted into a scan of patient "
                    f"{eval_patient}, who is in {side}; refused for training",
                    case_id=case,
                    patient_id=eval_patient,
                )
            )
            self._note_mask_use(row, "evaluation")
            return False
        ok = True
        if true_patient != patient:
            sink(
                SourceMismatch(
                    f"{where}: synthetic case {case} names source patient {patient}, but source case "
                    f"{row.source_case} belongs to {true_patient}",
                    case_id=case,
                    patient_id=patient,
                )
            )
            ok = False
        if row.source_image_sha256 != source.image_sha256 or (
            row.source_mask_sha256 is not None and row.source_mask_sha256 != source.mask_sha256
        ):
            sink(
                SourceMismatch(
                    f"{where}: synthetic case {case}: the source file hashes in the row differ from "
                    f"the real case {row.source_case}'s files (the row or the real file changed)",
                    case_id=case,
                    patient_id=patient,
                )
            )
            ok = False
        if row.source_split is not None and row.source_split != source.side:
            sink(
                SplitMismatch(
                    f"{where}: synthetic case {case}: the sampler saw patient {patient} in "
                    f"{row.source_split}, the locked splits put them in {source.side}; the manifest "
                    "was made against another split",
                    case_id=case,
                    patient_id=patient,
                )
            )
            ok = False
        return self._check_mask_source(row, where) and ok

    def _check_mask_source(self, row: ManifestRow, where: str) -> bool:
        sources = row.transplanted_masks()
        if not sources:
            return True
        self.sink.checked("reused-mask")
        patients: dict[str, str] = {}
        for digest, _case, patient in sources:
            owners = self.mask_owners.get(digest or "", [])
            patients.update({f.case.patient_id: f.side for f in owners})
            if patient is None:
                continue
            side = self.splits.side_of_patient(patient)
            if side is not None:
                patients.setdefault(patient, side)
            if owners and patient not in {f.case.patient_id for f in owners}:
                self.sink(
                    SourceMismatch(
                        f"{where}: synthetic case {row.case_id}: mask source patient {patient} "
                        f"does not own the real mask {(digest or '')[:12]}",
                        case_id=row.case_id,
                        patient_id=patient,
                    )
                )
                return False
        leaked = sorted((p, s) for p, s in patients.items() if s in EVAL_SIDES)
        if leaked:
            listed = ", ".join(f"{p} ({s})" for p, s in leaked)
            self.sink(
                ReusedMask(
                    f"{where}: synthetic case {row.case_id} transplants a lesion cut from the real "
                    f"mask of evaluation patient(s) {listed}; refused for training",
                    case_id=row.case_id,
                    patient_id=leaked[0][0],
                )
            )
            return False
        if not patients:
            self.unknown_mask_sources += 1
            if self.require_known_mask_source:
                self.sink(
                    ReusedMask(
                        f"{where}: synthetic case {row.case_id}: its mask source(s) match no real "
                        "mask, so their split is unknown",
                        case_id=row.case_id,
                    )
                )
                return False
        self._note_mask_use(row, "train")
        return True

    def _note_mask_use(self, row: ManifestRow, group: str) -> None:
        for digest, _case, _patient in row.transplanted_masks():
            if digest is not None:
                self.mask_use.setdefault(digest, {}).setdefault(group, row.case_id)

    def finish(self) -> None:
        """Refuse a real mask reused for synthetic cases of training and evaluation patients."""
        for digest, uses in sorted(self.mask_use.items()):
            if len(uses) > 1:
                self.sink(
                    ReusedMask(
                        f"the real mask {digest[:12]} was transplanted into synthetic cases of both "
                        f"training (case {uses['train']}) and evaluation patients (case "
                        f"{uses['evaluation']}): the mask bank is not split by patient",
                        case_id=uses["train"],
                    )
                )


@dataclass
class GeneratorFacts:
    """What the builder learnt about one generator (for the card)."""

    ref: GeneratorRef
    manifest: str
    patients_trained: int | None = None
    ok: bool = False
    rows: int = 0
    problem: str | None = None
    evaluation_overlap: list[str] = field(default_factory=list)


class GeneratorChecker:
    """Refuses generators whose training record lists a val/test patient, once per generator.

    Args:
        splits: The locked splits.
        sink: Where violations go.
        verify_folder: Recompute each model folder's hash (reads the weights once).
    """

    def __init__(self, splits: Splits, sink: ViolationSink, *, verify_folder: bool = True) -> None:
        self.sink = sink
        self.verify_folder = verify_folder
        self.evaluation = {p: (p, side) for side in EVAL_SIDES for p in splits.patients(side)}
        self.facts: dict[str, GeneratorFacts] = {}

    def check(self, ref: GeneratorRef, root: Path, manifest: Path) -> bool:
        facts = self.facts.get(ref.sha256)
        if facts is None:
            facts = self.facts[ref.sha256] = GeneratorFacts(ref, str(manifest))
            self.sink.checked("generator-record")
            self.sink.checked("generator-trained-on-evaluation")
            try:
                record = verify_generator(ref, root, verify_folder=self.verify_folder)
            except GeneratorRecordError as exc:
                facts.problem = str(exc)
                self.sink(exc)
                return False
            facts.patients_trained = len(record.patient_id_hashes)
            overlap = sorted(self.evaluation[p] for p in record.trained_on_any(self.evaluation))
            facts.evaluation_overlap = [f"{p} ({s})" for p, s in overlap]
            if overlap:
                facts.problem = "trained on evaluation patients"
                self.sink(
                    GeneratorLeak(
                        f"generator {ref.path} (sha256 {ref.sha256[:12]}, used by {manifest}) was "
                        f"trained on evaluation patient(s) {', '.join(facts.evaluation_overlap)}; "
                        "its synthetic cases are refused",
                        patient_id=overlap[0][0],
                        path=ref.path,
                    )
                )
                return False
            facts.ok = True
        facts.rows += 1
        return facts.ok


def check_real_against_registry(
    real: Mapping[str, RealCaseFacts],
    registry: SyntheticRegistry,
    sink: ViolationSink,
    *,
    check_voxels: bool = True,
) -> None:
    """Refuse real cases whose files are synthetic (:meth:`SyntheticRegistry.identify`: the
    synthetic mark in the header, known even with no manifest given; a registered file's hash;
    for val/test also the decoded voxels)."""
    for fact in real.values():
        evaluation = fact.side in EVAL_SIDES
        violation = SyntheticInEvaluation if evaluation else SyntheticAsReal
        files = list(zip(fact.case.images, fact.image_sha256, strict=True))
        if fact.case.mask is not None and fact.mask_sha256 is not None:
            files.append((fact.case.mask, fact.mask_sha256))
        for path, digest in files:
            sink.checked(violation.guard)
            match = registry.identify(path, file_sha256=digest, voxels=evaluation and check_voxels)
            if match is not None:
                sink(
                    violation(
                        f"real {fact.side} case {fact.case.case_id}: {path} {match.describe()}",
                        case_id=fact.case.case_id,
                        patient_id=fact.case.patient_id,
                        path=path,
                    )
                )
                break


class EvaluationContent:
    """The real val/test files by their decoded size (a gzip file's ISIZE trailer), with their
    voxel hashes made on first need: the content check of synthetic files that are not
    re-hashed (``verify_files`` off) decodes only files as large as an evaluation scan."""

    def __init__(self, real: dict[str, RealCaseFacts]) -> None:
        self.by_size: dict[int, list[tuple[str, str]]] = {}
        self._voxels: dict[str, str] = {}
        self.cleared: set[str] = set()  # synthetic files already found not to be evaluation scans
        for fact in real.values():
            if fact.side not in EVAL_SIDES:
                continue
            files = list(fact.case.images) + ([fact.case.mask] if fact.case.mask else [])
            for path in files:
                self.by_size.setdefault(_decoded_size(path), []).append(
                    (str(path), fact.case.case_id)
                )

    def __bool__(self) -> bool:
        return bool(self.by_size)

    def match(self, path: str) -> str | None:
        """The evaluation case whose file has the voxels of ``path``, if any."""
        candidates = self.by_size.get(_decoded_size(path))
        if not candidates:
            return None
        digest = voxel_sha256(load_image(path).array)
        for real, case in candidates:
            if real not in self._voxels:
                self._voxels[real] = voxel_sha256(load_image(real).array)
            if self._voxels[real] == digest:
                return case
        return None


def _decoded_size(path: str | Path) -> int:
    """Bytes of the decoded file: a gzip's ISIZE trailer (size mod 2^32), else the file size."""
    path = Path(path)
    if path.name.lower().endswith(".gz"):
        with open(path, "rb") as handle:
            handle.seek(-4, os.SEEK_END)
            return int.from_bytes(handle.read(4), "little")
    return path.stat().st_size


def not_an_evaluation_scan(
    row: Any, paths: list[str], evaluation: EvaluationContent, sink: ViolationSink
) -> bool:
    """False (and a violation) when a synthetic row's file holds a real val/test scan's voxels
    (a byte copy or a re-encoded one). A file that carries the synthetic mark is what the
    generator wrote (only its header is read); an unmarked one is decoded and compared with the
    evaluation scans of its size."""
    for path in paths:
        sink.checked("synthetic-in-evaluation")
        if path in evaluation.cleared:
            continue
        if read_mark(path) is not None:
            evaluation.cleared.add(path)
            continue
        case = evaluation.match(path)
        if case is None:
            evaluation.cleared.add(path)
        if case is not None:
            sink(
                EvaluationPatientLeak(
                    f"synthetic case {row.case_id}: {path} is the real evaluation scan of case "
                    f"{case}; refused for training",
                    case_id=row.case_id,
                    path=path,
                )
            )
            return False
    return True


@dataclass
class GuardReport:
    """What a check found: every violation and, per guard, how much it checked."""

    violations: list[GuardViolation]
    guards: dict[str, dict[str, int]]
    counts: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations

    def to_text(self) -> str:
        lines = [f"{len(self.violations)} guard violation(s)"]
        lines += [f"  [{v.guard}] {v.message}" for v in self.violations]
        lines.append(
            "guards: "
            + ", ".join(
                f"{g} {s['checked']} checked/{s['violations']} refused"
                for g, s in self.guards.items()
            )
        )
        return "\n".join(lines)


def case_id_key(case_id: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(case_id.casefold().encode("utf-8"), digest_size=8).digest(), "little"
    )


def check_duplicate_ids(
    keys: array, ids_file: Path, cases: Sequence[Case], sink: ViolationSink
) -> None:
    values = np.frombuffer(keys, dtype=np.uint64)
    sink.checked("duplicate-case", int(values.size) - len(cases))
    ordered = np.sort(values)
    repeated = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
    if not repeated:
        return
    names: dict[int, list[str]] = {}
    for case in cases:
        names.setdefault(case_id_key(case.case_id), []).append(f"{case.case_id} (real)")
    with open(ids_file, encoding="utf-8") as handle:
        for line in handle:
            key = case_id_key(line.rstrip("\n"))
            if key in repeated:
                names.setdefault(key, []).append(f"{line.rstrip()} (synthetic)")
    for key in sorted(repeated):
        group = names.get(key, [])
        if len(group) > 1 and any(n.endswith("(synthetic)") for n in group):
            sink(
                DuplicateCase(
                    f"duplicate case ids (ignoring case): {', '.join(group)}",
                    case_id=group[-1].split(" ")[0],
                )
            )


__all__ = [
    "GuardReport",
    "case_id_key",
    "check_duplicate_ids",
    "EVAL_SIDES",
    "GUARDS",
    "GeneratorChecker",
    "GeneratorFacts",
    "RealCaseFacts",
    "RowChecker",
    "ViolationSink",
    "check_real_against_registry",
    "index_real_cases",
    "load_splits_checked",
]
