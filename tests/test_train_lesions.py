"""The generators' set-up reads each labelled train scan once and caches what it learnt beside
the splits file: the same answers as reading the scans, and a rerun opens only changed scans."""

from __future__ import annotations

import logging
import os

import nibabel as nib
import numpy as np
import pytest

import synthlesion.pipelines.train_lesions as tl
from synthlesion.data.cases import Case
from synthlesion.masks.lesions import case_has_lesion
from synthlesion.masks.shapes import MaskBank
from synthlesion.pipelines.quality import RealLesionReference


def _write_case(folder, name, lesions, float_labels=False, seed=0):
    rng = np.random.default_rng(seed)
    shape = (40, 36, 24)
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    labels = np.zeros(shape, np.int16)
    labels[4:36, 4:32, 3:21] = 1  # an organ
    image = np.where(labels > 0, 50.0, -800.0) + rng.normal(0, 8, shape)
    for centre, radius, value in lesions:
        inside = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2
        labels[inside] = value
        image[inside] += 25 * value
    affine = np.diag([-0.9, -0.9, 2.0, 1.0])  # LPS-like flips, anisotropic
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), folder / f"{name}_0000.nii.gz")
    stored = labels.astype(np.float32) if float_labels else labels
    nib.save(nib.Nifti1Image(stored, affine), folder / f"{name}.nii.gz")
    return Case(
        name,
        f"patient-{name}",
        (folder / f"{name}_0000.nii.gz",),
        folder / f"{name}.nii.gz",
        "CT",
        {0: "background", 1: "liver", 2: "tumour", 3: "necrosis"},
    )


