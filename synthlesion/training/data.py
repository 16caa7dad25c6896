"""The training data path: train-split cases -> cached, prepared arrays.

Only the TRAIN side of the locked splits file is trained on (:func:`load_training_data`
refuses an edited splits file and one that does not match the dataset). Scans are prepared
once (:mod:`synthlesion.training.preprocess`); :mod:`synthlesion.training.crops` draws the
training crops from them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from synthlesion.data.cases import Case, lesion_label_values
from synthlesion.data.intensity import IntensityNormaliser
from synthlesion.data.sources import load_cases, require_unique_case_ids
from synthlesion.data.splits import Splits, load_splits
from synthlesion.masks.lesions import MIN_LESION_VOXELS
from synthlesion.provenance.identity import PATIENT_HASH_SCHEME, hash_patient_id
from synthlesion.storage import canonical_json_hash, sha256_file
from synthlesion.training.config import DataConfig
from synthlesion.training.errors import TrainingDataError
from synthlesion.training.preprocess import PreparedCase, Preprocessing, prepare_cases

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingData:
    """Everything the loop needs from the data side.

    Attributes:
        train: Prepared train-split cases (real and synthetic whose patient is on train).
        evaluation: Prepared cases the validation crops come from (val split or train).
        evaluation_source: ``"val"`` or ``"train"``.
        preprocessing: The preprocessing settings (recorded with the model).
        label_names: Name of each lesion class, in class order.
        record: Facts for the training record (hashes, patients, counts).
        modality: The train cases' modality (``CT``, ``MRI``...).
        channel_names: Name of each image channel (``FLAIR``, ``T1``... from dataset.json).
    """

    train: list[PreparedCase]
    evaluation: list[PreparedCase]
    evaluation_source: str
    preprocessing: Preprocessing
    label_names: tuple[str, ...]
    record: dict[str, Any]
    modality: str = "unknown"
    channel_names: tuple[str, ...] = ()

    @property
    def lesion_classes(self) -> int:
        return len(self.preprocessing.lesion_labels)

    @property
    def image_channels(self) -> int:
        return self.preprocessing.channels


def dataset_hash(path: Path, cases: Sequence[Case]) -> tuple[str, str]:
    """sha256 of the dataset's manifest (``dataset.json`` / CSV / JSONL) and the file hashed.

    A folder without a manifest is hashed as the sorted list of its cases and file sizes.
    """
    path = Path(path)
    manifest = path / "dataset.json" if path.is_dir() else path
    if manifest.is_file():
        return sha256_file(manifest), str(manifest)
    listing = sorted(
        [c.case_id, str(c.image.name), c.image.stat().st_size, c.mask.name if c.mask else None]
        for c in cases
    )
    return canonical_json_hash(listing), f"{path} (case listing)"


def ensure_phantom(cfg: DataConfig, spatial_dims: int) -> None:
    """Write the phantom dataset and its locked splits where ``cfg`` points, if configured
    and missing (an existing dataset or splits file is never touched)."""
    if cfg.phantom is None:
        return
    from synthlesion.data.phantom import make_phantom_dataset
    from synthlesion.data.splits import save_splits, split_patients

    ph = cfg.phantom
    dataset = Path(cfg.dataset)
    folder = dataset.parent if dataset.suffix == ".json" else dataset
    if not dataset.exists():
        logger.info(
            "writing the %s %dD phantom (%d patients) to %s",
            ph.kind,
            spatial_dims,
            ph.n_patients,
            folder,
        )
        if ph.kind == "brain-mri-multi":
            from synthlesion.data.phantom_brain import make_brain_multiseq_dataset

            made = make_brain_multiseq_dataset(
                folder,
                n_patients=ph.n_patients,
                size=ph.size,
                seed=ph.seed,
                lesion_fraction=ph.lesion_fraction,
            )
        else:
            made = make_phantom_dataset(
                folder,
                kind=ph.kind,
                spatial_dims=spatial_dims,
                n_patients=ph.n_patients,
                size=ph.size,
                seed=ph.seed,
                lesion_fraction=ph.lesion_fraction,
                max_lesions=ph.max_lesions,
            )
        if made != dataset and not (dataset.is_dir() and made.parent == dataset):
            raise TrainingDataError(
                f"data.dataset {dataset} must be the phantom's dataset.json ({made}) or its folder"
            )
    if not Path(cfg.splits).exists():
        cases = load_cases(dataset, patient_pattern=cfg.patient_pattern)
        save_splits(split_patients(cases, seed=ph.split_seed), cfg.splits)
        logger.info("wrote locked splits %s", cfg.splits)


def load_training_data(
    cfg: DataConfig, *, spatial_dims: int, seed: int, eval_source: str = "auto"
) -> TrainingData:
    """Load, check and prepare the train split (and the cases validation crops come from).

    Raises:
        SplitError: the splits file is edited, or does not match the dataset.
        TrainingDataError: no usable train case, or no lesion in the train split.
        ImageReadError, GeometryError, LabelError: a bad scan or mask (naming the file).
    """
    cases = load_cases(cfg.dataset, patient_pattern=cfg.patient_pattern)
    require_unique_case_ids(cases, str(cfg.dataset))
    splits: Splits = load_splits(cfg.splits)
    if cfg.fold is not None:
        splits = splits.for_fold(cfg.fold)
    train = splits.select(cases, "train")
    leaks = [
        f"{c.case_id} (patient {c.patient_id}: {splits.side_of_patient(c.patient_id) or 'not in the splits'})"
        for c in cases
        if c.origin == "synthetic" and splits.side_of_patient(c.patient_id) != "train"
    ]
    if leaks:
        raise TrainingDataError(
            f"{cfg.dataset}: synthetic case(s) whose source patient is not on the train side of "
            f"{cfg.splits}: {', '.join(leaks[:5])}"
            + (f" (and {len(leaks) - 5} more)" if len(leaks) > 5 else "")
        )
    unlabelled = [c.case_id for c in train if c.mask is None]
    if unlabelled:
        logger.warning(
            "%d train case(s) have no mask and are not trained on: %s",
            len(unlabelled),
            ", ".join(unlabelled[:5]),
        )
    train = [c for c in train if c.mask is not None]
    if not train:
        raise TrainingDataError(
            f"{cfg.dataset}: the train side of {cfg.splits} holds no case with a mask"
        )
    if all(c.has_lesion is False for c in train):
        raise TrainingDataError(
            f"{cfg.dataset}: every one of the {len(train)} train case(s) of {cfg.splits} is "
            "declared without a lesion (has_lesion: false); a lesion generator needs lesions"
        )
    labels = train[0].labels
    lesion_labels = (
        tuple(cfg.lesion_labels) if cfg.lesion_labels is not None else lesion_label_values(labels)
    )
    organ_labels = (
        tuple(cfg.organ_labels)
        if cfg.organ_labels is not None
        else tuple(v for v in sorted(labels) if v != 0 and v not in lesion_labels)
    )
    missing = [v for v in (*lesion_labels, *organ_labels) if v not in labels]
    if missing:
        raise TrainingDataError(
            f"{cfg.dataset}: label value(s) {missing} are not declared labels "
            f"{dict(sorted(labels.items()))}"
        )
    modalities = sorted({c.modality for c in train})
    if len(modalities) > 1:
        raise TrainingDataError(
            f"{cfg.dataset}: train cases mix modalities {modalities}; train one model per modality"
        )
    modality = modalities[0]
    channel_names = train[0].modalities
    odd = [
        f"{c.case_id} ({c.channel_count} channel(s) {list(c.modalities)})"
        for c in train
        if c.channel_count != train[0].channel_count or c.modalities != channel_names
    ]
    if odd:
        raise TrainingDataError(
            f"{cfg.dataset}: train cases differ in their image channels; {train[0].case_id} has "
            f"{train[0].channel_count} {list(channel_names)}, but {', '.join(odd[:5])}"
        )
    windows = cfg.intensity.windows
    if windows and len(windows) != train[0].channel_count:
        raise TrainingDataError(
            f"data.intensity.windows gives {len(windows)} window(s) but the cases have "
            f"{train[0].channel_count} channel(s) {list(channel_names)}: one window per channel"
        )
    if cfg.slice_axis is not None and spatial_dims != 2:
        raise TrainingDataError(
            f"data.slice_axis {cfg.slice_axis} cuts 3D scans into 2D slices: it needs a 2D model "
            f"(model.spatial_dims 2), not {spatial_dims}D"
        )
    pre = Preprocessing(
        spatial_dims=spatial_dims,
        spacing=tuple(cfg.spacing) if cfg.spacing is not None else None,
        intensity=_normaliser(cfg, modality),
        lesion_labels=lesion_labels,
        organ_labels=organ_labels,
        healthy_margin=cfg.region_dilation + 1,
        tolerance_mm=cfg.tolerance_mm,
        channels=train[0].channel_count,
        modality=modality,
        slice_axis=cfg.slice_axis,
        region_masks=cfg.region_masks,
    )
    prepared = prepare_cases(train, pre, cache_dir=cfg.cache_dir, workers=cfg.preprocess_workers)
    n_lesions = sum(len(p.components) for p in prepared)
    if n_lesions == 0:
        raise TrainingDataError(
            f"{cfg.dataset}: no lesion (a connected component of label value(s) "
            f"{list(lesion_labels)} of at least {MIN_LESION_VOXELS} voxels; smaller ones are "
            f"specks) in any of the {len(prepared)} train case(s) of {cfg.splits}"
            + (f" after resampling to {list(cfg.spacing)} mm" if cfg.spacing else "")
            + "; a lesion generator needs lesions to learn from"
        )
    _warn_lesions_larger_than_roi(prepared, cfg)
    evaluation, source = prepared, "train"
    if eval_source in ("auto", "val"):
        val_cases = [
            c for c in splits.select(cases, "val") if c.mask is not None and c.origin == "real"
        ]
        val = (
            prepare_cases(val_cases, pre, cache_dir=cfg.cache_dir, workers=cfg.preprocess_workers)
            if val_cases
            else []
        )
        if any(p.has_lesion for p in val):
            evaluation, source = val, "val"
        elif eval_source == "val":
            raise TrainingDataError(
                f"{cfg.splits}: validation.source is 'val' but the val side "
                "holds no real case with a lesion"
            )
    manifest_hash, manifest_file = dataset_hash(cfg.dataset, cases)
    patients = sorted({c.patient_id for c in train})
    record = {
        "dataset": str(cfg.dataset),
        "dataset_manifest_file": manifest_file,
        "dataset_sha256": manifest_hash,
        "splits_file": str(cfg.splits),
        "splits_sha256": splits.sha256,
        "splits_file_sha256": sha256_file(cfg.splits),
        "splits_fold": cfg.fold,
        "train_cases": len(prepared),
        "train_lesions": n_lesions,
        "train_patients": len(patients),
        "patient_hash_scheme": PATIENT_HASH_SCHEME,
        "patient_id_hashes": sorted(hash_patient_id(p) for p in patients),
        "synthetic_train_cases": sum(1 for c in train if c.origin == "synthetic"),
        "evaluation_source": source,
        "evaluation_patient_id_hashes": sorted({hash_patient_id(p.patient_id) for p in evaluation}),
    }
    names = tuple(labels.get(v, f"label {v}") for v in lesion_labels)
    logger.info(
        "training data: %d train cases (%d patients, %d lesions), validation from %s",
        len(prepared),
        len(patients),
        n_lesions,
        source,
    )
    return TrainingData(
        prepared, evaluation, source, pre, names, record, modality, tuple(channel_names)
    )


def _warn_lesions_larger_than_roi(prepared: Sequence[PreparedCase], cfg: DataConfig) -> None:
    """Warn when real lesions with their region margin do not fit the crop: the model never
    sees them whole, and sampling cannot paint lesions that large."""
    roi = list(cfg.roi_size)
    if cfg.slice_axis is not None:
        roi.insert(cfg.slice_axis, 10**9)  # 2D cuts: the slice axis does not count
    margin = 2 * cfg.region_dilation + 2
    extents = [c.extent for p in prepared for c in p.components]
    big = [e for e in extents if any(x + margin > r for x, r in zip(e, roi, strict=True))]
    if big:
        worst = max(big, key=lambda e: int(np.prod(e)))
        logger.warning(
            "%d of %d train lesions with their %d-voxel margin exceed data.roi_size %s "
            "(largest %s voxels): the model never sees them whole and sampling cannot paint "
            "lesions that large; a larger roi_size or a coarser spacing fits them",
            len(big),
            len(extents),
            margin,
            list(cfg.roi_size),
            list(worst),
        )


def _normaliser(cfg: DataConfig, modality: str) -> IntensityNormaliser:
    mode = cfg.intensity.mode
    if mode == "auto":
        mode = "window" if modality.upper() == "CT" else "percentile"
    return IntensityNormaliser(
        mode,
        tuple(cfg.intensity.window),
        tuple(cfg.intensity.percentiles),
        windows=tuple(tuple(w) for w in cfg.intensity.windows),
    )
