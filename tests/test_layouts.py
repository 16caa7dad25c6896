"""Real-world dataset layouts and geometry: nnU-Net v1 channel files, MSD 4D images, suffix-paired
folders, masks stored in another axis order, 2D images with (X, Y, 1) masks, float label maps and
header form codes kept on write. Every test writes real NIfTI files with nibabel."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import AFFINE, ct_image, lesion_mask, write_dataset, write_nifti

from synthlesion.data.io import load_image, load_mask_for, save_image
from synthlesion.data.sources import load_cases, load_decathlon, load_paired_folder
from synthlesion.data.validation import check_dataset
from synthlesion.data.volume import Volume, align_to_grid, geometry_differences
from synthlesion.errors import CaseSourceError, GeometryError

SHAPE = (24, 20, 12)
# LPS+: the first axis points left (-x), the second posterior (-y), the third superior
LPS = np.array([[-0.8, 0, 0, 40.0], [0, -0.9, 0, 30.0], [0, 0, 2.5, -60.0], [0, 0, 0, 1]])


def codes(report):
    return sorted((p.case_id, p.code) for p in report.problems)


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    return write_nifti(path, array, affine)


# --- nnU-Net v1 and MSD dataset.json -------------------------------------------------------


def _nnunet_v1(root: Path, cases: list[str], *, skip: tuple[str, int] | None = None) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for case_id in cases:
        for channel in range(2):
            if skip == (case_id, channel):
                continue
            _nifti(root / "imagesTr" / f"{case_id}_{channel:04d}.nii.gz", ct_image(seed=channel))
        _nifti(root / "labelsTr" / f"{case_id}.nii.gz", lesion_mask())
        training.append(
            {"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"}
        )
    spec = {
        "name": "v1",
        "modality": {"0": "T2", "1": "ADC"},
        "labels": {"0": "background", "1": "lesion"},
        "numTraining": len(training),
        "training": training,
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(spec))
    return root / "dataset.json"


def test_nnunet_v1_dataset_json_finds_channel_files(tmp_path):
    root = tmp_path / "Task01"
    _nnunet_v1(root, ["prostate_00", "prostate_01"])
    cases = load_cases(root)
    assert [c.case_id for c in cases] == ["prostate_00", "prostate_01"]
    case = cases[0]
    assert case.images == (
        root / "imagesTr" / "prostate_00_0000.nii.gz",
        root / "imagesTr" / "prostate_00_0001.nii.gz",
    )
    assert case.mask == root / "labelsTr" / "prostate_00.nii.gz"
    assert case.modalities == ("T2", "ADC") and case.modality == "T2"
    assert all(p.exists() for c in cases for p in c.images)
    report = check_dataset(root)
    assert report.ok and report.problems == [], report.to_text()


def test_nnunet_v1_missing_channel_names_case_and_file(tmp_path):
    root = tmp_path / "Task02"
    _nnunet_v1(root, ["a", "b"], skip=("b", 1))
    with pytest.raises(CaseSourceError, match=r"case b\).*b_0001\.nii\.gz"):
        load_decathlon(root / "dataset.json")


def test_nnunet_v2_scan_missing_channel_is_an_error(tmp_path):
    root = tmp_path / "v2"
    write_dataset(root, {"c1": (ct_image(), lesion_mask())})
    spec = json.loads((root / "dataset.json").read_text())
    del spec["training"]
    spec["channel_names"] = {"0": "T1", "1": "T2"}
    (root / "dataset.json").write_text(json.dumps(spec))
    with pytest.raises(CaseSourceError, match=r"case c1\).*c1_0001\.nii\.gz"):
        load_cases(root)


def test_msd_4d_image_stays_one_path_with_all_channel_names(tmp_path):
    root = tmp_path / "Task01_BrainTumour"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    _nifti(root / "imagesTr" / "BRATS_001.nii.gz", np.stack([ct_image()] * 4, axis=-1))
    _nifti(root / "labelsTr" / "BRATS_001.nii.gz", lesion_mask())
    spec = {
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing", "3": "enhancing"},
        "training": [
            {"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}
        ],
    }
    (root / "dataset.json").write_text(json.dumps(spec))
    (case,) = load_cases(root)
    assert case.case_id == "BRATS_001"
    assert case.images == (root / "imagesTr" / "BRATS_001.nii.gz",)
    assert case.modalities == ("FLAIR", "T1w", "t1gd", "T2w")


# --- suffix-paired folders ----------------------------------------------------------------


def test_suffix_folder_with_two_channels_and_masks(tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    for case_id, mask_suffix in (("sub_01", "mask"), ("sub_02", "seg")):
        _nifti(folder / f"{case_id}_t1.nii.gz", ct_image(seed=1))
        _nifti(folder / f"{case_id}_flair.nii.gz", ct_image(seed=2))
        _nifti(folder / f"{case_id}_{mask_suffix}.nii.gz", lesion_mask())
    _nifti(folder / "sub_03_t1.nii.gz", ct_image())  # unlabelled, both channels
    _nifti(folder / "sub_03_flair.nii.gz", ct_image())
    cases = load_paired_folder(folder, modality="MRI")
    assert [c.case_id for c in cases] == ["sub_01", "sub_02", "sub_03"]
    first = cases[0]
    assert first.images == (folder / "sub_01_flair.nii.gz", folder / "sub_01_t1.nii.gz")
    assert first.modalities == ("flair", "t1") and first.modality == "MRI"
    assert first.mask == folder / "sub_01_mask.nii.gz"
    assert cases[1].mask == folder / "sub_02_seg.nii.gz"
    assert cases[2].mask is None and len(cases[2].images) == 2
    assert check_dataset(folder).ok


def test_plain_image_and_mask_stay_one_single_channel_case(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    _nifti(folder / "case1.nii.gz", ct_image())
    _nifti(folder / "case1_seg.nii.gz", lesion_mask())
    _nifti(folder / "liver_007.nii.gz", ct_image())
    _nifti(folder / "liver_007_MASK.nii.gz", lesion_mask())
    _nifti(folder / "liver_009.nii.gz", ct_image())  # unlabelled, underscore in its id
    cases = load_paired_folder(folder)
    assert [c.case_id for c in cases] == ["case1", "liver_007", "liver_009"]
    assert cases[0].images == (folder / "case1.nii.gz",)
    assert cases[0].mask == folder / "case1_seg.nii.gz"
    assert cases[1].mask == folder / "liver_007_MASK.nii.gz"
    assert cases[2].mask is None and cases[2].images == (folder / "liver_009.nii.gz",)
    assert all(c.modalities == ("unknown",) for c in cases)


def test_a_mask_is_never_a_case(tmp_path):
    folder = tmp_path / "orphan"
    folder.mkdir()
    _nifti(folder / "case1.nii.gz", ct_image())
    _nifti(folder / "case1_seg.nii.gz", lesion_mask())
    assert [c.case_id for c in load_cases(folder)] == ["case1"]
    _nifti(folder / "case2_seg.nii.gz", lesion_mask())  # its image is missing
    with pytest.raises(
        CaseSourceError, match=r"case case2\): mask case2_seg\.nii\.gz has no image"
    ):
        load_cases(folder)


@pytest.mark.parametrize(
    ("files", "match"),
    [
        # some cases have channel suffixes, others do not
        (["a", "a_mask", "b_t1", "b_flair", "b_mask"], r"case b\).*differ from case a"),
        # different channel sets
        (["a_t1", "a_flair", "a_mask", "b_t1", "b_t2", "b_mask"], r"case b\).*_t1, _t2"),
        # one case with and without a channel suffix
        (["a", "a_t1", "a_mask"], r"case a\): both a file without channel suffix"),
        # two masks
        (["a", "a_mask", "a_seg"], r"case a\): two masks"),
        # unlabelled case missing a channel
        (["a_t1", "a_flair", "a_mask", "b_t1"], r"case b\): channel file\(s\) missing: b_flair"),
        # unlabelled image with no known channel suffix in a multi-channel folder
        (["a_t1", "a_flair", "a_mask", "b"], r"b\.nii\.gz has no mask and no channel suffix"),
        # no masks, names that look multi-channel
        (["p1_t1", "p1_flair", "p2_t1", "p2_flair"], "look like multi-channel"),
    ],
)
def test_ambiguous_folders_are_refused(tmp_path, files, match):
    folder = tmp_path / "ambiguous"
    folder.mkdir()
    for stem in files:
        _nifti(folder / f"{stem}.nii.gz", lesion_mask() if "mask" in stem else ct_image())
    with pytest.raises(CaseSourceError, match=match):
        load_paired_folder(folder)


def test_nii_and_nii_gz_of_one_name_are_refused(tmp_path):
    folder = tmp_path / "dup"
    folder.mkdir()
    _nifti(folder / "a.nii.gz", ct_image())
    _nifti(folder / "a.nii", ct_image())
    with pytest.raises(CaseSourceError, match="share the name 'a'"):
        load_paired_folder(folder)


# --- masks stored in another axis order -----------------------------------------------------


def _stored_as(array: np.ndarray, affine: np.ndarray, axes, flips):
    """The same grid stored with stored axis ``axes[i]`` = reference axis ``i`` and reference
    axes ``flips`` reversed (returns the stored array and its affine)."""
    moved = np.flip(array, axis=flips) if flips else array
    stored = np.transpose(moved, np.argsort(axes))
    index = np.zeros((4, 4))
    index[3, 3] = 1
    shape = array.shape
    for i, a in enumerate(axes):
        # reference index v_i = stored index w_a (or shape_i - 1 - w_a when flipped)
        index[i, a] = -1 if i in flips else 1
        index[i, 3] = shape[i] - 1 if i in flips else 0
    return np.ascontiguousarray(stored), affine @ index


@pytest.mark.parametrize(
    ("axes", "flips"),
    [((0, 1, 2), (0, 1)), ((2, 0, 1), ()), ((1, 2, 0), (0, 2)), ((2, 1, 0), (0, 1, 2))],
)
def test_lps_image_with_mask_in_another_axis_order_is_aligned_exactly(tmp_path, axes, flips):
    image_path = _nifti(tmp_path / "image.nii.gz", ct_image(), LPS)
    voxel = (3, 5, 7)
    world = LPS @ np.array([*voxel, 1.0])
    labels = np.zeros(SHAPE, np.uint8)
    labels[voxel] = 2
    stored, stored_affine = _stored_as(labels, LPS, axes, flips)
    mask_path = _nifti(tmp_path / "mask.nii.gz", stored, stored_affine)
    # the labelled voxel sits at the same world position in the stored file
    raw = nib.load(str(mask_path))
    where = np.argwhere(np.asarray(raw.dataobj) == 2)[0]
    np.testing.assert_allclose(raw.affine @ np.array([*where, 1.0]), world, atol=1e-4)
    if (axes, flips) == ((0, 1, 2), (0, 1)):
        assert "".join(nib.aff2axcodes(raw.affine)) == "RAS"

    image = load_image(image_path)
    mask = load_mask_for(image, mask_path)
    assert mask.shape == image.shape
    np.testing.assert_array_equal(mask.affine, image.affine)
    assert mask.array[voxel] == 2 and int(mask.array.sum()) == 2
    np.testing.assert_allclose(mask.affine @ np.array([*voxel, 1.0]), world)
    assert mask.array.dtype == np.uint8
    assert mask.meta["stored_axis_order"]["orientation"] == "".join(nib.aff2axcodes(raw.affine))
    assert mask.source == mask_path
    # the aligned mask writes back on the image grid, form codes kept
    out = save_image(mask, tmp_path / "aligned.nii.gz")
    again = load_image(out)
    assert geometry_differences(image, again) == []
    assert int(again.header["qform_code"]) == 1 and int(again.header["sform_code"]) == 1
    np.testing.assert_array_equal(again.array, mask.array)

    # `synthlesion check` accepts it with a warning only
    root = tmp_path / "ds"
    write_dataset(root, {"c": (ct_image(), lesion_mask())})
    _nifti(root / "imagesTr" / "c_0000.nii.gz", ct_image(), LPS)
    stored, stored_affine = _stored_as(lesion_mask(), LPS, axes, flips)
    _nifti(root / "labelsTr" / "c.nii.gz", stored, stored_affine)
    report = check_dataset(root)
    assert report.ok, report.to_text()
    assert [(p.code, p.severity) for p in report.problems] == [("mask_axis_order", "warning")]


def test_identical_grid_returns_the_mask_itself():
    image = Volume(ct_image(), LPS)
    mask = Volume(lesion_mask(), LPS.copy())
    assert align_to_grid(image, mask) is mask


def test_shifted_mask_is_refused_naming_the_file(tmp_path):
    image_path = _nifti(tmp_path / "image.nii.gz", ct_image(), LPS)
    stored, stored_affine = _stored_as(lesion_mask(), LPS, (0, 1, 2), (0, 1))
    stored_affine[0, 3] += 2.0  # 2 mm to the right
    mask_path = _nifti(tmp_path / "shifted_mask.nii.gz", stored, stored_affine)
    image = load_image(image_path)
    with pytest.raises(GeometryError) as info:
        load_mask_for(image, mask_path)
    message = str(info.value)
    assert "shifted_mask.nii.gz" in message and "image.nii.gz" in message
    assert "origin" in message and "max difference 2 mm" in message

    root = tmp_path / "ds"
    write_dataset(root, {"c": (ct_image(), lesion_mask())})
    _nifti(root / "imagesTr" / "c_0000.nii.gz", ct_image(), LPS)
    _nifti(root / "labelsTr" / "c.nii.gz", stored, stored_affine)
    report = check_dataset(root)
    assert not report.ok
    assert ("c", "origin") in codes(report)
    assert all(p.file.endswith("labelsTr/c.nii.gz") for p in report.problems)


def test_same_orientation_shift_and_spacing_still_refused():
    image = Volume(ct_image(), LPS)
    moved = LPS.copy()
    moved[2, 3] += 0.5
    with pytest.raises(GeometryError, match="origin"):
        align_to_grid(image, Volume(lesion_mask(), moved))
    thicker = LPS.copy()
    thicker[2, 2] = 3.0
    with pytest.raises(GeometryError, match="spacing"):
        align_to_grid(image, Volume(lesion_mask(), thicker))
    with pytest.raises(GeometryError, match="shape"):
        align_to_grid(image, Volume(lesion_mask((24, 20, 10), (12, 10, 5)), LPS))


# --- 2D images ----------------------------------------------------------------------------


def _ct_slice(shape=(16, 12)) -> np.ndarray:
    """A 2D CT-like int16 slice: air around a disc of soft tissue."""
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    body = sum(g**2 for g in grid) < 0.8
    noise = np.random.default_rng(0).normal(0, 10, shape)
    return (np.where(body, 40, -1000) + noise).astype(np.int16)


def test_2d_image_with_xy1_mask_and_the_reverse(tmp_path):
    image2d = _ct_slice()
    mask3d = lesion_mask((16, 12, 1), (8, 6, 0), 2)
    image_path = _nifti(tmp_path / "slice.nii.gz", image2d)
    mask_path = _nifti(tmp_path / "slice_mask.nii.gz", mask3d)
    image = load_image(image_path)
    assert image.shape == (16, 12)
    assert load_image(mask_path).shape == (16, 12, 1)
    mask = load_mask_for(image, mask_path)
    assert mask.shape == (16, 12)
    np.testing.assert_array_equal(mask.array, mask3d[..., 0])
    assert "stored_axis_order" not in mask.meta

    # the reverse: a one-slice 3D image with a 2D mask
    image3d = Volume(image2d[..., None], AFFINE)
    mask2d_path = _nifti(tmp_path / "flat_mask.nii.gz", mask3d[..., 0])
    mask = load_mask_for(image3d, mask2d_path)
    assert mask.shape == (16, 12, 1)
    np.testing.assert_array_equal(mask.array, mask3d)

    # a real in-plane shift is still an error
    shifted = AFFINE.copy()
    shifted[1, 3] += 2.0
    bad_path = _nifti(tmp_path / "bad_mask.nii.gz", mask3d, shifted)
    with pytest.raises(GeometryError, match=r"bad_mask\.nii\.gz.*origin"):
        load_mask_for(image, bad_path)

    # and `synthlesion check` agrees
    folder = tmp_path / "pairs"
    folder.mkdir()
    _nifti(folder / "s.nii.gz", image2d)
    _nifti(folder / "s_mask.nii.gz", mask3d)
    report = check_dataset(folder)
    assert report.ok and report.problems == [], report.to_text()


# --- float label maps ---------------------------------------------------------------------


def test_float32_label_map_with_whole_values_is_accepted(tmp_path):
    labels = {"background": 0, "a": 1, "b": 2, "c": 3, "lesion": 4}
    mask = np.zeros(SHAPE, np.float32)
    for value in range(1, 5):
        mask[10 + value, 8:12, 4:8] = value
    path = write_dataset(tmp_path / "ds", {"f": (ct_image(), mask)}, labels=labels)
    report = check_dataset(path)
    assert report.ok and report.problems == [], report.to_text()
    mask[10, 10, 6] = 2.5
    path = write_dataset(tmp_path / "ds2", {"f": (ct_image(), mask)}, labels=labels)
    assert codes(check_dataset(path)) == [("f", "fractional")]


# --- header form codes kept on write --------------------------------------------------------


@pytest.mark.parametrize(("qcode", "scode"), [(1, 1), (0, 1), (2, 2), (1, 0), (0, 4)])
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_save_image_keeps_form_codes_affine_and_dtype(tmp_path, qcode, scode, dtype):
    array = ct_image().astype(dtype)
    source = nib.Nifti1Image(array, LPS)
    source.header.set_qform(LPS, code=qcode)
    source.header.set_sform(LPS, code=scode)
    source.set_data_dtype(dtype)
    path = tmp_path / "source.nii.gz"
    nib.save(source, str(path))
    assert int(nib.load(str(path)).header["qform_code"]) == qcode

    volume = load_image(path)
    assert volume.orientation == "LPS"
    out = save_image(volume, tmp_path / "copy.nii.gz")
    written = nib.load(str(out))
    assert int(written.header["qform_code"]) == qcode
    assert int(written.header["sform_code"]) == scode
    np.testing.assert_allclose(written.affine, LPS, atol=1e-5)
    assert written.get_data_dtype() == dtype
    again = load_image(out)
    np.testing.assert_allclose(again.affine, volume.affine, atol=1e-5)
    np.testing.assert_array_equal(again.array, volume.array)
    assert again.array.dtype == dtype


def test_save_image_without_header_writes_codes_1(tmp_path):
    out = save_image(Volume(np.zeros((3, 4, 5), np.uint8), LPS), tmp_path / "v.nii")
    header = nib.load(str(out)).header
    assert (int(header["qform_code"]), int(header["sform_code"])) == (1, 1)
    np.testing.assert_allclose(nib.load(str(out)).affine, LPS, atol=1e-5)
