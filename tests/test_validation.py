"""`synthlesion check`: one row per problem naming case, file and problem; each with a crafted bad file."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from conftest import AFFINE, ct_image, lesion_mask, write_dataset, write_nifti

from synthlesion.cli import main
from synthlesion.data.validation import CheckOptions, check_dataset


def codes(report):
    return sorted((p.case_id, p.code) for p in report.problems)


def test_clean_dataset_checks_clean(clean_case):
    report = check_dataset(clean_case)
    assert report.ok and report.problems == [], report.to_text()
    assert report.n_cases == 1


def _one_case(tmp_path, image, mask, **kwargs):
    return write_dataset(tmp_path / "ds", {"bad": (image, mask)}, **kwargs)


def test_mask_shape_differs(tmp_path):
    report = check_dataset(_one_case(tmp_path, ct_image(), lesion_mask((24, 20, 10), (12, 10, 5))))
    assert codes(report) == [("bad", "shape")]
    assert (
        "(24, 20, 10)" in report.problems[0].message
        and "(24, 20, 12)" in report.problems[0].message
    )
    assert report.problems[0].file.endswith("labelsTr/bad.nii.gz")


def test_mask_spacing_differs(tmp_path):
    mask_affine = AFFINE.copy()
    mask_affine[2, 2] = 3.0
    report = check_dataset(
        _one_case(tmp_path, ct_image(), lesion_mask(), affines={"bad": (AFFINE, mask_affine)})
    )
    assert ("bad", "spacing") in codes(report)


def test_mask_origin_differs_and_tolerance(tmp_path):
    mask_affine = AFFINE.copy()
    mask_affine[0, 3] += 0.01
    path = _one_case(tmp_path, ct_image(), lesion_mask(), affines={"bad": (AFFINE, mask_affine)})
    report = check_dataset(path)
    assert codes(report) == [("bad", "origin")]
    assert report.problems[0].severity == "error"
    assert check_dataset(path, options=CheckOptions(tolerance_mm=0.1)).ok


def test_mask_orientation_differs(tmp_path):
    lps = AFFINE.copy()
    lps[0, 0] = 1.0
    lps[1, 1] = -1.0
    report = check_dataset(
        _one_case(tmp_path, ct_image(), lesion_mask(), affines={"bad": (AFFINE, lps)})
    )
    assert ("bad", "orientation") in codes(report)


def test_mask_direction_differs(tmp_path):
    angle = np.deg2rad(2.0)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    tilted = AFFINE.copy()
    tilted[:3, :3] = rotation @ AFFINE[:3, :3]
    report = check_dataset(
        _one_case(tmp_path, ct_image(), lesion_mask(), affines={"bad": (AFFINE, tilted)})
    )
    assert ("bad", "direction") in codes(report)


def test_qform_sform_disagree(tmp_path):
    path = _one_case(tmp_path, ct_image(), lesion_mask())
    image_path = path.parent / "imagesTr" / "bad_0000.nii.gz"
    image = nib.load(str(image_path))
    shifted = AFFINE.copy()
    shifted[:3, 3] += 60
    fresh = nib.Nifti1Image(np.asarray(image.dataobj), AFFINE)
    fresh.header.set_qform(shifted, code=1)
    fresh.header.set_sform(AFFINE, code=1)
    nib.save(fresh, str(image_path))
    assert ("bad", "qform_sform") in codes(check_dataset(path))


@pytest.mark.parametrize("value", [255, 4, -1024])
def test_undeclared_label_values(tmp_path, value):
    mask = lesion_mask().astype(np.int16)
    mask[0, 0, 0] = value
    report = check_dataset(_one_case(tmp_path, ct_image(), mask))
    assert codes(report) == [("bad", "undeclared_labels")]
    assert str(value) in report.problems[0].message


def test_fractional_mask_is_never_rounded(tmp_path):
    mask = lesion_mask().astype(np.float32)
    mask[mask > 0] = 0.7
    report = check_dataset(_one_case(tmp_path, ct_image(), mask))
    assert codes(report) == [("bad", "fractional")]
    assert "0.7" in report.problems[0].message


def test_float_mask_with_whole_values_is_fine(tmp_path):
    assert check_dataset(_one_case(tmp_path, ct_image(), lesion_mask().astype(np.float32))).ok


def test_all_background_mask_policy(tmp_path):
    path = _one_case(tmp_path, ct_image(), np.zeros((24, 20, 12), np.uint8))
    assert codes(check_dataset(path)) == [("bad", "empty_mask")]
    warn = check_dataset(path, options=CheckOptions(empty_mask="warn"))
    assert warn.ok and warn.problems[0].severity == "warning"
    assert check_dataset(path, options=CheckOptions(empty_mask="ignore")).problems == []


def test_lesion_outside_body(tmp_path):
    report = check_dataset(_one_case(tmp_path, ct_image(), lesion_mask(centre=(1, 1, 1), radius=2)))
    assert codes(report) == [("bad", "lesion_outside_body")]
    assert "%" in report.problems[0].message


def test_nan_and_inf_voxels(tmp_path):
    image = ct_image().astype(np.float32)
    image[0, 0, 0] = np.nan
    image[1, 0, 0] = np.inf
    image[2, 0, 0] = -np.inf
    report = check_dataset(_one_case(tmp_path, image, lesion_mask()))
    assert codes(report) == [("bad", "non_finite")]
    assert "1 NaN and 2 Inf" in report.problems[0].message


def test_4d_image(tmp_path):
    report = check_dataset(_one_case(tmp_path, np.stack([ct_image()] * 3, -1), lesion_mask()))
    assert codes(report) == [("bad", "dimensions")]


def test_truncated_and_corrupt_files(tmp_path):
    path = write_dataset(
        tmp_path / "ds", {"trunc": (ct_image(), lesion_mask()), "crc": (ct_image(), lesion_mask())}
    )
    trunc = path.parent / "imagesTr" / "trunc_0000.nii.gz"
    trunc.write_bytes(trunc.read_bytes()[:200])
    crc = path.parent / "labelsTr" / "crc.nii.gz"
    data = bytearray(crc.read_bytes())
    data[-5] ^= 0x01
    crc.write_bytes(bytes(data))
    report = check_dataset(path)
    assert codes(report) == [("crc", "corrupt"), ("trunc", "truncated")]


def test_duplicate_case_ids_ignoring_case(tmp_path):
    root = tmp_path / "ds"
    path = write_dataset(
        root, {"Case1": (ct_image(), lesion_mask()), "case1": (ct_image(), lesion_mask())}
    )
    report = check_dataset(path)
    assert [p.code for p in report.problems] == ["duplicate_case_id"]
    assert "Case1" in report.problems[0].message and "case1" in report.problems[0].message


def test_missing_file(tmp_path):
    path = _one_case(tmp_path, ct_image(), lesion_mask())
    (path.parent / "labelsTr" / "bad.nii.gz").unlink()
    assert codes(check_dataset(path)) == [("bad", "missing")]


def test_cli_folder_of_bad_cases_prints_one_row_each_and_exits_1(tmp_path, capsys):
    shape = (24, 20, 12)
    frac = lesion_mask().astype(np.float32) * 0.5
    labels255 = lesion_mask() * 255
    path = write_dataset(
        tmp_path / "ds",
        {
            "good": (ct_image(), lesion_mask()),
            "shape": (ct_image(), lesion_mask((24, 20, 11), (12, 10, 5))),
            "frac": (ct_image(), frac),
            "labels": (ct_image(), labels255),
            "empty": (ct_image(), np.zeros(shape, np.uint8)),
            "outside": (ct_image(), lesion_mask(centre=(1, 1, 1), radius=2)),
        },
    )
    status = main(["check", str(path.parent)])
    out = capsys.readouterr().out
    assert status == 1
    rows = [line for line in out.splitlines() if line.startswith("ERROR")]
    assert len(rows) == 5
    for case_id, code in [
        ("shape", "shape"),
        ("frac", "fractional"),
        ("labels", "undeclared_labels"),
        ("empty", "empty_mask"),
        ("outside", "lesion_outside_body"),
    ]:
        assert any(
            f" {case_id} " in r and f"[{code}]" in r and f"labelsTr/{case_id}.nii.gz" in r
            for r in rows
        )
    assert main(["check", str(path), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert len(data["problems"]) == 5 and data["ok"] is False


def test_cli_exit_codes(clean_case, tmp_path, capsys):
    assert main(["check", str(clean_case)]) == 0
    assert "clean" in capsys.readouterr().out
    assert main(["check"]) == 2
    assert main(["check", str(tmp_path / "missing.json")]) == 1


def test_manifest_and_paired_folder_sources_are_checked(tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    write_nifti(folder / "a.nii.gz", ct_image())
    write_nifti(folder / "a_mask.nii.gz", lesion_mask())
    write_nifti(folder / "b.nii.gz", ct_image())
    write_nifti(folder / "b_seg.nii.gz", lesion_mask((24, 20, 10), (12, 10, 5)))
    assert codes(check_dataset(folder)) == [("b", "shape")]
    manifest = tmp_path / "m.csv"
    manifest.write_text("case_id,patient_id,image,mask\nx,p1,pairs/a.nii.gz,pairs/a_mask.nii.gz\n")
    assert check_dataset(manifest).ok
