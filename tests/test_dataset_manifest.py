"""The synthetic-case manifest: round trip, tamper detection (each attack named), torn lines,
resume, path guards, and the provenance hashes."""

from __future__ import annotations

import gzip
import json
import os

import nibabel as nib
import numpy as np
import pytest
from test_dataset_support import add_synthetic, clone_world, edit_row, forge, make_world, populate

from synthlesion.data.io import load_image
from synthlesion.provenance import (
    GeneratorRef,
    ManifestError,
    ManifestTampered,
    UnsafePath,
    hash_patient_id,
    read_manifest,
    reseal_manifest,
    voxel_sha256,
)
from synthlesion.provenance.manifest import ROW_FIELDS, lock_path_for, read_lock


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("template"), n_patients=6)


@pytest.fixture
def world(template, tmp_path):
    return clone_world(template, tmp_path)


def rows_of(world, **kwargs):
    return list(read_manifest(world.manifest, world.synth_root, **kwargs))


def test_round_trip_rows_chain_and_lock(world):
    written = populate(world)
    read = rows_of(world)
    assert [r.case_id for r in read] == [r.case_id for r in written]
    assert read == written
    assert [r.row for r in read] == list(range(1, len(written) + 1))
    lock = read_lock(world.manifest)
    assert lock["rows"] == len(written) and lock["chain_head"] == written[-1].row_sha256
    record = json.loads(world.manifest.read_text().splitlines()[1])
    assert tuple(sorted(record)) == ROW_FIELDS
    assert list(record)[-1] == "row_sha256"
    assert record["images"][0].startswith("images/")  # relative to the dataset root
    assert record["source_patient"] == world.case(record["source_case"]).patient_id


@pytest.mark.parametrize(
    "field, value",
    [
        ("source_patient", "ct2d_p999"),  # moves the case to another patient
        ("source_split", "train"),  # edits the split
        ("mask_sha256", "0" * 64),  # edits a hash
        ("seed", 12345),
        ("quality", {"passed": True}),
    ],
)
def test_hand_edited_row_is_refused_naming_the_row(world, field, value):
    populate(world)
    edit_row(world.manifest, 2, **{field: value})
    with pytest.raises(ManifestTampered, match=r"row 2\b") as info:
        rows_of(world)
    assert info.value.row == 2


def test_edited_and_rehashed_row_breaks_the_next_row(world):
    populate(world)
    from synthlesion.provenance.manifest import encode_record

    lines = world.manifest.read_bytes().splitlines(keepends=True)
    previous = json.loads(lines[1])["row_sha256"]
    record = json.loads(lines[2])
    record.pop("row_sha256")
    record["source_patient"] = "someone_else"
    lines[2], _ = encode_record(record, previous)
    world.manifest.write_bytes(b"".join(lines))
    with pytest.raises(ManifestTampered, match=r"row 3\b.*row 2 was edited"):
        rows_of(world)


def test_removed_reordered_and_truncated_rows_are_caught(world):
    populate(world)
    original = world.manifest.read_bytes()
    lines = original.splitlines(keepends=True)
    world.manifest.write_bytes(b"".join(lines[:2] + lines[3:]))  # row 2 removed
    with pytest.raises(ManifestTampered, match="row 2"):
        rows_of(world)
    world.manifest.write_bytes(b"".join([lines[0], lines[2], lines[1], *lines[3:]]))  # swapped
    with pytest.raises(ManifestTampered, match="row 1"):
        rows_of(world)
    world.manifest.write_bytes(b"".join(lines[:-1]))  # last row removed: only the lock knows
    with pytest.raises(ManifestTampered, match="were removed"):
        rows_of(world)


def test_missing_or_edited_lock_is_refused(world):
    populate(world)
    lock = lock_path_for(world.manifest)
    data = json.loads(lock.read_text())
    lock.write_text(json.dumps({**data, "chain_head": "f" * 64}))
    with pytest.raises(ManifestTampered, match="chain head"):
        rows_of(world)
    lock.write_text(json.dumps({**data, "run_id": "other"}))
    with pytest.raises(ManifestTampered, match="swapped"):
        read_manifest(world.manifest, world.synth_root)
    lock.unlink()
    with pytest.raises(ManifestTampered, match="lock"):
        read_manifest(world.manifest, world.synth_root)


def test_file_changed_on_disk_is_refused_unless_verification_is_off(world):
    rows = populate(world)
    (world.synth_root / rows[1].mask).write_bytes(b"not the same mask")
    with pytest.raises(ManifestTampered, match=r"row 2\).*differs from the sha256"):
        rows_of(world)
    assert len(rows_of(world, verify_files=False)) == len(rows)


def test_torn_last_line_is_ignored_then_dropped_on_resume(world):
    populate(world)
    n = read_lock(world.manifest)["rows"]
    with open(world.manifest, "ab") as handle:
        handle.write(b'{"record":"case","row":')  # killed mid-write
    reader = read_manifest(world.manifest, world.synth_root)
    assert len(list(reader)) == n and reader.torn_tail
    with world.writer() as writer:
        add_synthetic(world, writer, world.side_cases("train")[0], "syn_after_resume", seed=99)
    assert world.manifest.read_bytes().endswith(b"}\n")
    assert [r.case_id for r in rows_of(world)][-1] == "syn_after_resume"


