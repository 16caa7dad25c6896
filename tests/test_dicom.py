"""Tests for reading DICOM series folders (synthlesion.data.dicom).

Series are built from the slices shipped inside the installed pydicom package (read from its
``data/test_files`` folder directly, so nothing is ever downloaded): one slice is copied N times
with new positions along a known direction, new SOPInstanceUIDs, and file names and
InstanceNumbers shuffled so that neither gives the position order.
"""

from __future__ import annotations

import copy
import logging
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import generate_uid

from synthlesion.data.dicom import load_dicom_series, save_dicom_series
from synthlesion.data.io import load_image, save_image
from synthlesion.data.volume import Volume
from synthlesion.errors import DicomSeriesError, ImageReadError

with warnings.catch_warnings():  # nibabel flags its DICOM readers as experimental on import
    warnings.simplefilter("ignore", UserWarning)
    from nibabel.nicom.dicomwrappers import wrapper_from_data

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
CT = TEST_FILES / "CT_small.dcm"  # 128x128 int16, PixelSpacing 0.661468, intercept -1024
MR = TEST_FILES / "MR_small.dcm"  # 64x64 int16, no rescale, SliceThickness 0.8
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
MARKER = (2, 5)  # (row, column) of a pixel set to 1000 + slice index in every written slice

if not CT.is_file() or not MR.is_file():  # pragma: no cover - depends on the pydicom build
    pytest.skip("pydicom's bundled test slices are not installed", allow_module_level=True)


def rotation(axis: Sequence[float], degrees: float) -> np.ndarray:
    """Rotation matrix (Rodrigues) about ``axis``."""
    a = np.asarray(axis, dtype=float)
    a = a / np.linalg.norm(a)
    t = np.deg2rad(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


OBLIQUE = rotation((1.0, 2.0, 3.0), 25.0)


def write_series(
    folder: Path,
    *,
    source: Path = CT,
    n: int = 6,
    row: Sequence[float] = (1.0, 0.0, 0.0),
    col: Sequence[float] = (0.0, 1.0, 0.0),
    step: float = 2.5,
    offsets: Sequence[float] | None = None,
    origin: Sequence[float] = (-80.25, -95.5, 30.125),
    pixel_spacing: Sequence[float] | None = None,
    skip: Sequence[int] = (),
    series_uid: str | None = None,
    description: str = "AX TEST",
    edit: dict[int, Callable[[pydicom.Dataset], None]] | None = None,
    seed: int = 0,
    prefix: str = "IM",
) -> list[dict]:
    """Write a series of copies of ``source`` into ``folder``; return one record per file.

    Slice k lies at ``origin + offsets[k] * (row x col)`` (``offsets`` defaults to
    ``k * step``). Records are in position order and hold ``name``, ``k`` and ``position``
    (LPS mm, as written).
    """
    folder.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(source)
    pixels = base.pixel_array
    row_v, col_v = np.asarray(row, dtype=float), np.asarray(col, dtype=float)
    normal = np.cross(row_v, col_v)
    offsets = [k * step for k in range(n)] if offsets is None else list(offsets)
    rng = np.random.default_rng(seed)
    # Neither the file names nor the InstanceNumbers follow the position order.
    name_rank = rng.permutation(len(offsets))
    while len(offsets) > 2 and (np.all(np.diff(name_rank) > 0) or np.all(np.diff(name_rank) < 0)):
        name_rank = rng.permutation(len(offsets))
    instance = rng.permutation(len(offsets)) + 1
    uid = series_uid or generate_uid()
    records = []
    for k, offset in enumerate(offsets):
        if k in skip:
            continue
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID = uid
        ds.SeriesDescription = description
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = int(instance[k])
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_v, *col_v)]
        position = np.asarray(origin, dtype=float) + offset * normal
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
        if pixel_spacing is not None:
            ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
        slice_pixels = pixels.copy()
        slice_pixels[MARKER] = 1000 + k
        ds.PixelData = slice_pixels.tobytes()
        if edit and k in edit:
            edit[k](ds)
        name = f"{prefix}{int(name_rank[k]):04d}.dcm"
        ds.save_as(folder / name)
        records.append(
            {
                "name": name,
                "k": k,
                "position": np.array([float(v) for v in ds.ImagePositionPatient]),
            }
        )
    return records


