"""Benchmark: load + full validation against plain nibabel loading and MONAI's LoadImaged.

Runs on the embedded 3D CT phantom (generated into a temporary folder). For each reader, every
case's image and mask are read completely; synthlesion's path additionally verifies the gzip
CRC and runs every integrity check of ``synthlesion check``. Prints cases per second and the
ratios, then one line of JSON with every figure.

Usage: python scripts/bench_io.py [--patients 8] [--size 128] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np


def _time(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=8)
    parser.add_argument("--size", type=int, default=128, help="in-plane size of the 3D phantom")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small, fast smoke run")
    args = parser.parse_args()
    if args.quick:
        args.patients, args.size, args.repeats = 3, 48, 1

    from monai.transforms import LoadImaged

    from synthlesion.data.phantom import make_phantom_dataset
    from synthlesion.data.sources import load_cases
    from synthlesion.data.validation import CheckOptions, check_cases

    with tempfile.TemporaryDirectory() as tmp:
        dataset = make_phantom_dataset(
            Path(tmp) / "ct3d",
            kind="ct",
            spatial_dims=3,
            n_patients=args.patients,
            size=args.size,
            seed=0,
        )
        cases = load_cases(dataset)
        pairs = [(str(c.image), str(c.mask)) for c in cases]
        n = len(cases)
        shape = nib.load(pairs[0][0]).shape
        mb = sum(os.path.getsize(p) for pair in pairs for p in pair) / 1e6

        def plain_nibabel() -> None:
            for image, mask in pairs:
                nib.load(image).get_fdata()
                np.asanyarray(nib.load(mask).dataobj)

        def plain_nibabel_raw() -> None:
            for image, mask in pairs:
                np.asanyarray(nib.load(image).dataobj)
                np.asanyarray(nib.load(mask).dataobj)

        loader = LoadImaged(keys=["image", "label"], image_only=True)

        def monai_load() -> None:
            for image, mask in pairs:
                loader({"image": image, "label": mask})

        def ours_serial() -> None:
            report = check_cases(cases, options=CheckOptions(workers=1))
            if not report.ok:
                raise SystemExit(report.to_text())

        def ours_parallel() -> None:
            report = check_cases(cases, options=CheckOptions())
            if not report.ok:
                raise SystemExit(report.to_text())

        timings = {
            "nibabel_get_fdata": _time(plain_nibabel, args.repeats),
            "nibabel_dataobj": _time(plain_nibabel_raw, args.repeats),
            "monai_LoadImaged": _time(monai_load, args.repeats),
            "synthlesion_check_1thread": _time(ours_serial, args.repeats),
            "synthlesion_check": _time(ours_parallel, args.repeats),
        }

    figures: dict[str, object] = {
        "bench": "io",
        "cases": n,
        "shape": list(shape),
        "megabytes_on_disk": round(mb, 2),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }
    print(f"3D CT phantom: {n} cases of {shape}, {mb:.1f} MB gzipped, {os.cpu_count()} CPU(s)")
    for name, seconds in timings.items():
        rate = n / seconds
        figures[f"{name}_cases_per_s"] = round(rate, 3)
        print(f"  {name:28s} {rate:8.2f} cases/s  ({seconds:.3f} s)")
    for reference in ("nibabel_get_fdata", "nibabel_dataobj", "monai_LoadImaged"):
        for ours in ("synthlesion_check_1thread", "synthlesion_check"):
            ratio = timings[ours] / timings[reference]
            figures[f"time_ratio_{ours}_vs_{reference}"] = round(ratio, 3)
            print(f"  time {ours} / {reference}: {ratio:.2f}x")
    target = figures["time_ratio_synthlesion_check_1thread_vs_nibabel_get_fdata"]
    print(
        f"target: load + full validation at most 1.5x a plain nibabel load "
        f"(single thread: {target:.2f}x)"
    )
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
