"""The realism figures of one cell, against real lesions the generators never saw.

* Repaint: held-out (val and test) real lesions are blanked (the mask filled with the mean of
  the tissue ring around it) and each generator paints its lesion back into exactly that mask:
  diffusion (the cell's model), hand-crafted (its fit to the budget's lesions), copy-paste (a
  labelled real lesion moved onto the mask, its contrast kept) and the mean fill itself. Inside
  the mask: MSE, PSNR and SSIM with the BraTS local-inpainting normalisation
  (:func:`~synthlesion.evaluation.realism.repaint_scores`) on images mapped to [0, 1] by the
  training normalisation.
* Distribution: KID of lesion crops in the feature space of the real-only segmenter's
  bottleneck (trained on the budget's real scans only); the floor is the labelled real train
  lesions against the held-out ones.
* Classifier: a cross-validated small CNN tells held-out real lesion crops from a generator's
  (AUC with DeLong's interval); the floor is two halves of the held-out real lesions, and the
  positive control the same crops with their lesion blanked (a classifier that cannot tell
  those apart has no power, and its other AUCs say nothing).
* Texture and shape: first-order, GLCM and shape descriptors
  (:mod:`~synthlesion.evaluation.radiomics`) compared as distributions (KS, Wasserstein) with
  the held-out lesions; the floor is the real train lesions.
* Adherence and memorisation (:func:`~synthlesion.evaluation.fidelity.generator_fidelity`)
  with the same segmenter.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from synthlesion.data.boxes import bounding_box
from synthlesion.evaluation import datasets as evdata
from synthlesion.evaluation.config import ArmConfig, EvaluateConfig
from synthlesion.evaluation.fidelity import crop_at, generator_fidelity, lesions_of
from synthlesion.evaluation.metrics import jsonable
from synthlesion.evaluation.protocol import Cell
from synthlesion.evaluation.radiomics import texture_shape_features
from synthlesion.evaluation.realism import (
    classifier_two_sample_test,
    copy_paste_fill,
    feature_distribution_distances,
    kid,
    mean_fill,
    repaint_scores,
)
from synthlesion.evaluation.segmenter import ArmBatches, ArrayCase, TrainedSegmenter
from synthlesion.storage import atomic_write_json

logger = logging.getLogger(__name__)


class _LesionSet:
    """Lesion crops and texture/shape features, both of the normalised image."""

    def __init__(self, blanked: bool = False) -> None:
        self.crops: list[np.ndarray] = []
        self.features: list[dict[str, float]] = []
        self.blanked: list[np.ndarray] | None = [] if blanked else None

    def add(self, case: ArrayCase, mask: np.ndarray, size: int) -> None:
        centre = tuple(int(round(c)) for c in ndimage.center_of_mass(mask))
        self.crops.append(crop_at(case.image, centre, size).astype(np.float32))
        if self.blanked is not None:  # the same crop with its lesion filled by the ring mean
            filled = mean_fill(case.image, mask, case.spacing[: mask.ndim])
            self.blanked.append(crop_at(filled, centre, size).astype(np.float32))
        box = bounding_box(mask, 2)  # features of the normalised image: one unit for every set
        try:
            self.features.append(
                texture_shape_features(case.image[box], mask[box], case.spacing[: mask.ndim])
            )
        except ValueError as exc:  # a degenerate lesion: leave its features out
            logger.debug("texture features of %s: %s", case.case_id, exc)

    def __len__(self) -> int:
        return len(self.crops)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    labelled, count = ndimage.label(mask, np.ones((3,) * mask.ndim, bool))
    return [labelled == i for i in range(1, count + 1) if (labelled == i).sum() >= 10]


def _collect(
    cases: Sequence[ArrayCase],
    lesion_values: Sequence[int],
    size: int,
    limit: int,
    exclude: Mapping[str, ArrayCase] | None = None,
    blanked: bool = False,
) -> _LesionSet:
    found = _LesionSet(blanked)
    for case in cases:
        mask = np.isin(case.label, lesion_values)
        if exclude is not None and case.source_case in exclude:
            mask &= ~np.isin(exclude[case.source_case].label, lesion_values)
        for one in _components(mask):
            if len(found) >= limit:
                return found
            found.add(case, one, size)
    return found


def measure_realism(
    config: EvaluateConfig,
    cell: Cell,
    pool: evdata.TrainingPool,
    kept: Mapping[str, Sequence[ArrayCase]],
    test_cases: Sequence[ArrayCase],
    val_cases: Sequence[ArrayCase],
    segmenter: TrainedSegmenter,
    data: Path,
    splits: Path,
    folder: Path,
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Every realism figure of the cell (see the module docstring); writes ``realism.json``.

    Returns:
        ``(record, report examples per generator)``.
    """
    cfg = config.fidelity
    size, limit, device = cfg.crop_size, cfg.max_lesions, config.device
    lesion_values = pool.lesion_values
    held_out_cases = [*val_cases, *test_cases]
    held_out = _collect(held_out_cases, lesion_values, size, limit, blanked=True)
    train = _collect(pool.real, lesion_values, size, limit)
    sources = pool.real_by_id()
    generated: dict[str, _LesionSet] = {
        kind: _collect(cases, lesion_values, size, limit, exclude=sources)
        for kind, cases in sorted(kept.items())
    }
    if any(a.kind == "copy_paste" for a in config.arms):
        generated["copy_paste"] = _copy_paste_lesions(config, pool, size, limit)
    if len(held_out) < 2 * cfg.classifier_folds:
        logger.warning("%s: too few held-out lesions (%d) for realism", cell.name, len(held_out))
        return {"held_out_lesions": len(held_out)}, {}
    encode = lambda s: segmenter.features(np.stack(s.crops), device)  # noqa: E731
    held_features = encode(held_out)
    record: dict[str, Any] = {
        "cell": cell.name,
        "lesions": {
            "held_out": len(held_out),
            "train": len(train),
            **{k: len(v) for k, v in generated.items()},
        },
        "kid": {},
        "classifier_auc": {},
        "texture": {},
    }
    seed = config.metrics.seed
    if len(train) >= 2:
        record["kid_floor"] = _kid(encode(train), held_features, cfg.kid_subsets, seed)
        record["texture_floor"] = _texture(train, held_out)
    half = len(held_out) // 2
    order = np.random.default_rng([seed, 41]).permutation(len(held_out))
    first = np.stack([held_out.crops[i] for i in order[:half]])
    second = np.stack([held_out.crops[i] for i in order[half:]])
    record["classifier_auc_floor"] = classifier_two_sample_test(
        first, second, folds=cfg.classifier_folds, seed=seed, device=device
    )
    # the positive control: the same held-out crops with their lesion filled by the ring mean
    # (a generator that paints nothing); a classifier that cannot tell these apart has no power
    record["classifier_auc_control"] = classifier_two_sample_test(
        np.stack(held_out.crops),
        np.stack(held_out.blanked or []),
        folds=cfg.classifier_folds,
        seed=seed,
        device=device,
    )
    for kind, lesions in generated.items():
        if len(lesions) < cfg.classifier_folds:
            logger.warning("%s: %d %s lesions, too few for realism", cell.name, len(lesions), kind)
            continue
        record["kid"][kind] = _kid(encode(lesions), held_features, cfg.kid_subsets, seed)
        record["classifier_auc"][kind] = classifier_two_sample_test(
            np.stack(held_out.crops),
            np.stack(lesions.crops),
            folds=cfg.classifier_folds,
            seed=seed,
            device=device,
        )
        record["texture"][kind] = _texture(lesions, held_out)
    record["repaint"] = _repaint(config, pool, held_out_cases, data, splits, folder)
    fidelity, examples = {}, {}
    for kind, cases in sorted(kept.items()):
        items = []
        for case in cases[:limit]:
            source = sources.get(case.source_case)
            mask = np.isin(case.label, lesion_values)
            if source is not None:
                mask &= ~np.isin(source.label, lesion_values)
            items.append(
                (case, lesions_of(case, mask, np.isin(case.label, pool.organ_values), size))
            )
        real_train = [
            x
            for c in pool.real
            for x in lesions_of(
                c, np.isin(c.label, lesion_values), np.isin(c.label, pool.organ_values), size
            )
        ]
        fid = generator_fidelity(kind, items, sources, real_train, segmenter, cfg, device)
        fidelity[kind] = {"adherence": fid.adherence, "memorisation": fid.memorisation}
        examples[kind] = fid.examples
    record["fidelity"] = fidelity
    write_examples(folder, examples)
    atomic_write_json(folder / "realism.json", jsonable(record))
    return record, examples


