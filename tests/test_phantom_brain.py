"""The multi-sequence BraTS-like brain-tumour phantom: layout, geometry, labels, intensities,
tumour contrast per sequence, determinism, refusal of a foreign folder, CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from synthlesion.cli import main
from synthlesion.data import phantom_brain
from synthlesion.data.phantom import PhantomOutputError
from synthlesion.data.phantom_brain import (
    BACKGROUND,
    CHANNELS,
    FULL_SHAPE,
    brain_multiseq_affine,
    brain_multiseq_geometry,
    make_brain_multiseq_dataset,
)
from synthlesion.data.sources import load_cases
from synthlesion.data.validation import check_dataset
from synthlesion.errors import ConfigError

SIZE, PATIENTS, SEED = 32, 4, 0
SHAPE = (32, 32, 21)
LABELS = {"background": 0, "NETC": 1, "SNFH": 2, "ET": 3, "RC": 4}


@pytest.fixture(scope="module")
def brats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("brats")
    return make_brain_multiseq_dataset(out, n_patients=PATIENTS, size=SIZE, seed=SEED)


@pytest.fixture(scope="module")
def arrays(brats: Path) -> list[dict[str, Any]]:
    """Every case read back: entry, images (by channel name), label, brain mask, affines."""
    spec = json.loads(brats.read_text())
    out = []
    for entry in spec["training"]:
        files = [*entry["image"], entry["label"], entry["brain_mask"]]
        nii = [nib.load(brats.parent / f) for f in files]
        out.append(
            {
                "entry": entry,
                "images": {n: np.asarray(i.dataobj) for n, i in zip(CHANNELS, nii, strict=False)},
                "label": np.asarray(nii[4].dataobj),
                "mask": np.asarray(nii[5].dataobj),
                "nii": nii,
            }
        )
    return out


def test_dataset_json_layout(brats: Path) -> None:
    spec = json.loads(brats.read_text())
    assert (
        spec["channel_names"]
        == spec["modality"]
        == {"0": "FLAIR", "1": "T1", "2": "T1c", "3": "T2"}
    )
    assert spec["labels"] == LABELS
    assert spec["file_ending"] == ".nii.gz"
    assert spec["numTraining"] == len(spec["training"])
    block = spec["synthlesion"]
    assert block["generator"] == "synthlesion.data.phantom_brain"
    assert block["kind"] == "brain-mri-multi" and block["orientation"] == "LPS"
    assert block["shape"] == list(SHAPE) and block["background_value"] == BACKGROUND
    listed = set()
    for entry in spec["training"]:
        assert set(entry) == {"image", "label", "brain_mask", "case_id", "patient_id"}
        case, patient = entry["case_id"], entry["patient_id"]
        assert re.fullmatch(r"BraTS-PH-\d{5}-\d{3}", case) and case.startswith(patient + "-")
        assert entry["image"] == [f"./imagesTr/{case}_{c:04d}.nii.gz" for c in range(4)]
        assert entry["label"] == f"./labelsTr/{case}.nii.gz"
        assert entry["brain_mask"] == f"./brainmasks/{case}.nii.gz"
        listed.update(p[2:] for p in [*entry["image"], entry["label"], entry["brain_mask"]])
    on_disk = {
        str(p.relative_to(brats.parent)) for p in brats.parent.rglob("*.nii.gz") if p.is_file()
    }
    assert on_disk == listed
    patients = {e["patient_id"] for e in spec["training"]}
    assert len(patients) == PATIENTS
    assert any(e["case_id"].endswith("-001") for e in spec["training"])  # a second time point
    assert "has_lesion" not in brats.read_text()


def test_cases_load_with_four_channels(brats: Path) -> None:
    cases = load_cases(brats.parent)
    assert len(cases) == json.loads(brats.read_text())["numTraining"]
    for case in cases:
        assert len(case.images) == 4
        assert case.modalities == CHANNELS
        assert case.labels == {v: k for k, v in LABELS.items()}
        assert case.mask is not None and case.mask.is_file()
        assert case.case_id.startswith(case.patient_id)
    assert len({c.patient_id for c in cases}) < len(cases)  # patient-level splits matter


def test_geometry_lps(arrays: list[dict[str, Any]]) -> None:
    affine = brain_multiseq_affine(SHAPE, 240 / SIZE)
    for case in arrays:
        for image in case["nii"]:
            assert image.shape == SHAPE
            assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
            np.testing.assert_allclose(image.affine, affine, atol=1e-4)
            assert image.header["qform_code"] > 0 and image.header["sform_code"] > 0
            np.testing.assert_allclose(image.header.get_zooms(), (7.5, 7.5, 7.5))


def test_geometry_helper_and_full_size() -> None:
    assert brain_multiseq_geometry(64) == ((64, 64, 41), 3.75)
    assert brain_multiseq_geometry(32) == (SHAPE, 7.5)
    assert brain_multiseq_geometry(full_size=True) == ((240, 240, 155), 1.0) == (FULL_SHAPE, 1.0)
    full = brain_multiseq_affine(FULL_SHAPE, 1.0)
    assert nib.aff2axcodes(full) == ("L", "P", "S")
    centre = full @ np.array([(n - 1) / 2 for n in FULL_SHAPE] + [1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)


def test_full_size_reaches_the_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--full-size asks for the 240 x 240 x 155 grid (no voxels made: far too slow here)."""
    seen: list[dict[str, Any]] = []

    def fake(index: int, **kwargs: Any) -> list[Any]:
        seen.append(kwargs)
        return []

    monkeypatch.setattr(phantom_brain, "make_brain_multiseq_patient", fake)
    out = tmp_path / "full"
    args = ["phantom", "--out", str(out), "--kind", "brain-mri-multi", "--full-size"]
    assert main([*args, "--patients", "2"]) == 0
    block = json.loads((out / "dataset.json").read_text())["synthlesion"]
    assert block["shape"] == [240, 240, 155] and block["spacing_mm"] == [1.0, 1.0, 1.0]
    assert len(seen) == 2 and all(s["full_size"] is True for s in seen)
    assert main([*args, "--size", "64", "--overwrite"]) == 1  # contradictory grid


