"""``synthlesion evaluate``: train a small segmenter under several arms, score each on the real
test split through the evaluation guard, compare the arms, measure the synthetic lesions'
fidelity, and write ``results.json`` and the report.

Run folder (``out_dir``)::

    evaluate_config.yaml   the resolved config
    run.json               run id, config hash, status (a folder of another run is refused)
    handcrafted/           the hand-crafted baseline's cases and manifest (when made here)
    build/                 the guarded dataset (DatasetBuilder) every arm trains from
    arms/<arm>/seed-<n>/   result.json (per-case scores, summary, losses), model.safetensors
    results.json           every figure
    report.html, figures/  the report and its figures as PNG

A rerun with the same config resumes: finished arm/seed runs are read back, not retrained.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from synthlesion import __version__
from synthlesion.config import config_to_dict, save_config
from synthlesion.data.intensity import IntensityNormaliser
from synthlesion.evaluation import datasets as evdata
from synthlesion.evaluation.config import ArmConfig, EvaluateConfig
from synthlesion.evaluation.errors import EvaluationError, RunFolderError
from synthlesion.evaluation.fidelity import (
    generator_fidelity,
    lesions_of,
    reference_fidelity,
)
from synthlesion.evaluation.metrics import CaseMetrics, case_metrics, size_bin_names, summarise
from synthlesion.evaluation.segmenter import (
    ArmBatches,
    ArrayCase,
    TrainedSegmenter,
    build_network,
    train_segmenter,
)
from synthlesion.evaluation.stats import over_seeds, paired_comparison
from synthlesion.storage import atomic_write_json, canonical_json_hash

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
RUN_FORMAT = "synthlesion-evaluation-run/1"
RESULTS_FORMAT = "synthlesion-evaluation/1"
Progress = Callable[[str], None]


def config_hash(config: EvaluateConfig) -> str:
    """Hash of the settings that shape the results (threads, device and report left out)."""
    plain = config_to_dict(config)
    for key in ("threads", "device", "report", "out_dir"):
        plain.pop(key, None)
    return canonical_json_hash(plain)


def claim_run_folder(out: Path, config: EvaluateConfig) -> bool:
    """Make ``out`` this run's folder; returns True when resuming the same run.

    Raises:
        RunFolderError: ``out`` holds another run's results, or files that are not a run.
    """
    digest = config_hash(config)
    marker = out / RUN_FILE
    if marker.is_file():
        try:
            run = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            run = {}
        if run.get("format") != RUN_FORMAT or run.get("config_sha256") != digest:
            raise RunFolderError(
                f"{out}: holds the results of another evaluation run (config sha256 "
                f"{str(run.get('config_sha256'))[:12]}, this config {digest[:12]}); nothing was "
                "overwritten: choose a new out_dir or remove the old one"
            )
        return True
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunFolderError(
            f"{out}: exists and holds files that are not an evaluation run; nothing was "
            "overwritten: choose a new or empty out_dir"
        )
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "evaluate_config.yaml")
    atomic_write_json(
        marker,
        {
            "format": RUN_FORMAT,
            "config_sha256": digest,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "synthlesion_version": __version__,
            "status": "running",
        },
    )
    return False


@contextlib.contextmanager
def _threads(count: int | None) -> Iterator[None]:
    if count is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _log(progress: Progress | None, message: str) -> None:
    logger.info(message)
    if progress is not None:
        progress(message)


def run_evaluation(
    config: EvaluateConfig,
    *,
    progress: Progress | None = None,
    step_progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Run every arm and seed, score, compare, measure fidelity, write results and report.

    Args:
        config: The resolved config.
        progress: Called with one line per stage (entry points print it).
        step_progress: Called as ``(label, step, total)`` during each training run.

    Returns:
        The results (also written to ``out_dir/results.json``).

    Raises:
        RunFolderError: ``out_dir`` holds another run.
        SyntheticTestDataError: the test split would hold synthetic data.
        EvaluationConfigError, GuardViolation, ...: bad inputs.
    """
    out = Path(config.out_dir)
    started = time.perf_counter()
    cases = evdata.require_real_source(config.data)  # before anything is written
    resume = claim_run_folder(out, config)
    modality = cases[0].modality if cases else "unknown"
    normaliser = IntensityNormaliser.for_modality(modality)
    with _threads(config.threads):
        manifests = {"diffusion": [Path(m) for m in config.diffusion_manifests]}
        if any(a.kind == "handcrafted" for a in config.arms):
            manifests["handcrafted"] = [_handcrafted_manifest(config, out, progress)]
        _log(progress, "building the guarded dataset (real + synthetic train, real-only test)")
        record = evdata.build_dataset(
            config.data,
            config.splits,
            [m for ms in manifests.values() for m in ms],
            out / evdata.BUILD_DIR,
            reuse=resume,
            include_rejected=config.include_rejected,
        )
        build = out / evdata.BUILD_DIR
        pool = evdata.load_training_pool(build, evdata.generator_kinds(manifests), normaliser)
        test = evdata.GuardedTestSet(build, config.test_split, normaliser)
        probe = evdata.probe_evaluation_guard(build)
        _log(
            progress,
            f"train: {len(pool.real)} real cases + "
            + ", ".join(f"{len(v)} {k}" for k, v in pool.synthetic.items())
            + f"; {config.test_split}: {len(test)} real cases (guarded)",
        )
        bins = size_bin_names(config.metrics.size_bins_mm)
        runs: dict[str, dict[int, dict[str, Any]]] = {}
        total = len(config.arms) * len(config.seeds)
        done = 0
        for arm in config.arms:
            runs[arm.name] = {}
            for seed in config.seeds:
                done += 1
                _log(progress, f"[{done}/{total}] arm {arm.name}, seed {seed}")
                runs[arm.name][seed] = _run_arm(
                    config, arm, seed, pool, test, bins, out, step_progress
                )
        results = _results(config, record, pool, test, probe, runs, bins)
        _log(progress, "measuring the fidelity of the synthetic lesions")
        results["fidelity"], examples = _fidelity(config, pool, test, runs, out)
        results["seconds"] = round(time.perf_counter() - started, 1)
        if config.report:
            from synthlesion.evaluation.report import REPORT_FILE, write_report

            results["report"] = str(out / REPORT_FILE)
            card = (build / "dataset_card.md").read_text(encoding="utf-8")
            write_report(out, _jsonable(results), examples, card)
            _log(progress, f"report: {results['report']}")
        atomic_write_json(out / "results.json", _jsonable(results))
        run = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
        atomic_write_json(out / RUN_FILE, {**run, "status": "complete"})
    return results


