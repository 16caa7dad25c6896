"""Every error is a clear error: one line naming the file, the case and the problem, exit 1 (2 for
usage), no traceback, nothing half written; and a package that declares what it imports."""

from __future__ import annotations

import ast
import errno
import gzip
import json
import pickle
import sys
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tomllib
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synthlesion.cli import main
from synthlesion.data.io import load_image
from synthlesion.data.phantom import make_phantom_dataset
from synthlesion.data.sources import load_cases
from synthlesion.errors import CaseSourceError, GeometryError, ImageReadError

ROOT = Path(__file__).resolve().parents[1]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("errors")
    return make_phantom_dataset(root / "real", kind="ct", spatial_dims=2, n_patients=8, size=64)


# --- OS errors, weights, records, configs: one line, exit 1 -----------------------------------


def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(tmp_path, capsys, monkeypatch):
    import synthlesion.storage as storage

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.os, "fsync", full)
    code, err = run_cli(["phantom", "--out", str(tmp_path / "p"), "--dims", "2",
                         "--size", "32", "--patients", "2"], capsys)  # fmt: skip
    assert code == 1 and "No space left on device" in err and "disk is full" in err
    assert len(err.strip().splitlines()) == 1
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_an_output_path_under_a_file_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = run_cli(["phantom", "--out", str(blocker / "sub"), "--dims", "2",
                         "--size", "32", "--patients", "2"], capsys)  # fmt: skip
    assert code == 1 and str(blocker) in err
    assert main(["--debug", "phantom", "--out", str(tmp_path / "ok"), "--dims", "2", "--size",
                 "32", "--patients", "1"]) == 0  # fmt: skip


def _model(tmp_path: Path, record: dict | None) -> Path:
    import torch

    from synthlesion.models import LesionDiffusionModel, ModelConfig

    torch.manual_seed(0)
    model = LesionDiffusionModel.from_config(
        ModelConfig(spatial_dims=2, sample_size=16, channels=(8, 8), attention_levels=(False,
                    False), layers_per_block=1, norm_num_groups=4, num_train_timesteps=10)
    )  # fmt: skip
    return model.save_pretrained(tmp_path / "model", training_record=record)


@pytest.mark.parametrize("damage", ["truncated", "pickled"])
def test_unreadable_weights_are_named_and_never_executed(phantom, tmp_path, capsys, damage):
    from synthlesion.data.splits import save_splits, split_patients
    from synthlesion.provenance.identity import PATIENT_HASH_SCHEME, hash_patient_id

    splits = split_patients(load_cases(phantom), seed=0)
    save_splits(splits, tmp_path / "s.json")
    record = {
        "patient_hash_scheme": PATIENT_HASH_SCHEME,
        "patient_id_hashes": [hash_patient_id(p) for p in splits.patients("train")],
        "data": {"intensity": {"mode": "window", "window": [-200, 300],
                               "percentiles": [0.5, 99.5]}, "roi_size": [16, 16]},
    }  # fmt: skip
    folder = _model(tmp_path, record)
    weights = folder / "weights.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        weights.write_bytes(pickle.dumps({"boom": 1}))
    code, err = run_cli(["sample", "--model", str(folder), "--data", str(phantom),
                         "--splits", str(tmp_path / "s.json"), "--out", str(tmp_path / "o")],
                        capsys)  # fmt: skip
    assert code == 1 and "weights.safetensors" in err and "not a readable safetensors" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "record",
    ["{not json", json.dumps(["a list"]), json.dumps({"data": {"intensity": {}, "roi_size": 3}})],
)
def test_malformed_training_records_are_one_line(phantom, tmp_path, capsys, record):
    from synthlesion.data.splits import save_splits, split_patients

    folder = _model(tmp_path, {"data": {}})
    (folder / "training_record.json").write_text(record)
    save_splits(split_patients(load_cases(phantom), seed=0), tmp_path / "s.json")
    code, err = run_cli(["sample", "--model", str(folder), "--data", str(phantom),
                         "--splits", str(tmp_path / "s.json"), "--out", str(tmp_path / "o")],
                        capsys)  # fmt: skip
    assert code == 1 and "training" in err and "record" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("text", ["output_dir: [unclosed", "output_dir: x\nno_such_key: 1\n"])
def test_malformed_configs_are_one_line(tmp_path, capsys, text):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    code, err = run_cli(["train", "--config", str(config)], capsys)
    assert code == 1 and str(config) in err or "no_such_key" in err


# --- check finishes every case ----------------------------------------------------------------


def _write_patched(path: Path, array: np.ndarray, patch) -> None:
    import io

    raw = nib.Nifti1Image(array, np.eye(4)).to_bytes()
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw))
    patch(header)
    path.write_bytes(header.binaryblock + raw[348:])


