"""Synthetic-aware loading for training code, and guarded loading for evaluation.

Training: :class:`SyntheticAwareDataset` yields MONAI-style dict items (``image`` ``(C, *S)``
float32, ``label`` ``(1, *S)`` int64, ``is_synthetic``, ``origin``, ``case_id``,
``source_patient``, ``generator``, ``sample_weight``), so every collated batch carries a
``(B,)`` bool ``is_synthetic``. :class:`SyntheticShareSampler` draws each epoch with a
synthetic share given by a schedule (:class:`ConstantShare`, :class:`LinearShare`) from its own
``torch.Generator``; :class:`WorkerSeeder` seeds each DataLoader worker from
``(base seed, epoch, worker id)`` so two workers never draw the same augmentations while a fixed
seed repeats a run. :class:`OriginLossWeights` weights a per-item loss by origin.

Evaluation: :class:`EvaluationDataset` refuses, with :class:`SyntheticInEvaluation`, any item
tagged synthetic and any file whose sha256 (at construction) or decoded voxels (on load) are
in the :class:`SyntheticRegistry`; :func:`make_eval_loader` accepts nothing else.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler, Subset, get_worker_info

from synthlesion.data.io import load_image
from synthlesion.dataset.errors import DatasetError
from synthlesion.dataset.export import REGISTRY_FILE, read_build_record
from synthlesion.provenance.errors import EvaluationPatientLeak, SyntheticInEvaluation
from synthlesion.provenance.registry import SyntheticRegistry
from synthlesion.storage import sha256_file

logger = logging.getLogger(__name__)

Item = dict[str, Any]
RandomTransform = Callable[[Item, np.random.Generator, torch.Generator], Item]


# -- schedules ---------------------------------------------------------------------------


class ShareSchedule(Protocol):
    """Synthetic share (0..1) of the samples drawn in an epoch."""

    def __call__(self, epoch: int) -> float: ...


@dataclass(frozen=True)
class ConstantShare:
    """The same synthetic share every epoch."""

    share: float

    def __post_init__(self) -> None:
        _check_share(self.share)

    def __call__(self, epoch: int) -> float:
        return self.share


@dataclass(frozen=True)
class LinearShare:
    """``start`` up to ``start_epoch``, then linear to ``end`` at ``end_epoch``, then ``end``.

    ``LinearShare(0.5, 0.0, 80, 100)`` ramps the synthetic share down over the last 20 of 100
    epochs, so training ends on real data.
    """

    start: float
    end: float
    start_epoch: int
    end_epoch: int

    def __post_init__(self) -> None:
        _check_share(self.start)
        _check_share(self.end)
        if self.end_epoch < self.start_epoch:
            raise DatasetError(
                f"LinearShare: end_epoch {self.end_epoch} < start_epoch {self.start_epoch}"
            )

    def __call__(self, epoch: int) -> float:
        if epoch <= self.start_epoch or self.end_epoch == self.start_epoch:
            return self.start if epoch <= self.start_epoch else self.end
        if epoch >= self.end_epoch:
            return self.end
        t = (epoch - self.start_epoch) / (self.end_epoch - self.start_epoch)
        return self.start + t * (self.end - self.start)


def parse_schedule(spec: str) -> ShareSchedule:
    """``"constant:0.3"`` or ``"linear:0.5:0.0:80:100"`` (start, end, start epoch, end epoch)."""
    kind, _, rest = spec.partition(":")
    values = rest.split(":") if rest else []
    try:
        if kind == "constant" and len(values) == 1:
            return ConstantShare(float(values[0]))
        if kind == "linear" and len(values) == 4:
            return LinearShare(float(values[0]), float(values[1]), int(values[2]), int(values[3]))
    except ValueError:
        pass
    raise DatasetError(
        f"share schedule {spec!r}: use constant:SHARE or linear:START:END:START_EPOCH:END_EPOCH"
    )


def _check_share(share: float) -> None:
    if not 0.0 <= share <= 1.0:
        raise DatasetError(f"synthetic share must lie in [0, 1], got {share}")


# -- seeding -----------------------------------------------------------------------------


def derive_seed(base_seed: int, epoch: int, worker_id: int, stream: int = 0) -> int:
    """A 63-bit seed from ``(base_seed, epoch, worker_id, stream)`` via ``numpy.SeedSequence``;
    distinct tuples give unrelated seeds."""
    words = np.random.SeedSequence([base_seed, epoch, worker_id, stream]).generate_state(2)
    return int((int(words[0]) << 32 | int(words[1])) & ((1 << 63) - 1))


class WorkerSeeder:
    """``worker_init_fn`` that seeds each worker from ``(base_seed, epoch, worker_id)``.

    In the worker it seeds torch, numpy's and Python's global generators (for third-party
    transforms that use them) and calls ``dataset.reseed(seed)`` (our datasets' own
    generators, and MONAI ``Randomizable`` transforms). Set :attr:`epoch` before each epoch's
    iterator is created (:func:`set_epoch` does it); with ``persistent_workers`` the seed of
    the epoch the workers started in stays.
    """

    def __init__(self, base_seed: int) -> None:
        self.base_seed = int(base_seed)
        self.epoch = 0

    def seed_for(self, worker_id: int) -> int:
        return derive_seed(self.base_seed, self.epoch, worker_id)

    def __call__(self, worker_id: int) -> None:
        seed = self.seed_for(worker_id)
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)  # noqa: NPY002 - only inside a worker process
        random.seed(seed)
        info = get_worker_info()
        dataset = info.dataset if info is not None else None
        if hasattr(dataset, "reseed"):
            dataset.reseed(seed)


# -- sampling ----------------------------------------------------------------------------


class SyntheticShareSampler(Sampler[int]):
    """Weighted draw with replacement whose synthetic share follows a schedule.

    Args:
        is_synthetic: One flag per dataset item.
        num_samples: Draws per epoch (default: the dataset length).
        schedule: Synthetic share per epoch; ``None`` uses ``base_weights`` (or uniform).
        base_weights: Per-item weights (a build's ``sample_weight``) used without a schedule.
        seed: Base seed; the epoch's draw uses ``derive_seed(seed, epoch, 0, stream=1)``.
    """

    def __init__(
        self,
        is_synthetic: Sequence[bool] | np.ndarray,
        *,
        num_samples: int | None = None,
        schedule: ShareSchedule | None = None,
        base_weights: Sequence[float] | None = None,
        seed: int = 0,
    ) -> None:
        self.flags = np.asarray(is_synthetic, dtype=bool)
        if self.flags.size == 0:
            raise DatasetError("cannot sample from an empty dataset")
        self.num_samples = int(num_samples or self.flags.size)
        self.schedule = schedule
        self.base_weights = None if base_weights is None else np.asarray(base_weights, float)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def weights(self, epoch: int | None = None) -> np.ndarray:
        """Per-item draw probabilities for ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        n_syn = int(self.flags.sum())
        n_real = self.flags.size - n_syn
        if self.schedule is not None and n_syn and n_real:
            share = self.schedule(epoch)
            weights = np.where(self.flags, share / n_syn, (1.0 - share) / n_real)
        elif self.schedule is not None and n_syn and not n_real:
            weights = np.full(self.flags.size, 1.0)
        elif self.schedule is not None:
            weights = np.where(self.flags, 0.0, 1.0)
        elif self.base_weights is not None:
            weights = self.base_weights
        else:
            weights = np.ones(self.flags.size)
        total = weights.sum()
        if total <= 0:
            raise DatasetError(f"epoch {epoch}: every sampling weight is zero")
        return weights / total

    def __iter__(self):  # noqa: ANN204 - Iterator[int]
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, 0, 1))
        weights = torch.as_tensor(self.weights(), dtype=torch.float64)
        draws = torch.multinomial(weights, self.num_samples, replacement=True, generator=generator)
        return iter(draws.tolist())

    def __len__(self) -> int:
        return self.num_samples