@pytest.fixture
def scans(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    cases = [
        _write_case(folder, "a", [((12, 12, 10), 4, 2), ((12, 12, 10), 1.5, 3)]),
        _write_case(folder, "b", [((28, 22, 12), 3, 2), ((10, 26, 14), 2.5, 2)], True, 1),
        _write_case(folder, "healthy case (1)", [], seed=2),
    ]
    splits = tmp_path / "splits" / "splits.json"
    splits.parent.mkdir()
    splits.write_text("{}")
    return cases, splits


def test_one_read_gives_what_the_separate_readers_give(scans):
    cases, _ = scans
    got = tl.train_lesions(cases, (2, 3), (1,))
    assert got.presence == {c.case_id: case_has_lesion(c, (2, 3)) for c in cases}
    assert got.presence == {"a": True, "b": True, "healthy case (1)": False}
    with_lesion = [c for c in cases if got.presence[c.case_id]]
    bank = MaskBank.from_cases(with_lesion, lesion_labels=(2, 3))
    mine = got.bank()
    assert len(mine.lesions) == len(bank.lesions) == 3 and mine.n_classes == bank.n_classes == 2
    for a, b in zip(mine.lesions, bank.lesions, strict=True):
        assert np.array_equal(a.patch, b.patch) and a.spacing == b.spacing
        assert (a.source_case, a.mask_sha256, a.volume_mm3) == (
            b.source_case, b.mask_sha256, b.volume_mm3,
        )  # fmt: skip
    reference = RealLesionReference.from_cases(with_lesion, organ_labels=(1,), lesion_labels=(2, 3))
    assert got.reference() == reference


def test_a_rerun_reads_the_cache_and_opens_only_changed_scans(scans, monkeypatch, caplog):
    cases, splits = scans
    first = tl.train_lesions(cases, (2, 3), (1,), cache_beside=splits)
    written = list(splits.parent.glob("splits.json.train-lesions-*.npz"))
    assert len(written) == 1
    opened = []
    measure = tl.measure_scan
    monkeypatch.setattr(
        tl, "measure_scan", lambda c, *a: opened.append(c.case_id) or measure(c, *a)
    )
    second = tl.train_lesions(cases, (2, 3), (1,), cache_beside=splits)
    assert opened == [] and second.presence == first.presence
    assert second.reference() == first.reference()
    assert all(
        np.array_equal(a.patch, b.patch) and a == a
        for a, b in zip(second.bank().lesions, first.bank().lesions, strict=True)
    )
    # a changed label map is read again, the others come from the cache
    path = cases[1].mask
    image = nib.load(path)
    labels = np.asarray(image.dataobj).copy()
    labels[labels == 2] = 0
    nib.save(nib.Nifti1Image(labels, image.affine), path)
    os.utime(path, ns=(1, 1))
    third = tl.train_lesions(cases, (2, 3), (1,), cache_beside=splits)
    assert opened == ["b"] and third.presence["b"] is False
    assert len(third.bank().lesions) == 1  # a's one lesion (a tumour with its necrosis)
    # other label settings: a cache of their own
    tl.train_lesions(cases, (2,), (1,), cache_beside=splits)
    assert len(list(splits.parent.glob("splits.json.train-lesions-*.npz"))) == 2
    # an edited cache is not believed: read again, with a warning
    opened.clear()
    written[0].write_bytes(written[0].read_bytes()[:-40] + b"\0" * 40)
    with caplog.at_level(logging.WARNING):
        again = tl.train_lesions(cases, (2, 3), (1,), cache_beside=splits)
    assert sorted(opened) == sorted(c.case_id for c in cases)
    assert "unreadable" in caplog.text and again.presence == third.presence


def test_a_folder_that_cannot_hold_the_cache_only_costs_the_cache(scans, caplog, monkeypatch):
    cases, splits = scans

    def read_only(path, data):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(tl, "atomic_write_bytes", read_only)
    with caplog.at_level(logging.WARNING):
        got = tl.train_lesions(cases, (2, 3), (1,), cache_beside=splits)
    assert got.presence["a"] and "could not write the set-up cache" in caplog.text
    assert not list(splits.parent.glob("*.npz"))


def test_any_damage_to_the_cache_means_a_reread_not_a_failure(scans, monkeypatch, caplog):
    cases, splits = scans
    first = tl.train_lesions(cases, (2, 3), (1,), cache_beside=splits)
    real_load = np.load

    def broken(*args, **kwargs):
        raise RuntimeError("File 'index.npy' is encrypted, password required for extraction")

    monkeypatch.setattr(np, "load", broken)
    with caplog.at_level(logging.WARNING):
        again = tl.train_lesions(cases, (2, 3), (1,), cache_beside=splits)
    monkeypatch.setattr(np, "load", real_load)
    assert "unreadable (RuntimeError: File 'index.npy' is encrypted" in caplog.text
    assert again.presence == first.presence and again.reference() == first.reference()


def test_the_cache_is_not_data_for_the_evaluation_input_hash(scans):
    cases, splits = scans
    tl.train_lesions(cases, (2, 3), (1,), cache_beside=splits)
    (written,) = splits.parent.glob("*.npz")
    assert tl.is_cache_file(written) and not tl.is_cache_file(splits)
    assert not tl.is_cache_file(splits.with_name("scan.train-lesions-x.npz"))


def test_a_lesion_with_non_finite_voxels_stays_out_of_the_reference(tmp_path, caplog):
    folder = tmp_path / "data"
    folder.mkdir()
    good = _write_case(folder, "good", [((12, 12, 10), 4, 2)])
    bad = _write_case(folder, "bad", [((12, 12, 10), 4, 2)], seed=3)
    image = nib.load(bad.image)
    values = np.asarray(image.dataobj).copy()
    values[12, 12, 10] = np.nan
    nib.save(nib.Nifti1Image(values, image.affine), bad.image)
    with caplog.at_level(logging.WARNING):
        got = tl.train_lesions([good, bad], (2,), (1,))
    assert "case bad: 1 lesion(s) hold non-finite voxels" in caplog.text
    reference = got.reference()
    assert len(reference.means) == 1 and np.isfinite(reference.means).all()
    assert got.presence == {"good": True, "bad": True} and len(got.bank().lesions) == 2


def test_a_rewritten_file_is_read_again_even_with_its_old_size_and_time(scans, monkeypatch):
    cases, splits = scans
    tl.train_lesions(cases, (2, 3), (1,), cache_beside=splits)
    path = cases[0].mask
    stat = path.stat()
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)  # the same bytes, extracted anew: same size, same mtime
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    opened = []
    measure = tl.measure_scan
    monkeypatch.setattr(
        tl, "measure_scan", lambda c, *a: opened.append(c.case_id) or measure(c, *a)
    )
    tl.train_lesions(cases, (2, 3), (1,), cache_beside=splits)
    assert opened == ["a"]  # its status-change time moved


def test_a_scan_whose_geometry_fails_is_left_to_fail_alone(scans, caplog):
    cases, _ = scans
    healthy = cases[2]
    image = nib.load(healthy.mask)
    moved = image.affine.copy()
    moved[0, 3] += 5.0  # the mask 5 mm off its image
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), moved), healthy.mask)
    with caplog.at_level(logging.WARNING):
        got = tl.train_lesions(cases, (2, 3), (1,))
    assert got.presence["healthy case (1)"] is False and got.presence["a"] is True
    assert "healthy case (1): not read for the set-up" in caplog.text