def test_check_reports_broken_headers_and_finishes_every_case(tmp_path, capsys):
    image = np.zeros((8, 8, 4), np.int16)
    image[1:7, 1:7, :] = 40  # a body in air
    mask = np.zeros((8, 8, 4), np.uint8)
    mask[3:5, 3:5, 1:3] = 1

    def zero(h):
        h["pixdim"][1] = 0
        h["srow_x"] = [0, 0, 0, 0]
        h["qform_code"], h["sform_code"] = 0, 1

    def nan(h):
        h["srow_x"] = [np.nan, 0, 0, 0]
        h["qform_code"], h["sform_code"] = 0, 1

    for name, patch in (("a_zero", zero), ("b_nan", nan), ("c_ok", lambda h: None)):
        _write_patched(tmp_path / f"{name}.nii", image, patch)
        _write_patched(tmp_path / f"{name}_mask.nii", mask, patch)
    from synthlesion.data.validation import check_dataset

    rows = check_dataset(tmp_path).problems
    codes = {(p.case_id, p.code) for p in rows}
    assert ("a_zero", "affine") in codes and ("b_nan", "affine") in codes
    assert not [p for p in rows if p.case_id == "c_ok"]  # the good case is checked too
    code, _ = run_cli(["check", str(tmp_path)], capsys)
    assert code == 1
    with pytest.raises(ImageReadError, match="voxel size of 0 mm"):
        load_image(tmp_path / "a_zero.nii")


# --- validation at the edge -------------------------------------------------------------------


def test_numeric_options_out_of_range_are_usage_errors(capsys):
    for argv in (
        ["sample", "--model", "m", "--data", "d", "--splits", "s", "--out", "o", "--steps", "0"],
        ["sample", "--model", "m", "--data", "d", "--splits", "s", "--out", "o", "--limit", "-1"],
        ["sample", "--model", "m", "--data", "d", "--splits", "s", "--out", "o",
         "--per-case", "-2"],
        ["sample", "--model", "m", "--data", "d", "--splits", "s", "--out", "o",
         "--batch-size", "0"],
        ["build-dataset", "d", "--splits", "s", "--out", "o", "--synthetic-share", "1.5"],
        ["split", "d", "--out", "s", "--seed", "-3"],
        ["split", "d", "--out", "s", "--patient-pattern", "("],
        ["phantom", "--out", "o", "--lesion-fraction", "nan"],
        ["phantom", "--out", "o", "--size", str(10**9)],
        ["phantom", "--out", "o", "--patients", "0"],
        ["sample", "--model", "m", "--data", "d", "--splits", "s", "--out", "o",
         "--per-case", str(2**40)],
        ["split", "d", "--out", "s", "--folds", "1"],
    ):  # fmt: skip
        code, err = run_cli(argv, capsys)
        assert code == 2, argv
        assert "error: argument" in err


NUMERIC = {
    "sample": ["--per-case", "--lesions-per-case", "--steps", "--seed", "--batch-size",
               "--limit", "--region-label", "--min-border-distance-mm",
               "--min-lesion-distance-mm", "--dilation-mm", "--feather-mm"],
    "split": ["--seed", "--folds"],
    # --patients and --size run the phantom at any valid value: their bounds are tested above
    "phantom": ["--seed", "--lesion-fraction", "--followup-fraction"],
    "build-dataset": ["--synthetic-share", "--seed", "--include-rejected"],
    "check": ["--tolerance-mm", "--outside-body"],
    "train": ["--stop-at-step"],
    "evaluate": ["--threads"],
}  # fmt: skip


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    command=st.sampled_from(sorted(NUMERIC)),
    data=st.data(),
    value=st.one_of(
        st.integers(-(2**40), 2**40).map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.text(max_size=8),
    ),
)
def test_random_numeric_values_never_give_a_traceback(tmp_path, capsys, command, data, value):
    option = data.draw(st.sampled_from(NUMERIC[command]))
    out = tmp_path / "out"
    missing = str(tmp_path / "missing")  # the command stops early after the options
    argv = {
        "sample": ["sample", "--model", missing, "--data", missing, "--splits", missing,
                   "--out", str(out)],
        "split": ["split", missing, "--out", str(out / "s.json")],
        "phantom": ["phantom", "--out", str(out), "--dims", "2", "--patients", "1", "--size",
                    "16"],
        "build-dataset": ["build-dataset", missing, "--splits", missing, "--out", str(out)],
        "check": ["check", missing],
        "train": ["train", "--config", missing],
        "evaluate": ["evaluate", "--config", missing],
    }[command]  # fmt: skip
    code, err = run_cli([*argv, option, value], capsys)
    assert code in (0, 1, 2), err
    outside = [p for p in tmp_path.rglob("*") if out not in (p, *p.parents)]
    assert outside == [], outside


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(blob=st.binary(max_size=2048), gz=st.booleans(), head=st.booleans())
def test_random_bytes_are_an_image_read_error(tmp_path, blob, gz, head):
    if head:  # a valid header followed by random bytes
        blob = nib.Nifti1Image(np.zeros((4, 4, 2), np.int16), np.eye(4)).to_bytes()[:352] + blob
    path = tmp_path / ("x.nii.gz" if gz else "x.nii")
    path.write_bytes(gzip.compress(blob) if gz else blob)
    try:
        load_image(path)
    except (ImageReadError, GeometryError):
        pass