def expected_ras(
    origin: np.ndarray,
    row: np.ndarray,
    col: np.ndarray,
    pixel_spacing: Sequence[float],
    step: float,
    ijk: Sequence[int],
) -> np.ndarray:
    """Hand computation of the RAS position of voxel (i, j, k).

    i counts columns (moves along ``row``, by PixelSpacing[1]); j counts rows (moves along
    ``col``, by PixelSpacing[0]); k moves along row x col by ``step``. DICOM is LPS, so the
    first two coordinates change sign.
    """
    i, j, k = ijk
    lps = origin + i * pixel_spacing[1] * row + j * pixel_spacing[0] * col
    lps = lps + k * step * np.cross(row, col)
    return lps * np.array([-1.0, -1.0, 1.0])


def voxel_to_world(affine: np.ndarray, ijk: Sequence[int]) -> np.ndarray:
    return (affine @ np.array([*ijk, 1.0]))[:3]


# --- geometry and values ------------------------------------------------------------------


def test_axial_ct_spacing_orientation_values(tmp_path: Path) -> None:
    records = write_series(tmp_path / "ct", n=6, step=2.5)
    volume = load_dicom_series(tmp_path / "ct")
    base = pydicom.dcmread(CT)
    assert volume.shape == (128, 128, 6)
    assert volume.spacing == pytest.approx((0.661468, 0.661468, 2.5), abs=1e-6)
    # Axial IOP (1,0,0,0,1,0): axis 0 towards patient left, axis 1 posterior, axis 2 superior.
    assert volume.orientation == "LPS"
    assert volume.array.dtype == np.int16
    expected = base.pixel_array.astype(np.int32) - 1024  # RescaleIntercept -1024 -> HU
    for k in range(6):
        got = volume.array[:, :, k].T.astype(np.int32)
        assert got[MARKER] == 1000 + k - 1024
        got[MARKER] = expected[MARKER]
        np.testing.assert_array_equal(got, expected)
    assert volume.array.min() == base.pixel_array.min() - 1024  # HU, not stored values
    assert volume.source == tmp_path / "ct"
    assert volume.meta["Modality"] == "CT"
    assert volume.meta["PatientID"] == "1CT1"
    assert volume.meta["SeriesDescription"] == "AX TEST"
    assert [Path(f).name for f in volume.meta["files"]] == [r["name"] for r in records]
    assert volume.meta["rescale_intercept"] == -1024.0
    np.testing.assert_allclose(volume.origin, records[0]["position"] * [-1, -1, 1], atol=1e-6)


def test_array_axis0_runs_along_a_row(tmp_path: Path) -> None:
    write_series(tmp_path / "s", n=3)
    volume = load_dicom_series(tmp_path / "s")
    row, column = MARKER
    # The marker sits at DICOM (row 2, column 5): NIfTI-like layout puts it at [5, 2, k].
    assert [int(volume.array[column, row, k]) for k in range(3)] == [-24, -23, -22]


@pytest.mark.parametrize("source", [CT, MR], ids=["CT", "MR"])
def test_oblique_non_square_affine_matches_hand_computation(tmp_path: Path, source: Path) -> None:
    row, col = OBLIQUE[:, 0], OBLIQUE[:, 1]
    spacing = (0.5, 0.8)  # (between rows, between columns): axis 0 gets 0.8, axis 1 gets 0.5
    records = write_series(
        tmp_path / "obl", source=source, n=5, row=row, col=col, step=1.7, pixel_spacing=spacing
    )
    volume = load_dicom_series(tmp_path / "obl")
    columns, rows = volume.shape[:2]
    assert volume.spacing == pytest.approx((0.8, 0.5, 1.7), abs=1e-5)
    origin = records[0]["position"]
    for ijk in [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (columns - 1, rows - 1, 4), (7, 3, 2)]:
        want = expected_ras(origin, row, col, spacing, 1.7, ijk)
        np.testing.assert_allclose(voxel_to_world(volume.affine, ijk), want, atol=2e-3)
    hand = np.eye(4)
    hand[:3, :3] = np.stack([row * 0.8, col * 0.5, np.cross(row, col) * 1.7], axis=1)
    hand = LPS_TO_RAS @ hand
    assert volume.orientation == "".join(nib.aff2axcodes(hand))
    assert np.linalg.det(volume.affine[:3, :3]) > 0


