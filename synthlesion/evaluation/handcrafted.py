"""The hand-crafted lesion baseline (SynTumor-style) a diffusion model must beat.

Each lesion is a smoothly deformed ellipsoid (:func:`synthlesion.masks.procedural_mask`) whose
size is drawn from the real training lesions' sizes, placed inside the organ away from its
border and from existing lesions (:class:`synthlesion.masks.PlacementConstraint`), and painted
additively, so the scan keeps its own noise: a contrast drawn from the real training lesions'
contrasts (lesion mean minus surrounding tissue mean, in image units) plus a smoothed Gaussian
texture, with a soft edge (the change is blurred by ``edge_mm``). The label map is exact: the
placed mask is the lesion.

Cases are written like :func:`synthlesion.pipelines.sampling.run_sampling` writes diffusion
cases: ``imagesTr/``, ``labelsTr/`` and a hash-chained ``manifest.jsonl`` through the dataset
package's :class:`~synthlesion.dataset.ManifestWriter`, with a generator folder whose
``training_record.json`` lists (hashed) the training patients whose lesions set the sizes and
contrasts, so the builder's guards treat the baseline exactly like a trained generator.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from synthlesion.data.cases import Case
from synthlesion.data.io import load_image, load_mask_for, save_image
from synthlesion.data.sources import load_cases
from synthlesion.data.splits import load_splits
from synthlesion.errors import SynthlesionError
from synthlesion.evaluation.config import HandcraftedConfig
from synthlesion.evaluation.errors import EvaluationError
from synthlesion.masks import (
    PlacementConstraint,
    PlacementError,
    place_mask,
    placement_region,
    procedural_mask,
)
from synthlesion.pipelines.quality import lesion_statistics
from synthlesion.pipelines.sampling import case_seed

logger = logging.getLogger(__name__)

GENERATOR_FORMAT = "synthlesion-handcrafted-generator/1"


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
            EvaluationError: no lesion among the cases.
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
            raise EvaluationError(
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


@dataclass
class HandcraftedReport:
    """What a run wrote; failed cases are listed, never dropped silently."""

    out_dir: Path
    manifest: Path
    generator_dir: Path
    written: list[str] = field(default_factory=list)
    skipped_existing: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)


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
) -> HandcraftedReport:
    """Write hand-crafted lesion cases of train-split scans, with a manifest.

    A rerun resumes (only missing cases are made, with the same per-case seeds).

    Raises:
        EvaluationError: no lesion to learn from, no source scan, or ``out_dir`` holds a
            manifest of another generator.
    """
    from synthlesion.provenance.identity import (
        PATIENT_HASH_SCHEME,
        TRAINING_RECORD_FILE,
        GeneratorRef,
        hash_patient_id,
    )
    from synthlesion.provenance.manifest_writer import ManifestWriter, make_missing_cases
    from synthlesion.provenance.record import TrainingRecord

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
    fit = RealLesionFit.from_cases([c for c in train if c.has_lesion is not False])
    sources = [c for c in train if not (options.healthy_only and c.has_lesion is not False)]
    sources.sort(key=lambda c: (c.has_lesion is not False, c.case_id))
    if not sources:
        raise EvaluationError(f"{data}: no source scan in the train split for hand-crafted lesions")
    generator_dir = out_dir / "generator"
    record = {
        "format": GENERATOR_FORMAT,
        "generator": "synthlesion.evaluation.handcrafted",
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
    record_path = generator_dir / TRAINING_RECORD_FILE
    if record_path.is_file():
        if TrainingRecord.read(generator_dir).content != json.loads(json.dumps(record)):
            raise EvaluationError(
                f"{out_dir}: holds hand-crafted cases made with other settings or "
                "data; use a new folder"
            )
    else:
        TrainingRecord(record).write(generator_dir)
    generator = GeneratorRef.from_folder(generator_dir, record_as=str(generator_dir.resolve()))
    try:
        writer = ManifestWriter(
            out_dir / "manifest.jsonl", out_dir, generator=generator, splits_sha256=splits.sha256
        )
    except SynthlesionError as exc:
        raise EvaluationError(
            f"{out_dir}: holds a manifest of another run ({exc}); use a new folder"
        ) from None
    report = HandcraftedReport(out_dir, out_dir / "manifest.jsonl", generator_dir)
    plan = [(src, k) for src in sources for k in range(options.per_case)]
    if options.limit is not None:
        plan = plan[: options.limit]
    with writer:
        make_missing_cases(
            writer,
            [(f"hc_{source.case_id}_{k:02d}", source) for source, k in plan],
            lambda case_id, source: _make_case(case_id, source, fit, options, writer, out_dir),
            report,
            (PlacementError, EvaluationError),
            progress,
        )
    return report


def _make_case(
    case_id: str,
    source: Case,
    fit: RealLesionFit,
    options: HandcraftedConfig,
    writer: Any,
    out_dir: Path,
) -> bool:
    """Write one hand-crafted case; True (hand-crafted lesions have no quality gates)."""
    seed = case_seed(options.seed, case_id)
    rng = np.random.default_rng(seed)
    image = load_image(source.image)
    labels = load_mask_for(image, source.mask)  # type: ignore[arg-type]
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
    values = image.array.astype(np.float64)
    label_map = labels.array.copy()
    lesions = []
    for _ in range(options.lesions_per_case):
        placed = None
        volume = fit.draw_volume(rng)
        for _attempt in range(12):
            try:
                patch = procedural_mask(rng, spacing, volume)
                placed, corner = place_mask(patch, allowed, rng)
                break
            except PlacementError:
                volume *= 0.75  # the organ has no room for this size: try smaller
        if placed is None:
            raise EvaluationError(f"{source.image}: no room in the organ for a lesion")
        values = paint_handcrafted_lesion(values, placed, tissue, spacing, rng, fit, options)
        label_map[placed] = fit.lesion_values[0]
        allowed &= ndimage.distance_transform_edt(~placed, sampling=spacing) > 5.0
        lesions.append(
            {"corner": list(corner), "voxels": int(placed.sum()), "volume_mm3": round(volume, 2)}
        )
    source_array = image.array
    if np.issubdtype(source_array.dtype, np.integer):
        info = np.iinfo(source_array.dtype)
        values = np.clip(np.rint(values), info.min, info.max)
    out = values.astype(source_array.dtype)
    image_rel = f"imagesTr/{case_id}_0000.nii.gz"
    mask_rel = f"labelsTr/{case_id}.nii.gz"
    save_image(image.with_array(out), out_dir / image_rel)
    save_image(labels.with_array(label_map), out_dir / mask_rel)
    writer.append_case(
        case_id=case_id,
        source=source,
        images=[image_rel],
        mask=mask_rel,
        mask_origin="procedural",
        scheduler="handcrafted",
        steps=0,
        seed=seed,
        quality={"passed": True, "lesions": lesions},
        source_split="train",
    )
    return True


__all__ = [
    "HandcraftedReport",
    "RealLesionFit",
    "paint_handcrafted_lesion",
    "run_handcrafted",
]