def _handcrafted_manifest(config: EvaluateConfig, out: Path, progress: Progress | None) -> Path:
    if config.handcrafted_manifest is not None:
        return Path(config.handcrafted_manifest)
    from synthlesion.pipelines.handcrafted import run_handcrafted

    _log(progress, "making the hand-crafted baseline lesions")
    report = run_handcrafted(config.data, config.splits, out / "handcrafted", config.handcrafted)
    if report.failed:
        logger.warning(
            "hand-crafted baseline: %d case(s) failed (first: %s)",
            len(report.failed),
            report.failed[0]["problem"],
        )
    if not report.written and not report.skipped_existing:
        raise EvaluationError("hand-crafted baseline: no case could be made")
    return report.manifest


def _pool_for(arm: ArmConfig, pool: evdata.TrainingPool) -> list[ArrayCase]:
    if arm.kind in ("handcrafted", "diffusion"):
        synthetic = pool.synthetic.get(arm.kind, [])
        if not synthetic:
            raise EvaluationError(f"arm {arm.name}: the build holds no {arm.kind} case")
        return [*pool.real, *synthetic]
    return list(pool.real)


def _run_arm(
    config: EvaluateConfig,
    arm: ArmConfig,
    seed: int,
    pool: evdata.TrainingPool,
    test: evdata.GuardedTestSet,
    bins: list[str],
    out: Path,
    step_progress: Callable[[str, int, int], None] | None,
) -> dict[str, Any]:
    folder = out / "arms" / arm.name / f"seed-{seed}"
    result_path = folder / "result.json"
    if result_path.is_file():
        data = json.loads(result_path.read_text(encoding="utf-8"))
        data["cases"] = [CaseMetrics.from_dict(c) for c in data["cases"]]
        return data
    cfg = config.segmenter
    donors = [c for c in pool.real if np.isin(c.label, pool.lesion_values).any()]
    batches = ArmBatches(
        _pool_for(arm, pool), arm, cfg, seed, pool.lesion_values, pool.organ_values, donors
    )
    label = f"{arm.name}/seed {seed}"
    started = time.perf_counter()
    trained = train_segmenter(
        batches,
        cfg,
        seed,
        device=config.device,
        progress=(lambda step, loss: step_progress(label, step, cfg.steps))
        if step_progress
        else None,
    )
    seconds = time.perf_counter() - started
    scored = [
        case_metrics(
            c.case_id,
            trained.predict(c.image, config.device),
            np.isin(c.label, pool.lesion_values),
            c.spacing,
            config.metrics.size_bins_mm,
        )
        for c in test.cases()
    ]
    summary = summarise(scored, bins)
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in trained.network.state_dict().items()},
        str(folder / "model.safetensors"),
    )
    data = {
        "arm": arm.name,
        "kind": arm.kind,
        "share": arm.share,
        "seed": seed,
        "drawn_share": trained.drawn_share,
        "seconds": round(seconds, 2),
        "loss_first": trained.losses[0],
        "loss_last": float(np.mean(trained.losses[-10:])),
        "summary": summary,
        "cases": [c.to_dict() for c in scored],
    }
    atomic_write_json(result_path, _jsonable(data))
    logger.info(
        "%s: dice %.3f, sensitivity %.3f, fp/case %.2f (%.0f s)",
        label,
        summary["dice"],
        summary["sensitivity"],
        summary["fp_per_case"],
        seconds,
    )
    return {**data, "cases": scored}