def test_affine_agrees_with_nibabel_dicom_wrappers(tmp_path: Path) -> None:
    """Independent reference: nibabel's per-slice DICOM affine.

    nibabel's ``Wrapper.affine`` is in LPS and indexes the pixel array as DICOM does
    (index 0 = row number, moving along the column cosine; index 1 = column number, moving
    along the row cosine). So our voxel (i, j, k) is nibabel's voxel (j, i, 0) of slice k's
    file, after negating x and y. Its third column points along col x row (opposite to ours)
    and is not used here: slice k's own ImagePositionPatient places it.
    """
    row, col = OBLIQUE[:, 0], OBLIQUE[:, 1]
    records = write_series(
        tmp_path / "obl", n=4, row=row, col=col, step=3.0, pixel_spacing=(0.6, 0.9)
    )
    volume = load_dicom_series(tmp_path / "obl")
    for record in records:
        wrapper = wrapper_from_data(pydicom.dcmread(tmp_path / "obl" / record["name"]))
        for i, j in [(0, 0), (10, 0), (0, 20), (127, 127), (33, 90)]:
            reference = (LPS_TO_RAS @ wrapper.affine @ [j, i, 0, 1.0])[:3]
            np.testing.assert_allclose(
                voxel_to_world(volume.affine, (i, j, record["k"])), reference, atol=2e-3
            )


def test_single_slice_uses_slice_spacing_and_matches_nibabel(tmp_path: Path) -> None:
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(CT, folder / "only.dcm")
    volume = load_dicom_series(folder)
    assert volume.shape == (128, 128, 1)
    assert volume.spacing == pytest.approx((0.661468, 0.661468, 5.0))  # SpacingBetweenSlices
    # nibabel (LPS, axes row-number, column-number, col x row): swap its first two columns,
    # negate its third (our normal is row x col), convert to RAS; then the affines are equal.
    reference = wrapper_from_data(pydicom.dcmread(CT)).affine[:, [1, 0, 2, 3]]
    reference[:3, 2] *= -1
    np.testing.assert_allclose(volume.affine, LPS_TO_RAS @ reference, atol=1e-6)


def test_single_mr_slice_uses_slice_thickness(tmp_path: Path) -> None:
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(MR, folder / "mr.dcm")
    volume = load_dicom_series(folder)
    assert volume.spacing == pytest.approx((0.3125, 0.3125, 0.8))  # no SpacingBetweenSlices
    assert volume.array.dtype == np.int16
    np.testing.assert_array_equal(volume.array[:, :, 0], pydicom.dcmread(MR).pixel_array.T)


def test_sort_is_by_position_not_file_name_or_instance_number(tmp_path: Path) -> None:
    row, col = OBLIQUE[:, 0], OBLIQUE[:, 1]
    records = write_series(tmp_path / "s", n=7, row=row, col=col, step=2.0, seed=3)
    names = [r["name"] for r in records]
    numbers = [int(pydicom.dcmread(tmp_path / "s" / name).InstanceNumber) for name in names]
    assert names != sorted(names) and names != sorted(names, reverse=True)
    assert numbers != sorted(numbers) and numbers != sorted(numbers, reverse=True)
    volume = load_dicom_series(tmp_path / "s")
    assert [Path(f).name for f in volume.meta["files"]] == names
    column, row_index = MARKER[1], MARKER[0]
    assert [int(v) for v in volume.array[column, row_index, :]] == [
        1000 + k - 1024 for k in range(7)
    ]
    assert np.all(np.diff(volume.meta["slice_positions_mm"]) == pytest.approx(2.0, abs=1e-3))


