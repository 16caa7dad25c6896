"""Benchmark of the training loop, all figures measured side by side in one run.

1. Overhead: steps per second of synthlesion's loop (accelerate, EMA, NaN guard, data
   position, metrics) against a bare diffusers-style loop (forward, backward, clip, AdamW,
   LR schedule) with the same network, batch and data, run alternately (median step times).
2. ROI cropping: the cost of one step on 3D scans of 64^3 and 256^3 voxels with a 48^3 region
   of interest (the ratio stays near 1 because every step sees a 48^3 crop), plus the one-off
   preparation time and the cost of drawing one crop.
3. Peak memory: tracemalloc (Python and numpy allocations) while preparing each 3D dataset,
   and the process's peak resident memory (``resource.getrusage``).
5. The tiny 3D config (configs/train_phantom3d_cpu.yaml): one optimizer step of synthlesion's
   loop against a bare MONAI ``DiffusionModelUNet`` forward/backward/AdamW step on a batch of
   the same shape (random tensors: no data, no EMA, no guards), run alternately
   (``train3d_step_s``, ``bare_monai_step_s``, ``train3d_step_ratio``; goal <= 3), and a
   per-phase profile of a short run with validation, previews and checkpoints (cProfile's
   cumulative seconds of the loop's phases: data preparation, crop drawing, forward + loss,
   backward, optimizer, EMA, validation and previews, checkpointing, export).
4. Quality: the tiny CPU config (configs/train_phantom2d_cpu.yaml) on the 2D MRI phantom:
   validation loss at the start and the end, and the lesion-to-surrounding contrast generated
   inside real target masks against the real lesions' (preview crops, and 32 more crops
   generated from the exported model afterwards).

Prints every figure; the last line is one line of JSON holding them all.

Usage: python scripts/bench_train.py [--quick] [--keep DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "train_phantom2d_cpu.yaml"
TINY3D = ROOT / "configs" / "train_phantom3d_cpu.yaml"
NO_EVAL = [
    "validation.every_n_steps=0",
    "validation.num_crops=0",
    "validation.num_preview=0",
    "checkpoint.every_n_steps=0",
    "report_to=none",
]


def _median(values: list[float], skip: int) -> float:
    return statistics.median(values[skip:] if len(values) > skip else values)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --- 1. overhead ---------------------------------------------------------------------------


def bare_loop(config, steps: int) -> list[float]:
    """A plain diffusers-example loop over the same data, network and optimizer settings."""
    from diffusers.optimization import get_scheduler

    from synthlesion.models import LesionDiffusionModel
    from synthlesion.training.crops import (
        CropBatchSampler,
        CropDataset,
        CropMaker,
        crop_spec,
        make_loader,
    )
    from synthlesion.training.data import load_training_data

    data = load_training_data(config.data, spatial_dims=config.model.spatial_dims, seed=config.seed)
    maker = CropMaker(data.train, crop_spec(config.data, data, None))
    dataset = CropDataset(maker, config.seed, config.data.samples_per_epoch)
    loader = make_loader(
        dataset,
        CropBatchSampler(config.data.samples_per_epoch, config.batch_size),
        num_workers=config.data.num_workers,
        generator=torch.Generator().manual_seed(0),
    )
    torch.manual_seed(config.seed)
    model = LesionDiffusionModel.from_config(config.model)
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=config.optim.learning_rate)
    scheduler = get_scheduler(
        config.optim.lr_scheduler,
        optimizer,
        num_warmup_steps=config.optim.lr_warmup_steps,
        num_training_steps=config.max_steps,
    )
    generator = torch.Generator().manual_seed(0)
    batches = iter(loader)
    times = []
    model.train()
    for _ in range(steps):
        started = time.perf_counter()
        batch = next(batches)
        loss = model.training_loss(
            batch, generator, config.loss.lesion_weight, config.loss.lesion_dilation
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.optim.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return times


def bench_overhead(tmp: Path, data_overrides: list[str], steps: int, rounds: int) -> dict:
    from synthlesion.training import load_train_config, train
    from synthlesion.training.data import ensure_phantom

    ensure_phantom(load_train_config(TINY, data_overrides).data, spatial_dims=2)
    ours, bare = [], []
    for r in range(rounds):
        config = load_train_config(
            TINY,
            [
                *data_overrides,
                *NO_EVAL,
                f"max_steps={steps}",
                f"output_dir={tmp / f'overhead{r}'}",
                f"log_every_n_steps={steps}",
            ],
        )
        order = ("bare", "ours") if r % 2 == 0 else ("ours", "bare")
        for which in order:
            if which == "bare":
                bare += bare_loop(config, steps)[3:]
            else:
                ours += train(config).step_seconds[3:]
    t_ours, t_bare = statistics.median(ours), statistics.median(bare)
    return {
        "overhead_steps": steps * rounds,
        "ours_step_s": t_ours,
        "bare_step_s": t_bare,
        "ours_steps_per_s": 1.0 / t_ours,
        "bare_steps_per_s": 1.0 / t_bare,
        "overhead_ratio": t_ours / t_bare,
        "overhead_pct": 100.0 * (t_ours / t_bare - 1.0),
    }


# --- 2./3. 3D regions of interest ----------------------------------------------------------


def cube_dataset(root: Path, size: int, n_cases: int = 2) -> tuple[Path, Path]:
    """CT-like cubes (1 mm voxels): a spherical organ with two lesions each."""
    from synthlesion.data.io import save_image
    from synthlesion.data.splits import Splits, save_splits
    from synthlesion.data.volume import Volume

    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(size)
    training = []
    axes = np.ogrid[:size, :size, :size]
    c = (size - 1) / 2
    r2 = sum((a - c) ** 2 for a in axes)
    for i in range(n_cases):
        labels = np.zeros((size,) * 3, np.uint8)
        labels[r2 <= (0.4 * size) ** 2] = 1
        for sign in (-1, 1):
            centre = c + sign * 0.15 * size + rng.uniform(-2, 2, 3)
            d2 = sum((a - q) ** 2 for a, q in zip(axes, centre, strict=True))
            labels[d2 <= 5.0**2] = 2
        image = np.where(r2 <= (0.45 * size) ** 2, 40.0, -1000.0)
        image[labels == 1] = 60.0
        image[labels == 2] = 15.0
        image += rng.normal(0, 8, image.shape)
        affine = np.eye(4)
        save_image(
            Volume(image.astype(np.int16), affine),
            root / "imagesTr" / f"c{i}_0000.nii.gz",
            compresslevel=1,
        )
        save_image(Volume(labels, affine), root / "labelsTr" / f"c{i}.nii.gz", compresslevel=1)
        training.append(
            {
                "image": f"./imagesTr/c{i}_0000.nii.gz",
                "label": f"./labelsTr/c{i}.nii.gz",
                "case_id": f"c{i}",
            }
        )
    spec = {
        "name": f"cube{size}",
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "organ": 1, "lesion": 2},
        "file_ending": ".nii.gz",
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(spec))
    splits = root / "splits.json"
    save_splits(
        Splits(
            {"train": tuple(t["case_id"] for t in training)},
            {t["case_id"]: t["case_id"] for t in training},
        ),
        splits,
    )
    return root / "dataset.json", splits


def config_3d(out: Path, dataset: Path, splits: Path, steps: int):
    from synthlesion.training import load_train_config

    return load_train_config(
        {
            "output_dir": str(out),
            "seed": 0,
            "max_steps": steps,
            "batch_size": 2,
            "log_every_n_steps": steps,
            "report_to": "none",
            "data": {
                "dataset": str(dataset),
                "splits": str(splits),
                "roi_size": [48, 48, 48],
                "healthy_fraction": 0.2,
                "samples_per_epoch": 64,
                "preprocess_workers": 1,
            },
            "model": {
                "spatial_dims": 3,
                "pixel_network": "monai",
                # Four levels: MONAI's middle block always holds self-attention, so it must
                # sit at 6^3, not 24^3 (13824 tokens: seconds and gigabytes per step on a CPU).
                "channels": [8, 16, 16, 16],
                "attention_levels": [False, False, False, False],
                "layers_per_block": 1,
                "norm_num_groups": 8,
                "sample_size": 48,
            },
            "validation": {"every_n_steps": 0, "num_crops": 0, "num_preview": 0},
            "checkpoint": {"every_n_steps": 0},
        }
    )


def bench_roi(tmp: Path, steps: int, rounds: int) -> dict:
    from synthlesion.training import train
    from synthlesion.training.crops import CropMaker, crop_spec
    from synthlesion.training.data import load_training_data

    figures: dict = {}
    datasets = {}
    for size in (64, 256):
        started = time.perf_counter()
        datasets[size] = cube_dataset(tmp / f"cube{size}", size)
        figures[f"roi3d_write_{size}_s"] = time.perf_counter() - started
        config = config_3d(tmp / f"roi{size}_mem", *datasets[size], steps)
        tracemalloc.start()
        started = time.perf_counter()
        data = load_training_data(config.data, spatial_dims=3, seed=0)
        figures[f"roi3d_prepare_{size}_s"] = time.perf_counter() - started
        maker = CropMaker(data.train, crop_spec(config.data, data, None))
        draws = []
        for i in range(30):
            t0 = time.perf_counter()
            maker.draw(np.random.default_rng(i))
            draws.append(time.perf_counter() - t0)
        figures[f"roi3d_tracemalloc_peak_{size}_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        figures[f"roi3d_crop_{size}_ms"] = 1000 * statistics.median(draws)
        del data, maker
    times: dict[int, list[float]] = {64: [], 256: []}
    for r in range(rounds):
        for size in (64, 256) if r % 2 == 0 else (256, 64):
            config = config_3d(tmp / f"roi{size}_{r}", *datasets[size], steps)
            times[size] += train(config).step_seconds[2:]
    for size in (64, 256):
        figures[f"roi3d_step_{size}_s"] = statistics.median(times[size])
    figures["roi3d_step_ratio_256_vs_64"] = figures["roi3d_step_256_s"] / figures["roi3d_step_64_s"]
    figures["roi3d_crop_ratio_256_vs_64"] = (
        figures["roi3d_crop_256_ms"] / figures["roi3d_crop_64_ms"]
    )
    return figures


# --- 5. the tiny 3D config against bare MONAI --------------------------------------------------


def bare_monai_steps(config, steps: int) -> list[float]:
    """Forward, MSE loss, backward and AdamW of a bare MONAI ``DiffusionModelUNet`` with the
    config's network on random tensors of the config's batch shape."""
    from monai.networks.nets import DiffusionModelUNet

    from synthlesion.models.pixel import pixel_in_channels

    m = config.model
    torch.manual_seed(0)
    net = DiffusionModelUNet(
        spatial_dims=3,
        in_channels=pixel_in_channels(m),
        out_channels=m.image_channels,
        num_res_blocks=m.layers_per_block,
        channels=tuple(m.channels),
        attention_levels=tuple(m.attention_levels),
        norm_num_groups=m.norm_num_groups,
        num_head_channels=m.attention_head_dim,
    )
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.optim.learning_rate)
    shape = (config.batch_size, pixel_in_channels(m), *config.data.roi_size)
    x = torch.randn(shape)
    target = torch.randn((config.batch_size, m.image_channels, *config.data.roi_size))
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        t = torch.randint(0, m.num_train_timesteps, (config.batch_size,))
        loss = torch.nn.functional.mse_loss(net(x, timesteps=t), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return times


PHASES = {  # phase -> functions whose cumulative time it is (cProfile keys: file end, name)
    "data_preparation": [("training/data.py", "load_training_data")],
    "crop_drawing": [("training/crops.py", "__getitem__")],
    "batch_wait": [("torch/utils/data/dataloader.py", "__next__")],
    "forward_loss": [("models/lesion_diffusion.py", "training_loss")],
    "backward": [("accelerate/accelerator.py", "backward")],
    "optimizer": [("accelerate/optimizer.py", "step")],
    "ema": [("training/ema.py", "step")],
    "validation_previews": [("training/loop.py", "evaluate")],
    "checkpointing": [("training/loop.py", "save")],
    "export": [("training/record.py", "export_model")],
}


def bench_train3d(tmp: Path, steps: int, rounds: int) -> dict:
    import cProfile
    import pstats

    from synthlesion.training import load_train_config, train
    from synthlesion.training.data import ensure_phantom

    def config(name: str, n: int, extra: list[str]):
        return load_train_config(
            TINY3D,
            [
                f"data.dataset={tmp / 'phantom3d' / 'dataset.json'}",
                f"data.splits={tmp / 'phantom3d' / 'splits.json'}",
                f"max_steps={n}",
                f"output_dir={tmp / name}",
                f"log_every_n_steps={n}",
                "report_to=none",
                *extra,
            ],
        )

    ensure_phantom(config("unused", 1, []).data, spatial_dims=3)
    ours, bare = [], []
    for r in range(rounds):
        for which in ("bare", "ours") if r % 2 == 0 else ("ours", "bare"):
            if which == "bare":
                bare += bare_monai_steps(config("bare", steps, NO_EVAL), steps)[2:]
            else:
                ours += train(config(f"train3d{r}", steps, NO_EVAL)).step_seconds[2:]
    figures = {
        "train3d_step_s": statistics.median(ours),
        "bare_monai_step_s": statistics.median(bare),
    }
    figures["train3d_step_ratio"] = figures["train3d_step_s"] / figures["bare_monai_step_s"]
    # the phases of a short run with validation, previews, checkpoints and the export
    every = max(steps // 2, 1)
    profiled = config(
        "profiled",
        steps,
        [
            f"validation.every_n_steps={every}",
            "validation.num_crops=4",
            "validation.num_preview=2",
            "validation.num_inference_steps=10",
            f"checkpoint.every_n_steps={every}",
            "report_to=none",
        ],
    )
    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.runcall(train, profiled)
    total = time.perf_counter() - started
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    phases = {}
    for phase, keys in PHASES.items():
        seconds = 0.0
        for (file, _line, name), (_cc, _nc, _tt, cumulative, _callers) in stats.items():
            if name in {k[1] for k in keys} and any(file.endswith(k[0]) for k in keys):
                seconds += cumulative
        phases[phase] = round(seconds, 3)
    phases["total"] = round(total, 3)
    phases["steps"] = steps
    figures["train3d_phases_s"] = phases
    return figures


# --- 4. quality ----------------------------------------------------------------------------


def bench_quality(tmp: Path, data_overrides: list[str], quick: bool) -> dict:
    from synthlesion.models import LesionDiffusionModel
    from synthlesion.training import load_train_config, train
    from synthlesion.training.crops import CropMaker, collate, crop_spec, fixed_crops
    from synthlesion.training.data import load_training_data
    from synthlesion.training.preview import fidelity, generate, summarise

    overrides = [*data_overrides, f"output_dir={tmp / 'quality'}", "report_to=none"]
    if quick:
        overrides += ["max_steps=30", "validation.every_n_steps=15", "validation.num_preview=4"]
    config = load_train_config(TINY, overrides)
    started = time.perf_counter()
    result = train(config)
    seconds = time.perf_counter() - started
    val = [(r["step"], r["val/loss"]) for r in result.metrics if "val/loss" in r]
    last = [r for r in result.metrics if "preview/gen_contrast" in r][-1]
    figures = {
        "quality_steps": result.global_step,
        "quality_train_s": seconds,
        "quality_step_s": statistics.median(result.step_seconds),
        "val_loss_start": val[0][1],
        "val_loss_end": val[-1][1],
        "val_loss_ratio": val[-1][1] / val[0][1],
        "val_loss_curve": val,
        "preview_crops": config.validation.num_preview,
        "preview_real_contrast": last["preview/real_contrast"],
        "preview_gen_contrast": last["preview/gen_contrast"],
        "preview_contrast_rel_error": last["preview/contrast_rel_error"],
    }
    # 32 more crops around real (val) lesions, generated with the exported (EMA) model.
    model = LesionDiffusionModel.from_pretrained(result.model_dir)
    data = load_training_data(config.data, spatial_dims=2, seed=0)
    maker = CropMaker(data.evaluation, crop_spec(config.data, data, None))
    count = 8 if quick else 32
    items = fixed_crops(maker, seed=777, count=count, num_lesion_first=count)
    spacing = {p.case_id: p.spacing for p in data.evaluation}
    painted = torch.cat(
        [
            generate(
                model,
                collate(items[i : i + 16]),
                scheduler="ddim",
                num_inference_steps=config.validation.num_inference_steps,
                seed=i,
            )
            for i in range(0, count, 16)
        ]
    )[:, 0].numpy()
    rows = [
        fidelity(
            painted[i],
            items[i]["image"][0].numpy(),
            items[i]["lesion"].amax(0).numpy(),
            spacing[items[i]["case_id"]],
            config.validation.ring_mm,
        )
        for i in range(count)
    ]
    summary = summarise([r for r in rows if r is not None])
    figures.update(
        {
            "eval_crops": count,
            "eval_real_contrast": summary["real_contrast"],
            "eval_gen_contrast": summary["gen_contrast"],
            "eval_contrast_rel_error": summary["contrast_rel_error"],
            "eval_real_lesion_mean": summary["real_mean"],
            "eval_gen_lesion_mean": summary["gen_mean"],
            "eval_real_lesion_std": summary["real_std"],
            "eval_gen_lesion_std": summary["gen_std"],
        }
    )
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small, fast smoke run")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder (kept)")
    parser.add_argument(
        "--threads",
        type=int,
        default=max(1, min(4, (os.cpu_count() or 2) // 2)),
        help="torch CPU threads (default: half the cores, at most 4; on a small shared "
        "machine more threads than free cores make every step several times slower)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    steps, rounds = (8, 1) if args.quick else (15, 4)
    steps3d, rounds3d = (3, 1) if args.quick else (8, 2)
    steps3d_tiny = 6 if args.quick else 20
    figures: dict = {
        "quick": args.quick,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        data = [
            f"data.dataset={tmp / 'phantom' / 'dataset.json'}",
            f"data.splits={tmp / 'phantom' / 'splits.json'}",
        ]
        started = time.perf_counter()
        figures.update(bench_overhead(tmp, data, steps, rounds))
        print(
            f"overhead: ours {figures['ours_steps_per_s']:.3f} steps/s, bare "
            f"{figures['bare_steps_per_s']:.3f} steps/s, ratio {figures['overhead_ratio']:.3f} "
            f"({figures['overhead_pct']:+.1f}%; target <= +10%)",
            flush=True,
        )
        figures.update(bench_roi(tmp, steps3d, rounds3d))
        print(
            f"3D step with a 48^3 ROI: 64^3 scan {figures['roi3d_step_64_s']:.3f} s, 256^3 scan "
            f"{figures['roi3d_step_256_s']:.3f} s, ratio "
            f"{figures['roi3d_step_ratio_256_vs_64']:.3f} (target <= 1.2)",
            flush=True,
        )
        print(
            f"  one crop: {figures['roi3d_crop_64_ms']:.2f} ms vs {figures['roi3d_crop_256_ms']:.2f}"
            f" ms; one-off preparation {figures['roi3d_prepare_64_s']:.2f} s vs "
            f"{figures['roi3d_prepare_256_s']:.2f} s",
            flush=True,
        )
        print(
            f"  tracemalloc peak while preparing: {figures['roi3d_tracemalloc_peak_64_mb']:.1f} MB"
            f" vs {figures['roi3d_tracemalloc_peak_256_mb']:.1f} MB",
            flush=True,
        )
        figures.update(bench_train3d(tmp, steps3d_tiny, rounds3d))
        print(
            f"tiny 3D config: synthlesion step {figures['train3d_step_s']:.3f} s, bare MONAI "
            f"DiffusionModelUNet step {figures['bare_monai_step_s']:.3f} s, ratio "
            f"{figures['train3d_step_ratio']:.2f} (goal <= 3)",
            flush=True,
        )
        print(
            f"  phases of a {steps3d_tiny}-step run (s): {figures['train3d_phases_s']}", flush=True
        )
        figures.update(bench_quality(tmp, data, args.quick))
        figures["peak_rss_mb"] = _rss_mb()
        figures["total_s"] = time.perf_counter() - started
    figures["pass_overhead"] = figures["overhead_ratio"] <= 1.10
    figures["pass_roi_ratio"] = figures["roi3d_step_ratio_256_vs_64"] <= 1.2
    figures["pass_train3d_ratio"] = figures["train3d_step_ratio"] <= 3.0
    figures["pass_val_loss"] = figures["val_loss_ratio"] <= 0.5
    figures["pass_contrast"] = (
        figures["eval_contrast_rel_error"] <= 0.15 and figures["preview_contrast_rel_error"] <= 0.15
    )
    print(
        f"quality ({figures['quality_steps']} steps, {figures['quality_train_s']:.0f} s, "
        f"{figures['quality_step_s']:.2f} s/step): val loss {figures['val_loss_start']:.4f} -> "
        f"{figures['val_loss_end']:.4f} (x{figures['val_loss_ratio']:.3f})"
    )
    print(
        f"  lesion contrast on {figures['preview_crops']} preview crops: generated "
        f"{figures['preview_gen_contrast']:.3f} vs real {figures['preview_real_contrast']:.3f} "
        f"(error {100 * figures['preview_contrast_rel_error']:.1f}%)"
    )
    print(
        f"  lesion contrast on {figures['eval_crops']} val crops: generated "
        f"{figures['eval_gen_contrast']:.3f} vs real {figures['eval_real_contrast']:.3f} (error "
        f"{100 * figures['eval_contrast_rel_error']:.1f}%; target <= 15%); lesion mean "
        f"{figures['eval_gen_lesion_mean']:.3f} vs {figures['eval_real_lesion_mean']:.3f}, std "
        f"{figures['eval_gen_lesion_std']:.3f} vs {figures['eval_real_lesion_std']:.3f}"
    )
    print(
        f"peak RSS {figures['peak_rss_mb']:.0f} MB; total {figures['total_s']:.0f} s; pass: "
        f"overhead {figures['pass_overhead']}, roi {figures['pass_roi_ratio']}, val loss "
        f"{figures['pass_val_loss']}, contrast {figures['pass_contrast']}"
    )
    if args.quick:
        print("(--quick: a smoke run; 30 training steps are not expected to meet the targets)")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
