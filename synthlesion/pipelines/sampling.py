"""``synthlesion sample``: write synthetic lesion cases into a synthetic set, with provenance.

For each source scan of the training split (healthy scans first: that is where new lesions add
the most; a scan is healthy when its label map holds no lesion voxel) it draws target lesion
masks (transplanted real lesions with their sub-regions, procedural ellipsoids split into nested
sub-regions as the real lesions are, or user masks) at allowed positions inside the scan's
placement region (:func:`synthlesion.masks.placement_region`: ``region_masks`` /
``region_label`` given by the user, else the organ labels, else the scan's foreground), runs
:class:`LesionSynthesisPipeline` on every image channel, writes each channel and the mask
(temporary name, then rename) and appends one manifest row last. A rerun after an interruption
makes only the missing cases, with the same per-case seeds as an uninterrupted run.

Guards: sources come from the train split only (a synthetic case inherits its source patient's
split); a model whose training record lists a val or test patient is refused; an output folder
holding a manifest of another model is refused; data whose image channels (count and names) or
lesion labels differ from the model's is refused before anything is written.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from synthlesion.config import check_counts, check_device
from synthlesion.data.cases import Case
from synthlesion.data.io import load_case_volumes, load_mask_for
from synthlesion.data.sources import load_cases
from synthlesion.data.splits import load_splits
from synthlesion.data.volume import Volume
from synthlesion.errors import ConfigError, GeometryError, ImageReadError
from synthlesion.masks import (
    MaskBank,
    PlacementConstraint,
    PlacementError,
    PlacementRegion,
    jitter_mask,
    keep_away,
    place_mask,
    placement_region,
    procedural_mask,
)
from synthlesion.masks.lesions import nest_classes
from synthlesion.pipelines.lesion_synthesis import (
    LesionSynthesisPipeline,
    SynthesisError,
    read_training_record,
)
from synthlesion.pipelines.train_lesions import train_lesions
from synthlesion.provenance.errors import GeneratorRecordError, ProvenanceError
from synthlesion.provenance.identity import GeneratorRef
from synthlesion.provenance.run import (
    GeneratedCase,
    SyntheticSetReport,
    SyntheticSetRun,
    plan_cases,
)
from synthlesion.storage import atomic_write_json

logger = logging.getLogger(__name__)

MaskSource = Literal["bank", "procedural", "user"]


@dataclass(frozen=True)
class SampleOptions:
    """Settings of a sampling run.

    Attributes:
        per_case: Synthetic cases made from each source scan.
        lesions_per_case: Target lesions placed in each synthetic case.
        scheduler: ``dpmsolver++``, ``ddim``, ``unipc`` or ``ddpm``.
        steps: Denoising steps.
        seed: Base seed; each case's seed is derived from it and the case id.
        batch_size: Regions per network call.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        mask_source: ``bank`` (real lesions of the train split, transplanted), ``procedural``
            or ``user`` (``user_masks`` folder with ``{source case id}.nii.gz``).
        user_masks: Folder of user masks (``{source case id}.nii.gz``; values = lesion
            classes 1..K).
        region_masks: Folder of placement regions, one ``{source case id}.nii.gz`` per
            source scan (e.g. brain masks; non-zero = lesions may go here), read onto the
            scan's grid like any mask. Overrides the organ labels and the foreground.
        region_label: A label value of the source's label map that is the placement region.
        healthy_only: Use only source scans without a lesion.
        limit: Largest number of synthetic cases (``None``: all).
        min_border_distance_mm: Distance kept from the organ's border.
        min_lesion_distance_mm: Distance kept from existing lesions.
        dilation_mm: Blend margin around each lesion (mm).
        feather_mm: Feather band inside the margin (mm).
        lesion_volume_mm3: ``(low, high)`` for procedural sizes when there is no real lesion to
            learn sizes from.
        attributes: For attribute-conditioned models: fixed values (``mean_intensity`` in image
            units, ``volume_fraction``); missing ones are measured or taken from the real
            lesions (see ``LesionSynthesisPipeline.__call__``). Recorded per case.
    """

    per_case: int = 1
    lesions_per_case: int = 1
    scheduler: str = "dpmsolver++"
    steps: int = 20
    seed: int = 0
    batch_size: int = 8
    device: str = "cpu"
    mask_source: MaskSource = "bank"
    user_masks: Path | None = None
    region_masks: Path | None = None
    region_label: int | None = None
    healthy_only: bool = False
    limit: int | None = None
    min_border_distance_mm: float = 2.0
    min_lesion_distance_mm: float = 5.0
    dilation_mm: float = 3.0
    feather_mm: float = 1.5
    lesion_volume_mm3: tuple[float, float] = (50.0, 2000.0)
    attributes: dict[str, float] | None = None

    def __post_init__(self) -> None:
        problems = check_counts(
            per_case=self.per_case, lesions_per_case=self.lesions_per_case, steps=self.steps,
            batch_size=self.batch_size, limit=self.limit,
        )  # fmt: skip
        if self.seed < 0:
            problems.append(f"seed must be >= 0, got {self.seed}")
        for name in (
            "min_border_distance_mm",
            "min_lesion_distance_mm",
            "dilation_mm",
            "feather_mm",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                problems.append(f"{name} must be a finite number >= 0, got {value}")
        low, high = self.lesion_volume_mm3
        if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
            problems.append(
                f"lesion_volume_mm3 must be 0 < low <= high, got {self.lesion_volume_mm3}"
            )
        try:
            object.__setattr__(self, "device", check_device(self.device))
        except ConfigError as exc:
            problems.append(str(exc))
        if problems:
            raise ConfigError("sample options: " + "; ".join(problems))


_PATH_OPTIONS = ("user_masks", "region_masks")  # recorded resolved (a resume from elsewhere)


def run_sampling(
    model_dir: str | Path,
    data: str | Path,
    splits_path: str | Path,
    out_dir: str | Path,
    options: SampleOptions | None = None,
    *,
    progress: Callable[[int, int, str], None] | None = None,
    patient_pattern: str | None = None,
    shard: tuple[int, int] | None = None,
) -> SyntheticSetReport:
    """Make synthetic lesion cases from the train split; see the module docstring.

    Args:
        model_dir: Trained model folder (with ``training_record.json``).
        data: Real cases (dataset.json, manifest or folder).
        splits_path: The locked splits file of ``data``.
        out_dir: Synthetic set folder (``imagesTr/``, ``labelsTr/``, ``manifest.jsonl``).
        options: Run settings.
        progress: Called as ``progress(done, total, case_id)`` after each case.
        patient_pattern: Regex over case ids for sources without patient ids.
        shard: ``(rank, world_size)``: make only every ``world_size``-th case, starting at
            ``rank``, into ``manifest.shard-RANK-of-WORLD.jsonl`` (for several GPUs; merge the
            shards with :func:`merge_manifest_shards`). ``None`` reads ``RANK``/``WORLD_SIZE``
            as set by ``accelerate launch`` and otherwise makes every case.

    Raises:
        SynthesisError: a model trained on an evaluation patient, a model without a training
            record, a foreign manifest in ``out_dir``, no source scan.
    """
    options = options or SampleOptions()
    rank, world = shard if shard is not None else _shard_from_env()
    if not 0 <= rank < world:
        raise SynthesisError(f"shard {rank} of {world} does not exist")
    if world > 1 and options.device.startswith("cuda") and ":" not in options.device:
        options = replace(options, device=f"cuda:{os.environ.get('LOCAL_RANK', rank)}")
    out_dir = Path(out_dir)
    model_dir = Path(model_dir)
    splits = load_splits(splits_path)
    cases = load_cases(data, patient_pattern=patient_pattern)
    splits.require_matches(cases)
    record = read_training_record(model_dir)
    evaluation = [p for side in ("val", "test") for p in splits.patients(side)]
    try:
        leaked = record.trained_on_any(evaluation)
        if not record.patient_id_hashes:
            raise SynthesisError(f"{model_dir}: training record lists no training patients")
    except GeneratorRecordError as exc:
        raise SynthesisError(f"{model_dir}: {exc}") from None
    if leaked:
        raise SynthesisError(
            f"{model_dir}: its training record lists evaluation patient(s) {', '.join(leaked[:10])}; "
            "a generator that saw a val or test patient cannot make training data"
        )
    data_facts = record.data
    lesion_values = [int(v) for v in data_facts.get("lesion_label_values", [2])]
    organ_values = tuple(int(v) for v in data_facts.get("organ_label_values", [1]))
    train_cases = [c for c in cases if splits.side_of_patient(c.patient_id) == "train"]
    sources = [c for c in train_cases if c.mask is not None]
    _require_model_fits_data(model_dir, data_facts, sources, lesion_values, data)
    skipped = len(cases) - len(train_cases)
    if skipped:
        logger.info("%d case(s) of val/test patients are not used as sources", skipped)
    # every labelled train scan read once (lesion presence, bank, gate reference), cached
    # beside the splits file: a rerun opens only the scans that changed
    known = train_lesions(sources, lesion_values, organ_values, cache_beside=splits_path)
    presence = known.presence
    if options.healthy_only:
        sources = [c for c in sources if not presence[c.case_id]]
    sources.sort(key=lambda c: (presence[c.case_id], c.case_id))  # healthy first
    if not sources:
        raise SynthesisError(f"{data}: no labelled source scan in the train split")

    bank = known.bank() if options.mask_source in ("bank", "procedural") else None
    if bank is None and options.mask_source == "bank":
        raise SynthesisError(f"{data}: no real lesion in the train split to transplant")
    reference = known.reference()
    if reference is None:
        logger.warning("no real lesion in the train split: quality gates run without a reference")

    pipeline = LesionSynthesisPipeline.from_pretrained(
        str(model_dir),
        device=options.device,
        reference=reference,
    )
    generator = GeneratorRef.from_folder(model_dir, record_as=str(model_dir.resolve()))
    try:
        run = SyntheticSetRun(
            out_dir,
            generator=generator,
            splits_sha256=splits.sha256,
            data=data,
            cases=cases,
            manifest_name=(
                "manifest.jsonl"
                if world == 1
                else f"manifest.shard-{rank:03d}-of-{world:03d}.jsonl"
            ),
            recoverable=(SynthesisError, PlacementError, ImageReadError, GeometryError),
        )
    except ProvenanceError as exc:
        raise SynthesisError(str(exc)) from None
    run.write_settings(
        # each shard records the settings of its own cases
        "sample_options.json"
        if world == 1
        else f"sample_options.shard-{rank:03d}-of-{world:03d}.json",
        {
            "model": str(model_dir.resolve()),
            "data": str(Path(data).resolve()),
            "splits": str(Path(splits_path).resolve()),
            **{
                k: (
                    str(Path(v).resolve())
                    if isinstance(v, (Path, str)) and k in _PATH_OPTIONS
                    else v
                )
                for k, v in options.__dict__.items()
            },
        },
        # what a case holds does not depend on these (noise is drawn per region)
        may_change=("device", "batch_size", "limit"),
    )
    maker = DiffusionCaseGenerator(pipeline, bank, options, lesion_values, organ_values)
    plan = plan_cases(
        sources, options.per_case, prefix="syn", limit=options.limit, shard=(rank, world)
    )
    report = run.run(plan, maker, base_seed=options.seed, progress=progress)
    atomic_write_json(
        out_dir / ("sample_report.json" if world == 1 else f"sample_report.shard-{rank:03d}.json"),
        report.to_dict(),
    )
    return report


def _require_model_fits_data(
    model_dir: Path,
    facts: dict[str, Any],
    sources: Sequence[Case],
    lesion_values: Sequence[int],
    data: str | Path,
) -> None:
    """Refuse data whose channels (count and names) or lesion labels are not the model's."""
    if not sources:
        return
    want = int(facts.get("image_channels", 1))
    names = [str(n) for n in facts.get("channel_names", [])]
    for case in sources:
        have = list(case.modalities)[: case.channel_count]
        if case.channel_count != want:
            raise SynthesisError(
                f"{data}: case {case.case_id} has {case.channel_count} image channel(s) "
                f"{have}, the model {model_dir} was trained on {want} {names}"
            )
        known = [n for n in have if n.lower() != "unknown"]
        if names and known and [n.lower() for n in have] != [n.lower() for n in names]:
            raise SynthesisError(
                f"{data}: case {case.case_id} has channels {have}, the model {model_dir} was "
                f"trained on {names} (same names in the same order needed)"
            )
    declared = sources[0].labels
    data_lesions = set(sources[0].lesion_labels)
    unknown = sorted(data_lesions - set(lesion_values))
    missing = [v for v in lesion_values if v not in declared]
    if unknown or missing:
        named = ", ".join(f"{v} {declared.get(v, '?')}" for v in sorted(data_lesions))
        raise SynthesisError(
            f"{data}: lesion labels [{named}] do not match the model's {list(lesion_values)} "
            f"{facts.get('lesion_class_names', [])}: "
            + (f"values {unknown} were never trained on" if unknown else "")
            + ("; " if unknown and missing else "")
            + (f"values {missing} are not declared in the data" if missing else "")
        )