def test_small_position_jitter_within_tolerance_is_accepted(tmp_path: Path) -> None:
    offsets = [0.0, 2.503, 4.998, 7.504, 10.0]
    write_series(tmp_path / "s", n=5, offsets=offsets)
    volume = load_dicom_series(tmp_path / "s")
    assert volume.spacing[2] == pytest.approx(2.5, abs=1e-3)


# --- rescale and dtype --------------------------------------------------------------------


def test_fractional_slope_gives_float32(tmp_path: Path) -> None:
    def half(ds: pydicom.Dataset) -> None:
        ds.RescaleSlope = "0.5"

    write_series(tmp_path / "s", n=3, edit={k: half for k in range(3)})
    volume = load_dicom_series(tmp_path / "s")
    assert volume.array.dtype == np.float32
    stored = pydicom.dcmread(CT).pixel_array
    np.testing.assert_allclose(volume.array[:, :, 0].T[10:], stored[10:] * 0.5 - 1024)


def test_values_outside_int16_give_float32(tmp_path: Path) -> None:
    def shift(ds: pydicom.Dataset) -> None:
        ds.RescaleIntercept = "40000"

    write_series(tmp_path / "s", n=3, edit={2: shift})
    volume = load_dicom_series(tmp_path / "s")
    assert volume.array.dtype == np.float32
    stored = pydicom.dcmread(CT).pixel_array
    np.testing.assert_array_equal(volume.array[:, :, 0].T[10:], stored[10:] - 1024.0)
    np.testing.assert_array_equal(volume.array[:, :, 2].T[10:], stored[10:] + 40000.0)
    assert volume.meta["rescale_intercept"] == [-1024.0, -1024.0, 40000.0]


# --- refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize(("skip", "missing"), [((4,), 1), ((3, 4), 2)])
def test_missing_slice_is_an_error_naming_folder_and_gap(
    tmp_path: Path, skip: tuple[int, ...], missing: int
) -> None:
    folder = tmp_path / "gap"
    records = write_series(folder, n=9, step=2.5, skip=skip)
    before = next(r for r in records if r["k"] == min(skip) - 1)
    after = next(r for r in records if r["k"] == max(skip) + 1)
    with pytest.raises(DicomSeriesError) as caught:
        load_dicom_series(folder)
    message = str(caught.value)
    assert caught.value.path == folder
    assert str(folder) in message
    assert before["name"] in message and after["name"] in message
    assert f"{before['position'][2]:.6g}" in message and f"{after['position'][2]:.6g}" in message
    assert "median step is 2.5000 mm" in message
    assert f"{missing} slice(s) seem missing" in message
    assert isinstance(caught.value, ImageReadError)


def test_uneven_spacing_is_an_error(tmp_path: Path) -> None:
    write_series(tmp_path / "s", n=6, offsets=[0.0, 2.5, 5.0, 7.5, 10.6, 13.1])
    with pytest.raises(DicomSeriesError, match="uneven spacing"):
        load_dicom_series(tmp_path / "s")


def test_tighter_tolerance_refuses_jitter(tmp_path: Path) -> None:
    write_series(tmp_path / "s", n=5, offsets=[0.0, 2.503, 4.998, 7.504, 10.0])
    with pytest.raises(DicomSeriesError, match="slice gap"):
        load_dicom_series(tmp_path / "s", spacing_tolerance_mm=1e-3)


def test_duplicate_positions_are_an_error(tmp_path: Path) -> None:
    write_series(tmp_path / "s", n=5, offsets=[0.0, 2.5, 5.0, 5.0, 7.5])
    with pytest.raises(DicomSeriesError, match="duplicate slice position"):
        load_dicom_series(tmp_path / "s")


