"""Smoke test of a plain install (``pip install .``, no extras): a 3D model trains and samples.

CI runs it in a fresh virtual environment holding only the package's declared dependencies, so
an import that only an extra brings (einops came through TorchIO once) fails here first.

Usage: python scripts/smoke_no_extras.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from synthlesion.cli import main as synthlesion


def run(out: Path) -> None:
    data = out / "data"
    assert synthlesion(["phantom", "--out", str(data), "--kind", "ct", "--dims", "3",
                        "--size", "48", "--patients", "8", "--seed", "1",
                        "--lesion-fraction", "1"]) == 0  # fmt: skip
    assert synthlesion(["split", str(data), "--out", str(data / "splits.json")]) == 0
    config = Path(__file__).resolve().parents[1] / "configs" / "train_phantom3d_cpu.yaml"
    overrides = {
        "output_dir": str(out / "run"), "data.dataset": str(data / "dataset.json"),
        "data.splits": str(data / "splits.json"), "data.phantom": "null",
        "data.spacing": "null", "data.roi_size": "[16,16,16]", "model.sample_size": "16",
        "max_steps": "2", "batch_size": "1", "validation.every_n_steps": "2",
        "validation.num_crops": "1", "validation.num_preview": "1",
        "validation.num_inference_steps": "2", "checkpoint.every_n_steps": "2",
    }  # fmt: skip
    args = ["train", "--config", str(config), "--no-progress"]
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    assert synthlesion(args) == 0
    assert synthlesion(["sample", "--model", str(out / "run" / "model"), "--data", str(data),
                        "--splits", str(data / "splits.json"), "--out", str(out / "synthetic"),
                        "--steps", "2", "--limit", "1", "--mask-source", "procedural"]) == 0  # fmt: skip
    report = json.loads((out / "synthetic" / "sample_report.json").read_text())
    assert len(report["written"]) == 1, report
    print(f"smoke test of a plain install passed: {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.out:
        run(Path(args.out))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            run(Path(tmp))
