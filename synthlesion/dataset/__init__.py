"""The dataset builder, its guards and synthetic-aware loaders (what a synthetic case *is*
lives one floor down, in :mod:`synthlesion.provenance`).

* :mod:`~synthlesion.dataset.builder`: :class:`DatasetBuilder` and the dataset folder it writes.
* :mod:`~synthlesion.dataset.guards`: the checks behind every refusal.
* :mod:`~synthlesion.dataset.export`: the nnU-Net / MONAI folder and evaluation lists.
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
from synthlesion.dataset.errors import BuildExistsError, DatasetError
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

__all__ = [
    "BuildConfig",
    "BuildExistsError",
    "BuildResult",
    "ConstantShare",
    "DatasetBuilder",
    "DatasetError",
    "EvaluationDataset",
    "GuardReport",
    "LinearShare",
    "ManifestSource",
    "OriginLossWeights",
    "SyntheticAwareDataset",
    "SyntheticShareSampler",
    "WorkerSeeder",
    "make_eval_loader",
    "make_train_loader",
    "parse_schedule",
    "read_build_record",
    "set_epoch",
]
