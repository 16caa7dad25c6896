"""The downstream segmentation network and its training, one recipe for every arm.

The recipe follows nnU-Net's spirit: Dice + cross-entropy on lesion vs. everything else,
foreground oversampling at the batch level (:class:`ArmBatches`: the same share of
lesion-centred patches for every arm, the rest lesion-free, healthy scans kept as negatives),
the augmentation recipe of :mod:`synthlesion.augment` on every batch, a warmup-stable-decay
learning rate (or cosine), a validation Dice curve and the weights of the best validation Dice.
:func:`train_segmenters` trains several budgets of one run at once: with the stable-decay
schedule their common first steps are trained once and the longer runs branch off them (the
convergence check's run of twice the steps costs 1.2 runs instead of 2). The network is MONAI's ``UNet`` or
``BasicUNet`` (2D or 3D). Every random choice comes from generators seeded by the run seed.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
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


ELASTIC_CONTROL_POINTS = 5
ELASTIC_MAX_MM = 4.0


def augmentation_recipe(
    seed: int, spatial_dims: int, patch_mm: Sequence[float] | None = None
) -> Any:
    """The augmentation every arm trains with (``synthlesion.augment``): flips, a small affine
    (rotation within 15 degrees in-plane, scale 0.85-1.15), a light elastic warp, contrast,
    gamma and noise. Label maps are resampled with nearest neighbour.

    Args:
        seed: Seed of the transforms' generator.
        spatial_dims: 2 or 3.
        patch_mm: The smallest extent of a patch per axis in mm (``(n - 1) * spacing``): the
            elastic warp's peak stays within 0.45 of its control-node spacing (no folding),
            at most 4 mm.
    """
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
    peak = ELASTIC_MAX_MM
    if patch_mm:
        peak = min(peak, 0.45 * min(patch_mm) / (ELASTIC_CONTROL_POINTS - 1))
    return Compose(
        [
            RandFlip("image", "label", p=0.5),
            RandAffine("image", "label", rotate=rotate, scale=(0.85, 1.15), p=0.7),
            RandElastic(
                "image",
                "label",
                control_points=ELASTIC_CONTROL_POINTS,
                max_displacement=(0.0, peak),
                p=0.3,
            ),
            RandContrastBrightness("image", contrast=(0.8, 1.2), brightness=(-0.1, 0.1), p=0.5),
            RandGamma("image", log_gamma=(-0.2, 0.2), p=0.3),
            RandGaussianNoise("image", std=(0.0, 0.05), p=0.5),
        ],
        seed=seed,
    )


@dataclass(frozen=True)
class _Lesions:
    """The lesion components of one case: voxel indices per component (``(n, ndim)``)."""

    case: ArrayCase
    components: tuple[np.ndarray, ...]


def _lesion_components(case: ArrayCase, lesion_values: Sequence[int]) -> _Lesions | None:
    from scipy import ndimage

    mask = np.isin(case.label, lesion_values)
    if not mask.any():
        return None
    labelled, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, bool))
    components = tuple(np.argwhere(labelled == i) for i in range(1, count + 1))
    return _Lesions(case, components)


@dataclass
class BatchCounts:
    """What one arm's batches held (measured after augmentation).

    Attributes:
        patches: Patches drawn.
        positive: Patches holding at least one lesion voxel.
        lesion_voxels, voxels: Lesion voxels and all voxels of the patches.
        lesion_draws: Lesion-centred patches drawn (before augmentation).
        new_lesion: Lesion-centred patches whose lesion came from the arm's new source
            (synthetic cases or copy-paste).
        paste_failed: Copy-paste draws that found no place and fell back to a real lesion.
    """

    patches: int = 0
    positive: int = 0
    lesion_voxels: int = 0
    voxels: int = 0
    lesion_draws: int = 0
    new_lesion: int = 0
    paste_failed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "patches": self.patches,
            "positive_patch_share": self.positive / max(self.patches, 1),
            "lesion_pixel_share": self.lesion_voxels / max(self.voxels, 1),
            "new_lesion_patches": self.new_lesion,
            "new_lesion_share": self.new_lesion / max(self.lesion_draws, 1),
            "paste_failed": self.paste_failed,
        }


class ArmBatches:
    """Draws the training batches of one arm and seed, nnU-Net style.

    Every batch of ``B`` patches holds ``k = max(1, round(foreground_share * B))`` patches
    centred on a random voxel of a lesion (a lesion-bearing scan drawn uniformly, then one of
    its lesions, then one of its voxels) and ``B - k`` patches holding no lesion voxel, drawn at
    random from the labelled real scans (healthy ones included). For the ``copy_paste``,
    ``handcrafted`` and ``diffusion`` arms a share ``arm.share`` of the lesion patches comes
    from the arm's new lesions (a synthetic case's painted lesion, or a real lesion pasted into
    a lesion-free patch); the rest, and every lesion patch of the ``real`` arm, from the real
    labelled lesions. So every arm sees the same share of lesion patches and differs only in
    where its lesions come from. The augmentation recipe then runs on every batch.

    Args:
        real: The labelled real training cases of the budget (lesion-bearing and healthy).
        new: The arm's synthetic cases (``handcrafted``/``diffusion``; empty otherwise).
        arm: The arm.
        cfg: Segmenter settings (batch size, patches, foreground share).
        seed: Run seed.
        lesion_values: Label values of lesions.
        organ_values: Label values of the tissue copy-paste pastes into.
        steps: Batches to draw (default ``cfg.steps``).
        modality: The scans' modality (the foreground rule where there is no organ label).
    """

    def __init__(
        self,
        real: Sequence[ArrayCase],
        new: Sequence[ArrayCase],
        arm: ArmConfig,
        cfg: SegmenterConfig,
        seed: int,
        lesion_values: Sequence[int],
        organ_values: Sequence[int],
        steps: int | None = None,
        modality: str = "unknown",
    ) -> None:
        if not real:
            raise EvaluationError(f"arm {arm.name}: no labelled real training case")
        self.real, self.new = list(real), list(new)
        self.arm, self.cfg = arm, cfg
        self.steps = cfg.steps if steps is None else int(steps)
        self.lesion_values = tuple(lesion_values)
        self.organ_values = tuple(organ_values)
        self.rng = np.random.default_rng([seed, 11])
        self.modality = modality
        self.spatial_dims = self.real[0].image.ndim
        found = [_lesion_components(c, self.lesion_values) for c in self.real]
        self.real_lesions = [f for f in found if f is not None]
        if not self.real_lesions:
            raise EvaluationError(f"arm {arm.name}: no labelled real case holds a lesion")
        self.healthy = [c for c, f in zip(self.real, found, strict=True) if f is None]
        self.new_lesions: list[_Lesions] = []
        if arm.kind in ("handcrafted", "diffusion"):
            made = [_lesion_components(c, self.lesion_values) for c in self.new]
            self.new_lesions = [m for m in made if m is not None]
            if not self.new_lesions:  # every case failed the gate: the arm is the real arm
                logger.warning(
                    "arm %s: no %s case with a lesion to train on (all left out by the "
                    "quality gate?); its lesion patches all come from real lesions",
                    arm.name,
                    arm.kind,
                )
        patch = cfg.patch_size or self.real[0].image.shape
        patch_mm = [(p - 1) * min(c.spacing[a] for c in self.real) for a, p in enumerate(patch)]
        self.transform = (
            augmentation_recipe(seed, self.spatial_dims, patch_mm) if cfg.augment else None
        )
        self.paste = None
        if arm.kind == "copy_paste":
            from synthlesion.augment import LesionCopyPaste

            # pasted into the organ, or where there is no organ label into the scan's
            # foreground (the placement rule of the generators: never the air)
            self.paste = LesionCopyPaste(
                "image",
                ["label", "tissue"],
                lesion_key="label",
                tissue_key="tissue",
                tissue_values=(1,),
                lesion_values=self.lesion_values,
                intensity_matching="mean_std",
                seed=seed,
            )
            self.tissue = {id(c): self._tissue(c) for c in self.real}
            # voxels a paste may be centred on, found once per scan (not per patch)
            self.tissue_voxels = {key: np.argwhere(m) for key, m in self.tissue.items()}
        shapes = {c.image.shape for c in [*self.real, *self.new]}
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
        self.positives = max(1, round(cfg.foreground_share * cfg.batch_size))
        self.counts = BatchCounts()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(self.steps):
            yield self._batch()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch of the stream: ``(image (B, 1, *P) float32, target (B, 1, *P)
        int64)``."""
        return self._batch()

    def fork(self) -> ArmBatches:
        """An independent copy at this point of the stream: both draw the same batches from
        here on (the cases are shared, the generators, transforms and counts copied)."""
        twin = copy.copy(self)
        twin.rng = copy.deepcopy(self.rng)
        twin.transform = copy.deepcopy(self.transform)
        twin.paste = copy.deepcopy(self.paste)
        twin.counts = copy.deepcopy(self.counts)
        return twin

    def _tissue(self, case: ArrayCase) -> np.ndarray:
        """Where a lesion may be pasted: the organ labels, else the scan's foreground."""
        if self.organ_values:
            return np.isin(case.label, (*self.organ_values, *self.lesion_values))
        from synthlesion.data.intensity import foreground_mask

        raw = case.raw if case.raw is not None else case.image
        return foreground_mask(raw, self.modality)

    # -- drawing -------------------------------------------------------------------------
    def _crop(self, array: np.ndarray, centre: Sequence[int], edge: bool) -> np.ndarray:
        """The patch of ``array`` centred at ``centre`` (kept inside the array; an array
        smaller than the patch is padded at its end, by edge values or zeros)."""
        patch = self.cfg.patch_size
        if patch is None:
            return array
        shape = array.shape
        pads = [(0, max(0, p - s)) for p, s in zip(patch, shape, strict=True)]
        if any(b for _, b in pads):
            array = np.pad(array, pads, mode="edge") if edge else np.pad(array, pads)
        start = [
            int(np.clip(c - p // 2, 0, max(s, p) - p))
            for c, p, s in zip(centre, patch, shape, strict=True)
        ]
        return array[tuple(slice(s, s + p) for s, p in zip(start, patch, strict=True))]

    def _crop_at(self, case: ArrayCase, centre: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        return self._crop(case.image, centre, True), self._crop(case.label, centre, False)

    def _lesion_patch(self, pool: list[_Lesions]) -> tuple[np.ndarray, np.ndarray, ArrayCase]:
        found = pool[self.rng.integers(len(pool))]
        component = found.components[self.rng.integers(len(found.components))]
        centre = component[self.rng.integers(len(component))]
        return (*self._crop_at(found.case, centre), found.case)

    def _negative_centre(
        self, organ: bool = False
    ) -> tuple[np.ndarray, np.ndarray, ArrayCase, Sequence[int]]:
        """A patch with no lesion voxel and its centre (``organ``: centred on a voxel where a
        lesion may be pasted)."""
        image = label = case = centre = None
        for attempt in range(20):
            use_healthy = self.healthy and attempt >= 10
            pool = self.healthy if use_healthy else self.real
            case = pool[self.rng.integers(len(pool))]
            centre = None
            if organ:
                tissue = self.tissue_voxels[id(case)]
                if len(tissue):
                    centre = tissue[self.rng.integers(len(tissue))]
            if centre is None:
                centre = [int(self.rng.integers(s)) for s in case.image.shape]
            image, label = self._crop_at(case, centre)
            if not np.isin(label, self.lesion_values).any():
                break
        return image, label, case, centre  # type: ignore[return-value]

    def _negative_patch(self) -> tuple[np.ndarray, np.ndarray, ArrayCase]:
        """A patch with no lesion voxel, from any labelled real scan (healthy ones included)."""
        return self._negative_centre()[:3]

    def pasted_patch(self) -> tuple[np.ndarray, np.ndarray, ArrayCase] | None:
        """A lesion-free patch with a real labelled lesion pasted into its tissue (``None``
        when the lesion found no place)."""
        image, label, case, centre = self._negative_centre(organ=True)
        donor_image, donor_label, donor = self._lesion_patch(self.real_lesions)
        tissue = self._crop(self.tissue[id(case)], centre, False)
        data = {
            "image": torch.from_numpy(np.stack([image, donor_image]))[:, None].float(),
            "label": torch.from_numpy(np.stack([label, donor_label]).astype(np.int64))[:, None],
            "tissue": torch.from_numpy(np.stack([tissue, np.zeros_like(tissue)]).astype(np.int64))[
                :, None
            ],
            "spacing": torch.tensor(
                [case.spacing[: self.spatial_dims], donor.spacing[: self.spatial_dims]],
                dtype=torch.float64,
            ),
        }
        out = self.paste(data)  # type: ignore[misc]
        pasted = out["label"][0, 0].numpy()
        if not np.isin(pasted, self.lesion_values).any():
            return None
        return out["image"][0, 0].numpy(), pasted.astype(label.dtype), case

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        size, positives = self.cfg.batch_size, self.positives
        crops: list[tuple[np.ndarray, np.ndarray, ArrayCase]] = []
        for _ in range(positives):
            crop = None
            if self.arm.kind != "real" and self.rng.random() < self.arm.share:
                if self.paste is None and not self.new_lesions:
                    pass
                elif self.paste is not None:
                    crop = self.pasted_patch()
                    if crop is None:
                        self.counts.paste_failed += 1
                else:
                    crop = self._lesion_patch(self.new_lesions)
                if crop is not None:
                    self.counts.new_lesion += 1
            crops.append(crop or self._lesion_patch(self.real_lesions))
            self.counts.lesion_draws += 1
        crops += [self._negative_patch() for _ in range(size - positives)]
        order = self.rng.permutation(size)
        crops = [crops[i] for i in order]
        image = torch.from_numpy(np.stack([c[0] for c in crops]).astype(np.float32))[:, None]
        label = torch.from_numpy(np.stack([c[1] for c in crops]).astype(np.int64))[:, None]
        if self.transform is not None:
            spacing = torch.tensor(
                [c[2].spacing[: self.spatial_dims] for c in crops], dtype=torch.float64
            )
            out = self.transform({"image": image, "label": label, "spacing": spacing})
            image, label = out["image"], out["label"]
        target = torch.isin(label, torch.tensor(self.lesion_values)).long()
        flat = target.flatten(1)
        self.counts.patches += size
        self.counts.positive += int((flat.sum(1) > 0).sum())
        self.counts.lesion_voxels += int(flat.sum())
        self.counts.voxels += int(flat.numel())
        return image.contiguous(), target


def bottleneck(network: torch.nn.Module) -> torch.nn.Module:
    """The deepest encoder block of a MONAI ``UNet`` (the innermost unit) or ``BasicUNet``
    (``down_4``): its output, averaged over space, is the segmenter's feature vector."""
    if hasattr(network, "down_4"):
        return network.down_4
    module = network.model  # type: ignore[attr-defined]
    from monai.networks.layers.simplelayers import SkipConnection

    while isinstance(module, torch.nn.Sequential) and isinstance(module[1], SkipConnection):
        module = module[1].submodule
    return module


@dataclass
class TrainedSegmenter:
    """A trained network with what inference needs.

    Attributes:
        network: The network (eval mode).
        patch_size: Sliding-window size (``None``: whole images).
        losses: Loss per step.
        counts: What the batches held (:class:`BatchCounts` as a dict).
        validation: ``[(step, val Dice)]`` measured during training.
        steps: Optimizer steps trained.
        selected_step: The step whose weights ``network`` holds (the best validation Dice, or
            the last step).
    """

    network: torch.nn.Module
    patch_size: tuple[int, ...] | None
    losses: list[float]
    counts: dict[str, Any] = field(default_factory=dict)
    validation: list[tuple[int, float]] = field(default_factory=list)
    steps: int = 0
    selected_step: int = 0

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

    @torch.no_grad()
    def features(self, crops: np.ndarray, device: str = "cpu", batch: int = 64) -> np.ndarray:
        """Bottleneck features of normalised crops ``(N, *S)`` (each side a multiple of 8
        works best): ``(N, D)``, the deepest block's output averaged over space."""
        self.network.eval()
        captured: list[torch.Tensor] = []
        hook = bottleneck(self.network).register_forward_hook(
            lambda _m, _i, out: captured.append(out.flatten(2).mean(2).cpu())
        )
        try:
            for start in range(0, len(crops), batch):
                x = torch.from_numpy(np.ascontiguousarray(crops[start : start + batch]))
                _padded(self.network, x[:, None].float().to(device))
        finally:
            hook.remove()
        return torch.cat(captured).numpy() if captured else np.zeros((0, 0), np.float32)


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


def validation_dice(
    segmenter: TrainedSegmenter,
    cases: Sequence[ArrayCase],
    lesion_values: Sequence[int],
    device: str = "cpu",
) -> float:
    """Mean Dice over the lesion-bearing ``cases`` (the convergence curve's figure)."""
    scores = []
    for case in cases:
        truth = np.isin(case.label, lesion_values)
        if not truth.any():
            continue
        pred = segmenter.predict(case.image, device)
        scores.append(2.0 * float((pred & truth).sum()) / float(pred.sum() + truth.sum()))
    return float(np.mean(scores)) if scores else math.nan


def learning_rate_factor(step: int, steps: int, cfg: SegmenterConfig) -> float:
    """The learning rate of update ``step`` (0-based) of a run of ``steps``, as a share of the
    peak: ``wsd`` holds the peak, then decays linearly to 0 over the last ``decay_fraction``;
    ``cosine`` decays from the start."""
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
    stable = _stable_steps(steps, cfg)
    return 1.0 if step < stable else (steps - step) / (steps - stable)


def _stable_steps(steps: int, cfg: SegmenterConfig) -> int:
    return min(steps - 1, int(round((1.0 - cfg.decay_fraction) * steps)))


class _Run:
    """One training run's state (network, optimizer, batch stream, curve, best weights)."""

    def __init__(self, batches: ArmBatches, cfg: SegmenterConfig, seed: int, device: str) -> None:
        with _seeded(seed):
            self.network = build_network(cfg, batches.spatial_dims).to(device)
        self.optimizer = torch.optim.AdamW(
            self.network.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
        )
        self.batches = batches
        self.step = 0
        self.losses: list[float] = []
        self.validation: list[tuple[int, float]] = []
        self.best: tuple[float, int, dict[str, torch.Tensor]] | None = None

    def fork(self) -> _Run:
        twin = copy.copy(self)
        twin.network = copy.deepcopy(self.network)
        twin.optimizer = torch.optim.AdamW(
            twin.network.parameters(), lr=self.optimizer.param_groups[0]["lr"]
        )
        twin.optimizer.load_state_dict(copy.deepcopy(self.optimizer.state_dict()))
        twin.batches = self.batches.fork()
        twin.losses = list(self.losses)
        twin.validation = list(self.validation)
        return twin  # ``best`` holds tensors never changed in place: shared safely


def train_segmenters(
    batches: ArmBatches,
    cfg: SegmenterConfig,
    seed: int,
    budgets: Sequence[int],
    *,
    device: str = "cpu",
    validation: Sequence[ArrayCase] = (),
    progress: Callable[[int, int, float], None] | None = None,
) -> dict[int, TrainedSegmenter]:
    """Train one network per budget (steps) of one arm and seed.

    Each budget's result is what a run of exactly that many steps gives. With the ``wsd``
    schedule the runs share their first steps (the peak learning rate), so the shared part is
    trained once and each longer budget continues from it; with ``cosine`` each budget
    trains from scratch. The batch stream and initialisation come from ``seed`` and
    ``batches`` alone, so a budget gives the same weights whichever budgets train with it.

    Args:
        batches: The arm's batches (fresh: nothing drawn yet).
        cfg: Network, optimiser, schedule and selection settings.
        seed: Network initialisation seed.
        budgets: Steps of each run (distinct, >= 1).
        device: Torch device.
        validation: Real val cases scored every ``cfg.validate_every`` steps and at the end.
        progress: Called as ``(step, budget, loss)``.

    Raises:
        EvaluationError: the loss became non-finite.
    """
    from monai.losses import DiceCELoss

    budgets = sorted({int(b) for b in budgets})
    if not budgets or budgets[0] < 1:
        raise EvaluationConfigError(f"budgets must be >= 1 steps, got {list(budgets)}")
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
    lesion_values = batches.lesion_values
    select_best = cfg.select == "best_validation" and bool(validation)
    last_budget = budgets[-1]

    def advance(run: _Run, until: int, total: int) -> None:
        run.network.train()
        while run.step < until:
            for group in run.optimizer.param_groups:
                group["lr"] = cfg.learning_rate * learning_rate_factor(run.step, total, cfg)
            image, target = run.batches.next_batch()
            image, target = image.to(device), target.to(device)
            logits = pad(run.network, image) if pad is not None else run.network(image)
            loss = loss_fn(logits, target)
            if not torch.isfinite(loss):
                raise EvaluationError(
                    f"arm {batches.arm.name} seed {seed}: non-finite loss at step {run.step + 1}"
                )
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            run.optimizer.step()
            run.step += 1
            run.losses.append(float(loss.detach()))
            if progress is not None:
                progress(run.step, total, run.losses[-1])
            every = cfg.validate_every
            if validation and ((every and run.step % every == 0) or run.step == total):
                _validate(run, validation, lesion_values, device, select_best)
                run.network.train()

    def finish(run: _Run) -> TrainedSegmenter:
        trained = TrainedSegmenter(
            run.network, cfg.patch_size, run.losses, validation=run.validation, steps=run.step
        )
        trained.selected_step = run.step
        if select_best and run.best is not None:
            _, trained.selected_step, state = run.best
            run.network.load_state_dict(state)
        run.network.eval()
        trained.counts = run.batches.counts.to_dict()
        return trained

    results: dict[int, TrainedSegmenter] = {}
    shared = _Run(batches, cfg, seed, device)
    for budget in budgets:
        if cfg.schedule == "wsd":
            advance(shared, _stable_steps(budget, cfg), budget)  # common to every longer run
            branch = shared if budget == last_budget else shared.fork()
        else:
            branch = _Run(batches.fork(), cfg, seed, device)  # nothing shared: from scratch
        advance(branch, budget, budget)
        results[budget] = finish(branch)
    return results


def _validate(
    run: _Run,
    cases: Sequence[ArrayCase],
    lesion_values: Sequence[int],
    device: str,
    keep_best: bool,
) -> None:
    if run.validation and run.validation[-1][0] == run.step:
        return  # measured at this step already (a branch's shared point)
    probe = TrainedSegmenter(run.network, run.batches.cfg.patch_size, [])
    score = validation_dice(probe, cases, lesion_values, device)
    run.validation.append((run.step, score))
    if keep_best and math.isfinite(score) and (run.best is None or score > run.best[0]):
        state = {k: v.detach().clone() for k, v in run.network.state_dict().items()}
        run.best = (score, run.step, state)


def train_segmenter(
    batches: ArmBatches,
    cfg: SegmenterConfig,
    seed: int,
    *,
    device: str = "cpu",
    validation: Sequence[ArrayCase] = (),
    progress: Callable[[int, float], None] | None = None,
) -> TrainedSegmenter:
    """Train one network on one arm's batches (``batches.steps`` steps); see
    :func:`train_segmenters`.

    Raises:
        EvaluationError: the loss became non-finite.
    """
    steps = batches.steps
    return train_segmenters(
        batches,
        cfg,
        seed,
        [steps],
        device=device,
        validation=validation,
        progress=(lambda step, _total, loss: progress(step, loss)) if progress else None,
    )[steps]


__all__ = [
    "ArmBatches",
    "ArrayCase",
    "BatchCounts",
    "TrainedSegmenter",
    "augmentation_recipe",
    "bottleneck",
    "build_network",
    "learning_rate_factor",
    "normalise",
    "train_segmenter",
    "train_segmenters",
    "validation_dice",
]
