"""Benchmark: synthlesion's batched augmentations against MONAI's and TorchIO's pipelines.

One process, the same data for everyone: the embedded 3D CT phantom (resampled to N^3) at
128^3 and 96^3 and a 2D 512^2 phantom slice, normalised to [0, 1], with its label map. The
pipeline is affine + elastic + Gaussian noise + bias field + gamma on the image and the mask:

* synthlesion: ``Compose`` on batches (B, 1, *spatial), as after a DataLoader, eager and with
  the compiled backend (its compilation time is reported apart, not counted), on CUDA also
  replayed as CUDA graphs (``eager+graph``; capture in the warm-up); the warp runs the fused
  kernel (numba on the CPU, Triton on CUDA) unless ``--samplers`` asks for the
  ``grid_sample`` path too (``torch``);
* MONAI: ``Rand3DElasticd`` (with rotation and scale) / ``Rand2DElasticd``,
  ``RandGaussianNoised``, ``RandBiasFieldd``, ``RandAdjustContrastd``, all ``prob=1``, one item
  at a time as its users run it (on GPU tensors with ``--device cuda``);
* TorchIO: ``RandomAffine`` + ``RandomElasticDeformation`` + ``RandomNoise`` +
  ``RandomBiasField`` + ``RandomGamma``, one subject at a time (CPU only).

Then ``recipes.xray_classification`` (normalisation, affine with its boxes, contrast,
gamma, noise, lesion-protecting cutout) on 64 images of 512^2 against the same operations in
Albumentations (one image at a time) and kornia (batched); ``--xray only`` runs just that.

Rounds are interleaved (one synthlesion batch, one MONAI item, one TorchIO subject, ...) so
that load from other processes hits every library alike. Prints volumes per second and the
ratios, and ends with one line of JSON holding every figure.

Usage: python scripts/bench_augment.py [--quick] [--device cpu|cuda] [--batch B] [--seconds S]
       [--samplers auto,torch] [--backends eager,compiled,eager+graph]
       [--sizes 128x3,512x2] [--profile] [--xray also|only|skip]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

TARGETS = {"cpu": {"vs_monai": 10.0, "vs_torchio": 30.0}, "cuda": {"volumes_per_s": 5000.0}}


# --- data --------------------------------------------------------------------------------------


def phantom(size: int, spatial_dims: int) -> tuple[np.ndarray, np.ndarray, tuple[float, ...], str]:
    """CT phantom image (float32 in [0, 1]) and uint8 labels, resampled to size^d."""
    try:
        from synthlesion.data.phantom import make_phantom_patient

        case = make_phantom_patient("ct", spatial_dims, n_lesions=2, size=size, seed=0)[0]
        image = case.image.array.astype(np.float32)
        label = case.label.array.astype(np.uint8)
        spacing = case.image.spacing
        source = "synthlesion.data.phantom (CT)"
    except Exception as exc:  # the phantom is optional for this script
        logging.warning("phantom unavailable (%s); using a generated volume", exc)
        image, label, spacing = _fallback(size, spatial_dims)
        source = "generated smooth volume with an ellipsoid lesion"
    target = (size,) * spatial_dims
    if image.shape != target:  # CT slices are thicker: resample to a cube
        spacing = tuple(s * n / t for s, n, t in zip(spacing, image.shape, target, strict=True))
        mode = "trilinear" if spatial_dims == 3 else "bilinear"
        image = F.interpolate(torch.from_numpy(image)[None, None], size=target, mode=mode,
                              align_corners=True)[0, 0].numpy()  # fmt: skip
        label = F.interpolate(torch.from_numpy(label)[None, None].float(), size=target,
                              mode="nearest")[0, 0].numpy().astype(np.uint8)  # fmt: skip
    image = np.clip((image + 1000.0) / 2000.0, 0.0, 1.0).astype(np.float32)
    return image, label, tuple(float(s) for s in spacing[:spatial_dims]), source


def _fallback(size: int, nd: int) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    rng = np.random.default_rng(0)
    axes = np.meshgrid(*[np.linspace(-1, 1, size)] * nd, indexing="ij")
    image = sum(np.cos((k + 2) * a + rng.uniform(0, 6)) for k, a in enumerate(axes)) * 200
    lesion = sum(((a - 0.2) / r) ** 2 for a, r in zip(axes, (0.15, 0.2, 0.12), strict=False)) < 1
    body = sum(a**2 for a in axes) < 0.8
    label = body.astype(np.uint8) + (lesion & body).astype(np.uint8)
    return (image - 100 + 300 * lesion).astype(np.float32), label, (1.0,) * nd


# --- pipelines ---------------------------------------------------------------------------------


def ours(backend: str, nd: int, spacing: tuple[float, ...], device: str, seed: int = 0,
         sampler: str = "auto"):  # fmt: skip
    from synthlesion.augment import (
        Compose,
        RandAffine,
        RandBiasField,
        RandElastic,
        RandGamma,
        RandGaussianNoise,
    )

    keys = ("image", "label")
    return Compose(
        [
            RandAffine(*keys, rotate=(-10, 10), scale=(0.9, 1.1), spacing=spacing, sampler=sampler),
            RandElastic(
                *keys,
                control_points=7,
                max_displacement=(0.0, 7.5),
                spacing=spacing,
                sampler=sampler,
            ),
            RandGaussianNoise("image", std=(0.0, 0.1)),
            RandBiasField("image", coefficients=(-0.3, 0.3), order=3),
            RandGamma("image", log_gamma=(-0.3, 0.3)),
        ],
        backend=backend.removesuffix("+graph"),
        cuda_graph=backend.endswith("+graph"),
        seed=seed,
    ).set_random_state(seed, device=device)


def monai_pipeline(nd: int, device: str, seed: int = 0):
    from monai.transforms import (
        Compose,
        Rand2DElasticd,
        Rand3DElasticd,
        RandAdjustContrastd,
        RandBiasFieldd,
        RandGaussianNoised,
    )

    keys = ["image", "label"]
    angle = math.radians(10)
    if nd == 3:
        elastic = Rand3DElasticd(keys, sigma_range=(5, 7), magnitude_range=(50, 150), prob=1.0,
                                 rotate_range=(angle,) * 3, scale_range=(0.1,) * 3,
                                 mode=("bilinear", "nearest"), padding_mode="border",
                                 device=torch.device(device))  # fmt: skip
    else:
        elastic = Rand2DElasticd(keys, spacing=(32, 32), magnitude_range=(1, 2), prob=1.0,
                                 rotate_range=(angle,), scale_range=(0.1, 0.1),
                                 mode=("bilinear", "nearest"), padding_mode="border",
                                 device=torch.device(device))  # fmt: skip
    pipe = Compose([
        elastic,
        RandGaussianNoised("image", prob=1.0, std=0.1),
        RandBiasFieldd("image", prob=1.0, coeff_range=(0.0, 0.3), degree=3),
        RandAdjustContrastd("image", prob=1.0, gamma=(0.74, 1.35)),
    ])  # fmt: skip
    pipe.set_random_state(seed)
    return pipe


def torchio_pipeline(nd: int, seed: int = 0):
    import torchio as tio

    torch.manual_seed(seed)  # TorchIO draws from torch's global generator
    if nd == 3:
        elastic = tio.RandomElasticDeformation(num_control_points=7, max_displacement=7.5)
    else:
        elastic = tio.RandomElasticDeformation(num_control_points=(7, 7, 5),
                                               max_displacement=(7.5, 7.5, 0))  # fmt: skip
    return tio.Compose([
        tio.RandomAffine(scales=(0.9, 1.1), degrees=(10, 10, 0) if nd == 2 else 10),
        elastic,
        tio.RandomNoise(std=(0, 0.1)),
        tio.RandomBiasField(coefficients=0.3, order=3),
        tio.RandomGamma(log_gamma=(-0.3, 0.3)),
    ])  # fmt: skip


# --- timing ------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Runner:
    """One library's step (a batch or one item) with its accumulated time and volumes."""

    def __init__(self, name: str, step: Callable[[], Any], volumes: int, device: str) -> None:
        self.name, self.step, self.volumes, self.device = name, step, volumes, device
        self.seconds, self.done, self.error, self.warmup_s = 0.0, 0, None, 0.0

    def warmup(self) -> None:
        start = time.perf_counter()
        try:
            self.step()
            _sync(self.device)
        except Exception as exc:  # report, keep benchmarking the others
            self.error = f"{type(exc).__name__}: {exc}"[:300]
        self.warmup_s = time.perf_counter() - start

    def run_once(self) -> None:
        if self.error:
            return
        start = time.perf_counter()
        self.step()
        _sync(self.device)
        self.seconds += time.perf_counter() - start
        self.done += self.volumes

    @property
    def rate(self) -> float | None:
        return self.done / self.seconds if self.done and not self.error else None


