"""``synthlesion demo``: the toolkit's main job end to end on a machine with no data.

1. the embedded 2D CT phantom in the scarce-label setting (few labelled lesion scans, many
   healthy scans), checked, with a locked patient-level split;
2. a tiny lesion diffusion model trained on the CPU through the training package;
3. lesions painted into the healthy training scans (``run_sampling``, with a manifest);
4. the guarded training dataset built (``DatasetBuilder``: nnU-Net / MONAI layout, card);
5. a quick downstream evaluation of every arm (``run_evaluation``) and its report.

``quick`` shrinks every stage to a smoke run of about 30 s on 2 CPU cores (one seed; used by
the tests).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synthlesion.evaluation.errors import EvaluationError, RunFolderError
from synthlesion.evaluation.scenario import Scenario, describe_splits, make_scenario
from synthlesion.storage import atomic_write_json

logger = logging.getLogger(__name__)

DEMO_FILE = "demo.json"
Log = Callable[[str], None]
Steps = Callable[[str, int, int], None]


@dataclass(frozen=True)
class DemoProfile:
    """Sizes of every stage (steps are optimizer or sampler steps)."""

    scenario: Scenario
    diffusion_steps: int
    diffusion_channels: tuple[int, ...]
    diffusion_batch: int
    sampling_steps: int
    segmenter_steps: int
    segmenter_batch: int
    patch_size: tuple[int, ...] | None = None
    seeds: tuple[int, ...] = (0, 1, 2)


PROFILES = {
    "full": DemoProfile(
        Scenario(lesion=(8, 4, 24), healthy=(48, 4, 12), size=128),
        diffusion_steps=400,
        diffusion_channels=(32, 64, 64),
        diffusion_batch=16,
        sampling_steps=20,
        segmenter_steps=240,
        segmenter_batch=8,
        patch_size=(64, 64),
    ),
    # a smoke run of about 30 s: one seed (the full profile has three)
    "quick": DemoProfile(
        Scenario(lesion=(6, 2, 6), healthy=(10, 2, 4), size=64),
        20,
        (16, 32, 32),
        8,
        5,
        15,
        8,
        seeds=(0,),
    ),
}


@dataclass
class DemoResult:
    """Where everything went, and the headline figures."""

    out_dir: Path
    paths: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)


def diffusion_train_config(
    out: Path, dataset: Path, splits: Path, profile: DemoProfile, seed: int = 0
) -> dict[str, Any]:
    """The tiny CPU training config of the demo (a mapping for ``load_train_config``)."""
    channels = list(profile.diffusion_channels)
    return {
        "output_dir": str(out),
        "seed": seed,
        "max_steps": profile.diffusion_steps,
        "batch_size": profile.diffusion_batch,
        "log_every_n_steps": 10,
        "report_to": "none",
        "data": {
            "dataset": str(dataset),
            "splits": str(splits),
            "roi_size": [32, 32],
            "samples_per_epoch": 256,
            "healthy_fraction": 0.2,
            "region_dilation": 2,
            "num_workers": 0,
            "preprocess_workers": 1,
        },
        "model": {
            "spatial_dims": 2,
            "channels": channels,
            "attention_levels": [False] * len(channels),
            "layers_per_block": 1,
            "norm_num_groups": min(16, channels[0]),
            "sample_size": 32,
            "num_train_timesteps": 1000,
            "prediction_type": "v_prediction",
            "beta_schedule": "squaredcos_cap_v2",
            "pixel_network": "diffusers",
        },
        "optim": {
            "learning_rate": 1e-3,
            "lr_scheduler": "cosine",
            "lr_warmup_steps": min(20, profile.diffusion_steps // 5),
        },
        "ema": {"decay": 0.995},
        "loss": {"lesion_weight": 10.0, "lesion_dilation": 1},
        "validation": {
            "every_n_steps": 0,
            "num_crops": 8,
            "num_preview": 4,
            "num_inference_steps": 10,
        },
        "checkpoint": {"every_n_steps": 0, "total_limit": 1},
    }


def _claim(out: Path, overwrite: bool) -> None:
    marker = out / DEMO_FILE
    if out.exists() and any(out.iterdir()):
        if overwrite and marker.is_file():
            shutil.rmtree(out)
        else:
            raise RunFolderError(
                f"{out}: is not empty; nothing was overwritten. Choose a new folder"
                + (" or pass --overwrite to replace the earlier demo" if marker.is_file() else "")
            )
    out.mkdir(parents=True, exist_ok=True)


def run_demo(
    out_dir: str | Path,
    *,
    quick: bool = False,
    threads: int | None = None,
    overwrite: bool = False,
    log: Log | None = None,
    steps: Steps | None = None,
) -> DemoResult:
    """Run the demo into ``out_dir`` (see the module docstring).

    Args:
        out_dir: A new or empty folder (or an earlier demo with ``overwrite``).
        quick: The smoke-sized profile.
        threads: torch CPU threads (``None``: torch's default).
        overwrite: Replace an earlier demo folder.
        log: Called with one line per stage.
        steps: Called as ``(stage, done, total)`` during long stages.

    Raises:
        RunFolderError: ``out_dir`` holds other files.
    """
    import torch

    from synthlesion.data.sources import load_cases
    from synthlesion.data.validation import check_dataset
    from synthlesion.dataset import BuildConfig, DatasetBuilder
    from synthlesion.evaluation.config import load_evaluate_config
    from synthlesion.evaluation.harness import run_evaluation
    from synthlesion.pipelines.sampling import SampleOptions, run_sampling
    from synthlesion.training import load_train_config, train

    out = Path(out_dir)
    _claim(out, overwrite)
    profile = PROFILES["quick" if quick else "full"]
    say = log or (lambda message: logger.info(message))
    result = DemoResult(out)
    atomic_write_json(
        out / DEMO_FILE,
        {"profile": "quick" if quick else "full", "started": time.strftime("%Y-%m-%dT%H:%M:%S")},
    )
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        clock = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            result.seconds[name] = round(now - clock, 1)
            clock = now

        say("1/5 phantom: 2D CT abdomen, few labelled lesion scans, many healthy scans")
        dataset, split_files = make_scenario(out / "data", profile.scenario)
        splits = split_files[0]
        from synthlesion.data.splits import load_splits

        cases = load_cases(dataset)
        say(f"    {len(cases)} scans; {describe_splits(load_splits(splits), cases)}")
        report = check_dataset(dataset)
        if not report.ok:
            raise EvaluationError(
                f"{dataset}: the phantom does not check clean:\n{report.to_text()}"
            )
        say(f"    check: {report.n_cases} cases, no problem; locked splits {splits}")
        result.paths.update({"dataset": dataset, "splits": splits})
        lap("phantom")

        say(
            f"2/5 training a tiny lesion diffusion model on the CPU ({profile.diffusion_steps} "
            "steps)"
        )
        config = load_train_config(
            diffusion_train_config(out / "diffusion", dataset, splits, profile)
        )
        trained = train(
            config,
            progress=(lambda step, row: steps("diffusion", step, config.max_steps))
            if steps
            else None,
        )
        if trained.model_dir is None:
            raise EvaluationError(f"diffusion training ended {trained.status}")
        loss = [r["loss"] for r in trained.metrics if "loss" in r]
        say(f"    model: {trained.model_dir} (loss {loss[0]:.3f} -> {loss[-1]:.3f})")
        result.paths["model"] = trained.model_dir
        lap("diffusion training")

        say("3/5 painting lesions into the healthy training scans")
        options = SampleOptions(
            steps=profile.sampling_steps,
            healthy_only=True,
            mask_source="bank",
            scheduler="dpmsolver++",
            seed=0,
        )
        sampled = run_sampling(
            trained.model_dir,
            dataset,
            splits,
            out / "synthetic",
            options,
            progress=(lambda done, total, case: steps("sampling", done, total)) if steps else None,
        )
        say(
            f"    {len(sampled.written)} synthetic scans, {len(sampled.failed)} failed, "
            f"{len(sampled.rejected_by_quality)} below the quality gate; manifest "
            f"{sampled.manifest}"
        )
        if sampled.rejected_by_quality:
            say(
                "    (a model trained for minutes on a CPU: the demo builds and evaluates "
                "the cases below the gate too, to show every stage; build-dataset and "
                "evaluate leave them out unless asked)"
            )
        result.paths["synthetic"] = sampled.manifest
        lap("sampling")

        say("4/5 building the guarded dataset (nnU-Net / MONAI layout, dataset card)")
        built = DatasetBuilder(
            dataset,
            splits,
            [sampled.manifest],
            BuildConfig(name="synthlesion-demo", synthetic_share=0.5, include_rejected=True),
        ).build(out / "dataset")
        c = built.counts
        refused = sum(g["violations"] for g in built.guards.values())
        say(
            f"    train {c['train']['real']} real + {c['train']['synthetic']} synthetic, val "
            f"{c['val']['real']}, test {c['test']['real']} (real only); "
            f"{len(built.guards)} guards, {refused} refusals"
        )
        result.paths["built_dataset"] = built.out_dir
        lap("dataset build")

        say(
            "5/5 downstream evaluation: real / copy-paste / hand-crafted / diffusion, the same "
            f"lesion-patch share, {len(profile.seeds)} seeds each"
        )
        evaluation = load_evaluate_config(
            {
                "out_dir": str(out / "evaluation"),
                "data": str(dataset),
                "splits": str(splits),
                "diffusion": {"manifests": [str(sampled.manifest)]},
                "include_rejected": True,
                # one split and every labelled scan: the full protocol is scripts/bench_downstream.py
                "protocol": {"convergence_check": False, "min_test_lesion_cases": 4},
                "seeds": list(profile.seeds),
                "threads": threads,
                "segmenter": {
                    "steps": profile.segmenter_steps,
                    "batch_size": profile.segmenter_batch,
                    "patch_size": list(profile.patch_size) if profile.patch_size else None,
                },
            }
        )
        results = run_evaluation(
            evaluation, progress=lambda m: say("    " + m), step_progress=steps
        )
        result.results = results
        result.paths["results"] = out / "evaluation" / "results.json"
        if "report" in results:
            result.paths["report"] = Path(results["report"])
        lap("evaluation")
    finally:
        if threads is not None:
            torch.set_num_threads(old_threads)
    atomic_write_json(
        out / DEMO_FILE,
        {
            "profile": "quick" if quick else "full",
            "seconds": result.seconds,
            "paths": {k: str(v) for k, v in result.paths.items()},
        },
    )
    return result


__all__ = [
    "PROFILES",
    "DemoProfile",
    "DemoResult",
    "diffusion_train_config",
    "run_demo",
]