def test_unsealed_complete_row_is_accepted_and_resealed(world):
    populate(world)
    lock = lock_path_for(world.manifest)
    before = lock.read_text()
    with world.writer() as writer:
        add_synthetic(world, writer, world.side_cases("train")[0], "syn_late", seed=7)
    lock.write_text(before)  # the sampler died between the row and the lock update
    reader = read_manifest(world.manifest, world.synth_root)
    assert [r.case_id for r in reader][-1] == "syn_late" and reader.unsealed == 1
    new_lock = reseal_manifest(world.manifest, world.synth_root)
    assert new_lock["rows"] == json.loads(before)["rows"] + 1


def test_resume_knows_done_cases_and_refuses_duplicates_other_generators(world, tmp_path):
    rows = populate(world)
    with world.writer() as writer:
        assert rows[0].case_id in writer and rows[0].case_id.upper() in writer
        with pytest.raises(ManifestError, match="already in the manifest"):
            add_synthetic(world, writer, world.side_cases("train")[0], rows[0].case_id.upper())
        with pytest.raises(ManifestError, match="another writer"):
            world.writer()
    other = GeneratorRef("elsewhere", "a" * 64, "b" * 64)
    with pytest.raises(ManifestError, match="resuming with generator"):
        world.writer(generator=other)


def test_row_is_written_only_after_its_files(world):
    populate(world)
    before = world.manifest.read_bytes()
    row = rows_of(world)[0]
    from dataclasses import replace

    ghost = replace(row, case_id="syn_ghost", images=("images/ghost_0000.nii.gz",))
    with world.writer() as writer, pytest.raises(ManifestTampered, match="does not exist"):
        writer.append(ghost)
    assert world.manifest.read_bytes() == before


@pytest.mark.parametrize(
    "attack, path",
    [
        ("absolute", "/etc/passwd"),
        ("dot-dot", "images/../../real/imagesTr/x.nii.gz"),
        ("backslash", "images\\x.nii.gz"),
    ],
)
def test_unsafe_paths_are_refused_by_writer_and_reader(world, attack, path):
    rows = populate(world)
    from dataclasses import replace

    with world.writer() as writer, pytest.raises(UnsafePath):
        writer.append(replace(rows[0], case_id="syn_bad", mask=path))

    def point_away(records):
        records[2]["mask"] = path
        return records

    forge(world.manifest, point_away)  # a manifest whose chain is intact
    with pytest.raises(UnsafePath, match="row 2") as info:
        rows_of(world, verify_files=False)
    assert info.value.row == 2


def test_symlink_leaving_the_root_is_refused(world, tmp_path):
    rows = populate(world)
    outside = tmp_path / "outside.nii.gz"
    outside.write_bytes((world.synth_root / rows[0].mask).read_bytes())
    os.symlink(outside, world.synth_root / "masks" / "escape.nii.gz")
    os.symlink(tmp_path, world.synth_root / "linkdir")
    for bad in ("masks/escape.nii.gz", "linkdir/outside.nii.gz"):
        forge(world.manifest, lambda r, bad=bad: [*r[:1], {**r[1], "mask": bad}, *r[2:]])
        with pytest.raises(UnsafePath, match="outside the dataset root"):
            rows_of(world, verify_files=False)
    inside = world.synth_root / "masks" / "alias.nii.gz"
    os.symlink(world.synth_root / rows[0].mask, inside)  # a link that stays inside is fine
    forge(world.manifest, lambda r: [*r[:1], {**r[1], "mask": "masks/alias.nii.gz"}, *r[2:]])
    assert len(rows_of(world)) == len(rows)


def test_unsafe_case_id_is_refused(world):
    rows = populate(world)
    from dataclasses import replace

    with world.writer() as writer, pytest.raises(UnsafePath, match="file name"):
        writer.append(replace(rows[0], case_id="../../evil"))


def test_hash_patient_id_is_documented_and_normalised():
    digest = hash_patient_id("P01")
    assert digest == hash_patient_id(" p01 ") != hash_patient_id("P02")
    import hashlib

    assert digest == hashlib.sha256(b"synthlesion-patient-id/1\x00p01").hexdigest()
    with pytest.raises(ValueError):
        hash_patient_id("  ")


def test_voxel_hash_survives_recompression_and_dtype_but_not_a_voxel(world, tmp_path):
    source = world.cases[0].image
    array = load_image(source).array
    digest = voxel_sha256(array)
    raw = gzip.decompress(source.read_bytes())
    again = tmp_path / "again.nii.gz"
    again.write_bytes(gzip.compress(raw, compresslevel=1))
    assert again.read_bytes() != source.read_bytes()
    assert voxel_sha256(load_image(again).array) == digest
    image = nib.Nifti1Image(array.astype(np.float32), np.eye(4))
    nib.save(image, str(tmp_path / "float.nii"))
    assert voxel_sha256(load_image(tmp_path / "float.nii").array) == digest
    assert voxel_sha256(array[..., None]) == digest
    changed = array.copy()
    changed.flat[0] += 1
    assert voxel_sha256(changed) != digest
