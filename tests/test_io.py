"""NIfTI reading and writing: data read fully, gzip verified, geometry and dtype kept."""

from __future__ import annotations

import gzip
import warnings

import nibabel as nib
import numpy as np
import pytest
from conftest import AFFINE, ct_image, write_nifti

from synthlesion.data.io import load_image, save_image
from synthlesion.data.volume import Volume, geometry_differences, require_same_geometry
from synthlesion.errors import GeometryError, ImageReadError


def test_round_trip_keeps_affine_dtype_and_header(tmp_path):
    path = write_nifti(tmp_path / "ct.nii.gz", ct_image())
    volume = load_image(path)
    assert volume.array.dtype == np.int16
    assert volume.orientation == "LAS"
    assert volume.spacing == pytest.approx((1.0, 1.0, 2.5))
    out = save_image(volume, tmp_path / "copy.nii.gz")
    again = load_image(out)
    np.testing.assert_array_equal(again.array, volume.array)
    np.testing.assert_allclose(again.affine, AFFINE)
    assert again.array.dtype == np.int16
    assert again.header.get_data_dtype() == np.int16
    # nibabel itself agrees on what we wrote
    ref = nib.load(str(out))
    np.testing.assert_allclose(ref.affine, AFFINE)
    np.testing.assert_array_equal(np.asarray(ref.dataobj), volume.array)


def test_writes_are_deterministic_and_leave_no_temp_files(tmp_path):
    volume = Volume(ct_image(), AFFINE)
    save_image(volume, tmp_path / "a.nii.gz")
    save_image(volume, tmp_path / "b.nii.gz")
    assert (tmp_path / "a.nii.gz").read_bytes() == (tmp_path / "b.nii.gz").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz", "b.nii.gz"]


def test_uncompressed_nii_and_scaled_data(tmp_path):
    array = np.arange(24, dtype=np.int16).reshape(4, 3, 2)
    write_nifti(tmp_path / "s.nii", array)
    raw = bytearray((tmp_path / "s.nii").read_bytes())
    raw[112:120] = np.array([0.5, -10], dtype="<f4").tobytes()  # scl_slope, scl_inter
    (tmp_path / "s.nii").write_bytes(bytes(raw))
    volume = load_image(tmp_path / "s.nii")
    np.testing.assert_allclose(volume.array, array * 0.5 - 10)
    save_image(volume, tmp_path / "t.nii")
    np.testing.assert_allclose(load_image(tmp_path / "t.nii").array, array * 0.5 - 10)


def test_truncated_gzip_is_an_error(tmp_path):
    path = write_nifti(tmp_path / "ct.nii.gz", ct_image())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_truncated_uncompressed_nii_is_an_error(tmp_path):
    path = write_nifti(tmp_path / "ct.nii", ct_image())
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(ImageReadError, match="truncated"):
        load_image(path)


def test_flipped_crc_byte_is_an_error_where_nibabel_returns_data(tmp_path):
    path = write_nifti(tmp_path / "ct.nii.gz", ct_image())
    data = bytearray(path.read_bytes())
    data[-6] ^= 0xFF  # inside the CRC32 trailer
    path.write_bytes(bytes(data))
    # nibabel alone hands back voxels without an error (at most a warning)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert nib.load(str(path)).get_fdata().shape == ct_image().shape
    with pytest.raises(ImageReadError, match="corrupt gzip"):
        load_image(path)


def test_flipped_byte_inside_stream_is_an_error(tmp_path):
    path = write_nifti(tmp_path / "ct.nii.gz", ct_image())
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x55
    path.write_bytes(bytes(data))
    with pytest.raises(ImageReadError):
        load_image(path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "empty"),
        (b"not gzip at all" * 40, "not a gzip"),
        (gzip.compress(b"\x00" * 400), "header"),
    ],
)
def test_empty_non_gzip_and_bad_header(tmp_path, content, match):
    path = tmp_path / "bad.nii.gz"
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=match):
        load_image(path)


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match="does not exist"):
        load_image(tmp_path / "nope.nii.gz")


def test_qform_sform_disagreement(tmp_path):
    image = nib.Nifti1Image(ct_image(), AFFINE)
    shifted = AFFINE.copy()
    shifted[:3, 3] += 60.0
    image.header.set_sform(AFFINE, code=1)
    image.header.set_qform(shifted, code=1)
    path = tmp_path / "forms.nii.gz"
    nib.save(image, str(path))
    with pytest.raises(GeometryError, match="qform and sform disagree"):
        load_image(path)
    volume = load_image(path, on_form_mismatch="sform")
    assert volume.meta["qform_sform_difference_mm"] == pytest.approx(60.0 * np.sqrt(3))
    np.testing.assert_allclose(volume.affine, AFFINE)


def test_4d_squeezes_only_trailing_singleton(tmp_path):
    volume = load_image(write_nifti(tmp_path / "a.nii.gz", ct_image()[..., None]))
    assert volume.array.ndim == 3
    with pytest.raises(ImageReadError, match="4D image"):
        load_image(write_nifti(tmp_path / "b.nii.gz", np.stack([ct_image()] * 2, -1)))
    with pytest.raises(ImageReadError, match="where a 2D image"):
        load_image(tmp_path / "a.nii.gz", spatial_dims=2)


def test_2d_image(tmp_path):
    array = ct_image((16, 12, 1))[..., 0]
    volume = load_image(write_nifti(tmp_path / "s.nii.gz", array), spatial_dims=2)
    assert volume.shape == (16, 12)
    assert volume.spacing == pytest.approx((1.0, 1.0))


def test_geometry_differences_names_each_problem():
    image = Volume(np.zeros((4, 4, 4)), AFFINE, source=None)
    lps = AFFINE.copy()
    lps[0, 0] = 1.0
    assert [c for c, _ in geometry_differences(image, Volume(np.zeros((4, 4, 4)), lps))] == [
        "orientation"
    ]
    moved = AFFINE.copy()
    moved[1, 3] += 0.5
    codes = [c for c, _ in geometry_differences(image, Volume(np.zeros((4, 4, 4)), moved))]
    assert codes == ["origin"]
    assert geometry_differences(image, Volume(np.zeros((4, 4, 3)), AFFINE))[0][0] == "shape"
    with pytest.raises(GeometryError, match="origin"):
        require_same_geometry(image, Volume(np.zeros((4, 4, 4)), moved))
