"""The training data path: train-split cases -> cached arrays -> crops around lesions.

Only the TRAIN side of the locked splits file is trained on (:func:`load_training_data`
refuses an edited splits file and one that does not match the dataset). Scans are prepared
once (:mod:`synthlesion.training.preprocess`) and every training item is a crop of
``roi_size`` voxels, so the cost of a step does not grow with the size of the scan:

* lesion crops: centred (with jitter) on a connected lesion; region = the lesions in the crop
  dilated by ``region_dilation``; lesion = one channel per lesion class;
* healthy crops (a ``healthy_fraction`` share): centred on healthy tissue far from any
  lesion; region = a random blob inside the placement region (organ labels, else the scan's
  foreground); lesion channels all zero ("fill with healthy tissue", the self-supervised
  route).

Crops carry every image channel (MRI sequences, CT phases): ``image`` is ``(C, *roi)``. A 2D
model can learn from 3D scans: with ``data.slice_axis`` the crops are 2D cuts along that RAS
axis (through a lesion, or through healthy tissue), as 2D segmentation pipelines do.

Item ``index`` of ``epoch`` is drawn with ``numpy.random.default_rng([seed, stream, epoch,
index])``: the same seed gives the same crops whatever the number of DataLoader workers, two
workers never draw the same crops, and resuming at ``(epoch, batch)`` needs no replay.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import DataLoader, Dataset, Sampler

from synthlesion.data.cases import Case, lesion_label_values
from synthlesion.data.intensity import IntensityNormaliser
from synthlesion.data.sources import load_cases, require_unique_case_ids
from synthlesion.data.splits import Splits, load_splits
from synthlesion.masks.placement import PlacementError
from synthlesion.masks.shapes import procedural_mask
from synthlesion.provenance.identity import PATIENT_HASH_SCHEME, hash_patient_id
from synthlesion.storage import canonical_json_hash, sha256_file
from synthlesion.training.config import DataConfig
from synthlesion.training.errors import TrainingDataError
from synthlesion.training.preprocess import PreparedCase, Preprocessing, prepare_cases

logger = logging.getLogger(__name__)

STREAM_TRAIN = 1
STREAM_EVAL = 2
HEALTHY_NAME = "healthy tissue"


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
            f"{cfg.dataset}: no lesion voxel (label value(s) {list(lesion_labels)}) in any of the "
            f"{len(prepared)} train case(s) of {cfg.splits}"
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


# --- crops ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CropSpec:
    """How one crop is drawn (see :class:`~synthlesion.training.config.DataConfig`)."""

    roi_size: tuple[int, ...]
    lesion_labels: tuple[int, ...]
    organ_labels: tuple[int, ...]
    healthy_fraction: float
    region_dilation: int
    center_jitter: float
    blob_volume_mm3: tuple[float, float] | None
    class_conditioning: bool
    healthy_class: int
    attributes: tuple[str, ...]
    prompt: str | None
    label_names: tuple[str, ...]
    emit_is_synthetic: bool = False
    slice_axis: int | None = None


def crop_spec(cfg: DataConfig, data: TrainingData, num_class_embeds: int | None) -> CropSpec:
    k = data.lesion_classes
    return CropSpec(
        roi_size=tuple(cfg.roi_size),
        lesion_labels=data.preprocessing.lesion_labels,
        organ_labels=data.preprocessing.organ_labels,
        healthy_fraction=cfg.healthy_fraction,
        region_dilation=cfg.region_dilation,
        center_jitter=cfg.center_jitter,
        blob_volume_mm3=tuple(cfg.blob_volume_mm3) if cfg.blob_volume_mm3 else None,
        class_conditioning=cfg.class_conditioning,
        healthy_class=k if (num_class_embeds or 0) > k else 0,
        attributes=tuple(cfg.attributes),
        prompt=cfg.prompt,
        label_names=data.label_names,
        emit_is_synthetic=any(p.origin == "synthetic" for p in data.train),
        slice_axis=data.preprocessing.slice_axis,
    )


def _ball(radius: int, dims: int) -> np.ndarray:
    axes = np.meshgrid(*[np.arange(-radius, radius + 1)] * dims, indexing="ij")
    return sum(a**2 for a in axes) <= radius**2


def _window(centre: Sequence[int], shape: Sequence[int], roi: Sequence[int]) -> list[int]:
    """Start of a crop holding ``centre``: clamped inside the scan where the scan is larger."""
    return [
        int(min(max(c - r // 2, 0), s - r)) if s >= r else int(c - r // 2)
        for c, s, r in zip(centre, shape, roi, strict=True)
    ]


def _extract(
    array: np.ndarray, start: Sequence[int], roi: Sequence[int], fill: float
) -> np.ndarray:
    """The crop ``[start, start + roi)`` of the last ``len(roi)`` axes (leading channel axes
    kept), padded with ``fill`` outside the array."""
    lead = array.shape[: array.ndim - len(roi)]
    out = np.full((*lead, *roi), fill, dtype=array.dtype)
    src, dst = [slice(None)] * len(lead), [slice(None)] * len(lead)
    for b, r, s in zip(start, roi, array.shape[len(lead) :], strict=True):
        lo, hi = max(b, 0), min(b + r, s)
        src.append(slice(lo, max(lo, hi)))
        dst.append(slice(lo - b, lo - b + max(0, hi - lo)))
    out[tuple(dst)] = array[tuple(src)]
    return out


class CropMaker:
    """Draws crops from prepared cases; every random choice comes from the ``rng`` given."""

    def __init__(self, cases: Sequence[PreparedCase], spec: CropSpec) -> None:
        self.cases = list(cases)
        self.spec = spec
        self.lesion_cases = [i for i, c in enumerate(self.cases) if c.components]
        self.healthy_cases = [i for i, c in enumerate(self.cases) if len(c.healthy_centres)]
        volumes = [comp.voxels * math.prod(c.spacing) for c in self.cases for comp in c.components]
        self.lesion_volumes = np.asarray(volumes or [1.0], dtype=float)
        if spec.slice_axis is not None:  # 2D blobs: the area of a ball's central section
            radius = (3 * self.lesion_volumes / (4 * math.pi)) ** (1 / 3)
            self.lesion_volumes = math.pi * radius**2
        self.dilation = (
            _ball(spec.region_dilation, len(spec.roi_size)) if spec.region_dilation > 0 else None
        )
        axis = spec.slice_axis
        # the crop in the prepared scan's grid: a 2D cut is a 3D crop one voxel thick
        self.grid_roi = (
            tuple(spec.roi_size)
            if axis is None
            else (*spec.roi_size[:axis], 1, *spec.roi_size[axis:])
        )

    def _cut(
        self, case: PreparedCase, centre: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
        """Image ``(C, *roi)``, labels and tissue ``roi`` around ``centre`` (a 2D cut along
        the slice axis when set), and the crop's start in the scan's grid."""
        start = _window(centre, case.labels.shape, self.grid_roi)
        image = _extract(case.image, start, self.grid_roi, -1.0)
        labels = _extract(case.labels, start, self.grid_roi, 0)
        tissue = _extract(case.tissue, start, self.grid_roi, False)
        axis = self.spec.slice_axis
        if axis is not None:
            plane = self._plane()
            image, labels, tissue = image[(slice(None), *plane)], labels[plane], tissue[plane]
        return image, labels, tissue, start

    def _plane(self) -> tuple[Any, ...]:
        axis = self.spec.slice_axis
        return tuple(0 if a == axis else slice(None) for a in range(3))

    def crop_spacing(self, case: PreparedCase) -> tuple[float, ...]:
        """Voxel size (mm) of the crops drawn from ``case`` (in-plane only for 2D cuts)."""
        axis = self.spec.slice_axis
        if axis is None:
            return case.spacing
        return tuple(s for a, s in enumerate(case.spacing) if a != axis)

    def draw(self, rng: np.random.Generator, healthy: bool | None = None) -> dict[str, Any]:
        """One crop dict (see the module docstring), as torch tensors."""
        if healthy is None:
            healthy = bool(rng.random() < self.spec.healthy_fraction)
        if healthy and not self.healthy_cases:
            healthy = False
        if not healthy and not self.lesion_cases:
            raise TrainingDataError("no case with a lesion to crop around")
        if healthy:
            return self._healthy(rng)
        return self._lesion(rng)

    # -- lesion crops
    def _lesion(self, rng: np.random.Generator) -> dict[str, Any]:
        spec = self.spec
        case = self.cases[self.lesion_cases[int(rng.integers(len(self.lesion_cases)))]]
        comp = case.components[int(rng.integers(len(case.components)))]
        centre = []
        for axis, (c, e, r) in enumerate(zip(comp.centre, comp.extent, self.grid_roi, strict=True)):
            if axis == spec.slice_axis:  # a slice through the lesion's middle half
                half = e // 4
                centre.append(c + (int(rng.integers(-half, half + 1)) if half else 0))
                continue
            room = max(0, (r - e) // 2 - spec.region_dilation - 1)
            jitter = min(room, int(spec.center_jitter * r))
            centre.append(c + int(rng.integers(-jitter, jitter + 1)) if jitter else c)
        image, labels, _, _ = self._cut(case, centre)
        lesion = np.stack([labels == v for v in spec.lesion_labels]).astype(np.float32)
        any_lesion = lesion.max(axis=0) > 0
        region = (
            ndimage.binary_dilation(any_lesion, self.dilation)
            if self.dilation is not None
            else any_lesion
        )
        return self._finish(case, image, region, lesion, comp.class_index)

    # -- healthy crops
    def _healthy(self, rng: np.random.Generator) -> dict[str, Any]:
        spec, roi = self.spec, self.spec.roi_size
        for attempt in range(6):
            case = self.cases[self.healthy_cases[int(rng.integers(len(self.healthy_cases)))]]
            centre = case.healthy_centres[int(rng.integers(len(case.healthy_centres)))]
            image, labels, tissue, start = self._cut(case, centre)
            local = [c - s for a, (c, s) in enumerate(zip(centre, start, strict=True))
                     if a != spec.slice_axis]  # fmt: skip
            blob = self._blob(rng, self.crop_spacing(case), local)
            lesion_any = np.isin(labels, spec.lesion_labels)
            if lesion_any.any() and self.dilation is not None:
                lesion_any = ndimage.binary_dilation(lesion_any, self.dilation)
            region = blob & tissue & ~lesion_any
            if region.sum() >= 0.5 * blob.sum() or (attempt == 5 and region.any()):
                break
        if not region.any():  # no healthy tissue in reach: never a blob outside the region
            return self._lesion(rng) if self.lesion_cases else self._finish(
                case, image, region, np.zeros((len(spec.lesion_labels), *roi), np.float32),
                spec.healthy_class,
            )  # fmt: skip
        lesion = np.zeros((len(spec.lesion_labels), *roi), np.float32)
        return self._finish(case, image, region, lesion, spec.healthy_class)

    def _blob(
        self, rng: np.random.Generator, spacing: Sequence[float], centre: Sequence[int]
    ) -> np.ndarray:
        spec = self.spec
        if spec.blob_volume_mm3 is not None:
            low, high = spec.blob_volume_mm3
            volume = float(np.exp(rng.uniform(np.log(low), np.log(high))))
        else:
            volume = float(self.lesion_volumes[int(rng.integers(len(self.lesion_volumes)))])
        try:
            patch = procedural_mask(rng, spacing, volume)
        except PlacementError:
            patch = np.ones((1,) * len(spacing), bool)
        out = np.zeros(spec.roi_size, bool)
        dst, src = [], []
        for c, p, r in zip(centre, patch.shape, spec.roi_size, strict=True):
            lo = int(c) - p // 2
            a, b = max(lo, 0), min(lo + p, r)
            dst.append(slice(a, max(a, b)))
            src.append(slice(a - lo, a - lo + max(0, b - a)))
        out[tuple(dst)] = patch[tuple(src)]
        return out

    def _finish(
        self,
        case: PreparedCase,
        image: np.ndarray,
        region: np.ndarray,
        lesion: np.ndarray,
        class_index: int,
    ) -> dict[str, Any]:
        spec = self.spec
        item: dict[str, Any] = {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "region": torch.from_numpy(region[None].astype(np.float32)),
            "lesion": torch.from_numpy(lesion),
            "case_id": case.case_id,
        }
        if spec.class_conditioning:
            item["class_labels"] = torch.tensor(class_index, dtype=torch.int64)
        if spec.attributes:
            inside = lesion.max(axis=0) > 0
            mask = inside if inside.any() else region
            values = {  # the mean intensity is the first channel's
                "volume_fraction": float(inside.mean()),
                "mean_intensity": float(image[0][mask].mean()) if mask.any() else 0.0,
            }
            item["attributes"] = torch.tensor(
                [values[a] for a in spec.attributes], dtype=torch.float32
            )
        if spec.prompt is not None:
            healthy = not lesion.any()
            name = HEALTHY_NAME if healthy else spec.label_names[class_index]
            item["prompt"] = spec.prompt.replace("{label}", name)
        if spec.emit_is_synthetic:
            item["is_synthetic"] = torch.tensor(case.origin == "synthetic")
        return item


class CropDataset(Dataset):
    """Map-style dataset indexed by ``(epoch, index)``; item = a crop drawn from a generator
    seeded by ``[seed, stream, epoch, index]`` (no state, so any worker may draw any item)."""

    def __init__(
        self, maker: CropMaker, seed: int, samples_per_epoch: int, stream: int = STREAM_TRAIN
    ) -> None:
        self.maker = maker
        self.seed = seed
        self.samples_per_epoch = samples_per_epoch
        self.stream = stream

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        rng = np.random.default_rng([self.seed, self.stream, int(epoch), int(index)])
        return self.maker.draw(rng)


@dataclass
class DataPosition:
    """Where the run is in the data: ``batch`` micro-batches into ``epoch``."""

    epoch: int = 0
    batch: int = 0

    def advance(self, batches_per_epoch: int) -> None:
        self.batch += 1
        if self.batch >= batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0


class CropBatchSampler(Sampler[list[tuple[int, int]]]):
    """Endless batches of ``(epoch, index)`` keys starting at a data position.

    With ``world_size`` processes, global batch ``b`` of an epoch covers indices
    ``[b * B * W, (b + 1) * B * W)`` and process ``rank`` takes its own ``B`` of them.
    """

    def __init__(
        self,
        samples_per_epoch: int,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        start: DataPosition | None = None,
    ) -> None:
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.batches_per_epoch = samples_per_epoch // (batch_size * world_size)
        if self.batches_per_epoch < 1:
            raise TrainingDataError(
                f"samples_per_epoch {samples_per_epoch} is smaller than one global batch "
                f"({batch_size} x {world_size} processes)"
            )
        self.start = start or DataPosition()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, batch = self.start.epoch, self.start.batch
        size, global_size = self.batch_size, self.batch_size * self.world_size
        while True:
            for b in range(batch, self.batches_per_epoch):
                first = b * global_size + self.rank * size
                yield [(epoch, first + j) for j in range(size)]
            epoch, batch = epoch + 1, 0


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed numpy's and Python's global generators per worker
    (from torch's per-worker seed), for any third-party code that uses them."""
    del worker_id
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)  # noqa: NPY002 - third-party transforms read the global generator
    random.seed(seed)


def make_loader(
    dataset: CropDataset,
    sampler: CropBatchSampler,
    *,
    num_workers: int,
    generator: torch.Generator,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over ``sampler``'s batches with seeded workers."""
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        worker_init_fn=seed_worker,
        generator=generator,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
    )


def fixed_crops(maker: CropMaker, seed: int, count: int, num_lesion_first: int) -> list[dict]:
    """``count`` reproducible crops (the first ``num_lesion_first`` around real lesions)."""
    items = []
    for i in range(count):
        rng = np.random.default_rng([seed, STREAM_EVAL, i])
        items.append(maker.draw(rng, healthy=False if i < num_lesion_first else None))
    return items


def collate(items: Sequence[dict]) -> dict[str, Any]:
    """Stack crop dicts into a batch (as the DataLoader would)."""
    return torch.utils.data.default_collate(list(items))
