"""What a synthetic case *is*, on the floor below everything that makes or consumes one.

* :mod:`~synthlesion.provenance.manifest` / :mod:`~synthlesion.provenance.manifest_writer`:
  the synthetic-case manifest (row schema and reader; the writer), hash-chained and locked.
* :mod:`~synthlesion.provenance.paths`: safe case ids and paths that cannot leave their folder.
* :mod:`~synthlesion.provenance.identity`: patient-id, voxel and model-folder hashes, the
  generator reference a row records.
* :mod:`~synthlesion.provenance.registry`: content hashes of every synthetic case.
* :mod:`~synthlesion.provenance.errors`: manifest, tampering and guard errors.

Nothing here imports from ``pipelines``, ``training``, ``dataset`` or ``evaluation``.
"""

from __future__ import annotations

from synthlesion.provenance.errors import (
    DuplicateCase,
    EvaluationPatientLeak,
    GeneratorLeak,
    GeneratorRecordError,
    GuardViolation,
    GuardViolations,
    ManifestError,
    ManifestTampered,
    PatientOnTwoSides,
    ProvenanceError,
    ReusedMask,
    SourceMismatch,
    SplitMismatch,
    SyntheticAsReal,
    SyntheticInEvaluation,
    UnsafePath,
)
from synthlesion.provenance.identity import (
    GeneratorRef,
    hash_patient_id,
    model_folder_sha256,
    voxel_sha256,
)
from synthlesion.provenance.manifest import ManifestReader, ManifestRow, read_manifest
from synthlesion.provenance.manifest_writer import ManifestWriter, reseal_manifest
from synthlesion.provenance.registry import SyntheticRegistry

__all__ = [
    "DuplicateCase",
    "EvaluationPatientLeak",
    "GeneratorLeak",
    "GeneratorRecordError",
    "GeneratorRef",
    "GuardViolation",
    "GuardViolations",
    "ManifestError",
    "ManifestReader",
    "ManifestRow",
    "ManifestTampered",
    "ManifestWriter",
    "PatientOnTwoSides",
    "ProvenanceError",
    "ReusedMask",
    "SourceMismatch",
    "SplitMismatch",
    "SyntheticAsReal",
    "SyntheticInEvaluation",
    "SyntheticRegistry",
    "UnsafePath",
    "hash_patient_id",
    "model_folder_sha256",
    "read_manifest",
    "reseal_manifest",
    "voxel_sha256",
]