def test_labels_float32_and_masks(arrays: list[dict[str, Any]]) -> None:
    for case in arrays:
        label, mask = case["label"], case["mask"]
        assert label.dtype == np.float32 and case["nii"][4].get_data_dtype() == np.float32
        assert set(np.unique(label).tolist()) <= {0.0, 1.0, 2.0, 3.0, 4.0}
        assert mask.dtype == np.uint8 and set(np.unique(mask).tolist()) == {0, 1}
        assert not np.any(label[mask == 0])  # tumour lies inside the brain
        for image in case["images"].values():
            assert image.dtype == np.float32


def test_healthy_cases_and_tumour_shape(arrays: list[dict[str, Any]]) -> None:
    healthy = {c["entry"]["patient_id"] for c in arrays if not c["label"].any()}
    sick = {c["entry"]["patient_id"] for c in arrays if c["label"].any()}
    assert len(healthy) == PATIENTS - round(0.75 * PATIENTS) and not healthy & sick
    found = set()
    for case in arrays:
        label, mask = case["label"], case["mask"].astype(bool)
        if not label.any():
            continue
        found.update(np.unique(label[label > 0]).astype(int).tolist())
        _, n = ndimage.label(label > 0, structure=np.ones((3, 3, 3)))
        assert n == 1  # one connected glioma
        if case["entry"]["case_id"].endswith("-000"):
            share = np.count_nonzero(label) / np.count_nonzero(mask)
            assert 0.03 <= share <= 0.15
        if (label == 3).any() and (label == 1).any():  # necrosis inside the enhancing rim
            around = ndimage.binary_dilation(label == 1) & (label != 1)
            assert set(np.unique(label[around]).tolist()) <= {3.0}
    assert {1, 2, 3} <= found