def _ours_step(backend: str, nd: int, spacing, device: str, data: dict,
               sampler: str) -> Callable[[], Any]:  # fmt: skip
    pipe = ours(backend, nd, spacing, device, sampler=sampler)
    return lambda: pipe(data)


def _monai_step(nd: int, device: str, item: dict) -> Callable[[], Any]:
    pipe = monai_pipeline(nd, device)
    return lambda: pipe(dict(item))


def _torchio_step(nd: int, image: np.ndarray, img: torch.Tensor, lab: torch.Tensor,
                  spacing: tuple[float, ...]) -> Callable[[], Any]:  # fmt: skip
    import torchio as tio

    affine = np.diag([*spacing, *([1.0] * (3 - nd)), 1.0])
    shape4 = (1,) + image.shape + (1,) * (3 - nd)
    subject = tio.Subject(
        image=tio.ScalarImage(tensor=img.reshape(shape4), affine=affine),
        label=tio.LabelMap(tensor=lab.reshape(shape4), affine=affine),
    )
    pipe = torchio_pipeline(nd)
    return lambda: pipe(subject)


def bench_size(size: int, nd: int, args: argparse.Namespace) -> dict[str, Any]:
    device = args.device
    image, label, spacing, source = phantom(size, nd)
    img = torch.from_numpy(image)[None]
    lab = torch.from_numpy(label)[None]
    batch = args.batch or (16 if device.startswith("cuda") else (16 if nd == 2 else 4))
    batch_data = {
        "image": img[None].repeat((batch,) + (1,) * (nd + 1)).to(device).contiguous(),
        "label": lab[None].repeat((batch,) + (1,) * (nd + 1)).to(device).contiguous(),
    }
    runners: list[Runner] = []

    def add(name: str, make: Callable[[], Callable[[], Any]], volumes: int, dev: str) -> None:
        try:
            runners.append(Runner(name, make(), volumes, dev))
        except Exception as exc:  # a library that cannot build its pipeline is reported
            failed = Runner(name, lambda: None, volumes, dev)
            failed.error = f"{type(exc).__name__}: {exc}"[:300]
            runners.append(failed)

    for backend in args.backends:
        for sampler in args.samplers:
            name = f"synthlesion_{backend}" + ("" if sampler == "auto" else f"_{sampler}")
            add(
                name,
                lambda b=backend, s=sampler: _ours_step(b, nd, spacing, device, batch_data, s),
                batch,
                device,
            )
    if not args.skip_monai:
        item = {"image": img.to(device), "label": lab.to(device)}
        add("monai", lambda: _monai_step(nd, device, item), 1, device)
    if not args.skip_torchio and not device.startswith("cuda"):
        add("torchio", lambda: _torchio_step(nd, image, img, lab, spacing), 1, "cpu")
    for r in runners:
        r.warmup()
    budget = args.seconds
    deadline = time.perf_counter() + budget * len(runners)
    rounds = 0
    while rounds < args.min_rounds or (time.perf_counter() < deadline and rounds < args.max_rounds):
        for r in runners:
            if r.seconds < budget or rounds < args.min_rounds:
                r.run_once()
        rounds += 1
        if all(r.seconds >= budget or r.error for r in runners) and rounds >= args.min_rounds:
            break
    shape = "x".join([str(size)] * nd)
    result: dict[str, Any] = {"shape": shape, "batch": batch, "spacing_mm": spacing,
                              "data": source, "device": device}  # fmt: skip
    for r in runners:
        result[r.name] = {
            "volumes_per_s": r.rate, "volumes": r.done, "seconds": round(r.seconds, 3),
            "warmup_s": round(r.warmup_s, 2), "error": r.error,
        }  # fmt: skip
    best = max((r.rate or 0.0, r.name) for r in runners if r.name.startswith("synthlesion"))
    result["synthlesion_best"] = best[1]
    for other in ("monai", "torchio"):
        theirs = result.get(other, {}).get("volumes_per_s")
        for r in runners:
            if r.name.startswith("synthlesion") and r.rate and theirs:
                result[f"{r.name}_vs_{other}"] = round(r.rate / theirs, 2)
        if best[0] and theirs:
            result[f"best_vs_{other}"] = round(best[0] / theirs, 2)
    if args.profile and best[0]:
        result["profile"] = profile_steps(next(r for r in runners if r.name == best[1]), device)
        eager = next((r for r in runners if r.name == "synthlesion_eager" and r.rate), None)
        if eager is not None and eager.name != best[1]:
            result["profile_eager"] = profile_steps(eager, device)
    return result


