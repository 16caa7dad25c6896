"""The embedded procedural phantom: layout, determinism, anatomy and lesion truth, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from synthlesion.cli import main
from synthlesion.data.io import load_image
from synthlesion.data.phantom import (
    PhantomOutputError,
    make_phantom_dataset,
    make_phantom_patient,
    phantom_geometry,
)
from synthlesion.errors import ConfigError


@pytest.fixture(scope="module")
def ct3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ct3d")
    return make_phantom_dataset(out, kind="ct", spatial_dims=3, n_patients=4, size=48, seed=3)


@pytest.fixture(scope="module")
def mri2d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mri2d")
    return make_phantom_dataset(out, kind="mri", spatial_dims=2, n_patients=6, size=64, seed=1)


def _cases(json_path: Path):
    spec = json.loads(json_path.read_text())
    for entry in spec["training"]:
        image = nib.load(json_path.parent / entry["image"])
        label = nib.load(json_path.parent / entry["label"])
        yield entry, image, label


@pytest.mark.parametrize("which", ["ct3d", "mri2d"])
def test_dataset_json_layout(which: str, request: pytest.FixtureRequest) -> None:
    json_path: Path = request.getfixturevalue(which)
    spec = json.loads(json_path.read_text())
    kind, dims = ("ct", 3) if which == "ct3d" else ("mri", 2)
    organ = "liver" if kind == "ct" else "brain"
    assert spec["name"] == f"synthlesion-phantom-{kind}-{dims}d"
    assert spec["tensorImageSize"] == f"{dims}D"
    assert spec["modality"] == spec["channel_names"] == {"0": "CT" if kind == "ct" else "MRI"}
    assert spec["labels"] == {"background": 0, organ: 1, "lesion": 2}
    assert spec["file_ending"] == ".nii.gz"
    assert spec["numTraining"] == len(spec["training"])
    block = spec["synthlesion"]
    assert block["generator"] == "synthlesion.data.phantom"
    assert (block["kind"], block["spatial_dims"]) == (kind, dims)
    assert block["lesion_labels"] == [2] and block["organ_label"] == 1
    images = sorted(p.name for p in (json_path.parent / "imagesTr").iterdir())
    assert images == sorted(Path(e["image"]).name for e in spec["training"])
    for entry in spec["training"]:
        assert entry["image"] == f"./imagesTr/{entry['case_id']}_0000.nii.gz"
        assert entry["label"] == f"./labelsTr/{entry['case_id']}.nii.gz"
        assert entry["case_id"].startswith(entry["patient_id"] + "_t")


@pytest.mark.slow  # importing MONAI (and torch) takes several seconds on a cold start
def test_monai_reads_dataset_json(ct3d: Path) -> None:
    from monai.data import load_decathlon_datalist

    datalist = load_decathlon_datalist(str(ct3d), data_list_key="training")
    assert len(datalist) == json.loads(ct3d.read_text())["numTraining"]
    assert all(Path(item["image"]).is_file() and Path(item["label"]).is_file() for item in datalist)
    assert all(item["case_id"] == Path(item["label"]).name[:-7] for item in datalist)


@pytest.mark.parametrize("which", ["ct3d", "mri2d"])
def test_images_masks_and_lesion_truth(which: str, request: pytest.FixtureRequest) -> None:
    json_path: Path = request.getfixturevalue(which)
    dims = 3 if which == "ct3d" else 2
    patients: dict[str, int] = {}
    n_healthy = n_lesion = 0
    for entry, image, label in _cases(json_path):
        patients[entry["patient_id"]] = patients.get(entry["patient_id"], 0) + 1
        data, lab = np.asanyarray(image.dataobj), np.asanyarray(label.dataobj)
        assert data.ndim == lab.ndim == dims and data.shape == lab.shape
        np.testing.assert_array_equal(image.affine, label.affine)
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
        assert np.abs(image.affine[:3, 3]).max() > 1  # origin not at zero
        assert lab.dtype == np.uint8 and set(np.unique(lab)) <= {0, 1, 2}
        if which == "ct3d":
            assert data.dtype == np.int16
            assert -1024 <= data.min() and data.max() <= 3071
            assert data[0, 0, 0] < -900  # air around the body
            assert 40 < np.median(data[lab == 1]) < 85  # liver HU
        else:
            assert data.dtype == np.float32 and data.min() >= 0
        lesion = lab == 2
        assert entry["has_lesion"] == bool(lesion.any())
        assert entry["lesion_count"] == len(entry["lesions"])
        assert sum(x["volume_voxels"] for x in entry["lesions"]) == int(lesion.sum())
        if not lesion.any():
            n_healthy += 1
            continue
        n_lesion += 1
        # every lesion voxel is surrounded by organ, and far from the image border
        assert (lab[ndimage.binary_dilation(lesion)] > 0).all()
        idx = np.argwhere(lesion)
        assert idx.min() >= 2 and (np.array(lab.shape) - 1 - idx.max(axis=0)).min() >= 2
        for truth in entry["lesions"]:
            assert len(truth["centre_voxel"]) == dims and len(truth["radii_mm"]) == 3
            ijk = np.r_[truth["centre_voxel"], np.zeros(3 - dims), 1.0]
            tol = 0.006 * max(image.header.get_zooms()) + 0.006  # JSON keeps two decimals
            np.testing.assert_allclose((image.affine @ ijk)[:3], truth["centre_mm"], atol=tol)
            assert lab[tuple(np.round(truth["centre_voxel"]).astype(int))] == 2
    assert n_healthy >= 1 and n_lesion >= 1
    assert max(patients.values()) == 2  # follow-ups: patient ids differ from case ids


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    kwargs = dict(kind="ct", spatial_dims=2, n_patients=3, size=48)
    a = make_phantom_dataset(tmp_path / "a", seed=5, **kwargs).parent
    b = make_phantom_dataset(tmp_path / "b", seed=5, **kwargs).parent
    c = make_phantom_dataset(tmp_path / "c", seed=6, **kwargs).parent
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    image = "imagesTr/ct2d_p000_t0_0000.nii.gz"
    assert (a / image).read_bytes() != (c / image).read_bytes()


@pytest.mark.parametrize("kind", ["ct", "mri"])
def test_lesions_have_contrast_but_no_trivial_threshold(kind: str) -> None:
    cases = []
    for index in range(3):
        cases += make_phantom_patient(kind, 3, patient_index=index, n_lesions=3, size=64, seed=0)
    contrasts = []
    for case in cases:
        image, lab = case.image.array.astype(np.float64), case.label.array
        organ = image[lab == 1]
        assert organ.std() > (8 if kind == "ct" else 0.05 * np.median(organ))  # texture, noise
        components, n = ndimage.label(lab == 2)
        assert n == len(case.lesions) >= 1
        for i in range(1, n + 1):
            lesion = components == i
            if lesion.sum() < 20:
                continue
            ring = ndimage.binary_dilation(lesion, iterations=2) & (lab == 1)
            contrasts.append(abs(image[lesion].mean() - np.median(image[ring])) / case.noise_sd)
            assert contrasts[-1] > 1.5, case.case_id
        # not separable by one threshold: lesion-like values exist elsewhere in the body
        lesion_values = image[lab == 2]
        lo, hi = np.percentile(lesion_values, [25, 75])
        body = (image > (-500 if kind == "ct" else 0.3 * np.median(organ))) & (lab != 2)
        assert ((image >= lo) & (image <= hi) & body).sum() > lesion_values.size
    assert np.mean(contrasts) > 2.0


def test_follow_up_moves_anatomy_and_changes_lesions() -> None:
    t0, t1 = make_phantom_patient("ct", 3, n_time_points=2, n_lesions=2, size=48, seed=2)
    assert (t0.patient_id, t1.patient_id) == ("ct3d_p000", "ct3d_p000")
    assert (t0.case_id, t1.case_id) == ("ct3d_p000_t0", "ct3d_p000_t1")
    a, b = t0.label.array > 0, t1.label.array > 0
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    assert 0.6 < dice < 0.999
    assert len(t0.lesions) == len(t1.lesions) == 2
    assert [x.radii_mm for x in t0.lesions] != [x.radii_mm for x in t1.lesions]


@pytest.mark.parametrize(("kind", "dims"), [("ct", 2), ("mri", 3)])
def test_geometry_and_reading_back(tmp_path: Path, kind: str, dims: int) -> None:
    shape, spacing = phantom_geometry(kind, dims, 40)
    (case,) = make_phantom_patient(kind, dims, n_lesions=1, size=40, seed=0)
    assert case.image.shape == case.label.shape == shape
    assert case.image.spacing == pytest.approx(spacing[:dims], abs=1e-3)
    if kind == "ct":
        assert spacing[2] == pytest.approx(2.5 * spacing[0])
    else:
        assert spacing[0] == spacing[1] == spacing[2]
    json_path = make_phantom_dataset(tmp_path, kind=kind, spatial_dims=dims, n_patients=1, size=40)
    entry = json.loads(json_path.read_text())["training"][0]
    volume = load_image(tmp_path / entry["image"], spatial_dims=dims)
    assert volume.shape == shape


def test_bad_arguments_raise_config_error(tmp_path: Path) -> None:
    for kwargs in (
        {"kind": "pet"},
        {"spatial_dims": 4},
        {"size": 8},
        {"n_patients": 0},
        {"lesion_fraction": 1.5},
    ):
        with pytest.raises(ConfigError):
            make_phantom_dataset(tmp_path, **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "dataset.json").exists()


def test_cli_writes_and_refuses_a_foreign_dataset(tmp_path: Path, capsys) -> None:
    out = tmp_path / "ds"
    args = ["phantom", "--out", str(out), "--dims", "2", "--size", "32", "--patients", "2"]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == str(out / "dataset.json")
    first = (out / "dataset.json").read_bytes()
    assert main(args) == 0  # the same dataset again is fine
    assert (out / "dataset.json").read_bytes() == first
    assert main([*args, "--seed", "1"]) == 1  # a different phantom is refused
    assert "different dataset.json" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "dataset.json").write_text('{"name": "real data"}')
    with pytest.raises(PhantomOutputError):
        make_phantom_dataset(foreign, spatial_dims=2, n_patients=1, size=32)
    assert json.loads((foreign / "dataset.json").read_text()) == {"name": "real data"}
    assert main([*args, "--seed", "1", "--overwrite"]) == 0
    spec = json.loads((out / "dataset.json").read_text())
    assert spec["synthlesion"]["seed"] == 1
    listed = {Path(e[k]).name for e in spec["training"] for k in ("image", "label")}
    on_disk = {p.name for p in out.rglob("*.nii.gz")}
    assert on_disk == listed  # files of the replaced phantom are gone
