"""Benchmark: lesion synthesis cost and quality.

(a) seconds per lesion for one fixed lesion in 3D CT phantom scans of 64^3, 128^3 and 256^3:
    region-of-interest sampling (synthlesion) against whole-scan sampling (the network run over
    the whole volume, as Med-DDPM and MAISI do), same network, steps and scheduler;
(b) DPM-Solver++ at 20 steps against DDPM at 1000 steps on the 2D phantom with a trained model
    (``--model``; without one, a small model is trained here first): time ratio and the
    distance between synthetic and real lesion intensity statistics for both;
(c) on a GPU, seconds per 64^3-ROI lesion (set against LeFusion's ~40 s per lesion on an A100);
(d) seconds per lesion for a 4-channel 3D case (FLAIR/T1/T1c/T2 painted jointly by one model)
    against a 1-channel case, same network body, ROI, steps and scan: the joint model must not
    cost a model per channel (goal: at most 1.3x);
(e) the set-up before the first lesion (which train scans hold a lesion, the bank of lesion
    shapes, the gates' reference statistics) per scan of 128^3, 240x240x155 (two channels, as
    BraTS) and 512^3, read from .nii.gz: cold (every scan read) and warm (the cache beside the
    splits file), against the former way (three readers, one per question) side by side
    (goal: under 2 s per 240x240x155 scan; warm set-up flat from 128^3 to 512^3).

The last line is one line of JSON holding every figure.

Usage: python scripts/bench_sample.py [--quick] [--model DIR] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from synthlesion.data.intensity import IntensityNormaliser
from synthlesion.data.volume import Volume
from synthlesion.models import LesionDiffusionModel, ModelConfig
from synthlesion.pipelines.lesion_synthesis import LesionSynthesisPipeline, SynthesisError


def ct_volume(size: int, seed: int = 0) -> tuple[Volume, np.ndarray]:
    """A CT-like cube (soft tissue with noise) and one fixed ~10-voxel-radius lesion at its centre."""
    rng = np.random.default_rng(seed)
    shape = (size, size, size)
    image = (60 + rng.normal(0, 12, shape)).astype(np.int16)
    grid = np.meshgrid(*[np.arange(s) - s // 2 for s in shape], indexing="ij")
    lesion = (sum(g.astype(np.float32) ** 2 for g in grid) <= 8**2).astype(np.uint8)
    return Volume(image, np.diag([1.0, 1.0, 1.0, 1.0])), lesion


def tiny_3d_model() -> LesionDiffusionModel:
    """A small 3D UNet with five levels, so that MONAI's mid-block self-attention (always on)
    stays affordable on a whole 256^3 scan (16^3 positions there)."""
    torch.manual_seed(0)
    return LesionDiffusionModel.from_config(
        ModelConfig(
            spatial_dims=3,
            sample_size=32,
            channels=(8, 16, 16, 32, 32),
            attention_levels=(False,) * 5,
            layers_per_block=1,
            norm_num_groups=8,
            num_train_timesteps=1000,
        )
    )


def time_call(
    pipe: LesionSynthesisPipeline,
    image: Volume | list[Volume],
    lesion: np.ndarray,
    steps: int,
    scheduler: str = "dpmsolver++",
) -> float:
    start = time.perf_counter()
    pipe(image, lesion, num_inference_steps=steps, scheduler=scheduler, dilation_mm=3.0)
    return time.perf_counter() - start


def part_a(
    figures: dict, sizes: list[int], steps: int, roi: int, device: str, whole_max: int
) -> None:
    model = tiny_3d_model()
    norm = IntensityNormaliser.for_modality("CT")
    roi_pipe = LesionSynthesisPipeline(model, norm, (roi,) * 3, device=device)
    print(
        f"(a) one lesion (radius 8 voxels), {steps} DPM-Solver++ steps, ROI {roi}^3, "
        f"3D UNet {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {device}"
    )
    for size in sizes:
        image, lesion = ct_volume(size)
        time_call(roi_pipe, image, lesion, 1)  # warm-up
        seconds = time_call(roi_pipe, image, lesion, steps)
        figures[f"roi_s_per_lesion_{size}"] = round(seconds, 3)
        line = f"    {size}^3: ROI {seconds:7.2f} s/lesion"
        if size <= whole_max:
            whole_pipe = LesionSynthesisPipeline(model, norm, (size,) * 3, device=device)
            whole = time_call(whole_pipe, image, lesion, steps)
            figures[f"whole_scan_s_per_lesion_{size}"] = round(whole, 3)
            figures[f"whole_over_roi_{size}"] = round(whole / seconds, 2)
            line += f"   whole scan {whole:8.2f} s/lesion   whole/ROI {whole / seconds:6.1f}x"
        print(line)
    ratio = figures[f"roi_s_per_lesion_{sizes[-1]}"] / figures[f"roi_s_per_lesion_{sizes[0]}"]
    figures[f"roi_ratio_{sizes[-1]}_over_{sizes[0]}"] = round(ratio, 3)
    print(f"    ROI cost {sizes[-1]}^3 / {sizes[0]}^3: {ratio:.2f} (target <= 1.3)")


def cpu_lesion(figures: dict, device: str, dims: int) -> None:
    """Seconds per lesion with the model of ``configs/train_phantom{dims}d_cpu.yaml`` (its
    ROI, 20 DPM-Solver++ steps, one lesion in a 256^2 slice or a 128^3 scan; timing only, so
    the weights are untrained)."""
    from synthlesion.training.config import load_train_config

    root = Path(__file__).parents[1] / "configs"
    config = load_train_config(root / f"train_phantom{dims}d_cpu.yaml")
    torch.manual_seed(0)
    model = LesionDiffusionModel.from_config(config.model)
    roi = tuple(config.data.roi_size)
    pipe = LesionSynthesisPipeline(
        model, IntensityNormaliser.for_modality("CT"), roi, device=device
    )
    if dims == 3:
        image, lesion = ct_volume(128)
        small = np.zeros_like(lesion)
        small[58:70, 58:70, 58:70] = lesion[58:70, 58:70, 58:70]  # fits the ROI with margin
    else:
        volume, cube = ct_volume(256)
        image = Volume(volume.array[:, :, 128], np.eye(4))
        small = np.zeros_like(cube[:, :, 128])
        small[122:134, 122:134] = cube[122:134, 122:134, 128]
    time_call(pipe, image, small, 1)
    seconds = min(time_call(pipe, image, small, 20) for _ in range(3))
    figures[f"seconds_per_lesion_cpu_{dims}d"] = round(seconds, 3)
    print(
        f"    {dims}D CPU config (ROI {'x'.join(map(str, roi))}, 20 DPM-Solver++ steps): "
        f"{seconds:.2f} s per lesion"
    )


def part_b(figures: dict, model_dir: str | None, quick: bool, device: str) -> None:
    from synthlesion.data.io import load_image
    from synthlesion.data.sources import load_cases
    from synthlesion.pipelines.lesion_synthesis import read_training_record
    from synthlesion.pipelines.quality import RealLesionReference, lesion_statistics

    with tempfile.TemporaryDirectory() as tmp:
        if model_dir is None:
            model_dir, dataset = _train_small_model(Path(tmp), quick)
        else:
            record = read_training_record(model_dir)
            dataset = record.content.get("dataset")
            if dataset is None:
                raise SystemExit(f"{model_dir}: training record names no dataset_path")
        cases = [c for c in load_cases(dataset) if c.has_lesion]
        reference = RealLesionReference.from_cases(cases)
        pipe = LesionSynthesisPipeline.from_pretrained(str(model_dir), device=device)
        n_cases = 3 if quick else 6
        results = {}
        for name, scheduler, steps in (
            ("dpmsolver20", "dpmsolver++", 20),
            ("ddpm1000", "ddpm", 1000),
        ):
            if quick and name == "ddpm1000":
                steps = 200
            means, contrasts, seconds = [], [], 0.0
            for case in cases[:n_cases]:
                image = load_image(case.image)
                labels = load_image(case.mask)
                lesion = (labels.array == 2).astype(np.uint8)
                start = time.perf_counter()
                try:
                    out = pipe(
                        image,
                        lesion,
                        scheduler=scheduler,
                        num_inference_steps=steps,
                        seed=1,
                        organ_mask=labels.array == 1,
                    )
                except SynthesisError as exc:  # a lesion larger than the model's ROI
                    print(f"    skipped {case.case_id}: {exc}")
                    continue
                seconds += time.perf_counter() - start
                stats = lesion_statistics(
                    out.image, lesion > 0, image.spacing, tissue=labels.array == 1
                )
                means.append(stats.mean)
                contrasts.append(stats.contrast)
            real_mean = float(np.mean(reference.means))
            real_contrast = float(np.mean(reference.contrasts))
            done = max(1, len(means))
            results[name] = {
                "steps": steps,
                "lesions": len(means),
                "s_per_lesion": seconds / done,
                "mean_distance": abs(float(np.mean(means)) - real_mean),
                "contrast_distance": abs(float(np.mean(contrasts)) - real_contrast),
                "contrast": float(np.mean(contrasts)),
            }
        figures["real_lesion_contrast"] = round(real_contrast, 2)
        for name, r in results.items():
            for key, value in r.items():
                figures[f"{name}_{key}"] = round(value, 4) if isinstance(value, float) else value
            print(
                f"(b) {name:12s} {r['steps']:5d} steps {r['s_per_lesion']:7.2f} s/lesion  "
                f"|mean - real| {r['mean_distance']:6.1f}  contrast {r['contrast']:6.1f} "
                f"(real {real_contrast:.1f})"
            )
        ratio = results["ddpm1000"]["s_per_lesion"] / results["dpmsolver20"]["s_per_lesion"]
        figures["ddpm_over_dpmsolver_time"] = round(ratio, 2)
        print(f"    DDPM/DPM-Solver++ time ratio {ratio:.1f}x")


def _train_small_model(tmp: Path, quick: bool) -> tuple[str, str]:
    """Train the tiny CPU config (2D MRI phantom, written on first use) into ``tmp``."""
    from synthlesion.training import load_train_config, train

    overrides = [
        f"data.dataset={tmp / 'phantom' / 'dataset.json'}",
        f"data.splits={tmp / 'phantom' / 'splits.json'}",
        f"output_dir={tmp / 'run'}",
    ]
    if quick:
        overrides.append("max_steps=20")
    root = Path(__file__).resolve().parents[1]
    config = load_train_config(root / "configs" / "train_phantom2d_cpu.yaml", overrides)
    result = train(config)
    return str(result.model_dir), str(tmp / "phantom" / "dataset.json")


def part_d(figures: dict, size: int, roi: int, steps: int, repeats: int, device: str) -> None:
    """Seconds per lesion, 4 channels against 1, interleaved rounds, median of each."""
    rng = np.random.default_rng(0)
    shape = (size, size, round(size * 155 / 240))
    grid = np.meshgrid(*[np.arange(s) - s / 2 for s in shape], indexing="ij")
    head = sum((g / (s / 2.3)) ** 2 for g, s in zip(grid, shape, strict=True)) <= 1
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS, 1 mm
    channels = [
        Volume(np.where(head, rng.normal(0, 1, shape), 0.0).astype(np.float32), affine)
        for _ in range(4)
    ]
    lesion = (sum(g**2 for g in grid) <= 10**2).astype(np.uint8)
    pipes = {}
    for c in (1, 4):
        torch.manual_seed(0)
        model = LesionDiffusionModel.from_config(
            ModelConfig(
                spatial_dims=3,
                image_channels=c,
                sample_size=roi,
                channels=(16, 32, 32),
                attention_levels=(False, False, False),
                layers_per_block=1,
                norm_num_groups=8,
                num_train_timesteps=1000,
            )
        )
        pipes[c] = LesionSynthesisPipeline(
            model, IntensityNormaliser("percentile"), (roi,) * 3, device=device
        )
    inputs = {1: channels[:1], 4: channels}
    for c in (1, 4):  # warm-up
        time_call(pipes[c], inputs[c], lesion, 1)
    seconds: dict[int, list[float]] = {1: [], 4: []}
    for _ in range(repeats):
        for c in (1, 4):
            seconds[c].append(time_call(pipes[c], inputs[c], lesion, steps))
    one, four = float(np.median(seconds[1])), float(np.median(seconds[4]))
    ratio = four / one
    print(
        f"(d) {shape} scan (LPS, z-scored, constant background), one lesion of radius 10 "
        f"voxels, ROI {roi}^3, {steps} steps, {device}, median of {repeats} interleaved rounds: "
        f"1 channel {one:.3f} s, 4 channels {four:.3f} s per lesion -> {ratio:.2f}x "
        f"(goal <= 1.3x; a model per channel would be 4x)"
    )
    figures["channels_s_per_lesion_1ch"] = round(one, 4)
    figures["channels_s_per_lesion_4ch"] = round(four, 4)
    figures["channels_ratio_4ch_over_1ch"] = round(ratio, 3)
    figures["sample_phases_s"] = sample_phases(pipes[4], inputs[4], lesion, steps)
    print(f"    phases of one 4-channel call (s): {figures['sample_phases_s']}")


SAMPLE_PHASES = {  # phase -> the pipeline's method (cProfile cumulative seconds)
    "checks": "check_inputs",
    "set_up_regions": "plan_regions",
    "intensity_ranges": "range_of",
    "crops": "_crop_inputs",
    "denoising": "_run_batches",
    "paste_back": "_paste_back",
    "gates": "_gates",
}


def sample_phases(pipe, inputs: list[Volume], lesion: np.ndarray, steps: int) -> dict:
    """Where one pipeline call spends its time, and the I/O of its channels (.nii.gz read and
    write through synthlesion's reader and writer)."""
    import cProfile
    import pstats

    from synthlesion.data.io import load_image, save_image

    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.runcall(pipe, inputs, lesion, num_inference_steps=steps, dilation_mm=3.0)
    total = time.perf_counter() - started
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    phases = {"total": round(total, 3)}
    for phase, name in SAMPLE_PHASES.items():
        phases[phase] = round(
            sum(
                cumulative
                for (file, _line, function), (_cc, _nc, _tt, cumulative, _callers) in stats.items()
                if function == name and "synthlesion" in file
            ),
            3,
        )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "channel.nii.gz"
        started = time.perf_counter()
        save_image(inputs[0], path)
        phases["io_write_per_channel"] = round(time.perf_counter() - started, 3)
        started = time.perf_counter()
        load_image(path)
        phases["io_read_per_channel"] = round(time.perf_counter() - started, 3)
    return phases


def _setup_scan(folder: Path, shape: tuple[int, ...], channels: int, seed: int = 0):
    """A head-like scan (organ label 1, six lesions of label 2) written as .nii.gz."""
    import nibabel as nib

    from synthlesion.data.cases import Case

    rng = np.random.default_rng(seed)
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    centre = [n / 2 for n in shape]
    inside = (
        sum(((g - c) / (0.42 * n)) ** 2 for g, c, n in zip(grid, centre, shape, strict=True)) < 1
    )
    labels = inside.astype(np.uint8)
    for _ in range(6):
        at = [c + rng.uniform(-0.18, 0.18) * n for c, n in zip(centre, shape, strict=True)]
        radius = rng.uniform(4, 10)
        labels[sum((g - a) ** 2 for g, a in zip(grid, at, strict=True)) < radius**2] = 2
    base = np.where(inside, 400.0, 0.0).astype(np.float32)
    images = []
    name = "x".join(map(str, shape))
    for k in range(channels):
        noisy = base + 60.0 * (labels == 2) + rng.normal(0, 20, shape).astype(np.float32)
        path = folder / f"{name}_{k:04d}.nii.gz"
        nib.save(nib.Nifti1Image(noisy.astype(np.float32), np.eye(4)), path)
        images.append(path)
    mask = folder / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(labels, np.eye(4)), mask)
    labels_map = {0: "background", 1: "brain", 2: "lesion"}
    return Case(name, name, tuple(images), mask, "MRI", labels_map)


