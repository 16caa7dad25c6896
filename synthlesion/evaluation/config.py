"""The evaluation config: frozen dataclasses read by :func:`synthlesion.config.load_config`
(unknown keys rejected) and saved beside the results.

A YAML file mirrors :class:`EvaluateConfig`::

    out_dir: runs/eval
    data: data/liver/dataset.json            # real cases
    splits: [data/liver/splits-0.json, data/liver/splits-1.json]   # locked patient splits
    budgets: [4, 16]                         # labelled lesion patients of the train side
    diffusion: {train_config: configs/train_phantom2d_cpu.yaml}   # trained per split x budget
    arms:
      - {name: real, kind: real}
      - {name: copy-paste, kind: copy_paste, share: 0.5}
      - {name: diffusion, kind: diffusion, share: 0.5}
    seeds: [0, 1]
    segmenter: {network: unet, steps: 600, foreground_share: 0.33}
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from synthlesion.config import check_device, load_config, read_mapping
from synthlesion.errors import ConfigError
from synthlesion.evaluation.errors import EvaluationConfigError
from synthlesion.pipelines.handcrafted import HandcraftedConfig

ArmKind = Literal["real", "copy_paste", "handcrafted", "diffusion"]
ARM_KINDS: tuple[str, ...] = ("real", "copy_paste", "handcrafted", "diffusion")
SYNTHETIC_KINDS = ("handcrafted", "diffusion")
SHARED_KINDS = ("copy_paste", *SYNTHETIC_KINDS)  # kinds whose share of the positives is new


@dataclass(frozen=True)
class ArmConfig:
    """One training arm.

    Attributes:
        name: Label in tables and plots (letters, digits, ``-``, ``_``, ``.``).
        kind: ``real`` (the labelled real cases only), ``copy_paste`` (+ real lesions pasted
            into lesion-free crops by the augmentation package's label-aware copy-paste),
            ``handcrafted`` (+ hand-crafted lesion cases) or ``diffusion`` (+ the diffusion
            model's synthetic cases). Every arm trains with the same augmentation recipe and
            the same share of lesion-bearing patches (``segmenter.foreground_share``), so arms
            differ in where their lesions come from only.
        share: Share of the lesion-bearing patches that come from the arm's new lesions
            (synthetic cases, or copy-pasted lesions), in (0, 1]; 0 for ``real``.
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
        if self.kind in SHARED_KINDS and self.share == 0.0:
            raise EvaluationConfigError(
                f"arm {self.name}: a {self.kind} arm needs a share > 0 of its lesion patches "
                "(0 is the real arm)"
            )
        if self.kind == "real" and self.share != 0.0:
            raise EvaluationConfigError(
                f"arm {self.name}: share applies to copy_paste, handcrafted and diffusion arms, "
                f"got share {self.share} for kind real"
            )


def default_arms() -> tuple[ArmConfig, ...]:
    return (
        ArmConfig("real", "real"),
        ArmConfig("copy-paste", "copy_paste", 0.5),
        ArmConfig("handcrafted", "handcrafted", 0.5),
        ArmConfig("diffusion", "diffusion", 0.5),
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
        steps_by_budget: Steps for a labelled budget where it needs its own (``{16: 3200}``;
            ``all`` for the upper reference, which otherwise takes the largest given): more
            labelled scans take more steps to converge. Every arm and seed of a budget gets
            the same steps; the convergence check doubles them.
        batch_size: Samples per step.
        learning_rate: AdamW peak learning rate.
        schedule: ``wsd`` (warmup-free "warmup-stable-decay": the peak rate, then a linear
            decay to 0 over the last ``decay_fraction`` of the steps) or ``cosine``. With
            ``wsd`` a run of twice the steps shares its first ``(1 - decay_fraction)`` steps
            with the shorter run exactly, so the convergence check branches off the real arm's
            run instead of training it again from scratch (same result, less compute).
        decay_fraction: Share of the steps spent decaying (``wsd``).
        select: ``best_validation`` keeps the weights with the best validation Dice (measured
            every ``validate_every`` steps and at the end; the earliest on ties), as MONAI's
            tutorials do; ``last`` keeps the final weights. Without val cases: the last.
        weight_decay: AdamW weight decay.
        patch_size: Crops of this size (voxels) and sliding-window inference; ``None``
            trains on whole images (all of one shape).
        foreground_share: nnU-Net's foreground oversampling: this share of every batch
            (rounded, at least one patch) is centred on a voxel of a lesion drawn from a
            lesion-bearing scan; the other patches hold no lesion voxel (drawn from the real
            scans, healthy ones included, as negatives). Every arm gets the same share.
        augment: Apply the augmentation recipe (flip, small affine, elastic, contrast, gamma,
            noise) to every batch of every arm.
        validate_every: Steps between validation Dice measurements on the val split (the
            convergence curve); 0 turns them off.
        lesion_weight: Cross-entropy weight of the lesion class (background 1).
    """

    network: Literal["unet", "basic_unet"] = "unet"
    norm: Literal["batch", "instance"] = "batch"
    channels: tuple[int, ...] = (16, 32, 64, 128)
    steps: int = 300
    steps_by_budget: dict[int | str, int] = field(default_factory=dict)
    batch_size: int = 16
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    patch_size: tuple[int, ...] | None = None
    foreground_share: float = 0.33
    augment: bool = True
    validate_every: int = 100
    lesion_weight: float = 1.0
    schedule: Literal["wsd", "cosine"] = "wsd"
    decay_fraction: float = 0.2
    select: Literal["best_validation", "last"] = "best_validation"

    def steps_for(self, budget: str) -> int:
        """Steps of a labelled budget (its name: ``"4"``, or ``"all"``)."""
        if budget in self.steps_by_budget:
            return self.steps_by_budget[budget]
        if budget == "all" and self.steps_by_budget:
            return max(self.steps, *self.steps_by_budget.values())
        return self.steps

    def __post_init__(self) -> None:
        if self.lesion_weight <= 0:
            raise EvaluationConfigError("segmenter.lesion_weight must be > 0")
        if self.steps < 1 or self.batch_size < 1:
            raise EvaluationConfigError("segmenter.steps and segmenter.batch_size must be >= 1")
        by_budget = {}
        for raw, value in self.steps_by_budget.items():
            key = str(raw)
            valid_key = key == "all" or re.fullmatch(r"[1-9][0-9]*", key, flags=re.ASCII)
            valid_value = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            if isinstance(raw, bool) or not valid_key or not valid_value:
                raise EvaluationConfigError(
                    f"segmenter.steps_by_budget: {raw!r}: {value!r}; keys are labelled budgets "
                    "(whole numbers >= 1, as in protocol.budgets) or 'all', values steps >= 1"
                )
            by_budget[key] = value
        object.__setattr__(self, "steps_by_budget", by_budget)
        for name, allowed in (
            ("network", ("unet", "basic_unet")),
            ("norm", ("batch", "instance")),
            ("schedule", ("wsd", "cosine")),
            ("select", ("best_validation", "last")),
        ):
            if getattr(self, name) not in allowed:
                raise EvaluationConfigError(
                    f"segmenter.{name} must be one of {list(allowed)}, got {getattr(self, name)!r}"
                )
        if self.network == "basic_unet" and len(self.channels) != 6:
            raise EvaluationConfigError("segmenter.channels: BasicUNet needs exactly 6 values")
        if self.network == "unet" and len(self.channels) < 2:
            raise EvaluationConfigError("segmenter.channels: UNet needs at least 2 levels")
        if not 0.0 < self.foreground_share < 1.0:
            raise EvaluationConfigError(
                f"segmenter.foreground_share must lie in (0, 1), got {self.foreground_share}"
            )
        if self.validate_every < 0:
            raise EvaluationConfigError("segmenter.validate_every must be >= 0")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise EvaluationConfigError(
                f"segmenter.decay_fraction must lie in (0, 1], got {self.decay_fraction}"
            )


@dataclass(frozen=True)
class MetricsConfig:
    """How the test cases are scored.

    Attributes:
        size_bins_mm: Edges of the lesion size bins by equivalent diameter (mm): ``[10, 20]``
            gives ``<10``, ``10-20``, ``>=20``.
        bootstrap: Bootstrap resamples of the paired case differences.
        reference_arm: Arm the paired comparisons are made against (default: the first real arm).
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
    """Realism of the synthetic lesions, measured against real ones.

    Attributes:
        crop_size: Side of the lesion crops (voxels) fed to the KID encoder, the real-vs-
            synthetic classifier and the memorisation check.
        memorisation_threshold: A synthetic lesion whose normalised correlation with a real
            training lesion crop reaches this is flagged as a near-copy.
        max_lesions: Most lesions measured per generator (and per real reference set).
        repaint_lesions: Most held-out real lesions repainted per generator.
        classifier_folds: Folds of the real-vs-synthetic classifier.
        kid_subsets: Random subsets averaged by KID.
        grid_rows: Example rows in the report's image grid per generator.
        grid_crop_size: Side of the crops shown in the image grid (voxels).
    """

    crop_size: int = 24
    memorisation_threshold: float = 0.9
    max_lesions: int = 200
    repaint_lesions: int = 40
    classifier_folds: int = 5
    kid_subsets: int = 100
    grid_rows: int = 4
    grid_crop_size: int = 32

    def __post_init__(self) -> None:
        if self.crop_size < 4 or self.grid_crop_size < 4:
            raise EvaluationConfigError("fidelity.crop_size and grid_crop_size must be >= 4")
        if not 0.0 < self.memorisation_threshold <= 1.0:
            raise EvaluationConfigError("fidelity.memorisation_threshold must lie in (0, 1]")
        if self.classifier_folds < 2 or self.repaint_lesions < 1 or self.kid_subsets < 1:
            raise EvaluationConfigError(
                "fidelity: classifier_folds >= 2, repaint_lesions >= 1, kid_subsets >= 1"
            )


@dataclass(frozen=True)
class GateConfig:
    """The quality gate every synthetic case of the evaluation passes through (diffusion and
    hand-crafted alike), on top of the gate recorded in its manifest (finite values,
    intensity z-scores, seam, minimum contrast).

    Attributes:
        min_dice: The real-only segmenter (seed 0 of the same split and budget) must find each
            painted lesion inside its mask with at least this Dice (FreeTumor-style filtering).
        apply: Leave cases that fail out of training (they are counted either way).
    """

    min_dice: float = 0.1
    apply: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_dice <= 1.0:
            raise EvaluationConfigError(f"gate.min_dice must lie in [0, 1], got {self.min_dice}")


@dataclass(frozen=True)
class DiffusionSource:
    """Where the diffusion arms' cases come from.

    Attributes:
        manifests: Existing diffusion sets (``synthlesion sample``); only for one patient split
            and one budget (a model trained on more labelled scans than a budget would leak
            labels into it).
        train_config: A ``synthlesion train`` YAML: the model is trained once per split and
            budget on exactly that budget's labelled scans (``data.*`` and ``out_dir`` are set
            by the evaluation), then paints lesions into the healthy train scans.
        sample_steps: Denoising steps when sampling.
        scheduler: Sampling scheduler.
    """

    manifests: tuple[Path, ...] = ()
    train_config: Path | None = None
    sample_steps: int = 20
    scheduler: str = "dpmsolver++"

    def __post_init__(self) -> None:
        if self.manifests and self.train_config is not None:
            raise EvaluationConfigError("diffusion: give manifests or train_config, not both")
        if self.sample_steps < 1:
            raise EvaluationConfigError("diffusion.sample_steps must be >= 1")


@dataclass(frozen=True)
class ProtocolConfig:
    """How many labelled scans, which references, and the convergence check.

    Attributes:
        budgets: Labelled lesion patients of each split's train side per budget, with all
            their scans (a nested draw: the 4 of budget 4 are among the 16 of budget 16);
            ``None``: all of them, one budget. The train side's lesion patients outside the
            budget are left out whole (their scans are unlabelled in this scenario); the
            healthy train patients are kept in every budget.
        upper_reference: Also train the real arm with every lesion scan of the train side
            labelled (the all-labelled upper reference).
        threshold_floor: Score the intensity-threshold rule (``|x - organ median| > t`` inside
            the organ, ``t`` fitted on the budget's labelled scans) as a floor.
        convergence_check: Train the real arm again with twice the steps (every split, budget
            and seed) and report the change in test Dice.
        convergence_tolerance: The budget counts as converged when doubling it changes the
            real arm's mean test Dice by less than this, at every budget.
        min_test_lesion_cases: Fewest lesion scans the test side of every split must hold.
    """

    budgets: tuple[int, ...] | None = None
    upper_reference: bool = True
    threshold_floor: bool = True
    convergence_check: bool = True
    convergence_tolerance: float = 0.01
    min_test_lesion_cases: int = 10

    def __post_init__(self) -> None:
        if self.budgets is not None:
            if not self.budgets or any(b < 1 for b in self.budgets):
                raise EvaluationConfigError(
                    f"protocol.budgets must be positive counts, got {list(self.budgets)}"
                )
            if len(set(self.budgets)) != len(self.budgets):
                raise EvaluationConfigError(f"protocol.budgets repeat: {list(self.budgets)}")
        if self.convergence_tolerance <= 0 or self.min_test_lesion_cases < 1:
            raise EvaluationConfigError(
                "protocol.convergence_tolerance must be > 0 and min_test_lesion_cases >= 1"
            )


@dataclass(frozen=True)
class EvaluateConfig:
    """One downstream evaluation run.

    Attributes:
        out_dir: Run folder: ``evaluate_config.yaml``, ``run.json``, ``cells/<split>-<budget>/``
            (the cell's real cases and splits, its generators' sets, the guarded build, every
            arm and seed), ``results.json``, ``report.html`` and ``figures/``.
        data: Real cases (dataset.json, folder or manifest); never a synthetic set.
        splits: Locked patient splits of ``data``, one per repetition (the protocol's
            statistics resample them).
        test_split: The evaluation side scored (``test``, or ``val`` while developing).
        diffusion: Where the diffusion arms' cases come from.
        include_rejected: Also train on synthetic cases that failed a quality gate.
        handcrafted_manifest: An existing hand-crafted set's manifest (one split and one budget
            only); ``None`` makes one per split and budget.
        arms: The arms (names unique); the first is the reference of the comparisons.
        seeds: Seeds; every arm trains once per seed, split and budget.
        threads: torch CPU threads (``None``: torch's default).
        device: ``cpu`` or ``cuda``.
        protocol, segmenter, handcrafted, gate, metrics, fidelity: See their classes.
        report: Write ``report.html`` and the figures.
    """

    out_dir: Path
    data: Path
    splits: tuple[Path, ...]
    test_split: Literal["test", "val"] = "test"
    diffusion: DiffusionSource = field(default_factory=DiffusionSource)
    include_rejected: bool = False
    handcrafted_manifest: Path | None = None
    arms: tuple[ArmConfig, ...] = field(default_factory=default_arms)
    seeds: tuple[int, ...] = (0, 1)
    threads: int | None = None
    device: str = "cpu"
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    handcrafted: HandcraftedConfig = field(default_factory=HandcraftedConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)
    report: bool = True

    def __post_init__(self) -> None:
        if self.test_split not in ("test", "val"):
            raise EvaluationConfigError(
                f"test_split must be 'test' or 'val' (an evaluation side), got {self.test_split!r}"
            )
        if not self.splits:
            raise EvaluationConfigError("splits: at least one locked splits file is needed")
        try:
            object.__setattr__(self, "device", check_device(self.device))
        except ConfigError as exc:
            raise EvaluationConfigError(str(exc)) from None
        budgets = self.protocol.budgets
        unknown = [
            k
            for k in self.segmenter.steps_by_budget
            if k != "all" and (budgets is None or int(k) not in budgets)
        ]
        if unknown:
            raise EvaluationConfigError(
                f"segmenter.steps_by_budget: budget(s) {unknown} are not in protocol.budgets "
                f"{list(budgets) if budgets is not None else '(none: every labelled scan)'}"
            )
        if len({str(s) for s in self.splits}) != len(self.splits):
            raise EvaluationConfigError("splits: the same splits file is listed twice")
        if not self.arms:
            raise EvaluationConfigError("arms: at least one arm is needed")
        names = [a.name for a in self.arms]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise EvaluationConfigError(f"arms: duplicate names {duplicates}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise EvaluationConfigError(f"seeds must be distinct and non-empty, got {self.seeds}")
        cells = len(self.splits) * len(self.protocol.budgets or (None,))
        wants_diffusion = any(a.kind == "diffusion" for a in self.arms)
        source = self.diffusion
        if wants_diffusion and not source.manifests and source.train_config is None:
            raise EvaluationConfigError(
                "a diffusion arm needs diffusion.train_config (a `synthlesion train` YAML, "
                "trained per split and budget) or diffusion.manifests (the manifest.jsonl of "
                "`synthlesion sample`)"
            )
        if wants_diffusion and source.manifests and cells > 1:
            raise EvaluationConfigError(
                f"diffusion.manifests serve one split and one budget, this run has {cells} "
                "(splits x budgets): give diffusion.train_config so each gets its own model"
            )
        if self.handcrafted_manifest is not None and cells > 1:
            raise EvaluationConfigError(
                f"handcrafted_manifest serves one split and one budget, this run has {cells}; "
                "leave it null (made per split and budget)"
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
        """``metrics.reference_arm``, else the first real arm (else the first arm)."""
        if self.metrics.reference_arm:
            return self.metrics.reference_arm
        return next((a.name for a in self.arms if a.kind == "real"), self.arms[0].name)


def load_evaluate_config(
    source: str | Path | dict | None = None, overrides: Sequence[str] = ()
) -> EvaluateConfig:
    """Read an evaluation YAML (or mapping) plus ``key.sub=value`` overrides.

    Raises:
        ConfigError: unknown key, wrong type (from the shared loader).
        EvaluationConfigError: a value out of range (a share outside [0, 1], ...).
    """
    data = read_mapping(source)
    if isinstance(data.get("splits"), (str, Path)):  # one splits file: a list of one
        data["splits"] = [data["splits"]]
    try:
        return load_config(EvaluateConfig, data, overrides)
    except ConfigError as exc:
        if source is None or isinstance(source, dict):
            raise
        raise ConfigError(str(exc).replace("<mapping>", str(source), 1)) from None


__all__ = [
    "ARM_KINDS",
    "ArmConfig",
    "DiffusionSource",
    "EvaluateConfig",
    "FidelityConfig",
    "GateConfig",
    "ProtocolConfig",
    "HandcraftedConfig",
    "MetricsConfig",
    "SegmenterConfig",
    "default_arms",
    "load_evaluate_config",
]