# -- datasets ----------------------------------------------------------------------------


def _read_case(
    item: Mapping[str, Any], spatial_dims: int | None
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """The decoded channels and label map of an item, as stored (before any cast)."""
    images = item["image"] if isinstance(item["image"], (list, tuple)) else [item["image"]]
    channels = [load_image(p, spatial_dims=spatial_dims).array for p in images]
    if len({c.shape for c in channels}) > 1:
        raise DatasetError(
            f"case {item.get('case_id')}: channels differ in shape {[c.shape for c in channels]}"
        )
    label = item.get("label")
    return channels, (load_image(label, spatial_dims=spatial_dims).array if label else None)


def _tensors(channels: list[np.ndarray], label: np.ndarray | None) -> dict[str, torch.Tensor]:
    out = {"image": torch.from_numpy(np.stack([c.astype(np.float32) for c in channels]))}
    if label is not None:
        out["label"] = torch.from_numpy(label[None].astype(np.int64))
    return out


class SyntheticAwareDataset(Dataset):
    """Training items with their origin, as MONAI-style dicts.

    Args:
        items: Dicts with ``image`` (path or list of channel paths), ``label``, ``origin``
            (``"real"``/``"synthetic"``) and optionally ``case_id``, ``patient_id``,
            ``source_patient``, ``generator``, ``sample_weight``.
        transform: MONAI-style ``transform(item) -> item``.
        random_transform: ``transform(item, rng, torch_generator) -> item`` drawing from the
            dataset's own generators (re-seeded per worker and epoch).
        spatial_dims: Expected 2 or 3 (``None``: as stored).
    """

    def __init__(
        self,
        items: Sequence[Mapping[str, Any]],
        *,
        transform: Callable | None = None,
        random_transform: RandomTransform | None = None,
        spatial_dims: int | None = None,
    ) -> None:
        self.items = [dict(i) for i in items]
        for index, item in enumerate(self.items):
            if item.get("origin") not in ("real", "synthetic"):
                raise DatasetError(
                    f"item {index} ({item.get('case_id')}): origin must be 'real' or 'synthetic'"
                )
        self.is_synthetic = np.array([i["origin"] == "synthetic" for i in self.items], dtype=bool)
        self.transform = transform
        self.random_transform = random_transform
        self.spatial_dims = spatial_dims
        self.reseed(0)

    @classmethod
    def from_build(cls, build_dir: str | Path, **kwargs: Any) -> SyntheticAwareDataset:
        """The ``train`` set of a build, after checking its files are unchanged and that no
        training item belongs to a val/test patient."""
        build_dir = Path(build_dir)
        read_build_record(build_dir)
        spec = json.loads((build_dir / "dataset.json").read_text(encoding="utf-8"))
        evaluation: dict[str, str] = {}
        for side in ("val", "test"):
            listing = json.loads((build_dir / f"{side}.json").read_text(encoding="utf-8"))
            evaluation.update({e["patient_id"]: side for e in listing[side]})
        items = []
        for entry in spec["training"]:
            for key in ("patient_id", "source_patient"):
                side = evaluation.get(entry.get(key))
                if side is not None:
                    raise EvaluationPatientLeak(
                        f"{build_dir}: training item {entry.get('case_id')} belongs to {side} "
                        f"patient {entry.get(key)}",
                        case_id=entry.get("case_id"),
                        patient_id=entry.get(key),
                    )
            items.append(
                {
                    **entry,
                    "image": [str(build_dir / p) for p in entry["image"]],
                    "label": str(build_dir / entry["label"]),
                }
            )
        return cls(items, **kwargs)

    def reseed(self, seed: int) -> None:
        """Re-seed the dataset's generators (and MONAI ``Randomizable`` transforms)."""
        self.rng = np.random.default_rng(seed)
        self.torch_generator = torch.Generator().manual_seed(seed)
        if self.transform is not None and hasattr(self.transform, "set_random_state"):
            self.transform.set_random_state(seed=seed % 2**32)

    @property
    def sample_weights(self) -> np.ndarray:
        return np.array([float(i.get("sample_weight", 1.0)) for i in self.items])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Item:
        source = self.items[index]
        item: Item = {
            **_tensors(*_read_case(source, self.spatial_dims)),
            "is_synthetic": torch.tensor(bool(self.is_synthetic[index])),
            "origin": source["origin"],
            "case_id": str(source.get("case_id", "")),
            "patient_id": str(source.get("patient_id", "")),
            "source_patient": str(source.get("source_patient") or source.get("patient_id", "")),
            "generator": str(source.get("generator") or ""),
            "sample_weight": float(source.get("sample_weight", 1.0)),
            "index": index,
        }
        if self.random_transform is not None:
            item = self.random_transform(item, self.rng, self.torch_generator)
        if self.transform is not None:
            item = self.transform(item)
        return item


class EvaluationDataset(Dataset):
    """Real evaluation items, refused if anything synthetic is among them.

    At construction every item's tags and the sha256 of every file are checked against the
    registry; on load the decoded voxels are too (``check_voxels``), so a re-compressed or
    re-saved synthetic copy is caught.

    Args:
        items: Dicts with ``image`` (path or list), optional ``label``, ``case_id``,
            ``origin``; optional recorded ``image_sha256``/``label_sha256`` are compared with
            the files.
        registry: Content hashes of every known synthetic case (``SyntheticRegistry.empty()``
            to state there are none).
        check_voxels: Compare decoded voxels with the registry on load.
        transform: MONAI-style ``transform(item) -> item`` (deterministic).
        spatial_dims: Expected 2 or 3.

    Raises:
        SyntheticInEvaluation: an item is synthetic by tag or by content.
        DatasetError: a file changed since it was listed.
    """

    def __init__(
        self,
        items: Sequence[Mapping[str, Any]],
        registry: SyntheticRegistry,
        *,
        check_voxels: bool = True,
        transform: Callable | None = None,
        spatial_dims: int | None = None,
    ) -> None:
        if not isinstance(registry, SyntheticRegistry):
            raise DatasetError("an evaluation dataset needs the SyntheticRegistry to check against")
        self.items = [dict(i) for i in items]
        self.registry = registry
        self.check_voxels = check_voxels and registry.has_voxels
        self.transform = transform
        self.spatial_dims = spatial_dims
        self._verified: set[int] = set()
        for index, item in enumerate(self.items):
            self._check_item(index, item)

    @classmethod
    def from_build(
        cls, build_dir: str | Path, split: str = "val", **kwargs: Any
    ) -> EvaluationDataset:
        """The ``val`` or ``test`` list of a build, checked against the build's registry."""
        if split not in ("val", "test"):
            raise DatasetError(f"evaluation split must be 'val' or 'test', got {split!r}")
        build_dir = Path(build_dir)
        read_build_record(build_dir)
        listing = json.loads((build_dir / f"{split}.json").read_text(encoding="utf-8"))
        items = [
            {
                **e,
                "image": [os.path.normpath(build_dir / p) for p in e["image"]],
                "label": os.path.normpath(build_dir / e["label"]) if e.get("label") else None,
            }
            for e in listing[split]
        ]
        return cls(items, SyntheticRegistry.load(build_dir / REGISTRY_FILE), **kwargs)

    def _check_item(self, index: int, item: Mapping[str, Any]) -> None:
        case = item.get("case_id", f"item {index}")
        flag = item.get("is_synthetic")
        if item.get("origin", "real") != "real" or (flag is not None and bool(flag)):
            raise SyntheticInEvaluation(
                f"evaluation item {case} is tagged synthetic (origin {item.get('origin')!r})",
                case_id=str(case),
            )
        images = item["image"] if isinstance(item["image"], (list, tuple)) else [item["image"]]
        recorded = list(item.get("image_sha256") or [None] * len(images))
        files = list(zip(images, recorded, strict=False))
        if item.get("label"):
            files.append((item["label"], item.get("label_sha256")))
        for path, expected in files:
            digest = sha256_file(path)
            changed = expected is not None and digest != expected
            match = self.registry.identify(path, file_sha256=digest, voxels=changed)
            if match is not None:
                raise SyntheticInEvaluation(
                    f"evaluation item {case}: {path} {match.describe()}",
                    case_id=str(case),
                    path=path,
                )
            if changed:
                raise DatasetError(
                    f"evaluation item {case}: {path} changed since it was listed (sha256 differs)"
                )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Item:
        source = self.items[index]
        channels, label = _read_case(source, self.spatial_dims)
        if self.check_voxels and index not in self._verified:
            for kind, array in [("image", c) for c in channels] + [("label", label)]:
                match = self.registry.identify(array) if array is not None else None
                if match is not None:
                    raise SyntheticInEvaluation(
                        f"evaluation item {source.get('case_id', index)}: its {kind} "
                        f"{match.describe()}",
                        case_id=str(source.get("case_id")),
                    )
            self._verified.add(index)
        item: Item = {
            **_tensors(channels, label),
            "is_synthetic": torch.tensor(False),
            "origin": "real",
            "case_id": str(source.get("case_id", "")),
            "patient_id": str(source.get("patient_id", "")),
            "index": index,
        }
        return self.transform(item) if self.transform is not None else item

    def __add__(self, other: Dataset) -> EvaluationDataset:
        if not isinstance(other, EvaluationDataset):
            raise SyntheticInEvaluation(
                f"only evaluation datasets can be joined to an evaluation dataset, not "
                f"{type(other).__name__}"
            )
        return EvaluationDataset(
            self.items + other.items,
            self.registry,
            check_voxels=self.check_voxels,
            transform=self.transform,
            spatial_dims=self.spatial_dims,
        )


def _only_evaluation(dataset: Dataset) -> bool:
    if isinstance(dataset, EvaluationDataset):
        return True
    if isinstance(dataset, Subset):
        return _only_evaluation(dataset.dataset)
    if isinstance(dataset, ConcatDataset):
        return all(_only_evaluation(d) for d in dataset.datasets)
    return False


def make_eval_loader(
    dataset: Dataset, *, batch_size: int = 1, num_workers: int = 0, **kwargs: Any
) -> DataLoader:
    """A sequential DataLoader over an :class:`EvaluationDataset` (nothing else is accepted).

    Raises:
        SyntheticInEvaluation: ``dataset`` is (or holds) anything but evaluation datasets.
    """
    if not _only_evaluation(dataset):
        raise SyntheticInEvaluation(
            f"evaluation loaders only take EvaluationDataset (got {type(dataset).__name__}); "
            "build one from the real evaluation list and the synthetic registry"
        )
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, **kwargs
    )