def profile_steps(runner: Runner, device: str, steps: int = 5) -> dict[str, Any]:
    """torch.profiler over a few steps of ``runner``: the top operators and, on CUDA, the
    kernel launches, host-device waits and device time per batch."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            runner.step()
        _sync(device)
    table = prof.key_averages()
    print(f"\nprofile of {runner.name} ({steps} batches):")
    try:
        print(table.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                          row_limit=15))  # fmt: skip
    except (AttributeError, KeyError, ValueError):  # older/newer profiler key names
        print(table.table(sort_by="cpu_time_total", row_limit=15))
    counts = {e.key: e.count for e in table}
    out: dict[str, Any] = {"batches": steps}
    if cuda:
        launches = ("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch")
        out["launches_per_batch"] = (
            sum(n for k, n in counts.items() if k.startswith(launches)) / steps
        )
        out["syncs_per_batch"] = counts.get("cudaStreamSynchronize", 0) / steps
        device_us = sum(
            getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
            for e in table
        )
        out["device_ms_per_batch"] = round(device_us / 1000 / steps, 3)
    return out


# --- the X-ray recipe against Albumentations and kornia --------------------------------------


def _xray_albumentations():
    import albumentations as A

    return A.Compose([
        A.Normalize(normalization="min_max", p=1.0),
        A.Affine(rotate=(-10, 10), scale=(0.9, 1.1), translate_px=(-5, 5), p=0.8),
        A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.2, p=0.5),
        A.RandomGamma(gamma_limit=(80, 120), p=0.3),
        A.GaussNoise(std_range=(0.0, 0.03), p=0.3),
        A.CoarseDropout(num_holes_range=(1, 3), hole_height_range=(16, 48),
                        hole_width_range=(16, 48), fill=0, p=0.5),
    ], seed=0)  # fmt: skip


def _xray_kornia(device: str):
    import kornia.augmentation as K

    return K.AugmentationSequential(
        K.RandomAffine(degrees=10.0, translate=(0.01, 0.01), scale=(0.9, 1.1), p=0.8),
        K.RandomContrast(contrast=(0.8, 1.2), p=0.5),
        K.RandomBrightness(brightness=(0.9, 1.1), p=0.5),
        K.RandomGamma(gamma=(0.8, 1.2), p=0.3),
        K.RandomGaussianNoise(std=0.03, p=0.3),
        K.RandomErasing(scale=(0.001, 0.01), p=0.5),
    ).to(device)


def bench_xray(args: argparse.Namespace) -> dict[str, Any]:
    """``recipes.xray_classification`` on a batch of 64 radiograph-sized 512^2 images against
    the same operations in Albumentations (one image at a time, numpy/OpenCV, as its users
    run it) and kornia (batched torch)."""
    from synthlesion.augment import recipes

    size, batch = (128, 8) if args.quick else (512, 64)
    image, _, _, source = phantom(size, 2)
    gen = torch.Generator().manual_seed(0)
    base = torch.from_numpy(image).float()[None, None].expand(batch, 1, -1, -1)
    images = (base + 0.02 * torch.randn(base.shape, generator=gen)).contiguous()
    boxes = torch.tensor([[[size * 0.4, size * 0.4, size * 0.6, size * 0.6]]] * batch,
                         dtype=torch.float64)  # fmt: skip
    ours = recipes.xray_classification("image", box_keys="boxes", box_format="xyxy_voxel", seed=0)
    data = {"image": images, "boxes": boxes, "finding": torch.ones(batch)}
    runners = [Runner("synthlesion", lambda: ours(data), batch, args.device)]
    errors = {}
    try:
        albu = _xray_albumentations()
        arrays = [images[b, 0].numpy().copy() for b in range(batch)]
        runners.append(Runner("albumentations", lambda: [albu(image=a) for a in arrays], batch,
                              "cpu"))  # fmt: skip
    except ImportError as exc:
        errors["albumentations"] = f"not installed ({exc})"
    try:
        kornia_pipe = _xray_kornia(args.device)

        def kornia_step() -> Any:
            x = images.to(args.device)
            low = x.amin((2, 3), keepdim=True)
            high = x.amax((2, 3), keepdim=True)
            return kornia_pipe((x - low) / (high - low).clamp_min(1e-8))

        runners.append(Runner("kornia", kornia_step, batch, args.device))
    except ImportError as exc:
        errors["kornia"] = f"not installed ({exc})"
    for r in runners:
        r.warmup()
    rounds = 0
    while rounds < args.min_rounds or (
        rounds < args.max_rounds and min(r.seconds for r in runners if not r.error) < args.seconds
    ):
        for r in runners:
            r.run_once()
        rounds += 1
    result: dict[str, Any] = {"shape": f"{batch}x1x{size}x{size}", "source": source,
                              "device": args.device, "batch": batch, "missing": errors}  # fmt: skip
    for r in runners:
        result[r.name] = {"images_per_s": r.rate, "images": r.done, "seconds": round(r.seconds, 2),
                          "error": r.error}  # fmt: skip
    ours_rate = result["synthlesion"]["images_per_s"]
    for other in ("albumentations", "kornia"):
        rate = result.get(other, {}).get("images_per_s")
        if ours_rate and rate:
            result[f"synthlesion_vs_{other}"] = ours_rate / rate
    return result


def report_xray(result: dict[str, Any]) -> None:
    print(f"\nX-ray recipe, {result['shape']} on {result['device']} (synthlesion and kornia "
          "batched; Albumentations one image at a time)")  # fmt: skip
    for name in ("synthlesion", "albumentations", "kornia"):
        if name in result:
            r = result[name]
            extra = f"  error: {r['error']}" if r["error"] else ""
            print(f"  {name:22s} {_fmt(r['images_per_s'])} images/s  "
                  f"[{r['images']} images in {r['seconds']:.1f} s]{extra}")  # fmt: skip
    for name, why in result["missing"].items():
        print(f"  {name:22s} {why}")
    for key, value in result.items():
        if "_vs_" in key:
            print(f"  ratio {key:40s} {value:8.2f}x")


def _fmt(rate: float | None) -> str:
    return f"{rate:9.2f}" if rate else "      n/a"


def report(result: dict[str, Any]) -> None:
    print(f"\n{result['shape']} on {result['device']}  (synthlesion batch {result['batch']}; "
          f"MONAI/TorchIO one volume at a time; spacing {result['spacing_mm']} mm)")  # fmt: skip
    names = [k for k in result if k.startswith("synthlesion_") and isinstance(result[k], dict)]
    for name in [*names, "monai", "torchio"]:
        if name in result:
            r = result[name]
            extra = f"  error: {r['error']}" if r["error"] else ""
            warm = f"  (first call {r['warmup_s']:.1f} s)" if "compiled" in name else ""
            print(f"  {name:22s} {_fmt(r['volumes_per_s'])} volumes/s  "
                  f"[{r['volumes']} volumes in {r['seconds']:.1f} s]{warm}{extra}")  # fmt: skip
    for key, value in result.items():
        if "_vs_" in key:
            print(f"  ratio {key:40s} {value:8.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, short smoke run")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch", type=int, default=None, help="synthlesion batch (default 4 "
                        "for 3D on CPU, 16 for 2D and on CUDA)")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=None, help="timed seconds per library")
    parser.add_argument(
        "--backends",
        default=None,
        help="comma list: compiled,eager (+graph: replayed as CUDA graphs, e.g. eager+graph)",
    )
    parser.add_argument(
        "--samplers",
        default="auto",
        help="comma list of warp samplers: "
        "auto (fused kernel where available), torch (grid_sample), native",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile the fastest "
        "synthlesion pipeline per size (top operators; on CUDA launches, "
        "host-device waits and device time per batch)",
    )
    parser.add_argument("--skip-monai", action="store_true")
    parser.add_argument("--skip-torchio", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--sizes", default=None, help="comma list like 128x3,96x3,512x2")
    parser.add_argument("--xray", choices=("also", "only", "skip"), default="also",
                        help="the X-ray recipe against Albumentations and kornia")  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    if args.backends is None:
        args.backends = (
            ["eager+graph", "eager"] if cuda else ["eager"] if args.quick else ["compiled", "eager"]
        )
    else:
        args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.samplers = [v.strip() for v in args.samplers.split(",") if v.strip()]
    if args.quick:
        sizes = [(32, 3), (64, 2)]
        args.seconds = args.seconds or 0.5
        args.min_rounds, args.max_rounds = 1, 3
    else:
        sizes = [(128, 3), (96, 3), (512, 2)]
        args.seconds = args.seconds or (3.0 if cuda else 8.0)
        args.min_rounds, args.max_rounds = 2, 10_000
    if args.sizes:
        sizes = [tuple(int(v) for v in item.split("x")) for item in args.sizes.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, device {args.device}")  # fmt: skip
    results = []
    for size, nd in sizes if args.xray != "only" else []:
        result = bench_size(size, nd, args)
        report(result)
        results.append(result)
    xray = None
    if args.xray != "skip":
        xray = bench_xray(args)
        report_xray(xray)
    summary = {
        "benchmark": "augment",
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "quick": args.quick,
        "targets": TARGETS["cuda" if cuda else "cpu"],
        "results": results,
        "xray": xray,
    }
    if not results:
        print(json.dumps(summary, separators=(",", ":")))
        return 0
    main_result = results[0]
    if cuda:
        best = main_result[main_result["synthlesion_best"]]["volumes_per_s"] or 0.0
        summary["meets_targets"] = best >= TARGETS["cuda"]["volumes_per_s"]
    else:
        summary["meets_targets"] = bool(
            (main_result.get("best_vs_monai") or 0) >= TARGETS["cpu"]["vs_monai"]
            and (main_result.get("best_vs_torchio") or 0) >= TARGETS["cpu"]["vs_torchio"]
        )
    print(json.dumps(summary, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
