"""Benchmark: do synthetic lesions help a segmenter trained with few labelled scans?

The protocol of ``synthlesion evaluate`` on the embedded 2D CT phantom with typed lesions
(cysts, rimmed metastases with a halo, heterogeneous HCC-like masses with calcifications,
infiltrative lesions; mass effect): 3 patient splits, each with 48 lesion + 48 healthy train
scans, 24 + 8 val and 100 + 30 test scans. Two labelled budgets (4 and 16 lesion scans, the 48
healthy scans kept) x 2 seeds; for every split and budget a lesion diffusion model is trained on
that budget's scans only and paints lesions into the healthy train scans, and the hand-crafted
baseline is fitted to the same scans. Arms: real (balanced: the same share of lesion patches as
every other arm), copy-paste, hand-crafted, diffusion; the all-labelled upper reference (all 48
lesion scans) and the threshold rule as a floor. The real arm is trained again with twice the
steps (the convergence check). Realism (repaint, KID, classifier AUC, texture) on the 16-scan
cells. Cells run in two worker processes side by side (one torch thread each), then the run is
resumed once to pool them.

The last line is one line of JSON holding every figure (see ``figures``).

Usage: python scripts/bench_downstream.py [--out runs/bench_downstream] [--quick] [--fresh]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from synthlesion.evaluation.config import load_evaluate_config
from synthlesion.evaluation.demo import DemoProfile, diffusion_train_config
from synthlesion.evaluation.harness import claim_run_folder, run_evaluation
from synthlesion.evaluation.protocol import plan_cells
from synthlesion.evaluation.scenario import Scenario, make_scenario


def _settings(quick: bool, out: Path, steps: int) -> tuple[Scenario, dict[str, Any], DemoProfile]:
    if quick:
        scenario = Scenario(
            lesion=(8, 2, 12), healthy=(8, 2, 4), size=64, splits=2, lesion_model="types"
        )
        profile = DemoProfile(scenario, 30, (16, 32, 32), 8, 5, 40, 8)
        segmenter = {
            "steps": 40,
            "batch_size": 8,
            "patch_size": [32, 32],
            "channels": [8, 16, 32],
            "validate_every": 20,
        }
        protocol = {"budgets": [2, 8], "min_test_lesion_cases": 10}
        fidelity = {"repaint_lesions": 8, "kid_subsets": 20, "classifier_folds": 3}
        bootstrap = 500
    else:
        scenario = Scenario(
            lesion=(48, 24, 100), healthy=(48, 8, 30), size=128, splits=3, lesion_model="types"
        )
        profile = DemoProfile(scenario, 400, (32, 64, 64), 16, 20, steps, 16)
        segmenter = {
            "steps": steps,
            # 16 labelled patients take longer to converge (a steps curve of the real arm at
            # 1600-6400 steps, README): 2400 there, 1600 at budget 4
            "steps_by_budget": {16: steps * 3 // 2},
            "batch_size": 16,
            "patch_size": [64, 64],
            "channels": [8, 16, 32, 64],
            "validate_every": max(steps // 4, 1),
        }
        protocol = {"budgets": [4, 16], "min_test_lesion_cases": 100}
        fidelity = {"repaint_lesions": 40}
        bootstrap = 2000
    evaluation = {
        "out_dir": str(out / "evaluation"),
        "arms": [
            {"name": "real_balanced", "kind": "real"},
            {"name": "copy_paste", "kind": "copy_paste", "share": 0.5},
            {"name": "handcrafted", "kind": "handcrafted", "share": 0.5},
            {"name": "diffusion", "kind": "diffusion", "share": 0.5},
        ],
        "seeds": [0, 1],
        "threads": 1,
        "protocol": protocol,
        "segmenter": segmenter,
        "metrics": {"bootstrap": bootstrap},
        "fidelity": fidelity,
        "diffusion": {"train_config": str(out / "diffusion_train.yaml"), "sample_steps": 20},
    }
    return scenario, evaluation, profile


def _worker(config_map: dict[str, Any], cells: list[str]) -> None:
    import logging

    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    config = load_evaluate_config(config_map)
    run_evaluation(config, only_cells=cells, progress=lambda m: print(f"  [{cells[0]}..] {m}"))


def figures(results: dict[str, Any]) -> dict[str, Any]:
    """The benchmark's JSON line: the issue's names, arm keys as ``<arm>@b<budget>``."""
    realism = results.get("realism") or {}

    def pick(record: dict[str, Any] | None, *keys: str) -> dict[str, Any]:
        return {k: (record or {}).get(k) for k in keys}

    convergence = results.get("convergence", {})
    return {
        "arms": {
            name: pick(
                arm,
                "dice_mean",
                "dice_ci",
                "positive_patch_share",
                "lesion_pixel_share",
                "sensitivity",
                "fp_per_case",
            )
            for name, arm in results["arms"].items()
        },  # fmt: skip
        "real_converged": results["real_converged"],
        "budget_steps": results["budget_steps"],
        "convergence": {
            b: pick(c, "test_dice_change_when_doubled", "ci", "within_tolerance", "validation")
            for b, c in convergence.items()
        },
        "positive_patch_share_spread": results["positive_patch_share_spread"],
        "upper_reference_dice": results["upper_reference_dice"],
        "threshold_floor_dice": results["threshold_floor_dice"],
        "threshold_floor": {b: f["dice_mean"] for b, f in results["threshold_floor"].items()},
        "comparisons": {
            key: pick(c, "mean_diff", "ci_low", "ci_high", "p_wilcoxon", "p_holm")
            for key, c in results["comparisons"].items()
        },
        "repaint": realism.get("repaint"),
        "kid": {k: v.get("mean") for k, v in (realism.get("kid") or {}).items()},
        "kid_floor": (realism.get("kid_floor") or {}).get("mean"),
        "classifier_auc": {
            k: pick(v, "auc", "ci_low", "ci_high")
            for k, v in (realism.get("classifier_auc") or {}).items()
        },
        "classifier_auc_floor": pick(
            realism.get("classifier_auc_floor"), "auc", "ci_low", "ci_high"
        ),
        "classifier_auc_control": pick(
            realism.get("classifier_auc_control"), "auc", "ci_low", "ci_high"
        ),
        "texture_mean_ks": {k: v.get("mean_ks") for k, v in (realism.get("texture") or {}).items()},
        "texture_mean_ks_floor": (realism.get("texture_floor") or {}).get("mean_ks"),
        "gate": results["gate"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench_downstream")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--fresh", action="store_true", help="remove --out first")
    parser.add_argument("--workers", type=int, default=2, help="cell worker processes")
    parser.add_argument("--segmenter-steps", type=int, default=1600)
    args = parser.parse_args()
    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    started = time.perf_counter()
    scenario, evaluation, profile = _settings(args.quick, out, args.segmenter_steps)
    print(
        f"phantom: 2D CT {scenario.size}^2 ({scenario.lesion_model} lesions), "
        f"{scenario.splits} patient splits: train {scenario.lesion[0]} lesion + "
        f"{scenario.healthy[0]} healthy, val {scenario.lesion[1]} + {scenario.healthy[1]}, "
        f"test {scenario.lesion[2]} + {scenario.healthy[2]}; budgets "
        f"{evaluation['protocol']['budgets']}"
    )
    dataset, splits = make_scenario(out / "data", scenario)
    train_yaml = diffusion_train_config(out / "unused", dataset, splits[0], profile)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diffusion_train.yaml").write_text(yaml.safe_dump(train_yaml), encoding="utf-8")
    evaluation.update({"data": str(dataset), "splits": [str(s) for s in splits]})
    config = load_evaluate_config(evaluation)
    from synthlesion.data.sources import load_cases

    cells = [c.name for c in plan_cells(config, load_cases(dataset))]
    claim_run_folder(Path(config.out_dir), config)
    seconds = {"phantom": round(time.perf_counter() - started, 1)}
    clock = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_worker, args=(evaluation, cells[i :: args.workers]))
        for i in range(args.workers)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if any(w.exitcode for w in workers):
        print(f"a worker failed (exit codes {[w.exitcode for w in workers]})", file=sys.stderr)
        return 1
    seconds["cells"] = round(time.perf_counter() - clock, 1)
    clock = time.perf_counter()
    results = run_evaluation(config, progress=lambda m: None)
    seconds["pooling"] = round(time.perf_counter() - clock, 1)
    seconds["total"] = round(time.perf_counter() - started, 1)
    line = figures(results)
    for name, arm in line["arms"].items():
        low, high = arm["dice_ci"]
        print(
            f"{name:24s} Dice {arm['dice_mean']:.3f} [{low:.3f}, {high:.3f}]  positive patches "
            f"{arm['positive_patch_share']:.3f}  lesion pixels {arm['lesion_pixel_share']:.4f}"
        )
    print(
        f"upper reference {line['upper_reference_dice']}, threshold floor {line['threshold_floor']}"
    )
    print(f"real converged: {line['real_converged']} ({line['convergence']})")
    for key, c in line["comparisons"].items():
        print(
            f"{key:40s} {c['mean_diff']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] "
            f"p_holm {c['p_holm']:.3g}"
        )
    print(json.dumps({**line, "seconds": seconds, "quick": args.quick}, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