def make_train_loader(
    dataset: SyntheticAwareDataset,
    *,
    batch_size: int,
    schedule: ShareSchedule | None = None,
    num_samples: int | None = None,
    seed: int = 0,
    num_workers: int = 0,
    use_sample_weights: bool = True,
    **kwargs: Any,
) -> DataLoader:
    """A DataLoader with a :class:`SyntheticShareSampler` and a :class:`WorkerSeeder`.

    Call :func:`set_epoch` before each epoch. Without a ``schedule`` the build's
    ``sample_weight`` per item sets the share (``use_sample_weights``), else uniform.
    """
    sampler = SyntheticShareSampler(
        dataset.is_synthetic,
        num_samples=num_samples,
        schedule=schedule,
        seed=seed,
        base_weights=dataset.sample_weights if use_sample_weights and schedule is None else None,
    )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        worker_init_fn=WorkerSeeder(seed) if num_workers else None,
        **kwargs,
    )
    set_epoch(loader, 0)
    return loader


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Move a :func:`make_train_loader` loader to ``epoch`` (sampler draw and worker seeds)."""
    if isinstance(loader.sampler, SyntheticShareSampler):
        loader.sampler.set_epoch(epoch)
    seeder = loader.worker_init_fn
    if isinstance(seeder, WorkerSeeder):
        seeder.epoch = int(epoch)
    elif hasattr(loader.dataset, "reseed") and isinstance(loader.sampler, SyntheticShareSampler):
        loader.dataset.reseed(derive_seed(loader.sampler.seed, epoch, 0))


@dataclass(frozen=True)
class OriginLossWeights:
    """Loss weight per origin: ``weights(batch)`` gives a ``(B,)`` tensor."""

    real: float = 1.0
    synthetic: float = 1.0

    def __call__(self, batch: Mapping[str, Any]) -> torch.Tensor:
        flags = torch.as_tensor(batch["is_synthetic"], dtype=torch.bool)
        return torch.where(flags, torch.tensor(self.synthetic), torch.tensor(self.real))

    def reduce(self, per_item_loss: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """Weighted mean of a per-item loss ``(B,)`` or ``(B, ...)`` (other axes averaged)."""
        loss = per_item_loss.reshape(per_item_loss.shape[0], -1).mean(dim=1)
        weights = self(batch).to(loss)
        return (weights * loss).sum() / weights.sum().clamp_min(torch.finfo(loss.dtype).tiny)


__all__ = [
    "ConstantShare",
    "EvaluationDataset",
    "LinearShare",
    "OriginLossWeights",
    "ShareSchedule",
    "SyntheticAwareDataset",
    "SyntheticShareSampler",
    "WorkerSeeder",
    "derive_seed",
    "make_eval_loader",
    "make_train_loader",
    "parse_schedule",
    "set_epoch",
]