def part_e(figures: dict, quick: bool) -> None:
    from synthlesion.masks.lesions import case_has_lesion
    from synthlesion.masks.shapes import MaskBank
    from synthlesion.pipelines.quality import RealLesionReference
    from synthlesion.pipelines.train_lesions import train_lesions

    shapes = {"128": ((128,) * 3, 1), "240x240x155": ((240, 240, 155), 2)}
    shapes["512"] = ((256,) * 3, 1) if quick else ((512,) * 3, 1)
    print("(e) set-up per scan (presence, bank, reference): cold / warm (cache) / former way")
    with tempfile.TemporaryDirectory() as tmp:
        for key, (shape, channels) in shapes.items():
            folder = Path(tmp) / key
            folder.mkdir()
            case = _setup_scan(folder, shape, channels)
            lock = folder / "splits.json"
            lock.write_text("{}")
            started = time.perf_counter()
            known = train_lesions([case], (2,), (1,), cache_beside=lock)
            cold = time.perf_counter() - started
            started = time.perf_counter()
            warm_known = train_lesions([case], (2,), (1,), cache_beside=lock)
            warm = time.perf_counter() - started
            started = time.perf_counter()
            case_has_lesion(case, (2,))
            bank = MaskBank.from_cases([case], lesion_labels=(2,))
            reference = RealLesionReference.from_cases(
                [case], organ_labels=(1,), lesion_labels=(2,)
            )
            former = time.perf_counter() - started
            if warm_known.reference() != known.reference() or reference != known.reference():
                raise SystemExit(f"{key}: the cached set-up differs from the scan's")
            if len(bank.lesions) != len(known.bank().lesions):
                raise SystemExit(f"{key}: the bank differs from the former reader's")
            figures[f"setup_cold_s_per_scan_{key}"] = round(cold, 3)
            figures[f"setup_s_per_scan_{key}"] = round(warm, 4)
            figures[f"setup_former_s_per_scan_{key}"] = round(former, 3)
            print(f"    {key:12s} cold {cold:7.2f} s   warm {warm:7.4f} s   former {former:7.2f} s"
                  f"   ({len(known.bank().lesions)} lesions)")  # fmt: skip
    figures["setup_ratio_512_vs_128"] = round(
        figures["setup_s_per_scan_512"] / figures["setup_s_per_scan_128"], 3
    )
    figures["setup_cold_ratio_512_vs_128"] = round(
        figures["setup_cold_s_per_scan_512"] / figures["setup_cold_s_per_scan_128"], 2
    )
    print(
        f"    warm 512/128: {figures['setup_ratio_512_vs_128']:.2f} (goal: flat); cold "
        f"{figures['setup_cold_ratio_512_vs_128']:.1f} (reading {512**3 // 128**3}x the voxels)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description="lesion synthesis benchmark")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default=None, help="trained 2D model folder for part (b)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-b", action="store_true", help="timing parts only")
    parser.add_argument("--skip-a", action="store_true", help="quality part only")
    parser.add_argument("--skip-d", action="store_true", help="no 4-channel vs 1-channel part")
    parser.add_argument("--skip-e", action="store_true", help="no set-up part")
    parser.add_argument("--only-setup", action="store_true", help="only part (e): the set-up")
    parser.add_argument(
        "--only-channels", action="store_true", help="only part (d): 4 channels against 1"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    figures: dict = {"bench": "sample", "device": args.device, "threads": torch.get_num_threads()}
    if args.only_channels:
        args.skip_a = args.skip_b = args.skip_e = True
    if args.only_setup:
        args.skip_a = args.skip_b = args.skip_d = True
    if args.skip_a:
        pass
    elif args.quick:
        part_a(figures, [32, 64], steps=2, roi=32, device=args.device, whole_max=64)
    else:
        part_a(figures, [64, 128, 256], steps=2, roi=48, device=args.device, whole_max=256)
    if not args.skip_a and not args.device.startswith("cuda"):
        cpu_lesion(figures, args.device, 2)
        cpu_lesion(figures, args.device, 3)
    if not args.skip_b:
        part_b(figures, args.model, args.quick, args.device)
    if args.device.startswith("cuda"):
        model = tiny_3d_model()
        pipe = LesionSynthesisPipeline(
            model,
            IntensityNormaliser.for_modality("CT"),
            (64,) * 3,
            device=args.device,
            dtype=torch.float16,
        )
        image, lesion = ct_volume(128)
        time_call(pipe, image, lesion, 20)
        seconds = time_call(pipe, image, lesion, 20)
        figures["gpu_s_per_lesion_roi64_20steps"] = round(seconds, 3)
        print(
            f"(c) GPU: {seconds:.3f} s per 64^3-ROI lesion at 20 steps (LeFusion ~40 s on an A100)"
        )
    else:
        print("(c) no GPU here: the GPU figure is not measured")
    if not args.skip_d:
        if args.quick:
            part_d(figures, 96, roi=32, steps=3, repeats=3, device=args.device)
        else:
            part_d(figures, 240, roi=48, steps=10, repeats=5, device=args.device)
    if not args.skip_e:
        part_e(figures, args.quick)
    if not args.device.startswith("cuda"):
        figures["gpu"] = None  # no GPU in this run: the GPU figures are not measured
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
