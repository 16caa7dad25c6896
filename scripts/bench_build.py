"""Benchmark: building a dataset from a manifest of many synthetic rows, against plain loading.

Makes a small 2D phantom (the real cases), a locked split, a generator folder and ONE synthetic
image/mask pair, then a manifest of N rows (default 100,000) that all point at that pair, with
their source cases cycling over the training cases; the rows are generated here, not stored.
File-hash verification of the synthetic files is switched OFF for the timed runs (hashing the
same pair 100,000 times would measure the disk cache, not the builder); every other guard runs:
hash chain and lock, path checks (lexical and symbolic links), source/split/patient checks,
generator record, duplicate ids, the registry and the real-vs-registry check. The build also
creates 2N symbolic links and writes dataset.json, synthetic.json and the registry.

Measured, each as rows per second and tracemalloc peak (separate runs: timing without
tracemalloc, peak with it):
  stream     iterate ``read_manifest`` (integrity + path checks)
  build      ``DatasetBuilder.build`` end to end (imagesTr/labelsTr as symbolic links)
  build_none the same with link_mode "none" (dataset.json lists the files in place)
  json_list  ``json.loads`` of every line into a list (what a naive reader keeps)
  csv_list   ``csv.DictReader`` over the same rows flattened to CSV, into a list
Ends with one line of JSON holding every figure.

Usage: python scripts/bench_build.py [--rows 100000] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import shutil
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any


def make_world(tmp: Path, n_rows: int) -> dict[str, Any]:
    """Real phantom cases, locked splits, generator and an ``n_rows`` manifest under ``tmp``."""
    from synthlesion.data.io import load_image, save_image
    from synthlesion.data.phantom import make_phantom_dataset
    from synthlesion.data.sources import load_cases
    from synthlesion.data.splits import save_splits, split_patients
    from synthlesion.data.synthetic_mark import mark_volume
    from synthlesion.data.volume import Volume
    from synthlesion.provenance import GeneratorRef, ManifestWriter, hash_patient_id
    from synthlesion.storage import sha256_file

    real_json = make_phantom_dataset(
        tmp / "real", kind="ct", spatial_dims=2, n_patients=12, size=32, seed=0
    )
    cases = load_cases(real_json)
    splits = split_patients(cases, fractions=(0.6, 0.2, 0.2), seed=0)
    save_splits(splits, tmp / "splits.json")
    model = tmp / "model"
    model.mkdir()
    (model / "weights.safetensors").write_bytes(b"\0" * 1024)
    (model / "training_record.json").write_text(
        json.dumps({"patient_id_hashes": [hash_patient_id(p) for p in splits.patients("train")]})
    )
    root = tmp / "synth"
    (root / "images").mkdir(parents=True)
    train = [c for c in cases if c.patient_id in set(splits.patients("train"))]
    source = train[0]
    image = load_image(source.image)
    painted = image.array.copy()
    painted[10:14, 10:14] += 300
    mark = {"case": "syn", "run": "bench"}  # as every synthetic file synthlesion writes
    save_image(
        mark_volume(Volume(painted, image.affine, image.header), mark),
        root / "images" / "syn_0000.nii.gz",
    )
    mask = load_image(source.mask)
    lesion = mask.array.copy()
    lesion[10:14, 10:14] = 2
    save_image(
        mark_volume(Volume(lesion, mask.affine, mask.header), mark),
        root / "images" / "syn_mask.nii.gz",
    )
    generator = GeneratorRef.from_folder(model, record_as="../model")
    facts = [(c.case_id, c.patient_id, (sha256_file(c.image),), sha256_file(c.mask)) for c in train]
    manifest = root / "manifest.jsonl"
    with ManifestWriter(
        manifest, root, generator=generator, durable=False, verify_files=False
    ) as writer:
        template = writer.append_case(
            case_id="syn0",
            source=source,
            images=["images/syn_0000.nii.gz"],
            mask="images/syn_mask.nii.gz",
            mask_origin="procedural",
            scheduler="ddim",
            steps=50,
            seed=0,
            quality={"passed": True, "seam": 0.4, "z_mean": 0.1},
        )
        chunk: list = []
        for i in range(1, n_rows):
            case_id, patient, image_sha, mask_sha = facts[i % len(facts)]
            chunk.append(
                replace(
                    template,
                    case_id=f"syn{i}",
                    seed=i,
                    source_case=case_id,
                    source_patient=patient,
                    source_image_sha256=image_sha,
                    source_mask_sha256=mask_sha,
                    created="",
                )
            )
            if len(chunk) == 5000:
                writer.append_many(chunk)
                chunk = []
        writer.append_many(chunk)
    return {
        "real": real_json,
        "splits": tmp / "splits.json",
        "manifest": manifest,
        "root": root,
        "tmp": tmp,
    }


def stream(world: dict[str, Any]) -> int:
    from synthlesion.provenance import read_manifest

    return sum(1 for _ in read_manifest(world["manifest"], world["root"], verify_files=False))


def build(world: dict[str, Any], out: Path, link_mode: str = "symlink") -> dict[str, Any]:
    from synthlesion.dataset import BuildConfig, DatasetBuilder

    config = BuildConfig(synthetic_share=0.3, verify_files=False, link_mode=link_mode)
    builder = DatasetBuilder(
        world["real"], world["splits"], [(world["manifest"], world["root"])], config
    )
    return builder.build(out).counts


def json_list(world: dict[str, Any]) -> int:
    with open(world["manifest"], encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    return len(rows) - 1


def csv_list(world: dict[str, Any]) -> int:
    with open(world["csv"], newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return len(rows)


def write_csv(world: dict[str, Any]) -> None:
    """The same rows flattened to CSV (nested fields as JSON text)."""
    with open(world["manifest"], encoding="utf-8") as source:
        source.readline()
        first = json.loads(source.readline())
        path = world["tmp"] / "manifest.csv"
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(first))
            writer.writeheader()
            for line in [json.dumps(first), *source]:
                row = json.loads(line)
                writer.writerow(
                    {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in row.items()}
                )
    world["csv"] = path


def measure(name: str, fn: Callable[[], Any], n_rows: int) -> dict[str, float]:
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    figures = {
        "seconds": round(seconds, 3),
        "rows_per_s": round(n_rows / seconds),
        "peak_mib": round(peak / 2**20, 2),
        "peak_bytes_per_row": round(peak / n_rows, 1),
    }
    print(
        f"{name:>10}: {figures['seconds']:8.2f} s  {figures['rows_per_s']:>9} rows/s  "
        f"peak {figures['peak_mib']:8.2f} MiB ({figures['peak_bytes_per_row']} B/row)"
    )
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true", help="10,000 rows")
    args = parser.parse_args()
    n = 10_000 if args.quick else args.rows
    tmp = Path(tempfile.mkdtemp(prefix="bench-build-"))
    try:
        start = time.perf_counter()
        world = make_world(tmp, n)
        write_csv(world)
        setup = time.perf_counter() - start
        size_mib = world["manifest"].stat().st_size / 2**20
        print(
            f"{n} synthetic rows ({size_mib:.1f} MiB manifest) made in {setup:.1f} s; "
            "file-hash verification off for the timed runs"
        )
        outs = iter(tmp / f"out{i}" for i in range(4))
        results = {
            "stream": measure("stream", lambda: stream(world), n),
            "build": measure("build", lambda: build(world, next(outs)), n),
            "build_nolinks": measure("build_none", lambda: build(world, next(outs), "none"), n),
            "json_list": measure("json_list", lambda: json_list(world), n),
            "csv_list": measure("csv_list", lambda: csv_list(world), n),
        }
        counts = json.loads((tmp / "out0" / "build.json").read_text())["counts"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        json.dumps(
            {
                "benchmark": "bench_build",
                "rows": n,
                "manifest_mib": round(size_mib, 2),
                "verify_files": False,
                "train_counts": counts["train"],
                **results,
                "python": platform.python_version(),
                "machine": platform.machine(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
