"""The hand-crafted lesion baseline (SynTumor-style) a diffusion model must beat.

Each lesion is a smoothly deformed ellipsoid (:func:`synthlesion.masks.procedural_mask`) whose
size is drawn from the real training lesions' sizes, placed inside the organ away from its
border and from existing lesions (:class:`synthlesion.masks.PlacementConstraint`), and painted
additively, so the scan keeps its own noise: a contrast drawn from the real training lesions'
contrasts (lesion mean minus surrounding tissue mean, in image units) plus a smoothed Gaussian
texture, with a soft edge (the change is blurred by ``edge_mm``). The label map is exact: the
placed mask is the lesion.

Cases are written by the same driver as diffusion cases
(:class:`~synthlesion.provenance.run.SyntheticSetRun`): ``imagesTr/`` (every channel: the
lesion is painted into each channel with that channel's own contrast), ``labelsTr/``, the
synthetic mark in every file and a hash-chained ``manifest.jsonl``, with a generator folder
whose ``training_record.json`` lists (hashed) the training patients whose lesions set the sizes
and contrasts, so the builder's guards treat the baseline exactly like a trained generator.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from synthlesion.config import check_counts
from synthlesion.data.cases import Case
from synthlesion.data.io import load_case_volumes, load_image
from synthlesion.data.sources import load_cases
from synthlesion.data.splits import load_splits
from synthlesion.errors import ConfigError, GeometryError, ImageReadError
from synthlesion.masks import (
    PlacementConstraint,
    PlacementError,
    keep_away,
    place_mask,
    placement_region,
    procedural_mask,
)
from synthlesion.masks.lesions import case_has_lesion
from synthlesion.pipelines.lesion_synthesis import SynthesisError
from synthlesion.pipelines.quality import (
    QualityGate,
    RealLesionReference,
    evaluate_lesion,
    lesion_statistics,
)
from synthlesion.provenance.errors import ProvenanceError
from synthlesion.provenance.identity import (
    PATIENT_HASH_SCHEME,
    TRAINING_RECORD_FILE,
    GeneratorRef,
    hash_patient_id,
)
from synthlesion.provenance.record import TrainingRecord
from synthlesion.provenance.run import (
    GeneratedCase,
    SyntheticSetReport,
    SyntheticSetRun,
    plan_cases,
    refuse_inside_data_root,
)

logger = logging.getLogger(__name__)

GENERATOR_FORMAT = "synthlesion-handcrafted-generator/1"


@dataclass(frozen=True)
class HandcraftedConfig:
    """The SynTumor-style baseline generator (see the module docstring).

    Attributes:
        per_case: Hand-crafted cases made from each source scan.
        lesions_per_case: Lesions painted into each case.
        healthy_only: Use only train scans without a lesion as sources.
        seed: Base seed (each case's seed derives from it and the case id).
        edge_mm: Width of the soft edge inside the lesion (mm).
        texture_sigma_mm: Smoothing of the Gaussian texture (mm).
        min_border_distance_mm: Distance kept from the placement region's border (mm).
        limit: Most cases (``None``: all sources).
    """

    per_case: int = 1
    lesions_per_case: int = 1
    healthy_only: bool = True
    seed: int = 0
    edge_mm: float = 2.0
    texture_sigma_mm: float = 3.0
    min_border_distance_mm: float = 2.0
    limit: int | None = None

    def __post_init__(self) -> None:
        problems = check_counts(
            per_case=self.per_case, lesions_per_case=self.lesions_per_case, limit=self.limit
        )
        if self.seed < 0:
            problems.append(f"seed must be >= 0, got {self.seed}")
        for name in ("edge_mm", "texture_sigma_mm", "min_border_distance_mm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                problems.append(f"{name} must be a finite number >= 0, got {value}")
        if problems:
            raise ConfigError("hand-crafted options: " + "; ".join(problems))


@dataclass(frozen=True)
class RealLesionFit:
    """What the baseline learns from the real training lesions (image units, mm).

    Attributes:
        volumes_mm3: Volume of each lesion (area in mm^2 for 2D).
        contrasts: Lesion mean minus surrounding-tissue mean.
        stds: Standard deviation inside each lesion.
        patients: Patients whose lesions were measured.
        lesion_values: Label values of lesions.
        organ_values: Label values of the organ lesions go into.
        modality: Modality of the train cases.
    """

    volumes_mm3: tuple[float, ...]
    contrasts: tuple[float, ...]
    stds: tuple[float, ...]
    patients: tuple[str, ...]
    lesion_values: tuple[int, ...]
    organ_values: tuple[int, ...]
    modality: str

    @classmethod
    def from_cases(cls, cases: Sequence[Case]) -> RealLesionFit:
        """Measure every connected lesion of the given real training cases.

        Raises:
            SynthesisError: no lesion among the cases.
        """
        volumes, contrasts, stds, patients = [], [], [], set()
        lesion_values: tuple[int, ...] = ()
        organ_values: tuple[int, ...] = ()
        modality = "unknown"
        for case in cases:
            if case.mask is None or case.origin != "real":
                continue
            lesion_values = case.lesion_labels
            organ_values = tuple(v for v in sorted(case.labels) if v and v not in lesion_values)
            modality = case.modality
            labels = load_image(case.mask)
            lesion = np.isin(labels.array, lesion_values)
            if not lesion.any():
                continue
            image = load_image(case.image)
            tissue = np.isin(labels.array, organ_values)
            components, count = ndimage.label(lesion)
            voxel = float(np.prod(labels.spacing))
            for index in range(1, count + 1):
                one = components == index
                stats = lesion_statistics(
                    image.array,
                    one,
                    image.spacing,
                    tissue=tissue,
                )
                volumes.append(float(one.sum()) * voxel)
                contrasts.append(stats.contrast)
                stds.append(stats.std)
            patients.add(case.patient_id)
        if not volumes:
            raise SynthesisError(
                "hand-crafted baseline: no real lesion in the train split to "
                "learn sizes and contrasts from"
            )
        return cls(
            tuple(volumes),
            tuple(contrasts),
            tuple(stds),
            tuple(sorted(patients)),
            lesion_values,
            organ_values,
            modality,
        )

    def draw_volume(self, rng: np.random.Generator) -> float:
        logs = np.log(np.asarray(self.volumes_mm3))
        return float(np.exp(rng.normal(logs.mean(), max(float(logs.std()), 0.1))))

    def draw_contrast(self, rng: np.random.Generator) -> float:
        return float(rng.choice(np.asarray(self.contrasts)) * rng.uniform(0.85, 1.15))

    def draw_texture_sd(self, rng: np.random.Generator) -> float:
        return float(rng.choice(np.asarray(self.stds)) * rng.uniform(0.3, 0.6))


def paint_handcrafted_lesion(
    image: np.ndarray,
    lesion: np.ndarray,
    tissue: np.ndarray,
    spacing: Sequence[float],
    rng: np.random.Generator,
    fit: RealLesionFit,
    options: HandcraftedConfig,
) -> np.ndarray:
    """Paint one lesion into ``image`` (float64 copy returned; same shape).

    Args:
        image: Source image in image units (HU for CT), shape ``S``.
        lesion: Boolean lesion mask, shape ``S``.
        tissue: Boolean organ mask (for the surrounding level), shape ``S``.
        spacing: Voxel size in mm.
        rng: Draws contrast and texture.
        fit: The real lesions' sizes, contrasts and spreads.
        options: Edge width and texture smoothing.
    """
    sp = np.asarray(spacing[: image.ndim], dtype=float)
    contrast = fit.draw_contrast(rng)
    texture = ndimage.gaussian_filter(
        rng.standard_normal(image.shape), sigma=list(options.texture_sigma_mm / sp)
    )
    texture /= float(texture.std()) + 1e-8
    texture *= fit.draw_texture_sd(rng)
    delta = np.where(lesion, contrast + texture, 0.0)
    sigma = list(options.edge_mm / 2 / sp)
    # full contrast inside the lesion, a blurred fade just outside it (within the organ)
    change = np.where(lesion, delta, ndimage.gaussian_filter(delta, sigma=sigma))
    change[~(tissue | lesion)] = 0.0
    return image.astype(np.float64) + change


def run_handcrafted(
    data: str | Path,
    splits_path: str | Path,
    out_dir: str | Path,
    options: HandcraftedConfig | None = None,
    *,
    progress: Callable[[int, int, str], None] | None = None,
    patient_pattern: str | None = None,
) -> SyntheticSetReport:
    """Write hand-crafted lesion cases of train-split scans, with a manifest.

    A rerun resumes (only missing cases are made, with the same per-case seeds).

    Raises:
        SynthesisError: no lesion to learn from, no source scan, or ``out_dir`` holds a
            manifest of another generator.
    """
    options = options or HandcraftedConfig()
    out_dir = Path(out_dir)
    splits = load_splits(splits_path)
    cases = load_cases(data, patient_pattern=patient_pattern)
    splits.require_matches(cases)
    train = [
        c
        for c in cases
        if splits.side_of_patient(c.patient_id) == "train"
        and c.mask is not None
        and c.origin == "real"
    ]
    lesion_values = train[0].lesion_labels if train else ()
    presence = {c.case_id: case_has_lesion(c, lesion_values) for c in train}
    fit = RealLesionFit.from_cases([c for c in train if presence[c.case_id]])
    sources = [c for c in train if not (options.healthy_only and presence[c.case_id])]
    sources.sort(key=lambda c: (presence[c.case_id], c.case_id))  # healthy first
    if not sources:
        raise SynthesisError(f"{data}: no source scan in the train split for hand-crafted lesions")
    try:
        refuse_inside_data_root(out_dir, data, cases)  # before the generator folder is written
    except ProvenanceError as exc:
        raise SynthesisError(str(exc)) from None
    generator_dir = out_dir / "generator"
    real_out = Path(os.path.realpath(out_dir))
    if generator_dir.is_symlink() or (
        generator_dir.exists() and real_out not in Path(os.path.realpath(generator_dir)).parents
    ):
        raise SynthesisError(
            f"{generator_dir}: must be a plain folder inside {out_dir} (it is a link or leads "
            "elsewhere); nothing was written"
        )
    record = {
        "format": GENERATOR_FORMAT,
        "generator": __name__,
        "patient_hash_scheme": PATIENT_HASH_SCHEME,
        "patient_id_hashes": sorted(hash_patient_id(p) for p in fit.patients),
        "data": {
            "lesion_label_values": list(fit.lesion_values),
            "organ_label_values": list(fit.organ_values),
            "modality": fit.modality,
        },
        "fit": {
            "lesions": len(fit.volumes_mm3),
            "volume_mm3_median": float(np.median(fit.volumes_mm3)),
            "contrast_mean": float(np.mean(fit.contrasts)),
            "contrast_sd": float(np.std(fit.contrasts)),
        },
        "options": asdict(options),
    }
    if (generator_dir / TRAINING_RECORD_FILE).is_file():
        if TrainingRecord.read(generator_dir).content != json.loads(json.dumps(record)):
            raise SynthesisError(
                f"{out_dir}: holds hand-crafted cases made with other settings or "
                "data; use a new folder"
            )
    else:
        TrainingRecord(record).write(generator_dir)
    generator = GeneratorRef.from_folder(generator_dir, record_as=str(generator_dir.resolve()))
    try:
        run = SyntheticSetRun(
            out_dir,
            generator=generator,
            splits_sha256=splits.sha256,
            data=data,
            cases=cases,
            recoverable=(PlacementError, SynthesisError, ImageReadError, GeometryError),
        )
    except ProvenanceError as exc:
        raise SynthesisError(str(exc)) from None
    reference = RealLesionReference.from_cases(
        [c for c in train if presence[c.case_id]],
        organ_labels=fit.organ_values,
        lesion_labels=fit.lesion_values,
    )
    plan = plan_cases(sources, options.per_case, prefix="hc", limit=options.limit)
    return run.run(plan, HandcraftedCaseGenerator(fit, options, reference), base_seed=options.seed,
                   progress=progress)  # fmt: skip


class HandcraftedCaseGenerator:
    """Paints hand-crafted lesions into one source scan (a
    :class:`~synthlesion.provenance.run.CaseGenerator`); the driver writes the case.

    Every painted lesion goes through the same quality gate as a diffusion lesion
    (:func:`~synthlesion.pipelines.quality.evaluate_lesion` against the real training lesions,
    on the first channel); a case with a failing lesion is written and recorded as rejected,
    and builds leave it out unless asked.
    """

    def __init__(
        self,
        fit: RealLesionFit,
        options: HandcraftedConfig,
        reference: RealLesionReference | None = None,
        gate: QualityGate | None = None,
    ) -> None:
        self.fit = fit
        self.options = options
        self.reference = reference
        self.gate = gate or QualityGate()

    def make_case(self, case_id: str, source: Case, seed: int) -> GeneratedCase:
        fit, options = self.fit, self.options
        rng = np.random.default_rng(seed)
        channels, labels = load_case_volumes(source)
        image = channels[0]
        spacing = image.spacing
        region = placement_region(  # organ labels, else the scan's foreground: never the air
            labels.array,
            image.array,
            organ_labels=fit.organ_values,
            lesion_labels=fit.lesion_values,
            modality=source.modality,
            where=f"{source.image} (case {source.case_id})",
        )
        constraint = PlacementConstraint(
            min_border_distance_mm=options.min_border_distance_mm,
            min_lesion_distance_mm=5.0,
            existing_lesion_labels=fit.lesion_values,
        )
        allowed = constraint.allowed(labels.array, image.array, spacing, region=region)
        tissue = region.mask
        values = [c.array.astype(np.float64) for c in channels]
        label_map = labels.array.copy()
        lesions = []
        placed_masks = []
        for _ in range(options.lesions_per_case):
            placed = None
            volume = fit.draw_volume(rng)
            for _attempt in range(12):
                try:
                    patch = procedural_mask(rng, spacing, volume)
                    placed, corner = place_mask(patch, allowed, rng)
                    break
                except PlacementError:
                    volume *= 0.75  # the region has no room for this size: try smaller
            if placed is None:
                raise SynthesisError(
                    f"{source.image} (case {source.case_id}): no room in the placement region "
                    f"({region.detail}) for a lesion"
                )
            # the same lesion in every channel; each channel gets its contrast drawn afresh
            values = [
                paint_handcrafted_lesion(v, placed, tissue, spacing, rng, fit, options)
                for v in values
            ]
            label_map[placed] = fit.lesion_values[0]
            placed_masks.append(placed)
            keep_away(allowed, placed, 5.0, spacing)
            lesions.append(
                {
                    "corner": list(corner),
                    "voxels": int(placed.sum()),
                    "volume_mm3": round(volume, 2),
                }
            )
        verdicts = []
        for placed, lesion in zip(placed_masks, lesions, strict=True):
            region = ndimage.binary_dilation(placed, iterations=2) & (tissue | placed)
            verdict = evaluate_lesion(
                image.array,
                values[0],
                placed,
                region,
                spacing,
                self.reference,
                self.gate,
                tissue=tissue,
            )
            lesion.update(verdict.to_dict())
            verdicts.append(verdict.passed)
        painted = []
        for channel, array in zip(channels, values, strict=True):
            dtype = channel.array.dtype
            if np.issubdtype(dtype, np.integer):
                info = np.iinfo(dtype)
                array = np.clip(np.rint(array), info.min, info.max)
            painted.append(channel.with_array(array.astype(dtype)))
        return GeneratedCase(
            images=painted,
            mask=labels.with_array(label_map),
            mask_origin="procedural",
            scheduler="handcrafted",
            steps=0,
            quality={"passed": all(verdicts), "lesions": lesions},
            passed=all(verdicts),
        )


__all__ = [
    "HandcraftedCaseGenerator",
    "HandcraftedConfig",
    "RealLesionFit",
    "paint_handcrafted_lesion",
    "run_handcrafted",
]
