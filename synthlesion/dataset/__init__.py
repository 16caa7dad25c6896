"""The dataset builder, its guards, the synthetic-case manifest and synthetic-aware loaders.

* :mod:`~synthlesion.dataset.manifest`: the synthetic-case manifest (row schema, writer, reader).
* :mod:`~synthlesion.dataset.provenance`: patient-id, voxel and model-folder hashes.
* :mod:`~synthlesion.dataset.builder`: :class:`DatasetBuilder` and the dataset folder it writes.
* :mod:`~synthlesion.dataset.guards`: the checks behind every refusal.
* :mod:`~synthlesion.dataset.registry`: content hashes of every synthetic case.
* :mod:`~synthlesion.dataset.loader`: training and evaluation datasets and loaders.
"""

from __future__ import annotations

from synthlesion.dataset.builder import (
    BuildConfig,
    BuildResult,
    DatasetBuilder,
    GuardReport,
    ManifestSource,
    read_build_record,
)
from synthlesion.dataset.errors import (
    BuildExistsError,
    DatasetError,
    DuplicateCase,
    EvaluationPatientLeak,
    GeneratorLeak,
    GeneratorRecordError,
    GuardViolation,
    GuardViolations,
    ManifestError,
    ManifestTampered,
    PatientOnTwoSides,
    ReusedMask,
    SourceMismatch,
    SplitMismatch,
    SyntheticAsReal,
    SyntheticInEvaluation,
    UnsafePath,
)
from synthlesion.dataset.loader import (
    ConstantShare,
    EvaluationDataset,
    LinearShare,
    OriginLossWeights,
    SyntheticAwareDataset,
    SyntheticShareSampler,
    WorkerSeeder,
    make_eval_loader,
    make_train_loader,
    parse_schedule,
    set_epoch,
)
from synthlesion.dataset.manifest import (
    ManifestReader,
    ManifestRow,
    ManifestWriter,
    read_manifest,
    reseal_manifest,
)
from synthlesion.dataset.provenance import (
    GeneratorRef,
    hash_patient_id,
    model_folder_sha256,
    voxel_sha256,
)
from synthlesion.dataset.registry import SyntheticRegistry

__all__ = [
    "BuildConfig",
    "BuildExistsError",
    "BuildResult",
    "ConstantShare",
    "DatasetBuilder",
    "DatasetError",
    "DuplicateCase",
    "EvaluationDataset",
    "EvaluationPatientLeak",
    "GeneratorLeak",
    "GeneratorRecordError",
    "GeneratorRef",
    "GuardReport",
    "GuardViolation",
    "GuardViolations",
    "LinearShare",
    "ManifestError",
    "ManifestReader",
    "ManifestRow",
    "ManifestSource",
    "ManifestTampered",
    "ManifestWriter",
    "OriginLossWeights",
    "PatientOnTwoSides",
    "ReusedMask",
    "SourceMismatch",
    "SplitMismatch",
    "SyntheticAsReal",
    "SyntheticAwareDataset",
    "SyntheticInEvaluation",
    "SyntheticRegistry",
    "SyntheticShareSampler",
    "UnsafePath",
    "WorkerSeeder",
    "hash_patient_id",
    "make_eval_loader",
    "make_train_loader",
    "model_folder_sha256",
    "parse_schedule",
    "read_build_record",
    "read_manifest",
    "reseal_manifest",
    "set_epoch",
    "voxel_sha256",
]
