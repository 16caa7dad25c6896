"""Benchmark: do diffusion-synthetic lesions help a segmenter trained with few labelled scans?

On the embedded 2D CT phantom with few labelled lesion scans (8 patients) and many healthy
scans (48) in the train split, a lesion diffusion model is trained on the CPU (through the
training package), lesions are painted into the healthy train scans (``run_sampling``), and
the downstream harness (``run_evaluation``) trains the same small MONAI UNet under every arm
with the same budget and seeds (3): real only, + classical augmentation, + lesion copy-paste,
+ hand-crafted lesions, + diffusion lesions at two shares. All scores are on the real test
split (24 lesion + 12 healthy scans), read through the evaluation guard.

Figures: each arm's lesion Dice (mean +- sd over seeds); the best diffusion arm minus real only
(goal: at least +0.05), and minus the hand-crafted baseline and copy-paste, each as the paired
per-case difference with its 95% bootstrap CI and Wilcoxon p; fidelity of the synthetic lesions.
The last line is one line of JSON holding every figure.

Usage: python scripts/bench_downstream.py [--out runs/bench_downstream] [--quick] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from synthlesion.evaluation.config import load_evaluate_config
from synthlesion.evaluation.console import StageBars, arms_table, comparison_lines
from synthlesion.evaluation.demo import DemoProfile, diffusion_train_config
from synthlesion.evaluation.harness import run_evaluation
from synthlesion.evaluation.scenario import Scenario, make_scenario
from synthlesion.pipelines.sampling import SampleOptions, run_sampling
from synthlesion.training import load_train_config, train

GOAL = 0.05


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--include-rejected",
        action="store_true",
        help="also train on diffusion cases below the quality gate (left out by default)",
    )
    parser.add_argument("--out", default="runs/bench_downstream")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--size", type=int, default=128, help="phantom in-plane voxels")
    parser.add_argument("--diffusion-steps", type=int, default=600)
    parser.add_argument("--segmenter-steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--fresh", action="store_true", help="remove --out first")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    if args.quick:
        scenario = Scenario(lesion=(4, 1, 4), healthy=(8, 1, 3), size=64)
        diffusion_steps, segmenter_steps, sampling_steps = 10, 5, 3
    else:
        scenario = Scenario(lesion=(8, 4, 24), healthy=(48, 4, 12), size=args.size)
        diffusion_steps, segmenter_steps, sampling_steps = (
            args.diffusion_steps,
            args.segmenter_steps,
            20,
        )
    bars = StageBars(None)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        seconds[name] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()

    bars.line(
        f"phantom: 2D CT {scenario.size}^2, train {scenario.lesion[0]} lesion + "
        f"{scenario.healthy[0]} healthy scans, test {scenario.lesion[2]} lesion + "
        f"{scenario.healthy[2]} healthy"
    )
    dataset, splits = make_scenario(out / "data", scenario)
    lap("phantom")
    model_dir = out / "diffusion" / "model"
    if not (model_dir / "training_record.json").is_file():
        bars.line(f"training the diffusion model ({diffusion_steps} steps)")
        profile = DemoProfile(scenario, diffusion_steps, (32, 64, 64), 16, sampling_steps, 0, 16)
        config = load_train_config(
            diffusion_train_config(out / "diffusion", dataset, splits, profile)
        )
        trained = train(
            config, progress=lambda step, row: bars.update("diffusion", step, config.max_steps)
        )
        model_dir = trained.model_dir
    lap("diffusion training")
    bars.line("painting lesions into the healthy training scans")
    sampled = run_sampling(
        model_dir,
        dataset,
        splits,
        out / "synthetic",
        SampleOptions(
            steps=sampling_steps, healthy_only=True, mask_source="bank", scheduler="dpmsolver++"
        ),
        progress=lambda done, total, case: bars.update("sampling", done, total),
    )
    lap("sampling")
    print(
        f"{len(sampled.written)} diffusion cases, {len(sampled.rejected_by_quality)} below the "
        f"quality gate ({'included' if args.include_rejected else 'left out'})"
    )
    config = load_evaluate_config(
        {
            "out_dir": str(out / "evaluation"),
            "data": str(dataset),
            "splits": str(splits),
            "diffusion_manifests": [str(sampled.manifest)],
            "include_rejected": args.include_rejected,
            "seeds": list(range(args.seeds)),
            "threads": args.threads,
            "segmenter": {
                "steps": segmenter_steps,
                "batch_size": 16,
                "patch_size": None if scenario.size <= 64 else [64, 64],
            },
        }
    )
    results = run_evaluation(config, progress=bars.line, step_progress=bars.update)
    bars.close()
    lap("evaluation")
    print(
        "\n".join(
            [
                "arms (lesion Dice etc., mean ± sd over seeds):",
                *arms_table(results),
                "paired Dice differences (95% bootstrap CI):",
                *comparison_lines(results),
            ]
        )
    )
    figures = summarise(results, seconds, scenario, diffusion_steps, segmenter_steps)
    best = figures["best_diffusion_arm"]
    diff = figures["diffusion_minus_real"]["mean_diff"]
    print(
        f"best diffusion arm {best}: Dice {diff:+.3f} against real only (goal +{GOAL}: "
        f"{'met' if figures['goal_met'] else 'NOT met'}); against hand-crafted "
        f"{figures['diffusion_minus_handcrafted']['mean_diff']:+.3f}, against copy-paste "
        f"{figures['diffusion_minus_copy_paste']['mean_diff']:+.3f}; report: "
        f"{results.get('report')}"
    )
    print(json.dumps(figures, sort_keys=True))
    return 0


def _pick(results: dict, arm: str, against: str) -> dict:
    for c in results["comparisons"]:
        if c["arm"] == arm and c["against"] == against and c["metric"] == "dice":
            return {
                k: c[k]
                for k in ("mean_diff", "ci_low", "ci_high", "wilcoxon_p", "cases", "seed_diffs")
            }
    return {}


def summarise(
    results: dict, seconds: dict, scenario: Scenario, diffusion_steps: int, segmenter_steps: int
) -> dict:
    arms = {a["name"]: a for a in results["arms"]}
    dice = {
        name: {
            "mean": a["metrics"]["dice"]["mean"],
            "sd": a["metrics"]["dice"]["sd"],
            "seeds": a["metrics"]["dice"]["values"],
        }
        for name, a in arms.items()
    }
    diffusion = [a["name"] for a in results["arms"] if a["kind"] == "diffusion"]
    best = max(diffusion, key=lambda n: dice[n]["mean"] if dice[n]["mean"] is not None else -1)
    by_kind = {a["kind"]: a["name"] for a in results["arms"]}
    vs_real = _pick(results, best, by_kind["real"])
    fid = results["fidelity"]
    return {
        "bench": "downstream",
        "scenario": {
            "size": scenario.size,
            "train_lesion_scans": scenario.lesion[0],
            "train_healthy_scans": scenario.healthy[0],
            "test_scans": scenario.lesion[2] + scenario.healthy[2],
            "test_lesion_scans": scenario.lesion[2],
        },
        "budget": {
            "diffusion_steps": diffusion_steps,
            "segmenter_steps": segmenter_steps,
            "seeds": results["seeds"],
        },
        "dice": dice,
        "sensitivity": {n: a["metrics"]["sensitivity"]["mean"] for n, a in arms.items()},
        "fp_per_case": {n: a["metrics"]["fp_per_case"]["mean"] for n, a in arms.items()},
        "hd95_mm": {n: a["metrics"]["hd95_mm"]["mean"] for n, a in arms.items()},
        "best_diffusion_arm": best,
        "diffusion_minus_real": vs_real,
        "goal": GOAL,
        "goal_met": bool(
            vs_real and vs_real["mean_diff"] is not None and vs_real["mean_diff"] >= GOAL
        ),
        "diffusion_minus_handcrafted": _pick(results, best, by_kind["handcrafted"]),
        "diffusion_minus_copy_paste": _pick(results, best, by_kind["copy_paste"]),
        "diffusion_minus_classical": _pick(results, best, by_kind["classical"]),
        "fidelity": {
            kind: {
                "intensity_w1_over_sd": {
                    s: g["intensity"][s]["w1_over_sd"] for s in ("mean", "std", "contrast")
                },
                "adherence_voxel_fraction": g["adherence"]["voxel_fraction"],
                "near_copies": g["memorisation"]["flagged"],
                "nearest_ncc_max": g["memorisation"]["nearest_ncc_max"],
            }
            for kind, g in fid["generators"].items()
        },
        "fidelity_floor_adherence_real_test": fid["reference"]["adherence_real_test"][
            "voxel_fraction"
        ],
        "seconds": {**seconds, "total": round(sum(seconds.values()), 1)},
        "report": results.get("report"),
    }


if __name__ == "__main__":
    sys.exit(main())
