"""The evaluation config: frozen dataclasses read by :func:`synthlesion.config.load_config`
(unknown keys rejected) and saved beside the results.

A YAML file mirrors :class:`EvaluateConfig`::

    out_dir: runs/eval
    data: runs/demo/phantom/dataset.json     # real cases
    splits: runs/demo/splits.json            # their locked splits
    diffusion_manifests: [runs/demo/synthetic/manifest.jsonl]
    arms:
      - {name: real, kind: real}
      - {name: diffusion-50, kind: diffusion, share: 0.5}
    seeds: [0, 1, 2]
    segmenter: {network: unet, steps: 300}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from synthlesion.config import load_config
from synthlesion.evaluation.errors import EvaluationConfigError
from synthlesion.pipelines.handcrafted import HandcraftedConfig

ArmKind = Literal["real", "classical", "copy_paste", "handcrafted", "diffusion"]
ARM_KINDS: tuple[str, ...] = ("real", "classical", "copy_paste", "handcrafted", "diffusion")
SYNTHETIC_KINDS = ("handcrafted", "diffusion")


@dataclass(frozen=True)
class ArmConfig:
    """One training arm.

    Attributes:
        name: Label in tables and plots (letters, digits, ``-``, ``_``, ``.``).
        kind: ``real`` (real training cases only), ``classical`` (+ the augmentation package's
            spatial and intensity transforms), ``copy_paste`` (+ its label-aware lesion
            copy-paste), ``handcrafted`` (+ hand-crafted lesion cases) or ``diffusion`` (+ the
            diffusion model's synthetic cases).
        share: Synthetic share of the samples drawn per epoch (0..1), for ``handcrafted`` and
            ``diffusion``; must be 0 for the other kinds.
    """

    name: str
    kind: ArmKind
    share: float = 0.0

    def __post_init__(self) -> None:
        if not self.name or not all(ch.isalnum() or ch in "-_." for ch in self.name):
            raise EvaluationConfigError(
                f"arm name {self.name!r}: use letters, digits, '-', '_' or '.'"
            )
        if self.kind not in ARM_KINDS:
            raise EvaluationConfigError(
                f"arm {self.name}: kind must be one of {list(ARM_KINDS)}, got {self.kind!r}"
            )
        if not (isinstance(self.share, (int, float)) and 0.0 <= self.share <= 1.0):
            raise EvaluationConfigError(
                f"arm {self.name}: synthetic share must lie in [0, 1], got {self.share!r}"
            )
        if self.kind in SYNTHETIC_KINDS and self.share == 0.0:
            raise EvaluationConfigError(
                f"arm {self.name}: a {self.kind} arm needs a synthetic share > 0 (0 is the "
                "real arm)"
            )
        if self.kind not in SYNTHETIC_KINDS and self.share != 0.0:
            raise EvaluationConfigError(
                f"arm {self.name}: share applies to handcrafted and diffusion arms only, got "
                f"share {self.share} for kind {self.kind}"
            )


def default_arms() -> tuple[ArmConfig, ...]:
    return (
        ArmConfig("real", "real"),
        ArmConfig("classical", "classical"),
        ArmConfig("copy-paste", "copy_paste"),
        ArmConfig("handcrafted", "handcrafted", 0.5),
        ArmConfig("diffusion-25", "diffusion", 0.25),
        ArmConfig("diffusion-50", "diffusion", 0.5),
    )


@dataclass(frozen=True)
class SegmenterConfig:
    """The small segmentation network every arm trains, with one budget for all.

    Attributes:
        network: MONAI ``unet`` (``UNet`` with residual units) or ``basic_unet``.
        norm: ``UNet`` normalisation, ``batch`` or ``instance`` (instance-normalised residual
            units learned far more slowly on small lesions in our runs).
        channels: Feature channels per level (``UNet``: one per level, strides 2; ``BasicUNet``:
            exactly 6 values).
        steps: Optimizer steps per run (the budget, equal for every arm and seed).
        batch_size: Samples per step.
        learning_rate: AdamW learning rate (cosine decay to 0).
        weight_decay: AdamW weight decay.
        patch_size: Random crops of this size (voxels, half of them centred on a lesion when
            there is one) and sliding-window inference; ``None`` trains on whole images (all of
            one shape).
        lesion_centred_fraction: Share of patches centred on a lesion voxel.
        lesion_weight: Cross-entropy weight of the lesion class (background 1).
    """

    network: Literal["unet", "basic_unet"] = "unet"
    norm: Literal["batch", "instance"] = "batch"
    channels: tuple[int, ...] = (16, 32, 64, 128)
    steps: int = 300
    batch_size: int = 16
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    patch_size: tuple[int, ...] | None = None
    lesion_centred_fraction: float = 0.5
    lesion_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.lesion_weight <= 0:
            raise EvaluationConfigError("segmenter.lesion_weight must be > 0")
        if self.steps < 1 or self.batch_size < 1:
            raise EvaluationConfigError("segmenter.steps and segmenter.batch_size must be >= 1")
        if self.network == "basic_unet" and len(self.channels) != 6:
            raise EvaluationConfigError("segmenter.channels: BasicUNet needs exactly 6 values")
        if self.network == "unet" and len(self.channels) < 2:
            raise EvaluationConfigError("segmenter.channels: UNet needs at least 2 levels")
        if not 0.0 <= self.lesion_centred_fraction <= 1.0:
            raise EvaluationConfigError("segmenter.lesion_centred_fraction must lie in [0, 1]")


@dataclass(frozen=True)
class MetricsConfig:
    """How the test cases are scored.

    Attributes:
        size_bins_mm: Edges of the lesion size bins by equivalent diameter (mm): ``[10, 20]``
            gives ``<10``, ``10-20``, ``>=20``.
        bootstrap: Bootstrap resamples of the paired case differences.
        reference_arm: Arm the paired comparisons are made against (default: the first arm).
        seed: Seed of the bootstrap.
    """

    size_bins_mm: tuple[float, ...] = (20.0, 30.0)
    bootstrap: int = 2000
    reference_arm: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        edges = list(self.size_bins_mm)
        if any(not math.isfinite(e) or e <= 0 for e in edges) or edges != sorted(set(edges)):
            raise EvaluationConfigError(
                f"metrics.size_bins_mm must be increasing positive values, got {edges}"
            )
        if self.bootstrap < 100:
            raise EvaluationConfigError("metrics.bootstrap must be >= 100")


@dataclass(frozen=True)
class FidelityConfig:
    """Fidelity of the synthetic lesions themselves.

    Attributes:
        crop_size: Side of the lesion crops compared for memorisation (voxels).
        memorisation_threshold: A synthetic lesion whose normalised correlation with a real
            training lesion crop reaches this is flagged as a near-copy.
        max_lesions: Most synthetic lesions measured per generator.
        grid_rows: Example rows in the report's image grid per generator.
        grid_crop_size: Side of the crops shown in the image grid (voxels).
    """

    crop_size: int = 16
    memorisation_threshold: float = 0.9
    max_lesions: int = 200
    grid_rows: int = 4
    grid_crop_size: int = 32

    def __post_init__(self) -> None:
        if self.crop_size < 4 or self.grid_crop_size < 4:
            raise EvaluationConfigError("fidelity.crop_size and grid_crop_size must be >= 4")
        if not 0.0 < self.memorisation_threshold <= 1.0:
            raise EvaluationConfigError("fidelity.memorisation_threshold must lie in (0, 1]")


@dataclass(frozen=True)
class EvaluateConfig:
    """One downstream evaluation run.

    Attributes:
        out_dir: Run folder: ``evaluate_config.yaml``, ``run.json``, ``build/`` (the guarded
            dataset), ``handcrafted/`` (baseline cases), ``arms/<arm>/seed-<n>/``,
            ``results.json``, ``report.html`` and ``figures/``.
        data: Real cases (dataset.json, folder or manifest); never a synthetic set.
        splits: The locked splits file of ``data``.
        test_split: The evaluation side scored (``test``, or ``val`` while developing).
        diffusion_manifests: Manifests of diffusion-synthetic sets (``synthlesion sample``).
        include_rejected: Also train on synthetic cases that failed their quality gate
            (left out by default, as ``build-dataset`` does).
        handcrafted_manifest: An existing hand-crafted set's manifest; ``None`` makes one in
            ``out_dir/handcrafted`` when an arm needs it.
        arms: The arms (names unique).
        seeds: Seeds; every arm trains once per seed (the same seeds for every arm).
        threads: torch CPU threads (``None``: torch's default).
        device: ``cpu`` or ``cuda``.
        segmenter, handcrafted, metrics, fidelity: See their classes.
        report: Write ``report.html`` and the figures.
    """

    out_dir: Path
    data: Path
    splits: Path
    test_split: Literal["test", "val"] = "test"
    diffusion_manifests: tuple[Path, ...] = ()
    include_rejected: bool = False
    handcrafted_manifest: Path | None = None
    arms: tuple[ArmConfig, ...] = field(default_factory=default_arms)
    seeds: tuple[int, ...] = (0, 1, 2)
    threads: int | None = None
    device: str = "cpu"
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    handcrafted: HandcraftedConfig = field(default_factory=HandcraftedConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)
    report: bool = True

    def __post_init__(self) -> None:
        if self.test_split not in ("test", "val"):
            raise EvaluationConfigError(
                f"test_split must be 'test' or 'val' (an evaluation side), got {self.test_split!r}"
            )
        if not self.arms:
            raise EvaluationConfigError("arms: at least one arm is needed")
        names = [a.name for a in self.arms]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise EvaluationConfigError(f"arms: duplicate names {duplicates}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise EvaluationConfigError(f"seeds must be distinct and non-empty, got {self.seeds}")
        if any(a.kind == "diffusion" for a in self.arms) and not self.diffusion_manifests:
            raise EvaluationConfigError(
                "a diffusion arm needs diffusion_manifests (the manifest.jsonl of `synthlesion "
                "sample`)"
            )
        reference = self.metrics.reference_arm
        if reference is not None and reference not in names:
            raise EvaluationConfigError(
                f"metrics.reference_arm {reference!r} is not an arm ({', '.join(names)})"
            )
        if self.threads is not None and self.threads < 1:
            raise EvaluationConfigError("threads must be >= 1")

    @property
    def reference_arm(self) -> str:
        return self.metrics.reference_arm or self.arms[0].name


def load_evaluate_config(
    source: str | Path | dict | None = None, overrides: Sequence[str] = ()
) -> EvaluateConfig:
    """Read an evaluation YAML (or mapping) plus ``key.sub=value`` overrides.

    Raises:
        ConfigError: unknown key, wrong type (from the shared loader).
        EvaluationConfigError: a value out of range (a share outside [0, 1], ...).
    """
    return load_config(EvaluateConfig, source, overrides)


__all__ = [
    "ARM_KINDS",
    "ArmConfig",
    "EvaluateConfig",
    "FidelityConfig",
    "HandcraftedConfig",
    "MetricsConfig",
    "SegmenterConfig",
    "default_arms",
    "load_evaluate_config",
]