EXAMPLES_FILE = "realism_examples.npz"


def write_examples(folder: Path, examples: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
    """Keep the report's example rows beside ``realism.json`` (arrays in an ``.npz`` without
    pickles, the rest as JSON), so a resumed run's report shows them too."""
    import io
    import json

    from synthlesion.storage import atomic_write_bytes

    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, list[dict[str, Any]]] = {}
    for kind, rows in examples.items():
        meta[kind] = []
        for index, row in enumerate(rows):
            plain = {}
            for key, value in row.items():
                if isinstance(value, np.ndarray):
                    arrays[f"{kind}/{index}/{key}"] = value
                else:
                    plain[key] = value
            meta[kind].append(plain)
    arrays["__meta__"] = np.frombuffer(json.dumps(jsonable(meta)).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(folder / EXAMPLES_FILE, buffer.getvalue())


def read_examples(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """The example rows kept by :func:`write_examples` (``{}`` when there are none)."""
    import json

    path = folder / EXAMPLES_FILE
    if not path.is_file():
        return {}
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(bytes(data["__meta__"]).decode())
        out: dict[str, list[dict[str, Any]]] = {}
        for kind, rows in meta.items():
            out[kind] = []
            for index, plain in enumerate(rows):
                row = dict(plain)
                prefix = f"{kind}/{index}/"
                for key in data.files:
                    if key.startswith(prefix):
                        row[key[len(prefix) :]] = data[key]
                out[kind].append(row)
    return out


def _kid(a: np.ndarray, b: np.ndarray, subsets: int, seed: int) -> dict[str, float]:
    size = max(2, min(len(a), len(b), 100))
    mean, sd = kid(a, b, subsets=subsets, subset_size=size, seed=seed)
    return {"mean": mean, "sd": sd, "n": int(len(a))}


def _texture(lesions: _LesionSet, reference: _LesionSet) -> dict[str, Any]:
    if not lesions.features or not reference.features:
        return {"mean_ks": math.nan, "mean_wasserstein_sd": math.nan}
    distances = feature_distribution_distances(reference.features, lesions.features)
    return {
        "mean_ks": distances["mean_ks"],
        "mean_wasserstein_sd": distances["mean_wasserstein_sd"],
        "features": {k: v["ks"] for k, v in distances["features"].items()},
    }


def _copy_paste_lesions(
    config: EvaluateConfig, pool: evdata.TrainingPool, size: int, limit: int
) -> _LesionSet:
    """Lesions as the copy-paste arm makes them: real labelled lesions pasted into lesion-free
    patches of the labelled real scans."""
    arm = next(a for a in config.arms if a.kind == "copy_paste")
    cfg = config.segmenter
    patch = cfg.patch_size or pool.real[0].image.shape
    from dataclasses import replace

    batches = ArmBatches(
        pool.real,
        [],
        ArmConfig(arm.name, "copy_paste", 1.0),
        replace(cfg, patch_size=tuple(max(p, 2 * size) for p in patch), augment=False),
        config.metrics.seed,
        pool.lesion_values,
        pool.organ_values,
        modality=pool.modality,
    )
    found = _LesionSet()
    for _ in range(4 * limit):
        if len(found) >= min(limit, 200):
            break
        made = batches.pasted_patch()
        if made is None:
            continue
        image, label, case = made
        patch_case = ArrayCase(case.case_id, image, label, case.spacing)
        mask = np.isin(label, pool.lesion_values)
        for one in _components(mask):
            found.add(patch_case, one, size)
    return found


def diffusion_model_dir(config: EvaluateConfig, folder: Path) -> Path | None:
    """The diffusion model the cell's cases came from: trained in the cell, or the generator
    folder named by the first given manifest."""
    if not any(a.kind == "diffusion" for a in config.arms):
        return None
    if not config.diffusion.manifests:
        return folder / "diffusion" / "model"
    from synthlesion.provenance import read_manifest

    path = read_manifest(config.diffusion.manifests[0], verify_files=False).generator.path
    return Path(path) if path else None


def _repaint(
    config: EvaluateConfig,
    pool: evdata.TrainingPool,
    held_out: Sequence[ArrayCase],
    data: Path,
    splits: Path,
    folder: Path,
) -> dict[str, Any]:
    from synthlesion.data.intensity import IntensityNormaliser
    from synthlesion.data.sources import load_cases
    from synthlesion.data.splits import load_splits
    from synthlesion.data.volume import Volume
    from synthlesion.pipelines.handcrafted import RealLesionFit, paint_handcrafted_lesion

    cfg = config.fidelity
    lesion_values, organ_values = pool.lesion_values, pool.organ_values
    normaliser = IntensityNormaliser.for_modality(pool.modality)
    rng = np.random.default_rng([config.metrics.seed, 43])
    targets = []
    for case in held_out:
        for one in _components(np.isin(case.label, lesion_values)):
            targets.append((case, one))
    order = rng.permutation(len(targets))[: cfg.repaint_lesions]
    targets = [targets[i] for i in order]
    donors = [
        (case, one) for case in pool.real for one in _components(np.isin(case.label, lesion_values))
    ]
    fit = None
    if any(a.kind == "handcrafted" for a in config.arms):
        cell_splits = load_splits(splits)
        train = [
            c
            for c in load_cases(data)
            if cell_splits.side_of_patient(c.patient_id) == "train" and c.mask is not None
        ]
        try:
            fit = RealLesionFit.from_cases(train)
        except Exception as exc:  # noqa: BLE001 - the figure is left out, the run goes on
            logger.warning("repaint: no hand-crafted fit (%s)", exc)
    pipeline = None
    model_dir = diffusion_model_dir(config, folder)
    if model_dir is not None and (model_dir / "training_record.json").is_file():
        from synthlesion.pipelines.lesion_synthesis import LesionSynthesisPipeline

        pipeline = LesionSynthesisPipeline.from_pretrained(str(model_dir), device=config.device)
    scores: dict[str, list[dict[str, float]]] = {}

    def unit(x: np.ndarray) -> np.ndarray:
        return np.clip((normaliser.normalise(x.astype(np.float32)) + 1.0) / 2.0, 0.0, 1.0)

    for index, (case, mask) in enumerate(targets):
        raw = (case.raw if case.raw is not None else case.image).astype(np.float64)
        spacing = case.spacing[: raw.ndim]
        tissue = np.isin(case.label, organ_values) if organ_values else None
        blank = mean_fill(raw, mask, spacing, tissue=tissue)
        painted: dict[str, np.ndarray] = {"mean_fill": blank}
        if donors:
            donor_case, donor_mask = donors[int(rng.integers(len(donors)))]
            donor_raw = donor_case.raw if donor_case.raw is not None else donor_case.image
            painted["copy_paste"] = copy_paste_fill(
                blank, mask, donor_raw, donor_mask, tissue=tissue, spacing=spacing
            )
        if fit is not None:
            painted["handcrafted"] = paint_handcrafted_lesion(
                blank,
                mask,
                tissue if tissue is not None else np.ones_like(mask),
                spacing,
                np.random.default_rng([config.metrics.seed, index]),
                fit,
                config.handcrafted,
            )
        if pipeline is not None:
            affine = np.diag([*spacing, *([1.0] * (4 - len(spacing)))])
            try:
                out = pipeline(
                    Volume(blank.astype(np.float32), affine),
                    mask.astype(np.uint8),  # one lesion class (the model's class 1)
                    organ_mask=tissue,
                    num_inference_steps=config.diffusion.sample_steps,
                    scheduler=config.diffusion.scheduler,
                    seed=index,
                )
                painted["diffusion"] = out.image
            except Exception as exc:  # noqa: BLE001 - one lesion's figure is left out
                logger.warning("repaint: diffusion failed on %s (%s)", case.case_id, exc)
        truth = unit(raw)
        for name, image in painted.items():
            try:
                scores.setdefault(name, []).append(repaint_scores(truth, unit(image), mask))
            except ValueError as exc:
                logger.debug("repaint %s on %s: %s", name, case.case_id, exc)
    out: dict[str, Any] = {}
    for name, rows in scores.items():
        out[name] = {"lesions": len(rows)}
        for key in ("mse", "psnr", "ssim"):
            finite = [r[key] for r in rows if math.isfinite(r[key])]
            out[name][key] = float(np.mean(finite)) if finite else math.nan
    return out


__all__ = ["EXAMPLES_FILE", "measure_realism", "read_examples", "write_examples"]
