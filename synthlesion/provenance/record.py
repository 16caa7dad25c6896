"""The training record: what a generator was trained on, in one file beside its weights.

``training_record.json`` (:data:`TRAINING_RECORD_FILE`) holds the dataset and splits hashes,
the salted hashes of every training patient (:func:`~synthlesion.provenance.identity.
hash_patient_id`) and the data settings sampling must reproduce (``data``: intensity, ROI,
channels, labels...). Training *fills* a record; this module is its one reader and one writer,
and :meth:`TrainingRecord.trained_on_any` is the one answer to "was this generator trained on
an evaluation patient?" asked by sampling and by the dataset builder alike.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synthlesion.provenance.errors import GeneratorRecordError
from synthlesion.provenance.identity import (
    PATIENT_HASH_SCHEME,
    TRAINING_RECORD_FILE,
    GeneratorRef,
    hash_patient_id,
    is_sha256,
    model_folder_sha256,
)
from synthlesion.storage import atomic_write_json, sha256_file

RECORD_FORMAT = "synthlesion-training-record/1"


@dataclass(frozen=True, eq=False)
class TrainingRecord:
    """A generator's training record.

    Attributes:
        content: The whole JSON object (``format``, ``patient_id_hashes``, ``data``, ...).
        path: The file it was read from, if any.
    """

    content: Mapping[str, Any] = field(default_factory=dict)
    path: Path | None = None

    # -- reading ---------------------------------------------------------------------------
    @classmethod
    def read(cls, folder: str | Path) -> TrainingRecord:
        """Read ``folder/training_record.json`` (or the file itself when given).

        Raises:
            GeneratorRecordError: missing, unreadable, not a JSON object (naming the file).
        """
        path = Path(folder)
        if path.is_dir() or path.name != TRAINING_RECORD_FILE:
            path = path / TRAINING_RECORD_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise GeneratorRecordError(
                f"{path.parent}: no {TRAINING_RECORD_FILE}; only generators whose training "
                "patients are recorded (models trained by synthlesion) can make synthetic cases",
                path=path,
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise GeneratorRecordError(
                f"{path}: unreadable training record ({exc})", path=path
            ) from None
        try:
            content = json.loads(text, parse_constant=_refuse_constant)
        except (json.JSONDecodeError, ValueError) as exc:
            raise GeneratorRecordError(
                f"{path}: unreadable training record ({exc})", path=path
            ) from None
        if not isinstance(content, dict):
            raise GeneratorRecordError(
                f"{path}: a training record must be a JSON object", path=path
            )
        return cls(content, path)

    @property
    def data(self) -> dict[str, Any]:
        """The data settings sampling reproduces (``{}`` when the record has none)."""
        data = self.content.get("data", {})
        return data if isinstance(data, dict) else {}

    @property
    def patient_id_hashes(self) -> frozenset[str]:
        """The hashed training patients.

        Raises:
            GeneratorRecordError: another hash scheme, or no list of sha256 digests.
        """
        where = self.path or TRAINING_RECORD_FILE
        scheme = self.content.get("patient_hash_scheme", PATIENT_HASH_SCHEME)
        if scheme != PATIENT_HASH_SCHEME:
            raise GeneratorRecordError(
                f"{where}: patient_hash_scheme {scheme!r} is not {PATIENT_HASH_SCHEME!r}",
                path=self.path,
            )
        hashes = self.content.get("patient_id_hashes")
        if not isinstance(hashes, list) or not all(is_sha256(h) for h in hashes):
            raise GeneratorRecordError(
                f"{where}: no 'patient_id_hashes' list of sha256 digests (hash_patient_id of "
                "each training patient); cannot prove the generator never saw an evaluation "
                "patient",
                path=self.path,
            )
        return frozenset(hashes)

    def trained_on_any(self, patients: Iterable[str]) -> list[str]:
        """The given patients the generator was trained on (sorted; empty when none).

        Raises:
            GeneratorRecordError: the record does not list its training patients.
        """
        hashes = self.patient_id_hashes
        return sorted({p for p in patients if hash_patient_id(p) in hashes})

    # -- writing ---------------------------------------------------------------------------
    def write(self, folder: str | Path) -> Path:
        """Write ``folder/training_record.json`` atomically (strict JSON: no NaN)."""
        path = Path(folder) / TRAINING_RECORD_FILE
        atomic_write_json(path, dict(self.content))
        return path


def verify_generator(
    ref: GeneratorRef, root: Path, *, verify_folder: bool = True
) -> TrainingRecord:
    """Check a generator against what a manifest recorded of it; return its training record.

    Args:
        ref: The generator as recorded in the manifest.
        root: The manifest's dataset root (a relative ``ref.path`` starts there).
        verify_folder: Also recompute the model folder's hash (reads the weights).

    Raises:
        GeneratorRecordError: folder or record missing, a hash differs from the manifest, or
            the record does not list its training patients.
    """
    folder = ref.folder(root)
    path = folder / TRAINING_RECORD_FILE
    if not path.is_file():
        raise GeneratorRecordError(
            f"generator {ref.path}: {path} not found; the training record is needed to prove "
            "the generator never trained on an evaluation patient",
            path=path,
        )
    if sha256_file(path) != ref.training_record_sha256:
        raise GeneratorRecordError(
            f"generator {ref.path}: {path} differs from the training record the manifest "
            "recorded (sha256 changed since sampling)",
            path=path,
        )
    if verify_folder and model_folder_sha256(folder) != ref.sha256:
        raise GeneratorRecordError(
            f"generator {ref.path}: the model folder's content differs from the manifest's "
            "model folder hash (weights or config changed since sampling)",
            path=folder,
        )
    record = TrainingRecord.read(path)
    record.patient_id_hashes  # noqa: B018 - validated here, once
    return record


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


__all__ = ["RECORD_FORMAT", "TRAINING_RECORD_FILE", "TrainingRecord", "verify_generator"]