def test_a_gzip_bomb_is_refused_from_its_header(tmp_path):
    raw = nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), np.eye(4)).to_bytes()
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    blob = compressor.compress(raw[:352])
    for _ in range(16):
        blob += compressor.compress(b"\0" * (1 << 24))  # 256 MiB of zeros
    blob += compressor.flush()
    (tmp_path / "bomb.nii.gz").write_bytes(blob)
    with pytest.raises(ImageReadError, match="expands beyond the 864 bytes its NIfTI header"):
        load_image(tmp_path / "bomb.nii.gz")
    (tmp_path / "ok.nii.gz").write_bytes(gzip.compress(raw))
    assert load_image(tmp_path / "ok.nii.gz").shape == (8, 8, 4)


def test_ragged_csv_rows_are_refused_naming_the_line(tmp_path):
    (tmp_path / "a.csv").write_text("case_id,image,mask\nc1,i1.nii.gz,m1.nii.gz,extra\n")
    with pytest.raises(CaseSourceError, match=r"a.csv line 2: 4 fields where the header names 3"):
        load_cases(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text("case_id,image,mask\nc1,i1.nii.gz\n")
    with pytest.raises(CaseSourceError, match=r"b.csv line 2: 2 field\(s\) where the header"):
        load_cases(tmp_path / "b.csv")


def test_a_patient_pattern_must_match_a_case_id(phantom):
    with pytest.raises(CaseSourceError, match="matches none of"):
        load_cases(phantom, patient_pattern=r"zzz_(\d+)")


def test_split_refuses_missing_files_and_warns_on_thin_sides(phantom, tmp_path, capsys, caplog):
    import shutil

    data = tmp_path / "real"
    shutil.copytree(phantom.parent, data)
    victim = sorted((data / "labelsTr").glob("*.nii.gz"))[0]
    victim.unlink()
    code, err = run_cli(["split", str(data), "--out", str(tmp_path / "s.json")], capsys)
    assert code == 1 and victim.name in err and "not locked" in err
    assert not (tmp_path / "s.json").exists()
    two = make_phantom_dataset(tmp_path / "two", kind="ct", spatial_dims=2, n_patients=2, size=32)
    with caplog.at_level("WARNING"):
        assert main(["split", str(two), "--out", str(tmp_path / "t.json")]) == 0
    assert "too few" in caplog.text


# --- declared dependencies --------------------------------------------------------------------


DISTRIBUTION = {"PIL": "pillow", "yaml": "pyyaml", "skimage": "scikit-image"}
OPTIONAL = {"triton": "gpu"}  # imported only by the CUDA kernels, behind a check
EXTRAS_ONLY = {"torchio": ("interop.py", "bench")}  # module, extra that installs it


def test_every_runtime_import_is_a_declared_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {
        req.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower()
        for req in project["dependencies"]
    }
    assert "einops" in declared  # MONAI's 3D attention imports it at use
    for path in sorted((ROOT / "synthlesion").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "synthlesion":
                    continue
                if top in OPTIONAL:
                    assert path.name.startswith("_triton"), f"{path}: {top} outside its kernels"
                    continue
                if top in EXTRAS_ONLY:  # an adapter importing its library lazily, from an extra
                    module, extra = EXTRAS_ONLY[top]
                    assert path.name == module, f"{path}: {top} outside {module}"
                    extras = project["optional-dependencies"][extra]
                    assert any(r.lower().startswith(top) for r in extras), (top, extra)
                    continue
                dist = DISTRIBUTION.get(top, top).lower()
                assert dist in declared, f"{path.relative_to(ROOT)} imports {top}, not declared"


def test_api_options_are_validated_like_the_command_line():
    from synthlesion.errors import ConfigError
    from synthlesion.pipelines.handcrafted import HandcraftedConfig
    from synthlesion.pipelines.sampling import SampleOptions

    for bad in (
        {"steps": 0},
        {"limit": -1},
        {"per_case": -2},
        {"batch_size": 0},
        {"seed": -1},
        {"dilation_mm": float("nan")},
        {"lesion_volume_mm3": (5.0, 1.0)},
    ):
        with pytest.raises(ConfigError, match="sample options"):
            SampleOptions(**bad)  # fmt: skip
    with pytest.raises(ConfigError, match="hand-crafted options"):
        HandcraftedConfig(lesions_per_case=0)
