"""Typed errors of synthetic provenance: manifests, tampering and the guards.

Two families:

* :class:`ProvenanceError` (and :class:`ManifestError`): the input is malformed or the request
  cannot be carried out (unreadable manifest, missing lock file, an output path outside its
  folder).
* :class:`GuardViolation` and its subclasses: the input is well formed but would let synthetic
  data or evaluation patients leak where they must not be. Each names the case, the patient,
  the manifest row or the file concerned. :class:`GuardViolations` carries several at once (the
  ``report`` mode lists every violation instead of stopping at the first).

Every class takes one positional message, so an error raised inside a DataLoader worker is
re-raised in the main process with its type intact.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from synthlesion.errors import SynthlesionError


class ProvenanceError(SynthlesionError):
    """A provenance request (manifest, record, synthetic mark, output path) that cannot be
    carried out."""


class ManifestError(ProvenanceError):
    """A manifest or its lock file is missing, unreadable or not in the manifest format."""


class GuardViolation(SynthlesionError):
    """Base class of the guards' refusals.

    Attributes:
        guard: Short name of the guard that refused (``"synthetic-in-evaluation"``...).
        case_id: The case concerned, if any.
        patient_id: The patient concerned, if any.
        path: The file (manifest, image, model folder) concerned, if any.
        row: The manifest row number (1-based, header excluded), if any.
    """

    guard: ClassVar[str] = "guard"

    def __init__(
        self,
        message: str,
        *,
        case_id: str | None = None,
        patient_id: str | None = None,
        path: str | Path | None = None,
        row: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.case_id = case_id
        self.patient_id = patient_id
        self.path = Path(path) if path is not None else None
        self.row = row

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready description (guard, message and the named case/patient/path/row)."""
        return {
            "guard": self.guard,
            "message": self.message,
            "case_id": self.case_id,
            "patient_id": self.patient_id,
            "path": str(self.path) if self.path is not None else None,
            "row": self.row,
        }


class SyntheticInEvaluation(GuardViolation):
    """A synthetic item (by tag, file hash or voxel hash) reached an evaluation list or loader."""

    guard = "synthetic-in-evaluation"


class SyntheticAsReal(GuardViolation):
    """A file listed as a real training case is byte- or voxel-identical to a synthetic case."""

    guard = "synthetic-as-real"


class EvaluationPatientLeak(GuardViolation):
    """A synthetic case painted into a scan of a val/test patient was asked for training."""

    guard = "evaluation-patient"


class GeneratorLeak(GuardViolation):
    """A generator's training record lists a val/test patient."""

    guard = "generator-trained-on-evaluation"


class GeneratorRecordError(GuardViolation):
    """A generator's model folder or training record is missing or differs from the manifest."""

    guard = "generator-record"


class ManifestTampered(GuardViolation):
    """A manifest row, its hashes, its order or its lock was changed after it was written."""

    guard = "manifest-integrity"


class UnsafePath(GuardViolation):
    """A manifest path is absolute, holds ``..``, or resolves outside the dataset root; or a
    case id cannot safely be used as a file name."""

    guard = "unsafe-path"


class PatientOnTwoSides(GuardViolation):
    """One patient (or one scan under two ids) on two sides of the split."""

    guard = "patient-on-two-sides"


class SplitMismatch(GuardViolation):
    """The cases and the locked splits file disagree (unknown case, other patient, other side)."""

    guard = "split-mismatch"


class ReusedMask(GuardViolation):
    """A real mask of an evaluation patient was transplanted into training data, or one real
    mask was reused for synthetic cases of training and of evaluation patients."""

    guard = "reused-mask"


class SourceMismatch(GuardViolation):
    """A manifest row's source case, patient or source hashes disagree with the real data."""

    guard = "source-mismatch"


class DuplicateCase(GuardViolation):
    """Two cases (real or synthetic) share an id, compared ignoring case."""

    guard = "duplicate-case"


class GuardViolations(GuardViolation):
    """Several violations found in ``report`` mode.

    Attributes:
        violations: Every violation, in the order found.
    """

    guard = "several"

    def __init__(self, message: str, *, violations: Sequence[GuardViolation] = ()) -> None:
        super().__init__(message)
        self.violations = list(violations)

    @classmethod
    def of(cls, violations: Sequence[GuardViolation]) -> GuardViolations:
        """Build one error whose message lists every violation, one per line."""
        lines = [f"{len(violations)} guard violation(s):"]
        lines += [f"  [{v.guard}] {v.message}" for v in violations]
        return cls("\n".join(lines), violations=violations)


__all__ = [
    "ProvenanceError",
    "DuplicateCase",
    "EvaluationPatientLeak",
    "GeneratorLeak",
    "GeneratorRecordError",
    "GuardViolation",
    "GuardViolations",
    "ManifestError",
    "ManifestTampered",
    "PatientOnTwoSides",
    "ReusedMask",
    "SourceMismatch",
    "SplitMismatch",
    "SyntheticAsReal",
    "SyntheticInEvaluation",
    "UnsafePath",
]