def test_two_series_are_an_error_listing_both(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    uid_a, uid_b = generate_uid(), generate_uid()
    write_series(folder, n=4, series_uid=uid_a, description="AX SOFT", prefix="A")
    write_series(folder, n=3, series_uid=uid_b, description="AX BONE", prefix="B", seed=1)
    with pytest.raises(DicomSeriesError) as caught:
        load_dicom_series(folder)
    message = str(caught.value)
    assert str(folder) in message and "2 DICOM series" in message
    assert re.search(re.escape(uid_a) + r".*'AX SOFT', 4 slice\(s\)", message)
    assert re.search(re.escape(uid_b) + r".*'AX BONE', 3 slice\(s\)", message)


def test_localizer_series_beside_the_series_is_flagged(tmp_path: Path) -> None:
    def localizer(ds: pydicom.Dataset) -> None:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.ImageOrientationPatient = ["0", "1", "0", "0", "0", "-1"]

    folder = tmp_path / "study"
    write_series(folder, n=5, prefix="CT")
    write_series(
        folder, n=3, description="SCOUT", prefix="LOC", edit=dict.fromkeys(range(3), localizer)
    )
    with pytest.raises(DicomSeriesError, match=r"'SCOUT', 3 slice\(s\), localizer"):
        load_dicom_series(folder)


def test_localizer_image_type_is_an_error_naming_the_file(tmp_path: Path) -> None:
    def localizer(ds: pydicom.Dataset) -> None:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]

    records = write_series(tmp_path / "s", n=5, edit={2: localizer})
    with pytest.raises(DicomSeriesError, match="localizer") as caught:
        load_dicom_series(tmp_path / "s")
    assert caught.value.path == tmp_path / "s" / records[2]["name"]


def test_slice_in_another_orientation_is_an_error_naming_the_file(tmp_path: Path) -> None:
    def sagittal(ds: pydicom.Dataset) -> None:
        ds.ImageOrientationPatient = ["0", "1", "0", "0", "0", "-1"]

    records = write_series(tmp_path / "s", n=5, edit={3: sagittal})
    with pytest.raises(DicomSeriesError, match="ImageOrientationPatient") as caught:
        load_dicom_series(tmp_path / "s")
    assert caught.value.path == tmp_path / "s" / records[3]["name"]


def test_slice_with_other_pixel_spacing_is_an_error_naming_the_file(tmp_path: Path) -> None:
    def coarse(ds: pydicom.Dataset) -> None:
        ds.PixelSpacing = ["1.5", "1.5"]

    records = write_series(tmp_path / "s", n=5, edit={0: coarse})
    with pytest.raises(DicomSeriesError, match="PixelSpacing") as caught:
        load_dicom_series(tmp_path / "s")
    assert caught.value.path == tmp_path / "s" / records[0]["name"]


def test_gantry_tilt_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "tilt"
    tilted = rotation((1.0, 0.0, 0.0), 15.0) @ np.array([0.0, 0.0, 1.0])
    offsets = np.arange(4) * 2.0
    records = write_series(folder, n=4, step=2.0)
    for record, offset in zip(records, offsets, strict=True):
        ds = pydicom.dcmread(folder / record["name"])
        position = np.array([-80.25, -95.5, 30.125]) + offset * tilted
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
        ds.save_as(folder / record["name"])
    with pytest.raises(DicomSeriesError, match="gantry tilt"):
        load_dicom_series(folder)


def test_empty_folder_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(DicomSeriesError, match="no DICOM image") as caught:
        load_dicom_series(folder)
    assert caught.value.path == folder


def test_folder_without_images_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "README").write_text("Export from PACS\n")
    (folder / "notes.txt").write_bytes(b"\x08\x00 not really dicom")
    (folder / ".DS_Store").write_bytes(b"\x00" * 64)
    shutil.copy(TEST_FILES / "dicomdirtests" / "DICOMDIR", folder / "DICOMDIR")
    with pytest.raises(DicomSeriesError, match=r"no DICOM image .*3 file\(s\) skipped") as caught:
        load_dicom_series(folder)
    assert caught.value.path == folder