def _shard_from_env() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else (0, 1)


def merge_manifest_shards(out_dir: str | Path) -> Path:
    """Merge ``manifest.shard-*.jsonl`` of a several-GPU run into ``manifest.jsonl``.

    Every shard is verified (hash chain, lock, files) first; rows already in the merged
    manifest are skipped, so merging again after a rerun adds only the new cases.
    """
    from synthlesion.provenance.identity import GeneratorRef
    from synthlesion.provenance.manifest import read_lock, read_manifest
    from synthlesion.provenance.manifest_writer import ManifestWriter

    out_dir = Path(out_dir)
    shards = sorted(out_dir.glob("manifest.shard-*.jsonl"))
    if not shards:
        raise SynthesisError(f"{out_dir}: no manifest shards to merge")
    lock = read_lock(shards[0])
    generator = GeneratorRef.from_dict(lock["generator"], str(shards[0]))
    with ManifestWriter(
        out_dir / "manifest.jsonl",
        out_dir,
        generator=generator,
        splits_sha256=lock.get("splits_sha256"),
    ) as writer:
        for shard_path in shards:
            rows = [r for r in read_manifest(shard_path, out_dir) if r.case_id not in writer]
            writer.append_many(rows)
    return out_dir / "manifest.jsonl"


class DiffusionCaseGenerator:
    """Makes one synthetic case with the lesion diffusion model (a
    :class:`~synthlesion.provenance.run.CaseGenerator`): target masks in the placement region,
    every channel painted, the label map updated; the driver writes it."""

    def __init__(
        self,
        pipeline: LesionSynthesisPipeline,
        bank: MaskBank | None,
        options: SampleOptions,
        lesion_values: Sequence[int],
        organ_values: Sequence[int],
    ) -> None:
        self.pipeline = pipeline
        self.bank = bank
        self.options = options
        self.lesion_values = list(lesion_values)
        self.organ_values = tuple(organ_values)

    def make_case(self, case_id: str, source: Case, seed: int) -> GeneratedCase:
        options, lesion_values = self.options, self.lesion_values
        rng = np.random.default_rng(seed)
        where = f"case {source.case_id}"
        channels, labels = load_case_volumes(source)
        image = channels[0]
        label_array = _integer_labels(labels, where)
        extra = sorted(set(np.unique(label_array).tolist()) - set(source.labels))
        if extra:
            raise SynthesisError(
                f"{source.mask} ({where}): label values {extra} are not declared labels "
                f"{sorted(source.labels)}"
            )
        region = _placement_region(
            source, image, label_array, options, self.organ_values, lesion_values
        )
        target, mask_facts = _target_mask(
            case_id, source, image, label_array, region, rng, self.pipeline, self.bank,
            options, lesion_values,
        )  # fmt: skip
        organ = np.isin(label_array, self.organ_values) if self.organ_values else region.mask
        result = self.pipeline(
            channels,
            target,
            organ_mask=organ,
            region_mask=region.mask,
            scheduler=options.scheduler,
            num_inference_steps=options.steps,
            seed=seed,
            batch_size=options.batch_size,
            dilation_mm=options.dilation_mm,
            feather_mm=options.feather_mm,
            attributes=options.attributes,
        )
        label_map = labels.array.copy()
        for cls_index, value in enumerate(lesion_values, start=1):
            label_map[result.lesion_mask == cls_index] = value
        quality = {
            "passed": all(q.passed for q in result.quality),
            "lesions": [q.to_dict() for q in result.quality],
            "mask_facts": mask_facts,
        }
        if result.attributes is not None:
            quality["attributes"] = result.attributes
        return GeneratedCase(
            images=[v.with_array(a) for v, a in zip(channels, result.images, strict=True)],
            mask=labels.with_array(label_map.astype(labels.array.dtype)),
            mask_origin=options.mask_source,
            scheduler=options.scheduler,
            steps=options.steps,
            quality=quality,
            passed=bool(quality["passed"]),
            mask_source_sha256=mask_facts.get("mask_sha256"),
            mask_source_case=mask_facts.get("source_case"),
            mask_source_patient=mask_facts.get("source_patient"),
            mask_sources=[
                {
                    "sha256": m["mask_sha256"],
                    "case": m["source_case"],
                    "patient": m["source_patient"],
                }
                for m in mask_facts.get("lesions", [])
                if "mask_sha256" in m
            ],
        )


