"""Training crops: from prepared cases to the batches the loop trains on.

Every training item is a crop of ``roi_size`` voxels, so the cost of a step does not grow with
the size of the scan:

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

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import DataLoader, Dataset, Sampler

from synthlesion.masks.placement import PlacementError
from synthlesion.masks.shapes import procedural_mask
from synthlesion.training.config import DataConfig
from synthlesion.training.data import TrainingData
from synthlesion.training.errors import TrainingDataError
from synthlesion.training.preprocess import PreparedCase

STREAM_TRAIN = 1
STREAM_EVAL = 2
HEALTHY_NAME = "healthy tissue"


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
