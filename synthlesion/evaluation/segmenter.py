"""The downstream segmentation network and its training, one budget for every arm.

Training items come from a guarded dataset build (:meth:`SyntheticAwareDataset.from_build`);
each arm draws its samples with the dataset package's :class:`SyntheticShareSampler` (a constant
synthetic share, or uniform over real cases), optionally through the augmentation package's
batched transforms (classical: flips, affine, elastic, contrast, gamma, noise; copy-paste: its
label-aware :class:`~synthlesion.augment.LesionCopyPaste`). The network is MONAI's ``UNet`` or
``BasicUNet`` (2D or 3D), trained with Dice + cross-entropy on lesion vs. everything else.
Every random choice comes from generators seeded by the run seed.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from synthlesion.data.intensity import IntensityNormaliser
from synthlesion.evaluation.config import ArmConfig, SegmenterConfig
from synthlesion.evaluation.errors import EvaluationConfigError, EvaluationError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class ArrayCase:
    """One case held in memory.

    Attributes:
        case_id: The case id.
        image: Normalised image, float32, shape ``S`` (values about [-1, 1]).
        label: Label map, int16, shape ``S`` (organ and lesion values as stored).
        spacing: Voxel size in mm.
        is_synthetic: Origin flag from the build.
        generator: Generator folder hash (``""`` for real cases).
        source_case: The real case a synthetic case was painted into (itself for real cases).
        raw: The image in image units (HU for CT), for intensity statistics; optional.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, ...]
    is_synthetic: bool = False
    generator: str = ""
    source_case: str = ""
    raw: np.ndarray | None = None


def normalise(image: np.ndarray, normaliser: IntensityNormaliser) -> np.ndarray:
    """Image units -> float32 about [-1, 1] (the training normalisation, fixed for CT)."""
    return normaliser.normalise(np.asarray(image, dtype=np.float32))


def build_network(cfg: SegmenterConfig, spatial_dims: int) -> torch.nn.Module:
    """MONAI ``UNet`` (two residual units per level, strides 2, ``cfg.norm``) or ``BasicUNet``,
    1 input channel and 2 outputs (background, lesion)."""
    from monai.networks.nets import BasicUNet, UNet

    if cfg.network == "basic_unet":
        return BasicUNet(
            spatial_dims=spatial_dims, in_channels=1, out_channels=2, features=tuple(cfg.channels)
        )
    return UNet(
        spatial_dims=spatial_dims,
        in_channels=1,
        out_channels=2,
        channels=tuple(cfg.channels),
        strides=(2,) * (len(cfg.channels) - 1),
        num_res_units=2,
        norm=cfg.norm,
    )


def _classical(seed: int, spatial_dims: int) -> Any:
    from synthlesion.augment import (
        Compose,
        RandAffine,
        RandContrastBrightness,
        RandElastic,
        RandFlip,
        RandGamma,
        RandGaussianNoise,
    )

    rotate = (-15.0, 15.0) if spatial_dims == 2 else ((-15.0, 15.0), (-5.0, 5.0), (-5.0, 5.0))
    return Compose(
        [
            RandFlip("image", "label", p=0.5),
            RandAffine("image", "label", rotate=rotate, scale=(0.85, 1.15), p=0.7),
            RandElastic("image", "label", control_points=5, max_displacement=(0.0, 4.0), p=0.3),
            RandContrastBrightness("image", contrast=(0.8, 1.2), brightness=(-0.1, 0.1), p=0.5),
            RandGamma("image", log_gamma=(-0.2, 0.2), p=0.3),
            RandGaussianNoise("image", std=(0.0, 0.05), p=0.5),
        ],
        seed=seed,
    )