def _integer_labels(volume: Volume, where: str) -> np.ndarray:
    """The label map as integers (float label maps with whole values are accepted)."""
    array = np.asarray(volume.array)
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or np.any(array != np.round(array)):
            raise SynthesisError(f"{volume.source} ({where}): label map holds fractional values")
        array = array.astype(np.int64)
    return array


def _placement_region(
    source: Case,
    image: Volume,
    labels: np.ndarray,
    options: SampleOptions,
    organ_values: Sequence[int],
    lesion_values: Sequence[int],
) -> PlacementRegion:
    """The scan's placement region: the user's region mask or label, else organ, else
    foreground (:func:`synthlesion.masks.placement_region`)."""
    where = f"{source.image} (case {source.case_id})"
    user_region = None
    if options.region_masks is not None:
        path = Path(options.region_masks) / f"{source.case_id}.nii.gz"
        if not path.is_file():
            raise SynthesisError(f"{path}: no region mask for case {source.case_id}")
        try:
            user_region = load_mask_for(image, path).array
        except GeometryError as exc:
            raise SynthesisError(f"region mask of case {source.case_id}: {exc}") from None
        if user_region.dtype.kind == "f" and not np.isfinite(user_region).all():
            raise SynthesisError(f"{path} (case {source.case_id}): region mask holds NaN/Inf")
        if not np.any(user_region != 0):
            raise SynthesisError(f"{path}: region mask of case {source.case_id} is empty")
    if options.region_label is not None and options.region_label not in source.labels:
        raise SynthesisError(
            f"{source.mask} (case {source.case_id}): region label {options.region_label} is not "
            f"a declared label {sorted(source.labels)}"
        )
    return placement_region(
        labels,
        image.array,
        user_region=user_region,
        region_label=options.region_label,
        organ_labels=organ_values,
        lesion_labels=lesion_values,
        modality=source.modality,
        where=where,
    )