def test_zscore_inside_brain_constant_background(arrays: list[dict[str, Any]]) -> None:
    for case in arrays:
        mask = case["mask"].astype(bool)
        for name, image in case["images"].items():
            inside = image[mask].astype(np.float64)
            assert abs(inside.mean()) < 1e-4, name
            assert abs(inside.std() - 1.0) < 1e-4, name
            assert np.all(image[~mask] == BACKGROUND)
            assert inside.min() < BACKGROUND < inside.max()  # the background is not the minimum
            assert np.all(np.isfinite(image))


def test_tumour_contrast_per_sequence(arrays: list[dict[str, Any]]) -> None:
    def pooled(name: str, value: int) -> np.ndarray:
        parts = [c["images"][name][c["label"] == value] for c in arrays]
        return np.concatenate(parts)

    # brain means are 0 after z-scoring
    assert pooled("FLAIR", 2).mean() > 0.8  # oedema bright in FLAIR
    assert pooled("T2", 2).mean() > 0.3  # and in T2
    assert pooled("T1c", 3).mean() > 1.0  # enhancing rim bright in T1c
    assert pooled("T1c", 1).mean() < pooled("T1c", 3).mean() - 1.0  # necrosis dark
    assert pooled("T1", 3).mean() < pooled("T1c", 3).mean() - 1.0  # enhancement needs contrast
    cavity = [c for c in arrays if (c["label"] == 4).any()]
    for case in cavity:  # a resection cavity looks like CSF
        rc = case["label"] == 4
        assert case["images"]["FLAIR"][rc].mean() < 0 < case["images"]["T2"][rc].mean()
        assert case["images"]["T1"][rc].mean() < 0


def test_deterministic_and_rerun_in_place(brats: Path, tmp_path: Path) -> None:
    again = make_brain_multiseq_dataset(tmp_path, n_patients=PATIENTS, size=SIZE, seed=SEED)
    files = sorted(p.relative_to(brats.parent) for p in brats.parent.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for rel in files:
        assert (brats.parent / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel
    before = again.read_bytes()
    make_brain_multiseq_dataset(tmp_path, n_patients=PATIENTS, size=SIZE, seed=SEED)
    assert again.read_bytes() == before  # same arguments: no overwrite needed


def test_refuses_a_different_dataset(tmp_path: Path) -> None:
    make_brain_multiseq_dataset(tmp_path, n_patients=3, size=24, seed=1)
    with pytest.raises(PhantomOutputError):
        make_brain_multiseq_dataset(tmp_path, n_patients=2, size=24, seed=1)
    make_brain_multiseq_dataset(tmp_path, n_patients=1, size=24, seed=1, overwrite=True)
    spec = json.loads((tmp_path / "dataset.json").read_text())
    named = {p[2:] for e in spec["training"] for p in [*e["image"], e["label"], e["brain_mask"]]}
    on_disk = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.nii.gz")}
    assert on_disk == named  # the files of the earlier run are gone


@pytest.mark.parametrize(
    "kwargs",
    [{"size": 16}, {"size": 32.0}, {"n_patients": 0}, {"lesion_fraction": 1.5}],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        make_brain_multiseq_dataset(tmp_path, **{"n_patients": 1, "size": 24, **kwargs})
    assert not (tmp_path / "dataset.json").exists()


def test_cli_and_check(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    args = ["phantom", "--out", str(out), "--kind", "brain-mri-multi", "--size", "32"]
    assert main([*args, "--patients", "3"]) == 0
    spec = json.loads((out / "dataset.json").read_text())
    assert spec["synthlesion"]["n_patients"] == 3 and spec["synthlesion"]["size"] == 32
    assert main([*args, "--patients", "3", "--dims", "2", "--overwrite"]) == 1
    report = check_dataset(out)
    assert report.n_cases == spec["numTraining"]
    # Healthy scans have all-zero label maps, which the check reports as empty masks by default.
    assert {p.code for p in report.problems} <= {"empty_mask"}