def test_non_dicom_and_hidden_files_are_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "s"
    write_series(folder, n=4)
    (folder / "README.txt").write_text("hello")
    (folder / ".hidden.dcm").write_bytes(b"garbage")
    shutil.copy(TEST_FILES / "dicomdirtests" / "DICOMDIR", folder / "DICOMDIR")
    (folder / "sub").mkdir()
    shutil.copy(CT, folder / "sub" / "other.dcm")  # not read: no recursion
    with caplog.at_level(logging.DEBUG, logger="synthlesion.data.dicom"):
        volume = load_dicom_series(folder)
    assert volume.shape == (128, 128, 4)
    assert sorted(volume.meta["skipped_files"]) == ["DICOMDIR", "README.txt"]
    assert "README.txt: skipped, not a DICOM file" in caplog.text
    assert "DICOMDIR: skipped" in caplog.text


def test_undecodable_compressed_slice_is_an_error_naming_the_file(tmp_path: Path) -> None:
    source = TEST_FILES / "MR_small_jpeg_ls_lossless.dcm"
    try:
        pydicom.dcmread(source).pixel_array  # noqa: B018 - probing for a decoder
    except Exception:
        pass
    else:
        pytest.skip("a JPEG-LS decoder is installed here")
    folder = tmp_path / "jls"
    folder.mkdir()
    shutil.copy(source, folder / "slice.dcm")
    with pytest.raises(DicomSeriesError, match="cannot decode pixel data") as caught:
        load_dicom_series(folder)
    assert caught.value.path == folder / "slice.dcm"
    assert "JPEG-LS" in str(caught.value)


def test_rle_compressed_slice_is_decoded(tmp_path: Path) -> None:
    folder = tmp_path / "rle"
    folder.mkdir()
    shutil.copy(TEST_FILES / "MR_small_RLE.dcm", folder / "slice.dcm")
    volume = load_dicom_series(folder)
    np.testing.assert_array_equal(volume.array[:, :, 0], pydicom.dcmread(MR).pixel_array.T)


def test_not_a_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DicomSeriesError, match="not a folder"):
        load_dicom_series(tmp_path / "missing")


# --- round trip through NIfTI -------------------------------------------------------------


def test_round_trip_through_nifti(tmp_path: Path) -> None:
    row, col = OBLIQUE[:, 0], OBLIQUE[:, 1]
    write_series(tmp_path / "s", n=5, row=row, col=col, step=1.25, pixel_spacing=(0.7, 0.9))
    volume = load_image(tmp_path / "s")  # a folder goes through load_dicom_series
    assert volume.shape == (128, 128, 5)
    path = save_image(volume, tmp_path / "out.nii.gz")
    again = load_image(path)
    assert again.array.dtype == np.int16
    np.testing.assert_array_equal(again.array, volume.array)
    np.testing.assert_allclose(again.affine, volume.affine, atol=1e-5)
    assert "".join(nib.aff2axcodes(nib.load(path).affine)) == volume.orientation
    assert again.orientation == volume.orientation


# --- property -----------------------------------------------------------------------------


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    axis=st.tuples(*[st.floats(-1, 1) for _ in range(3)]).filter(lambda a: np.linalg.norm(a) > 0.1),
    degrees=st.floats(-180, 180),
    step=st.floats(0.5, 6.0),
    n=st.integers(2, 5),
    spacing=st.tuples(st.floats(0.2, 2.0), st.floats(0.2, 2.0)),
    seed=st.integers(0, 1000),
)
def test_any_orientation_maps_voxels_to_hand_positions(
    axis: tuple[float, float, float],
    degrees: float,
    step: float,
    n: int,
    spacing: tuple[float, float],
    seed: int,
) -> None:
    rot = rotation(axis, degrees)
    row, col = rot[:, 0], rot[:, 1]
    spacing = (float(f"{spacing[0]:g}"), float(f"{spacing[1]:g}"))  # as written to the file
    with tempfile.TemporaryDirectory() as tmp:
        records = write_series(
            Path(tmp),
            source=MR,
            n=n,
            row=row,
            col=col,
            step=step,
            pixel_spacing=spacing,
            seed=seed,
        )
        volume = load_dicom_series(Path(tmp))
    assert [Path(f).name for f in volume.meta["files"]] == [r["name"] for r in records]
    origin = records[0]["position"]
    for ijk in [(0, 0, 0), (63, 0, 0), (0, 63, n - 1), (63, 63, n - 1)]:
        want = expected_ras(origin, row, col, spacing, step, ijk)
        np.testing.assert_allclose(voxel_to_world(volume.affine, ijk), want, atol=5e-3)


