"""The final model folder and its training record.

``training_record.json`` proves what a model was trained on: the dataset manifest hash, the
splits file hash, and the sha256 of every training patient id (so a later step can show the
generator never saw an evaluation patient), plus steps, seed, package versions, the data
settings sampling must reproduce (key ``data``) and the resolved training config.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from synthlesion.config import config_to_dict, save_config
from synthlesion.provenance.record import RECORD_FORMAT
from synthlesion.training.config import TrainConfig
from synthlesion.training.data import TrainingData
from synthlesion.training.ema import EMA
from synthlesion.training.preprocess import intensity_record

TRAIN_CONFIG_FILE = "train_config.yaml"
PACKAGES = (
    "synthlesion",
    "torch",
    "diffusers",
    "accelerate",
    "monai",
    "numpy",
    "scipy",
    "safetensors",
    "nibabel",
    "transformers",
)


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def data_record(config: TrainConfig, data: TrainingData) -> dict[str, Any]:
    """The data settings sampling must reproduce (the ``data`` key of the record)."""
    pre = data.preprocessing
    spacing = (
        list(pre.spacing)
        if pre.spacing is not None
        else [float(v) for v in np.median([p.spacing for p in data.train], axis=0)]
    )
    return {
        "intensity": intensity_record(pre.intensity),
        "spacing": spacing,
        "spacing_resampled": pre.spacing is not None,
        "orientation": "RAS",
        "roi_size": list(config.data.roi_size),
        "modality": data.modality,
        "image_channels": data.image_channels,
        "channel_names": list(data.channel_names),
        "slice_axis": pre.slice_axis,
        "lesion_label_values": list(pre.lesion_labels),
        "lesion_class_names": list(data.label_names),
        "organ_label_values": list(pre.organ_labels),
        "region_dilation": config.data.region_dilation,
        "attributes": list(config.data.attributes),
        "healthy_fraction": config.data.healthy_fraction,
    }


def training_record(
    config: TrainConfig,
    data: TrainingData,
    *,
    steps: int,
    world_size: int,
    weights: str,
    resumed_from: list[str],
    final_metrics: Mapping[str, float],
) -> dict[str, Any]:
    """The JSON written as ``training_record.json`` beside the final weights."""
    return {
        "format": RECORD_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "steps": steps,
        "seed": config.seed,
        "weights": weights,
        **data.record,
        "data": data_record(config, data),
        "world_size": world_size,
        "batch_size_per_process": config.batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "effective_batch_size": config.batch_size * config.gradient_accumulation_steps * world_size,
        "mixed_precision": config.mixed_precision,
        "resumed_from": resumed_from,
        "final_metrics": dict(final_metrics),
        "versions": package_versions(),
        "config": config_to_dict(config),
    }


def export_model(
    model: Any, ema: EMA | None, path: Path, record: Mapping[str, Any], config: TrainConfig
) -> Path:
    """Write the final model folder (EMA weights when on), its record and the training config.

    The folder is loadable with ``LesionDiffusionModel.from_pretrained``.
    """
    context = ema.applied() if ema is not None else contextlib.nullcontext()
    with context:
        model.save_pretrained(path, training_record=dict(record))
    save_config(config, Path(path) / TRAIN_CONFIG_FILE)
    return Path(path)