class ArmBatches:
    """Draws the training batches of one arm and seed.

    Args:
        pool: The arm's training cases (real ones, plus synthetic ones of its generator).
        arm: The arm.
        cfg: Segmenter settings (steps, batch size, patches).
        seed: Run seed.
        lesion_values: Label values of lesions.
        organ_values: Label values of the tissue copy-paste may paste into.
        donors: Real lesion cases used as copy-paste donors.
    """

    def __init__(
        self,
        pool: Sequence[ArrayCase],
        arm: ArmConfig,
        cfg: SegmenterConfig,
        seed: int,
        lesion_values: Sequence[int],
        organ_values: Sequence[int],
        donors: Sequence[ArrayCase] = (),
    ) -> None:
        from synthlesion.dataset import ConstantShare, SyntheticShareSampler

        if not pool:
            raise EvaluationError(f"arm {arm.name}: no training case")
        self.pool = list(pool)
        self.arm = arm
        self.cfg = cfg
        self.lesion_values = tuple(lesion_values)
        self.organ_values = tuple(organ_values)
        self.rng = np.random.default_rng([seed, 11])
        flags = [c.is_synthetic for c in self.pool]
        if arm.share > 0 and not any(flags):
            raise EvaluationError(
                f"arm {arm.name}: share {arm.share} but no synthetic case of "
                f"kind {arm.kind} was built"
            )
        schedule = ConstantShare(arm.share) if arm.share > 0 else None
        self.sampler = SyntheticShareSampler(
            flags, num_samples=cfg.steps * cfg.batch_size, schedule=schedule, seed=seed
        )
        self.sampler.set_epoch(0)
        self.spatial_dims = self.pool[0].image.ndim
        self.transform = None
        self.donors = list(donors)
        if arm.kind == "classical":
            self.transform = _classical(seed, self.spatial_dims)
        elif arm.kind == "copy_paste":
            from synthlesion.augment import LesionCopyPaste

            if not self.donors:
                raise EvaluationError(f"arm {arm.name}: copy-paste needs real lesion donors")
            self.transform = LesionCopyPaste(
                "image",
                "label",
                lesion_key="label",
                tissue_key="label",
                tissue_values=self.organ_values,
                lesion_values=self.lesion_values,
                intensity_matching="mean_std",
                seed=seed,
            )
        shapes = {c.image.shape for c in self.pool}
        if cfg.patch_size is None and len(shapes) > 1:
            raise EvaluationConfigError(
                f"training images have several shapes {sorted(shapes)[:3]}; set "
                "segmenter.patch_size to train on patches"
            )
        if cfg.patch_size is not None and len(cfg.patch_size) != self.spatial_dims:
            raise EvaluationConfigError(
                f"segmenter.patch_size {list(cfg.patch_size)} does not fit {self.spatial_dims}D "
                "images"
            )

    def drawn_share(self) -> float:
        """Synthetic share among the indices this arm draws (for the results)."""
        indices = np.fromiter(iter(self.sampler), dtype=np.int64)
        flags = np.array([self.pool[i].is_synthetic for i in indices])
        return float(flags.mean()) if flags.size else 0.0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = list(iter(self.sampler))
        size = self.cfg.batch_size
        for start in range(0, len(order), size):
            yield self._batch([self.pool[i] for i in order[start : start + size]])

    def _crop(self, case: ArrayCase) -> tuple[np.ndarray, np.ndarray]:
        patch = self.cfg.patch_size
        if patch is None:
            return case.image, case.label
        shape = case.image.shape
        lesion = np.argwhere(np.isin(case.label, self.lesion_values))
        if lesion.size and self.rng.random() < self.cfg.lesion_centred_fraction:
            centre = lesion[self.rng.integers(len(lesion))]
        else:
            centre = np.array([self.rng.integers(s) for s in shape])
        pads = [(max(0, p - s), 0) for p, s in zip(patch, shape, strict=True)]
        image = np.pad(case.image, [(0, a) for a, _ in pads], mode="edge")
        label = np.pad(case.label, [(0, a) for a, _ in pads])
        start = [
            int(np.clip(c - p // 2, 0, max(s, p) - p))
            for c, p, s in zip(centre, patch, shape, strict=True)
        ]
        box = tuple(slice(s, s + p) for s, p in zip(start, patch, strict=True))
        return image[box], label[box]

    def _batch(self, cases: list[ArrayCase]) -> tuple[torch.Tensor, torch.Tensor]:
        crops = [self._crop(c) for c in cases]
        image = torch.from_numpy(np.stack([c[0] for c in crops]))[:, None]
        label = torch.from_numpy(np.stack([c[1] for c in crops]).astype(np.int64))[:, None]
        if self.transform is not None:
            spacing = torch.tensor(
                [c.spacing[: self.spatial_dims] for c in cases], dtype=torch.float64
            )
            data: dict[str, Any] = {"image": image.float(), "label": label, "spacing": spacing}
            n = len(cases)
            if self.arm.kind == "copy_paste":  # a donor pool so most samples get a lesion
                picks = self.rng.integers(len(self.donors), size=n)
                donors = [self._crop(self.donors[i]) for i in picks]
                data = {
                    "image": torch.cat(
                        [image, torch.from_numpy(np.stack([d[0] for d in donors]))[:, None]]
                    ).float(),
                    "label": torch.cat(
                        [
                            label,
                            torch.from_numpy(np.stack([d[1] for d in donors]).astype(np.int64))[
                                :, None
                            ],
                        ]
                    ),
                    "spacing": torch.cat(
                        [
                            spacing,
                            torch.tensor(
                                [self.donors[i].spacing[: self.spatial_dims] for i in picks],
                                dtype=torch.float64,
                            ),
                        ]
                    ),
                }
            out = self.transform(data)
            image, label = out["image"][:n], out["label"][:n]
        target = torch.isin(label, torch.tensor(self.lesion_values)).long()
        return image.contiguous(), target


@dataclass
class TrainedSegmenter:
    """A trained network with what inference needs."""

    network: torch.nn.Module
    patch_size: tuple[int, ...] | None
    losses: list[float]
    drawn_share: float

    @torch.no_grad()
    def predict(self, image: np.ndarray, device: str = "cpu") -> np.ndarray:
        """Boolean lesion prediction for one normalised image of shape ``S``."""
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(device)
        self.network.eval()
        if self.patch_size is not None:
            from monai.inferers import sliding_window_inference

            logits = sliding_window_inference(x, self.patch_size, 4, self.network, overlap=0.25)
        else:
            logits = _padded(self.network, x)
        return (logits.argmax(1)[0] == 1).cpu().numpy()


def _padded(network: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run on ``x`` padded to a multiple of 16 per axis (then cropped back)."""
    shape = x.shape[2:]
    pad: list[int] = []
    for s in reversed(shape):
        pad += [0, (-s) % 16]
    if any(pad):
        out = network(torch.nn.functional.pad(x, pad, mode="replicate"))
        return out[(slice(None), slice(None), *[slice(0, s) for s in shape])]
    return network(x)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global generator inside the block only (network initialisation)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def train_segmenter(
    batches: ArmBatches,
    cfg: SegmenterConfig,
    seed: int,
    *,
    device: str = "cpu",
    progress: Callable[[int, float], None] | None = None,
) -> TrainedSegmenter:
    """Train one network on one arm's batches (``cfg.steps`` steps, cosine learning rate).

    Raises:
        EvaluationError: the loss became non-finite.
    """
    from monai.losses import DiceCELoss

    with _seeded(seed):
        network = build_network(cfg, batches.spatial_dims).to(device)
    optimizer = torch.optim.AdamW(
        network.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, cfg.steps) / cfg.steps))
    )
    # Dice on the lesion channel only (background would dominate it) plus cross-entropy
    loss_fn = DiceCELoss(
        to_onehot_y=True,
        softmax=True,
        include_background=False,
        batch=True,
        smooth_nr=1e-5,
        smooth_dr=1e-5,
        weight=torch.tensor([1.0, cfg.lesion_weight], device=device),
    )
    pad = None if cfg.patch_size is not None else _padded
    network.train()
    losses: list[float] = []
    for step, (image, target) in enumerate(batches, start=1):
        image, target = image.to(device), target.to(device)
        logits = pad(network, image) if pad is not None else network(image)
        loss = loss_fn(logits, target)
        if not torch.isfinite(loss):
            raise EvaluationError(
                f"arm {batches.arm.name} seed {seed}: non-finite loss at step {step}"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step, losses[-1])
    network.eval()
    return TrainedSegmenter(network, cfg.patch_size, losses, batches.drawn_share())


__all__ = [
    "ArmBatches",
    "ArrayCase",
    "TrainedSegmenter",
    "build_network",
    "normalise",
    "train_segmenter",
]
