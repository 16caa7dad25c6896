"""Provenance hashes shared by training, sampling and the dataset builder.

* :func:`hash_patient_id`: how a generator's ``training_record.json`` lists the patients it was
  trained on (``patient_id_hashes``), so that the builder can refuse a generator that saw a
  val/test patient without the record holding plain patient ids.
* :func:`voxel_sha256`: a hash of decoded voxel values, equal for two files holding the same
  voxels however they were compressed or stored (int16 or float32, gzip level, header fields).
* :func:`model_folder_sha256`: one hash over every file of a model folder.
* :class:`GeneratorRef`: the generator facts a manifest row records.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from synthlesion.provenance.errors import GeneratorRecordError
from synthlesion.storage import canonical_json_hash, sha256_file

PATIENT_HASH_SCHEME = "synthlesion-patient-sha256/1"
_PATIENT_PREFIX = b"synthlesion-patient-id/1\x00"
TRAINING_RECORD_FILE = "training_record.json"  # read and written by provenance.record
VERSIONED_PACKAGES = ("synthlesion", "torch", "monai", "diffusers", "numpy", "nibabel")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_VOXEL_CHUNK = 1 << 22  # voxels hashed per step (32 MiB as float64)


def hash_patient_id(patient_id: str) -> str:
    """Hash a patient id for a generator's training record.

    The hash is ``sha256(b"synthlesion-patient-id/1\\x00" + key)`` in lowercase hex, where
    ``key`` is the id with surrounding white space removed, put in Unicode NFC form and
    case-folded (so ``"P01"`` and ``"p01 "`` give the same hash: a generator trained on either
    is refused for a split holding either), encoded as UTF-8. Training code writes
    ``{"patient_hash_scheme": PATIENT_HASH_SCHEME, "patient_id_hashes": [...]}`` into the model
    folder's ``training_record.json``.

    This is matching, not anonymisation: short ids can be recovered by trying candidates.

    Args:
        patient_id: The patient id exactly as in the splits file.

    Returns:
        64 lowercase hex characters.
    """
    if not isinstance(patient_id, str) or not patient_id.strip():
        raise ValueError(f"patient id must be a non-empty string, got {patient_id!r}")
    key = unicodedata.normalize("NFC", patient_id.strip()).casefold()
    return hashlib.sha256(_PATIENT_PREFIX + key.encode("utf-8")).hexdigest()


def voxel_sha256(array: np.ndarray) -> str:
    """sha256 of decoded voxel values, independent of file encoding and storage dtype.

    The array is hashed as its shape with size-1 axes dropped, then its values in C order as
    little-endian float64 (``-0.0`` counted as ``0.0``), in chunks so memory stays small. Two
    files whose arrays hold equal values (re-compressed, re-saved as float, a trailing axis
    added) hash alike; any changed voxel changes the hash.

    Args:
        array: Voxel values of any numeric or boolean dtype, any shape.
    """
    values = np.asarray(array)
    shape = [int(s) for s in values.shape if s != 1]
    digest = hashlib.sha256(("voxels/1:" + ",".join(map(str, shape)) + ";").encode("ascii"))
    flat = values.reshape(-1)
    for start in range(0, flat.size, _VOXEL_CHUNK):
        chunk = flat[start : start + _VOXEL_CHUNK].astype("<f8") + 0.0
        digest.update(chunk.tobytes())
    return digest.hexdigest()


def model_folder_sha256(folder: str | Path) -> str:
    """One sha256 over a model folder: ``canonical_json_hash({relative path: file sha256})``.

    Every regular file below ``folder`` counts (symbolic links followed), with ``/``
    separators; names starting with ``.`` (temporary files, ``.git``) at any depth are left
    out.

    Raises:
        GeneratorRecordError: ``folder`` is not a folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise GeneratorRecordError(f"{folder}: model folder does not exist", path=folder)
    files: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            files[path.relative_to(folder).as_posix()] = sha256_file(path)
    return canonical_json_hash(files)


@dataclass(frozen=True)
class GeneratorRef:
    """The generator that painted a synthetic case.

    Attributes:
        path: The model folder, relative to the manifest's dataset root or absolute. Unlike
            image paths it may lie outside the root: what the guards trust is its hashes.
        sha256: :func:`model_folder_sha256` of the folder.
        training_record_sha256: sha256 of its ``training_record.json`` file.
    """

    path: str
    sha256: str
    training_record_sha256: str

    @classmethod
    def from_folder(cls, folder: str | Path, *, record_as: str | None = None) -> GeneratorRef:
        """Hash a model folder; ``record_as`` is the path to record (default: as given)."""
        folder = Path(folder)
        record = folder / TRAINING_RECORD_FILE
        if not record.is_file():
            raise GeneratorRecordError(
                f"{folder}: no {TRAINING_RECORD_FILE}; a generator without a training record "
                "cannot prove it never saw an evaluation patient",
                path=folder,
            )
        return cls(record_as or str(folder), model_folder_sha256(folder), sha256_file(record))

    def to_dict(self) -> dict[str, str]:
        return {
            "path": self.path,
            "sha256": self.sha256,
            "training_record_sha256": self.training_record_sha256,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str) -> GeneratorRef:
        if not isinstance(data, dict) or set(data) != {"path", "sha256", "training_record_sha256"}:
            raise ValueError(f"{where}: generator must hold path, sha256, training_record_sha256")
        for key in ("sha256", "training_record_sha256"):
            if not is_sha256(data[key]):
                raise ValueError(f"{where}: generator.{key} is not a sha256 hex digest")
        if not isinstance(data["path"], str) or not data["path"]:
            raise ValueError(f"{where}: generator.path must be a non-empty string")
        return cls(data["path"], data["sha256"], data["training_record_sha256"])

    def folder(self, root: Path) -> Path:
        """The model folder, a relative path taken from ``root``."""
        path = Path(self.path)
        return path if path.is_absolute() else root / path


def is_sha256(value: Any) -> bool:
    """True for a 64-character lowercase hex string."""
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape a synthetic case (metadata only)."""
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def utc_now() -> str:
    """The current time as ISO 8601 UTC with seconds (``2025-01-31T12:00:00Z``)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


__all__ = [
    "GeneratorRef",
    "PATIENT_HASH_SCHEME",
    "TRAINING_RECORD_FILE",
    "hash_patient_id",
    "is_sha256",
    "model_folder_sha256",
    "package_versions",
    "utc_now",
    "voxel_sha256",
]