# --- writing ------------------------------------------------------------------------------


def _rotation_z(degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])


@pytest.mark.parametrize("rotated", [False, True])
def test_written_series_reads_back_with_the_same_voxels_and_geometry(tmp_path, rotated):

    rng = np.random.default_rng(0)
    array = rng.integers(-1024, 1500, size=(12, 10, 6)).astype(np.int16)
    affine = np.eye(4)
    affine[:3, :3] = (_rotation_z(20) if rotated else np.eye(3)) @ np.diag([0.7, 0.8, 2.5])
    affine[:3, 3] = [-40.0, 25.0, -60.0]
    volume = Volume(array, affine, None, "syn_case.nii.gz")
    folder = save_dicom_series(volume, tmp_path / "series", patient_id="syn_0001")
    assert sorted(p.name for p in folder.iterdir()) == [f"{k:04d}.dcm" for k in range(1, 7)]
    back = load_dicom_series(folder)
    assert back.array.dtype == np.int16 and np.array_equal(back.array, array)
    np.testing.assert_allclose(back.affine, affine, atol=1e-4)
    header = pydicom.dcmread(folder / "0001.dcm")
    assert list(header.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert header.PatientID == "syn_0001" and "synthetic" in header.SeriesDescription
    again = save_dicom_series(volume, tmp_path / "again", patient_id="syn_0001")
    assert (again / "0003.dcm").read_bytes() == (folder / "0003.dcm").read_bytes()


def test_float_volume_is_rescaled_into_16_bits(tmp_path):

    array = np.linspace(0.0, 812.5, 8 * 8 * 4, dtype=np.float32).reshape(8, 8, 4)
    volume = Volume(array, np.diag([1.0, 1.0, 3.0, 1.0]), None, "mri.nii.gz")
    back = load_dicom_series(save_dicom_series(volume, tmp_path / "s", modality="MR",
                                               patient_id="p"))  # fmt: skip
    assert back.array.dtype == np.float32
    np.testing.assert_allclose(back.array, array, atol=812.5 / 32767)


def test_writer_refuses_what_dicom_cannot_hold_and_writes_nothing(tmp_path):

    sheared = np.eye(4)
    sheared[0, 2] = 0.5
    volume = Volume(np.zeros((4, 4, 3), np.int16), sheared, None, "sheared.nii.gz")
    with pytest.raises(ValueError, match="sheared.nii.gz.*sheared or its slices"):
        save_dicom_series(volume, tmp_path / "s", patient_id="p")
    with pytest.raises(ValueError, match="3D volume"):
        save_dicom_series(Volume(np.zeros((4, 4), np.int16), np.eye(4)), tmp_path / "s",
                          patient_id="p")  # fmt: skip
    big = Volume(np.full((2, 2, 2), 40000, np.int32), np.eye(4), None, "big.nii.gz")
    with pytest.raises(ValueError, match="int16 range"):
        save_dicom_series(big, tmp_path / "s", patient_id="p")
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    ok = Volume(np.zeros((4, 4, 3), np.int16), np.eye(4))
    save_dicom_series(ok, tmp_path / "s", patient_id="p")
    with pytest.raises(ValueError, match="exists"):
        save_dicom_series(ok, tmp_path / "s", patient_id="p")
