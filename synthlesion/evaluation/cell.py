"""One cell of the protocol (one patient split, one labelled budget), start to end.

1. write the cell's real cases and splits (:func:`~synthlesion.evaluation.protocol.write_cell_data`);
2. make each generator's lesions from the budget's labelled scans only: hand-crafted
   (:func:`~synthlesion.pipelines.handcrafted.run_handcrafted`), diffusion (trained on the
   cell, then :func:`~synthlesion.pipelines.sampling.run_sampling` into the healthy train
   scans) or given manifests;
3. build the guarded dataset (the builder's guards refuse a set that fails them, before any
   segmenter trains);
4. train the real arm for every seed, and with it the convergence check (the real arm with
   twice the steps, branched off the same run); its seed-0 network is the gate's and the
   realism encoder's segmenter;
5. gate the synthetic cases (the manifest's gate, then the real segmenter must find each
   painted lesion with ``gate.min_dice``);
6. train the other arms and score the threshold floor;
7. measure realism (cells of the largest budget).

Every finished step is kept on disk, so a rerun resumes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from synthlesion.data.cases import Case
from synthlesion.data.intensity import IntensityNormaliser
from synthlesion.evaluation import datasets as evdata
from synthlesion.evaluation.config import ArmConfig, EvaluateConfig
from synthlesion.evaluation.errors import EvaluationError
from synthlesion.evaluation.floor import threshold_floor
from synthlesion.evaluation.metrics import (
    CaseMetrics,
    case_metrics,
    jsonable,
    size_bin_names,
    summarise,
)
from synthlesion.evaluation.protocol import Cell, write_cell_data
from synthlesion.evaluation.segmenter import (
    ArmBatches,
    ArrayCase,
    TrainedSegmenter,
    build_network,
    train_segmenters,
)
from synthlesion.storage import atomic_write_json, canonical_json_hash

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]
DOUBLED = "@2x"  # suffix of the convergence check's real-arm runs


@dataclass
class CellOutcome:
    """What one cell produced (per-case scores stay in memory for the pooled statistics).

    Attributes:
        cell: The cell.
        runs: Arm name -> seed -> run record (``cases``: :class:`CaseMetrics` list).
        gate: Generator kind -> gate record.
        floor: The threshold floor's record (``cases`` per-case scores), or ``None``.
        realism: The realism record, or ``None`` (not measured in this cell).
        data: Case counts of the cell.
        build: The build's id, counts and guard record.
        examples: Report image rows per generator.
        card: The build's dataset card (markdown).
    """

    cell: Cell
    runs: dict[str, dict[int, dict[str, Any]]]
    gate: dict[str, Any]
    floor: dict[str, Any] | None
    realism: dict[str, Any] | None
    data: dict[str, Any]
    build: dict[str, Any]
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    card: str = ""


def _log(progress: Progress | None, message: str) -> None:
    logger.info(message)
    if progress is not None:
        progress(message)


def run_cell(
    config: EvaluateConfig,
    cell: Cell,
    cases: Sequence[Case],
    folder: Path,
    normaliser: IntensityNormaliser,
    *,
    realism: bool,
    resume: bool,
    progress: Progress | None = None,
    step_progress: Callable[[str, int, int], None] | None = None,
) -> CellOutcome:
    """Run one cell (see the module docstring); returns its outcome."""
    if cell.budget is None and not cell.reference:
        # every labelled scan: the data and splits as given (sets made against them fit)
        data, splits = Path(config.data), cell.splits_file
    else:
        data, splits = write_cell_data(cell, cases, Path(config.data), folder / "real")
    arms = [a for a in config.arms if a.kind == "real"][:1] if cell.reference else config.arms
    kinds = {a.kind for a in arms}
    manifests: dict[str, list[Path]] = {}
    if "handcrafted" in kinds:
        manifests["handcrafted"] = [_handcrafted(config, data, splits, folder, progress)]
    if "diffusion" in kinds:
        manifests["diffusion"] = _diffusion(config, data, splits, folder, progress, step_progress)
    given = [*config.diffusion.manifests, *filter(None, [config.handcrafted_manifest])]
    _require_within_budget(cell, [Path(m) for m in given], splits)

    def build_into(into: Path, excluded: dict[str, str] | None = None) -> dict[str, Any]:
        return evdata.build_dataset(
            data,
            splits,
            [m for ms in manifests.values() for m in ms],
            into,
            reuse=(into / "build.json").is_file(),
            include_rejected=config.include_rejected,
            excluded=excluded,
        )

    build = folder / evdata.BUILD_DIR
    _log(progress, f"{cell.name}: building the guarded dataset")
    record = build_into(build)
    pool = evdata.load_training_pool(build, evdata.generator_kinds(manifests), normaliser)
    test = evdata.GuardedTestSet(build, config.test_split, normaliser)
    test_cases = list(test.cases())
    val_cases = _val_cases(build, normaliser)
    probe = evdata.probe_evaluation_guard(build)
    real_arm = next(a for a in arms if a.kind == "real")
    runs: dict[str, dict[int, dict[str, Any]]] = {}

    def train(arm: ArmConfig, seed: int, new: Sequence[ArrayCase], budgets: dict[str, int]) -> None:
        done = _run_arm(
            config, cell, arm, seed, pool, new, test_cases, val_cases, folder, budgets,
            step_progress,
        )  # fmt: skip
        for name, data in done.items():
            runs.setdefault(name, {})[seed] = data

    steps = config.segmenter.steps_for(cell.budget_name)
    doubled = config.protocol.convergence_check and not cell.reference
    for seed in config.seeds:
        # the convergence check: the real arm with twice the steps, branched off the same run
        budgets = {real_arm.name: steps}
        if doubled:
            budgets[real_arm.name + DOUBLED] = 2 * steps
            _log(progress, f"{cell.name}: arm {real_arm.name}, seed {seed} ({steps} and "
                 f"{2 * steps} steps: the convergence check)")  # fmt: skip
        else:
            _log(progress, f"{cell.name}: arm {real_arm.name}, seed {seed}")
        train(real_arm, seed, [], budgets)
    segmenter = _load_segmenter(config, folder, real_arm.name, config.seeds[0], pool)
    gate, kept = _gate(config, pool, segmenter, folder, manifests)
    refused = {
        c["case_id"]: f"the real-only segmenter's Dice below {config.gate.min_dice}"
        for verdicts in gate.values()
        for c in verdicts["rejected_cases"]
    }
    if refused and config.gate.apply and not config.include_rejected:
        build = folder / "build-gated"  # the build the arms train from; its card says so
        record = build_into(build, refused)
    for arm in arms:
        if arm.kind == "real":
            continue
        new = kept.get(arm.kind, []) if arm.kind in ("handcrafted", "diffusion") else []
        for seed in config.seeds:
            _log(progress, f"{cell.name}: arm {arm.name}, seed {seed}")
            train(arm, seed, new, {arm.name: steps})
    floor = None
    if config.protocol.threshold_floor and not cell.reference:
        floor = threshold_floor(pool, test_cases, config.metrics.size_bins_mm, folder)
    realism_record, examples = None, {}
    if realism and (folder / "realism.json").is_file():  # resumed
        from synthlesion.evaluation.realism_suite import read_examples

        realism_record = json.loads((folder / "realism.json").read_text(encoding="utf-8"))
        examples = read_examples(folder)
    elif realism:
        from synthlesion.evaluation.realism_suite import measure_realism

        _log(progress, f"{cell.name}: measuring realism")
        realism_record, examples = measure_realism(
            config,
            cell,
            pool,
            pool.synthetic,
            test_cases,
            val_cases,
            segmenter,
            data,
            splits,
            folder,
        )
    lesion_real = sum(bool(np.isin(c.label, pool.lesion_values).any()) for c in pool.real)
    return CellOutcome(
        cell=cell,
        runs=runs,
        gate=gate,
        floor=floor,
        realism=realism_record,
        data={
            "train_real": len(pool.real),
            "train_real_lesion": lesion_real,
            "train_real_healthy": len(pool.real) - lesion_real,
            "train_synthetic": {k: len(v) for k, v in pool.synthetic.items()},
            "train_synthetic_kept": {k: len(v) for k, v in kept.items()},
            "test_cases": len(test_cases),
            "test_lesion_cases": sum(
                bool(np.isin(c.label, pool.lesion_values).any()) for c in test_cases
            ),
            "val_cases": len(val_cases),
            "modality": pool.modality,
            "image_channels": pool.image_channels,
            "image_channels_used": 1,  # the segmenter reads the first channel
        },
        build={
            "dir": str(build),
            "build_id": record["build_id"],
            "counts": record["counts"],
            "guards": record["guards"],
            "evaluation_guard": {
                "split": config.test_split,
                "cases_loaded": len(test_cases),
                "all_real": True,
                "loader_passes": test.loads,
                "probe": probe,
            },
        },
        examples=examples,
        card=(build / "dataset_card.md").read_text(encoding="utf-8"),
    )


def _require_within_budget(cell: Cell, manifests: Sequence[Path], splits: Path) -> None:
    """A given set's generator must have learnt from the cell's train patients only (the
    budget's labelled ones and the healthy ones): a model trained on more labelled scans than
    the budget would leak labels into it.

    Raises:
        EvaluationConfigError: the generator's training record lists other patients.
    """
    if not manifests:
        return
    from synthlesion.data.splits import load_splits
    from synthlesion.evaluation.errors import EvaluationConfigError
    from synthlesion.provenance import read_manifest
    from synthlesion.provenance.identity import hash_patient_id
    from synthlesion.provenance.record import TrainingRecord

    allowed = {hash_patient_id(p) for p in load_splits(splits).patients("train")}
    for path in manifests:
        generator = read_manifest(path, verify_files=False).generator
        if not generator.path:
            continue
        record = TrainingRecord.read(generator.path).content
        outside = set(record.get("patient_id_hashes") or ()) - allowed
        if outside:
            raise EvaluationConfigError(
                f"{path}: its generator ({generator.path}) learnt from {len(outside)} "
                f"patient(s) outside the train side of cell {cell.name} (budget "
                f"{cell.budget_name}: its labelled lesion patients and the healthy ones); a "
                "model trained on more labelled scans than the budget leaks labels: train it on "
                "the cell's data (diffusion.train_config) instead"
            )


def _val_cases(build: Path, normaliser: IntensityNormaliser) -> list[ArrayCase]:
    try:
        return list(evdata.GuardedTestSet(build, "val", normaliser).cases())
    except EvaluationError:
        return []  # no val side: no convergence curve


def _handcrafted(
    config: EvaluateConfig, data: Path, splits: Path, folder: Path, progress: Progress | None
) -> Path:
    if config.handcrafted_manifest is not None:
        return Path(config.handcrafted_manifest)
    from synthlesion.pipelines.handcrafted import run_handcrafted

    _log(progress, f"{folder.name}: making the hand-crafted baseline lesions")
    report = run_handcrafted(data, splits, folder / "handcrafted", config.handcrafted)
    if report.failed:
        logger.warning(
            "hand-crafted baseline: %d case(s) failed (first: %s)",
            len(report.failed),
            report.failed[0]["problem"],
        )
    if not report.written and not report.skipped_existing:
        raise EvaluationError(f"{folder.name}: hand-crafted baseline: no case could be made")
    return report.manifest


def _diffusion(
    config: EvaluateConfig,
    data: Path,
    splits: Path,
    folder: Path,
    progress: Progress | None,
    step_progress: Callable[[str, int, int], None] | None,
) -> list[Path]:
    source = config.diffusion
    if source.manifests:
        return [Path(m) for m in source.manifests]
    from synthlesion.pipelines.sampling import SampleOptions, run_sampling
    from synthlesion.training import load_train_config, train

    model_dir = folder / "diffusion" / "model"
    if not (model_dir / "training_record.json").is_file():
        train_config = load_train_config(
            source.train_config,
            [
                f"output_dir={folder / 'diffusion'}",
                f"data.dataset={data}",
                f"data.splits={splits}",
            ],
        )
        _log(
            progress,
            f"{folder.name}: training the diffusion model ({train_config.max_steps} steps)",
        )
        label = f"{folder.name}/diffusion"
        trained = train(
            train_config,
            progress=(lambda step, row: step_progress(label, step, train_config.max_steps))
            if step_progress
            else None,
        )
        model_dir = trained.model_dir
    manifest = folder / "diffusion" / "synthetic" / "manifest.jsonl"
    _log(progress, f"{folder.name}: painting diffusion lesions into the healthy train scans")
    sampled = run_sampling(
        model_dir,
        data,
        splits,
        manifest.parent,
        SampleOptions(
            steps=source.sample_steps,
            healthy_only=True,
            mask_source="bank",
            scheduler=source.scheduler,
        ),
    )
    return [sampled.manifest]


def _load_segmenter(
    config: EvaluateConfig, folder: Path, arm: str, seed: int, pool: evdata.TrainingPool
) -> TrainedSegmenter:
    from safetensors.torch import load_file

    network = build_network(config.segmenter, pool.real[0].image.ndim)
    network.load_state_dict(
        load_file(str(folder / "arms" / arm / f"seed-{seed}" / "model.safetensors"))
    )
    network.to(config.device).eval()
    return TrainedSegmenter(network, config.segmenter.patch_size, [])


def _manifest_gate(paths: Sequence[Path]) -> tuple[int, int]:
    """``(rows, rows that failed the gate recorded in the manifest)``."""
    from synthlesion.provenance import read_manifest

    rows = failed = 0
    for path in paths:
        for row in read_manifest(path, verify_files=False):
            rows += 1
            failed += row.quality.get("passed") is False
    return rows, failed


def _gate(
    config: EvaluateConfig,
    pool: evdata.TrainingPool,
    segmenter: TrainedSegmenter,
    folder: Path,
    manifests: dict[str, list[Path]],
) -> tuple[dict[str, Any], dict[str, list[ArrayCase]]]:
    """The segmenter part of the gate on every synthetic case of the build, counted with the
    manifest's own gate; returns the record and the cases each arm may train on."""
    record: dict[str, Any] = {}
    kept: dict[str, list[ArrayCase]] = {}
    sources = pool.real_by_id()
    for kind in sorted(manifests):
        cases = pool.synthetic.get(kind, [])
        rejected, dices = [], []
        for case in cases:
            source = sources.get(case.source_case)
            painted = np.isin(case.label, pool.lesion_values)
            if source is not None:
                painted &= ~np.isin(source.label, pool.lesion_values)
            if not painted.any():
                rejected.append({"case_id": case.case_id, "dice": 0.0, "note": "no painted lesion"})
                dices.append(0.0)
                continue
            pred = segmenter.predict(case.image, config.device)
            dice = _local_dice(pred, painted)
            dices.append(dice)
            if dice < config.gate.min_dice:
                rejected.append({"case_id": case.case_id, "dice": round(dice, 4)})
        out = {c["case_id"] for c in rejected}
        kept[kind] = [
            c
            for c in cases
            if not config.gate.apply or config.include_rejected or c.case_id not in out
        ]
        rows, failed = _manifest_gate(manifests[kind])
        built_failed = failed if config.include_rejected else 0  # built only when included
        total = max(rows, len(cases) + failed - built_failed)
        refused = len(rejected) + failed
        record[kind] = {
            "cases": total,
            "rejected": refused,
            "rejected_share": refused / total if total else 0.0,
            "rejected_by_manifest_gate": failed,
            "rejected_by_segmenter": len(rejected),
            "kept": len(kept[kind]),
            "dice_median": float(np.median(dices)) if dices else None,
            "min_dice": config.gate.min_dice,
            "rejected_cases": rejected,  # by the segmenter (the manifest lists its own)
        }
    atomic_write_json(folder / "gate.json", jsonable(record))
    return record, kept


def _local_dice(pred: np.ndarray, painted: np.ndarray) -> float:
    """Dice of ``pred`` and ``painted`` inside the painted lesion's bounding box grown by half
    its size (a detection elsewhere in the scan neither helps nor hurts this lesion)."""
    where = np.argwhere(painted)
    low, high = where.min(axis=0), where.max(axis=0) + 1
    grow = np.maximum((high - low) // 2, 2)
    box = tuple(
        slice(max(0, int(a - g)), int(b + g)) for a, b, g in zip(low, high, grow, strict=True)
    )
    p, t = pred[box], painted[box]
    return 2.0 * float((p & t).sum()) / float(p.sum() + t.sum())


def _read_result(result_path: Path) -> dict[str, Any]:
    data = json.loads(result_path.read_text(encoding="utf-8"))
    recorded = data.pop("sha256", None)
    if recorded is not None and recorded != canonical_json_hash(data):
        raise EvaluationError(
            f"{result_path}: its content does not match its sha256 (edited after it was "
            "written); remove the file to train this run again"
        )
    if recorded is None:
        logger.warning("%s: written before result hashes; read unverified", result_path)
    data["cases"] = [CaseMetrics.from_dict(c) for c in data["cases"]]
    return data


def _run_arm(
    config: EvaluateConfig,
    cell: Cell,
    arm: ArmConfig,
    seed: int,
    pool: evdata.TrainingPool,
    new: Sequence[ArrayCase],
    test_cases: Sequence[ArrayCase],
    val_cases: Sequence[ArrayCase],
    folder: Path,
    budgets: dict[str, int],
    step_progress: Callable[[str, int, int], None] | None,
) -> dict[str, dict[str, Any]]:
    """Train (or read back) one arm and seed at each budget: ``{run name: steps}``; the runs
    share their common first steps (:func:`train_segmenters`)."""
    paths = {name: folder / "arms" / name / f"seed-{seed}" / "result.json" for name in budgets}
    if all(p.is_file() for p in paths.values()):
        return {name: _read_result(p) for name, p in paths.items()}
    cfg = config.segmenter
    batches = ArmBatches(
        pool.real,
        new,
        arm,
        cfg,
        seed,
        pool.lesion_values,
        pool.organ_values,
        steps=max(budgets.values()),
        modality=pool.modality,
    )
    label = f"{cell.name}/{arm.name}/seed {seed}"
    started = time.perf_counter()
    trained = train_segmenters(
        batches,
        cfg,
        seed,
        sorted(set(budgets.values())),
        device=config.device,
        validation=val_cases,
        progress=(
            (lambda step, total, loss: step_progress(f"{label} ({total})", step, total))
            if step_progress
            else None
        ),
    )
    seconds = time.perf_counter() - started  # all budgets together (shared steps once)
    from safetensors.torch import save_file

    results = {}
    for name, steps in budgets.items():
        if paths[name].is_file():  # an interrupted pair: the finished run is kept as written
            results[name] = _read_result(paths[name])
            continue
        model = trained[steps]
        scored = [
            case_metrics(
                c.case_id,
                model.predict(c.image, config.device),
                np.isin(c.label, pool.lesion_values),
                c.spacing,
                config.metrics.size_bins_mm,
            )
            for c in test_cases
        ]
        out = paths[name].parent
        out.mkdir(parents=True, exist_ok=True)
        partial = out / "model.safetensors.partial"  # renamed once whole, before result.json
        save_file({k: v.contiguous() for k, v in model.network.state_dict().items()}, str(partial))
        os.replace(partial, out / "model.safetensors")
        data = {
            "cell": cell.name,
            "arm": name,
            "kind": arm.kind,
            "share": arm.share,
            "seed": seed,
            "steps": steps,
            "schedule": cfg.schedule,
            "selected_step": model.selected_step,
            "seconds": round(seconds * steps / sum(budgets.values()), 2),
            "batches": model.counts,
            "validation": [list(v) for v in model.validation],
            "loss_first": model.losses[0],
            "loss_last": float(np.mean(model.losses[-20:])),
            "summary": summarise(scored, size_bin_names(config.metrics.size_bins_mm)),
            "cases": [c.to_dict() for c in scored],
        }
        plain = jsonable(data)
        atomic_write_json(paths[name], {**plain, "sha256": canonical_json_hash(plain)})
        logger.info(
            "%s (%d steps, weights of step %d): dice %.3f, positive patches %.3f",
            label,
            steps,
            model.selected_step,
            data["summary"]["dice"],
            model.counts.get("positive_patch_share", float("nan")),
        )
        results[name] = {**data, "cases": scored}
    return results


__all__ = ["DOUBLED", "CellOutcome", "run_cell"]
