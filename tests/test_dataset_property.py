"""Property test over random case/patient/split layouts, generators and attacks: no evaluation
loader ever yields a synthetic item, and no training set ever holds a synthetic case of an
evaluation patient. The build is refused exactly when the layout holds a violation."""

from __future__ import annotations

import gzip
import json
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_dataset_support import make_generator

from synthlesion.data.cases import Case
from synthlesion.data.io import load_image
from synthlesion.data.splits import Splits, save_splits
from synthlesion.dataset import DatasetBuilder, EvaluationDataset, make_eval_loader
from synthlesion.provenance import GuardViolation, ManifestWriter, SyntheticRegistry, voxel_sha256
from synthlesion.storage import sha256_file

SIDES = ("train", "val", "test")


def _write(path: Path, array: np.ndarray) -> Path:
    image = nib.Nifti1Image(array, np.eye(4))
    image.set_data_dtype(array.dtype)
    nib.save(image, str(path))
    return path


@st.composite
def layouts(draw):
    n_patients = draw(st.integers(2, 5))
    cases_per = draw(st.lists(st.integers(1, 3), min_size=n_patients, max_size=n_patients))
    sides = draw(st.lists(st.sampled_from(SIDES), min_size=n_patients, max_size=n_patients))
    n_cases = sum(cases_per)
    sources = draw(st.lists(st.integers(0, n_cases - 1), max_size=5))
    trained = draw(st.lists(st.integers(0, n_patients - 1), unique=True, max_size=n_patients))
    copies = (
        draw(
            st.lists(
                st.tuples(st.integers(0, 4), st.integers(0, n_cases - 1), st.booleans()), max_size=2
            )
        )
        if sources
        else []
    )
    return cases_per, sides, sources, trained, copies


def _world(root: Path, cases_per, sides, sources, trained, copies):
    (root / "real").mkdir()
    (root / "synth").mkdir()
    cases, patient_side = [], {}
    rng = np.random.default_rng(len(cases_per))
    for p, (count, side) in enumerate(zip(cases_per, sides, strict=True)):
        patient_side[f"pat{p}"] = side
        for t in range(count):
            case_id = f"pat{p}_t{t}"
            image = _write(
                root / "real" / f"{case_id}_0000.nii.gz",
                rng.integers(-100, 100, (6, 5)).astype(np.int16),
            )
            mask = _write(
                root / "real" / f"{case_id}.nii.gz", (rng.random((6, 5)) > 0.7).astype(np.uint8)
            )
            cases.append(
                Case(case_id, f"pat{p}", (image,), mask, labels={0: "background", 1: "lesion"})
            )
    splits = Splits(
        {s: tuple(sorted(p for p, ps in patient_side.items() if ps == s)) for s in SIDES},
        {c.case_id: c.patient_id for c in cases},
    )
    save_splits(splits, root / "splits.json")
    generator = make_generator(root / "model", [f"pat{p}" for p in trained])
    with ManifestWriter(root / "synth" / "m.jsonl", generator=generator) as writer:
        for k, index in enumerate(sources):
            source = cases[index]
            array = load_image(source.image).array + np.int16(k + 1) * 7
            _write(root / "synth" / f"syn{k}_0000.nii.gz", array)
            _write(root / "synth" / f"syn{k}.nii.gz", np.ones((6, 5), np.uint8))
            writer.append_case(
                case_id=f"syn{k}",
                source=source,
                images=[f"syn{k}_0000.nii.gz"],
                mask=f"syn{k}.nii.gz",
                mask_origin="procedural",
                scheduler="ddim",
                steps=1,
                seed=k,
            )
    attacked_eval = attacked_train = False
    for syn, victim, recompress in copies:
        syn %= len(sources)
        data = (root / "synth" / f"syn{syn}_0000.nii.gz").read_bytes()
        if recompress:
            data = gzip.compress(gzip.decompress(data), 1)
        cases[victim].image.write_bytes(data)
        if patient_side[cases[victim].patient_id] != "train":
            attacked_eval = True  # byte copies by file hash, re-compressed ones by voxels
        else:  # a byte copy is caught by file hash; any change to a source scan by its hash
            attacked_train |= not recompress or victim in sources
    return cases, splits, patient_side, attacked_eval, attacked_train


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts())
def test_no_synthetic_in_evaluation_no_evaluation_patient_in_training(layout):
    cases_per, sides, sources, trained, copies = layout
    root = Path(tempfile.mkdtemp(prefix="synthlesion-prop-"))
    try:
        cases, splits, side_of, attacked_eval, attacked_train = _world(root, *layout)
        eval_patients = {p for p, s in side_of.items() if s != "train"}
        source_leak = any(side_of[cases[i].patient_id] != "train" for i in sources)
        generator_leak = bool(sources) and bool({f"pat{p}" for p in trained} & eval_patients)
        # Real training scans are checked by file hash only (voxels are decoded for val/test),
        # so a re-compressed copy over a train scan that no row was painted into goes unseen:
        # it is a real-labelled training case, never an evaluation one.
        expected_refusal = source_leak or generator_leak or attacked_eval or attacked_train
        synthetic_files = {sha256_file(p) for p in (root / "synth").glob("syn*_0000.nii.gz")}
        synthetic_voxels = {
            voxel_sha256(load_image(p).array) for p in (root / "synth").glob("syn*_0000.nii.gz")
        }
        builder = DatasetBuilder(cases, splits, [root / "synth" / "m.jsonl"])
        try:
            result = builder.build(root / "out")
        except GuardViolation:
            assert expected_refusal
        else:
            assert not expected_refusal
            spec = json.loads((root / "out" / "dataset.json").read_text())
            for entry in spec["training"]:
                assert side_of[entry["source_patient"]] == "train"
                assert side_of[entry["patient_id"]] == "train"
            assert result.counts["train"]["synthetic"] == len(sources)
            for side in ("val", "test"):
                for batch in make_eval_loader(EvaluationDataset.from_build(root / "out", side)):
                    assert not batch["is_synthetic"].any()
        # Independently of any build: an evaluation loader over the real eval cases either
        # refuses or yields nothing synthetic.
        registry = SyntheticRegistry.from_manifests(
            [(root / "synth" / "m.jsonl", None)], verify_files=False
        )
        items = [
            {"image": str(c.image), "label": str(c.mask), "case_id": c.case_id}
            for c in cases
            if side_of[c.patient_id] != "train"
        ]
        try:
            for batch in make_eval_loader(EvaluationDataset(items, registry)):
                path = next(i["image"] for i in items if i["case_id"] == batch["case_id"][0])
                assert sha256_file(path) not in synthetic_files
                assert voxel_sha256(batch["image"][0, 0].numpy()) not in synthetic_voxels
        except GuardViolation:
            assert attacked_eval
        else:
            assert not attacked_eval
    finally:
        shutil.rmtree(root, ignore_errors=True)