def _results(
    config: EvaluateConfig,
    record: dict[str, Any],
    pool: evdata.TrainingPool,
    test: evdata.GuardedTestSet,
    probe: dict[str, Any],
    runs: dict[str, dict[int, dict[str, Any]]],
    bins: list[str],
) -> dict[str, Any]:
    arms = []
    for arm in config.arms:
        per_seed = {s: r["summary"] for s, r in runs[arm.name].items()}
        arms.append(
            {
                "name": arm.name,
                "kind": arm.kind,
                "share": arm.share,
                "drawn_share": float(np.mean([r["drawn_share"] for r in runs[arm.name].values()])),
                "seconds": float(sum(r["seconds"] for r in runs[arm.name].values())),
                "metrics": over_seeds(per_seed),
            }
        )
    reference = config.reference_arm
    pairs = [(a.name, reference) for a in config.arms if a.name != reference]
    baselines = [
        a.name for a in config.arms if a.kind in ("classical", "copy_paste", "handcrafted")
    ]
    for arm in config.arms:
        if arm.kind == "diffusion":
            pairs += [(arm.name, b) for b in baselines if (arm.name, b) not in pairs]
    comparisons = []
    for a, b in pairs:
        cases_a = {s: r["cases"] for s, r in runs[a].items()}
        cases_b = {s: r["cases"] for s, r in runs[b].items()}
        for metric in ("dice", "hd95_mm"):
            comparisons.append(
                {
                    "arm": a,
                    "against": b,
                    **paired_comparison(
                        cases_a,
                        cases_b,
                        metric=metric,
                        bootstrap=config.metrics.bootstrap,
                        seed=config.metrics.seed,
                    ),
                }
            )
    lesion_real = sum(bool(np.isin(c.label, pool.lesion_values).any()) for c in pool.real)
    return {
        "format": RESULTS_FORMAT,
        "synthlesion_version": __version__,
        "config_sha256": config_hash(config),
        "out_dir": str(config.out_dir),
        "test_split": config.test_split,
        "seeds": list(config.seeds),
        "size_bins": bins,
        "reference_arm": reference,
        "segmenter": config_to_dict(config.segmenter),
        "data": {
            "train_real": len(pool.real),
            "train_real_lesion": lesion_real,
            "train_real_healthy": len(pool.real) - lesion_real,
            "train_synthetic": {k: len(v) for k, v in pool.synthetic.items()},
            "test_cases": len(test),
            "modality": pool.modality,
        },
        "build": {
            "dir": str(Path(config.out_dir) / evdata.BUILD_DIR),
            "build_id": record["build_id"],
            "counts": record["counts"],
        },
        "guards": {
            "build": record["guards"],
            "evaluation": {
                "split": config.test_split,
                "cases_loaded": len(test),
                "all_real": True,
                "loader_passes": test.loads,
                "probe": probe,
            },
        },
        "arms": arms,
        "comparisons": comparisons,
    }


