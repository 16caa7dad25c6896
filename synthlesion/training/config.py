"""The training config: frozen dataclasses read from YAML (unknown keys rejected) with
``key.sub=value`` overrides, saved beside every output.

A YAML file mirrors :class:`TrainConfig`::

    output_dir: runs/phantom2d
    max_steps: 300
    data: {dataset: ..., splits: ..., roi_size: [32, 32]}
    model: {spatial_dims: 2, channels: [32, 64], ...}      # synthlesion.models ModelConfig
    optim: {learning_rate: 2.0e-4}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from synthlesion.config import load_config
from synthlesion.errors import ConfigError
from synthlesion.models.model_config import ModelConfig

ATTRIBUTES = ("volume_fraction", "mean_intensity")


@dataclass(frozen=True)
class IntensityConfig:
    """Intensity normalisation to [-1, 1] (done once, before anything random).

    Attributes:
        mode: ``"auto"`` (CT: window, anything else: percentiles, from the dataset's modality),
            ``"window"`` or ``"percentile"``.
        window: ``[low, high]`` image units (HU for CT) mapped to [-1, 1] in ``window`` mode.
        percentiles: ``[low, high]`` percentiles of each scan's foreground mapped to [-1, 1].
        windows: ``window`` mode for several channels (CT phases): one ``[low, high]`` per
            channel; empty uses ``window`` for all. Every channel is normalised on its own.
    """

    mode: Literal["auto", "window", "percentile"] = "auto"
    window: tuple[float, float] = (-200.0, 300.0)
    percentiles: tuple[float, float] = (0.5, 99.5)
    windows: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True)
class PhantomConfig:
    """Make the embedded procedural phantom (and a locked split of it) when ``data.dataset``
    does not exist yet, so a demo config trains with no data at hand.

    Attributes:
        kind: ``"ct"`` (abdomen: liver + lesions), ``"mri"`` (head: brain + lesions) or
            ``"brain-mri-multi"`` (FLAIR/T1/T1c/T2 brain tumours, lesion-only labels 1-4,
            LPS, z-scored; ``max_lesions`` does not apply: one tumour per patient).
        n_patients: Patients to make.
        size: In-plane voxels.
        seed: Phantom seed (the same seed makes byte-identical files).
        lesion_fraction: Share of patients with lesions.
        max_lesions: Most lesions per patient.
        split_seed: Seed of the patient-level split written to ``data.splits``.
    """

    kind: Literal["ct", "mri", "brain-mri-multi"] = "ct"
    n_patients: int = 40
    size: int = 64
    seed: int = 0
    lesion_fraction: float = 0.8
    max_lesions: int = 3
    split_seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    """Where cases come from and how crops are drawn.

    Attributes:
        dataset: ``dataset.json``, Decathlon/nnU-Net folder, CSV/JSONL manifest or folder.
        splits: The locked splits file (``synthlesion split``); only its train side is trained on.
        patient_pattern: Regex over the case id giving the patient id (sources without one).
        fold: For k-fold splits, the fold held out as val (``None`` for hold-out splits).
        spacing: Voxel size in mm the scans are resampled to (one value per axis); ``None``
            keeps each scan's own spacing.
        roi_size: Crop size in voxels, one value per spatial axis (sets 2D/3D with the model).
        slice_axis: For a 2D model on 3D scans: the RAS axis (0 = R-L, 1 = A-P, 2 = S-I, the
            axial slices) the scans are cut along; 2D crops are drawn from those slices
            (``spacing`` then gives the in-plane voxel size only). ``None``: scans have the
            model's dimensions.
        intensity: Normalisation settings.
        lesion_labels: Label values that are lesions, in class order; ``None`` takes the
            labels whose names say lesion/tumour/nodule... (or every non-zero one).
        organ_labels: Labels of the tissue healthy-tissue blobs are placed in; ``None`` takes
            every label that is neither background nor lesion; ``[]`` means the scan's
            foreground (the placement rule of :func:`synthlesion.masks.placement_region`).
        region_masks: Folder of ``{case_id}.nii.gz`` placement regions (e.g. brain masks) that
            healthy-tissue blobs must stay inside; comes before the organ labels (as
            ``synthlesion sample --region-masks``).
        healthy_fraction: Share of crops centred in healthy tissue, with a random blob as
            region and an empty lesion channel ("fill with healthy tissue").
        region_dilation: Voxels the lesion is dilated by to make the region to fill.
        center_jitter: Largest shift of a lesion from the crop centre, as a fraction of the
            crop size (the lesion stays inside the crop where it fits).
        blob_volume_mm3: ``[low, high]`` volume (area in 2D, mm^2) of healthy blobs, drawn
            log-uniformly; ``None`` draws volumes of the training lesions.
        class_conditioning: Emit ``class_labels`` (lesion class index; healthy crops get K when
            the model has more than K class embeddings, else 0).
        attributes: Scalar attributes to emit, from ``volume_fraction`` (lesion voxels / crop
            voxels) and ``mean_intensity`` (mean normalised intensity inside the lesion).
        prompt: Text prompt for latent backends; ``{label}`` is replaced by the lesion class
            name (``healthy tissue`` for healthy crops). ``None``: no prompt.
        samples_per_epoch: Crops per epoch (an epoch is only a unit of the data position).
        num_workers: DataLoader worker processes (seeded; 0 = in the main process).
        preprocess_workers: Threads reading and resampling scans before training.
        cache_dir: Folder for preprocessed arrays (safetensors) reused across runs; ``None``
            keeps them in memory only.
        tolerance_mm: Largest image/mask geometry difference accepted.
        phantom: When set and ``dataset`` does not exist, the phantom is written there first.
    """

    dataset: Path
    splits: Path
    patient_pattern: str | None = None
    fold: int | None = None
    spacing: tuple[float, ...] | None = None
    roi_size: tuple[int, ...] = (64, 64)
    slice_axis: int | None = None
    intensity: IntensityConfig = field(default_factory=IntensityConfig)
    lesion_labels: tuple[int, ...] | None = None
    organ_labels: tuple[int, ...] | None = None
    region_masks: Path | None = None
    healthy_fraction: float = 0.2
    region_dilation: int = 2
    center_jitter: float = 0.25
    blob_volume_mm3: tuple[float, float] | None = None
    class_conditioning: bool = False
    attributes: tuple[str, ...] = ()
    prompt: str | None = None
    samples_per_epoch: int = 1024
    num_workers: int = 0
    preprocess_workers: int = 2
    cache_dir: Path | None = None
    tolerance_mm: float = 1e-3
    phantom: PhantomConfig | None = None


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and the learning-rate schedule.

    Attributes:
        learning_rate: Peak learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        eps: AdamW epsilon.
        max_grad_norm: Gradient-norm clip (``None``: no clipping).
        lr_scheduler: diffusers ``get_scheduler`` name (``constant``, ``constant_with_warmup``,
            ``linear``, ``cosine``, ``cosine_with_restarts``, ``polynomial``).
        lr_warmup_steps: Linear warm-up steps.
    """

    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 0


@dataclass(frozen=True)
class EMAConfig:
    """Exponential moving average of the trainable weights (exported as the final model).

    Attributes:
        enabled: Keep an EMA copy.
        decay: Largest decay.
        update_after_step: Optimizer steps before the EMA starts following.
        use_warmup: diffusers' warm-up ``1 - (1 + step / inv_gamma) ** -power``; otherwise
            ``(1 + step) / (10 + step)``, both capped at ``decay``.
        inv_gamma: Warm-up inverse gamma.
        power: Warm-up power.
    """

    enabled: bool = True
    decay: float = 0.9999
    update_after_step: int = 0
    use_warmup: bool = True
    inv_gamma: float = 1.0
    power: float = 0.75


@dataclass(frozen=True)
class LossConfig:
    """Arguments of the model's ``training_loss``.

    Attributes:
        lesion_weight: Loss weight inside the (dilated) region/lesion (1 = plain MSE).
        lesion_dilation: Voxels the weighted area is dilated by.
    """

    lesion_weight: float = 1.0
    lesion_dilation: int = 0


@dataclass(frozen=True)
class ValidationConfig:
    """Validation loss and previews on fixed crops, every ``every_n_steps``.

    Attributes:
        every_n_steps: Interval in optimizer steps (0 = never; the end of training always).
        source: ``"val"`` (the val split's real cases), ``"train"`` (fixed held-out crops of
            the train cases) or ``"auto"`` (val when it holds a lesion, else train).
        num_crops: Fixed crops the validation loss is averaged over.
        num_preview: Crops shown in the preview grid and measured for lesion fidelity.
        num_inference_steps: Scheduler steps of the preview generation.
        scheduler: ``"ddim"`` or ``"dpm_solver"`` (DPMSolverMultistep).
        use_ema: Generate previews with the EMA weights when EMA is on.
        ring_mm: Thickness of the ring around a lesion for its contrast, in mm.
        seed: Seed of the fixed crops, noise and timesteps (the same every time).
    """

    every_n_steps: int = 500
    source: Literal["auto", "val", "train"] = "auto"
    num_crops: int = 32
    num_preview: int = 4
    num_inference_steps: int = 25
    scheduler: Literal["ddim", "dpm_solver"] = "ddim"
    use_ema: bool = True
    ring_mm: float = 3.0
    seed: int = 1234


@dataclass(frozen=True)
class AugmentConfig:
    """Classical augmentation of the training crops (``synthlesion.augment``), off by default.

    Runs on the device on every micro-batch, after the intensity normalisation (never before
    it). Spatial transforms move the image and its region and lesion masks with one warp
    (masks nearest-neighbour, so they stay 0/1); intensity transforms change the image only.
    Each transform applies with probability ``p`` per crop. Parameters are reseeded from the
    run seed, the process and the data position, so a resumed run augments exactly as an
    uninterrupted one.

    Attributes:
        enabled: Augment the training crops (validation crops never are).
        p: Probability of each transform, per crop.
        rotate_deg: Largest rotation, degrees (0: none; bound 30).
        scale: Zoom range (equal values: none).
        elastic_mm: Largest elastic displacement, mm (0: none).
        flip_axes: Spatial axes flipped at random (mind anatomy that is not symmetric).
        noise_std: Largest Gaussian noise standard deviation, normalised intensity units.
        gamma_log: Range of log(gamma) is ``[-gamma_log, gamma_log]`` (0: none).
        bias: Largest bias-field coefficient (0: none).
    """

    enabled: bool = False
    p: float = 0.5
    rotate_deg: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    elastic_mm: float = 0.0
    flip_axes: tuple[int, ...] = ()
    noise_std: float = 0.0
    gamma_log: float = 0.0
    bias: float = 0.0


@dataclass(frozen=True)
class CheckpointConfig:
    """Resumable checkpoints.

    Attributes:
        every_n_steps: Interval in optimizer steps (0 = only at the end and on a signal).
        total_limit: Complete checkpoints kept (oldest pruned after a new one is complete);
            ``None`` keeps all.
    """

    every_n_steps: int = 500
    total_limit: int | None = 3


@dataclass(frozen=True)
class TrainConfig:
    """One training run.

    Attributes:
        output_dir: Run folder: ``checkpoint-{step}/``, ``model/`` (the final model),
            ``previews/``, ``metrics.jsonl``, ``train_config.yaml``.
        data: Data settings.
        model: The synthlesion ``ModelConfig`` (built with ``from_config``).
        init_from: A saved synthlesion model folder to start from instead (fine-tuning);
            its own config then replaces ``model``.
        seed: Seed of model init, noise, timesteps and crops.
        max_steps: Optimizer steps.
        batch_size: Crops per process per micro-batch.
        gradient_accumulation_steps: Micro-batches per optimizer step.
        mixed_precision: ``"no"``, ``"fp16"`` or ``"bf16"`` (accelerate).
        gradient_checkpointing: Trade compute for memory in the network.
        max_nonfinite_steps: Abort after this many NaN/Inf losses in a row (each skipped).
        log_every_n_steps: Interval of the training metrics rows.
        report_to: ``"auto"`` (TensorBoard when installed), ``"tensorboard"`` or ``"none"``;
            ``metrics.jsonl`` is always written.
        optim, ema, loss, augment, validation, checkpoint: See their classes.
    """

    output_dir: Path
    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    init_from: Path | None = None
    seed: int = 0
    max_steps: int = 1000
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    max_nonfinite_steps: int = 5
    log_every_n_steps: int = 10
    report_to: Literal["auto", "tensorboard", "none"] = "auto"
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        problems = []
        d = self.data
        dims = len(d.roi_size)
        if dims not in (2, 3):
            problems.append(f"data.roi_size must have 2 or 3 values, got {list(d.roi_size)}")
        if any(s < 4 for s in d.roi_size):
            problems.append(f"data.roi_size values must be >= 4, got {list(d.roi_size)}")
        if self.init_from is None and dims != self.model.spatial_dims:
            problems.append(
                f"data.roi_size has {dims} values but model.spatial_dims is "
                f"{self.model.spatial_dims}"
            )
        if d.spacing is not None and (len(d.spacing) != dims or min(d.spacing) <= 0):
            problems.append(f"data.spacing must hold {dims} positive values, got {list(d.spacing)}")
        if not 0.0 <= d.healthy_fraction <= 1.0:
            problems.append(f"data.healthy_fraction must lie in [0, 1], got {d.healthy_fraction}")
        unknown = [a for a in d.attributes if a not in ATTRIBUTES]
        if unknown:
            problems.append(f"data.attributes {unknown} unknown; known: {list(ATTRIBUTES)}")
        for name, value in (
            ("max_steps", self.max_steps),
            ("batch_size", self.batch_size),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps),
            ("max_nonfinite_steps", self.max_nonfinite_steps),
            ("data.samples_per_epoch", d.samples_per_epoch),
        ):
            if value < 1:
                problems.append(f"{name} must be >= 1, got {value}")
        if d.samples_per_epoch < self.batch_size:
            problems.append(
                f"data.samples_per_epoch ({d.samples_per_epoch}) must be at least "
                f"batch_size ({self.batch_size})"
            )
        if self.checkpoint.total_limit is not None and self.checkpoint.total_limit < 1:
            problems.append("checkpoint.total_limit must be >= 1 or null")
        if self.loss.lesion_weight <= 0:
            problems.append(f"loss.lesion_weight must be > 0, got {self.loss.lesion_weight}")
        a = self.augment
        if not 0.0 <= a.p <= 1.0:
            problems.append(f"augment.p must lie in [0, 1], got {a.p}")
        if any(axis < 0 or axis >= dims for axis in a.flip_axes):
            problems.append(f"augment.flip_axes must be spatial axes < {dims}, got {a.flip_axes}")
        for name, value in (("rotate_deg", a.rotate_deg), ("elastic_mm", a.elastic_mm),
                            ("noise_std", a.noise_std), ("gamma_log", a.gamma_log),
                            ("bias", a.bias)):  # fmt: skip
            if value < 0:
                problems.append(f"augment.{name} must be >= 0, got {value}")
        if not 0 < a.scale[0] <= a.scale[1]:
            problems.append(
                f"augment.scale must be (low, high) with 0 < low <= high, got {a.scale}"
            )
        if a.enabled and "mean_intensity" in d.attributes and a.noise_std + a.gamma_log + a.bias:
            problems.append(
                "augment: intensity transforms would change the crop after its mean_intensity "
                "attribute was measured; drop the attribute or the intensity transforms"
            )
        if not 0 < self.ema.decay < 1:
            problems.append(f"ema.decay must lie in (0, 1), got {self.ema.decay}")
        if problems:
            raise ConfigError("training config: " + "; ".join(problems))


def load_train_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a training YAML plus ``key.sub=value`` overrides.

    Raises:
        ConfigError: unknown key (named with its full dotted path), wrong type, bad value.
    """
    return load_config(TrainConfig, path, overrides)