def _target_mask(
    case_id,
    source,
    image: Volume,
    labels: np.ndarray,
    region: PlacementRegion,
    rng,
    pipeline,
    bank,  # noqa: ANN001
    options: SampleOptions,
    lesion_values,
) -> tuple[np.ndarray, dict[str, Any]]:
    spacing = image.spacing
    classes = len(lesion_values)
    if options.mask_source == "user":
        if options.user_masks is None:
            raise SynthesisError("mask source 'user' needs a folder of masks (--user-masks)")
        path = Path(options.user_masks) / f"{source.case_id}.nii.gz"
        try:
            user = load_mask_for(image, path)
        except GeometryError as exc:
            raise SynthesisError(f"user mask of case {source.case_id}: {exc}") from None
        target = _integer_labels(user, f"case {source.case_id}")
        if not target.any():
            raise SynthesisError(f"{path}: user mask is empty")
        if target.min() < 0 or target.max() > classes:
            raise SynthesisError(
                f"{path} (case {source.case_id}): user mask values "
                f"{np.unique(target).tolist()} outside 0..{classes} (the model's lesion classes)"
            )
        outside = int(np.count_nonzero((target > 0) & ~region.mask))
        if outside:
            raise SynthesisError(
                f"{path}: {outside} voxel(s) of the user mask of case {source.case_id} lie "
                f"outside the placement region ({region.detail})"
            )
        return target, {
            "origin": "user",
            "path": str(path),
            "placement_region": region.to_dict(),
        }
    constraint = PlacementConstraint(
        min_border_distance_mm=options.min_border_distance_mm,
        min_lesion_distance_mm=options.min_lesion_distance_mm,
        existing_lesion_labels=tuple(lesion_values),
    )
    allowed = constraint.allowed(labels, image.array, spacing, region=region)
    target = np.zeros(image.shape, dtype=np.int64)
    facts: dict[str, Any] = {
        "origin": options.mask_source,
        "lesions": [],
        "placement_region": region.to_dict(),
    }
    roi = np.asarray(pipeline.roi_size)
    margin = np.ceil(2 * options.dilation_mm / np.asarray(spacing)).astype(int) + 2
    for _ in range(options.lesions_per_case):
        placed, problem = None, "no lesion drawn fits the model's region of interest"
        largest: list[int] = []
        for _attempt in range(20):  # draw again when a lesion does not fit or has no place
            if options.mask_source == "bank":
                lesion = bank.draw(rng)
                patch = jitter_mask(lesion.patch, lesion.spacing, spacing, rng)
                drawn = {
                    "source_case": lesion.source_case,
                    "source_patient": lesion.source_patient,
                    "mask_sha256": lesion.mask_sha256,
                }
            else:
                volume = _draw_volume(rng, bank, options.lesion_volume_mm3)
                shape = procedural_mask(rng, spacing, volume)
                if classes > 1 and bank is not None:  # nested sub-regions, as the real ones
                    patch = nest_classes(shape, bank.draw_fractions(rng), bank.class_order())
                else:
                    patch = shape.astype(np.uint8)
                drawn = {"volume_mm3": round(float(volume), 2)}
            if not patch.any() or np.any(np.asarray(patch.shape) + margin > roi):
                largest = max(largest, [int(n) for n in patch.shape], key=lambda e: np.prod(e))
                problem = (
                    f"no lesion drawn fits the model's region of interest "
                    f"{[int(r) for r in roi]} voxels with the blend margin of "
                    f"{[int(m) for m in margin]} voxels (e.g. a lesion of {largest} voxels); "
                    "train with a larger data.roi_size (or at a coarser data.spacing)"
                )
                continue
            try:
                placed, corner = place_mask(patch, allowed, rng)
                break
            except PlacementError as exc:
                problem = f"{exc} (a lesion of {list(patch.shape)} voxels)"
        if placed is None:
            raise PlacementError(
                f"{source.image} (case {source.case_id}): no lesion placed after 20 draws: "
                f"{problem}; placement region: {region.detail}, {int(allowed.sum())} allowed "
                f"voxel(s)"
            )
        inside = placed > 0
        target[inside] = placed[inside]
        facts["lesions"].append({**drawn, "corner": list(corner), "voxels": int(inside.sum())})
        keep_away(allowed, inside, options.min_lesion_distance_mm, spacing)  # later lesions
    if options.mask_source == "bank" and facts["lesions"]:
        first = facts["lesions"][0]
        facts.update({k: first[k] for k in ("source_case", "source_patient", "mask_sha256")})
    return target, facts


def _draw_volume(
    rng: np.random.Generator, bank: MaskBank | None, fallback: Sequence[float]
) -> float:
    """A lesion volume from the real lesions' distribution (log-normal fit), else uniform."""
    if bank is not None and len(bank.lesions) >= 2:
        logs = np.log(bank.volumes_mm3())
        return float(np.exp(rng.normal(logs.mean(), max(logs.std(), 0.1))))
    if bank is not None:
        return float(bank.lesions[0].volume_mm3 * rng.uniform(0.7, 1.3))
    return float(np.exp(rng.uniform(np.log(fallback[0]), np.log(fallback[1]))))


__all__ = ["DiffusionCaseGenerator", "SampleOptions", "run_sampling"]