def _load_segmenter(
    config: EvaluateConfig, out: Path, arm: str, seed: int, spatial_dims: int
) -> TrainedSegmenter:
    from safetensors.torch import load_file

    network = build_network(config.segmenter, spatial_dims)
    network.load_state_dict(
        load_file(str(out / "arms" / arm / f"seed-{seed}" / "model.safetensors"))
    )
    network.to(config.device).eval()
    return TrainedSegmenter(network, config.segmenter.patch_size, [], 0.0)


def _fidelity(
    config: EvaluateConfig,
    pool: evdata.TrainingPool,
    test: evdata.GuardedTestSet,
    runs: dict[str, dict[int, dict[str, Any]]],
    out: Path,
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    cfg = config.fidelity
    lesion_values, organ_values = pool.lesion_values, pool.organ_values
    real_arm = next((a for a in config.arms if a.kind == "real"), None)
    segmenter = None
    if real_arm is not None and pool.real:
        segmenter = _load_segmenter(
            config, out, real_arm.name, config.seeds[0], pool.real[0].image.ndim
        )

    def lesions(case: ArrayCase, exclude: np.ndarray | None = None) -> list[Any]:
        mask = np.isin(case.label, lesion_values)
        if exclude is not None:
            mask &= ~exclude
        return lesions_of(case, mask, np.isin(case.label, organ_values), cfg.crop_size)

    real_train = [x for c in pool.real for x in lesions(c)]
    test_items = [(c, lesions(c)) for c in test.cases()]
    real_test = [x for _, found in test_items for x in found]
    result: dict[str, Any] = {
        "reference": reference_fidelity(
            real_train, real_test, test_items, segmenter, config.device
        ),
        "segmenter": f"{real_arm.name}/seed-{config.seeds[0]}" if real_arm else None,
        "generators": {},
    }
    sources = pool.real_by_id()
    examples: dict[str, list[dict[str, Any]]] = {}
    for kind, cases in sorted(pool.synthetic.items()):
        items = []
        for case in cases[: cfg.max_lesions]:
            source = sources.get(case.source_case)
            own = np.isin(source.label, lesion_values) if source is not None else None
            items.append((case, lesions(case, own)))
        fid = generator_fidelity(kind, items, sources, real_train, segmenter, cfg, config.device)
        result["generators"][kind] = fid.to_dict()
        examples[kind] = fid.examples
    return result, examples


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, CaseMetrics):
        return value.to_dict()
    if isinstance(value, Path):
        return str(value)
    return value


__all__ = ["claim_run_folder", "config_hash", "run_evaluation"]
