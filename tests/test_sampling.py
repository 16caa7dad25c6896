"""`synthlesion sample`: guards, provenance rows, resume with the same seeds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from synthlesion.cli import main
from synthlesion.data.io import load_image
from synthlesion.data.phantom import make_phantom_dataset
from synthlesion.data.sources import load_cases
from synthlesion.data.splits import load_splits, save_splits, split_patients
from synthlesion.models import LesionDiffusionModel, ModelConfig
from synthlesion.pipelines.lesion_synthesis import SynthesisError
from synthlesion.pipelines.sampling import SampleOptions, run_sampling
from synthlesion.provenance.identity import PATIENT_HASH_SCHEME, hash_patient_id
from synthlesion.provenance.manifest import read_manifest


def training_record(patients, **data) -> dict:
    """A training record for a 2D CT model trained on ``patients`` (32x32 ROI)."""
    return {
        "patient_hash_scheme": PATIENT_HASH_SCHEME,
        "patient_id_hashes": sorted(hash_patient_id(p) for p in patients),
        "data": {
            "intensity": {"mode": "window", "window": [-200, 300], "percentiles": [0.5, 99.5]},
            "roi_size": [32, 32],
            "modality": "CT",
            "lesion_label_values": [2],
            "organ_label_values": [1],
            **data,
        },
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    dataset = make_phantom_dataset(
        root / "phantom", kind="ct", spatial_dims=2, n_patients=8, size=64, seed=3
    )
    cases = load_cases(dataset)
    splits = split_patients(cases, seed=0)
    save_splits(splits, root / "splits.json")
    torch.manual_seed(0)
    model = LesionDiffusionModel.from_config(
        ModelConfig(
            spatial_dims=2,
            sample_size=32,
            channels=(8, 16),
            attention_levels=(False, False),
            layers_per_block=1,
            norm_num_groups=4,
            num_train_timesteps=50,
        )
    )

    def save(path, patients):
        model.save_pretrained(path, training_record=training_record(patients))
        return path

    good = save(root / "model", splits.patients("train"))
    leaky = save(root / "leaky", [*splits.patients("train"), splits.patients("test")[0]])
    return {
        "root": root,
        "dataset": dataset,
        "splits": root / "splits.json",
        "model": good,
        "leaky": leaky,
        "cases": cases,
        "split": splits,
    }


def test_cli_writes_cases_rows_and_keeps_geometry(world, capsys):
    out = world["root"] / "syn_cli"
    status = main(
        [
            "sample",
            "--model",
            str(world["model"]),
            "--data",
            str(world["dataset"]),
            "--splits",
            str(world["splits"]),
            "--out",
            str(out),
            "--steps",
            "3",
            "--limit",
            "3",
            "--mask-source",
            "procedural",
        ]
    )
    assert status == 0, capsys.readouterr()
    rows = list(read_manifest(out / "manifest.jsonl", out))
    assert len(rows) == 3
    split = world["split"]
    by_id = {c.case_id: c for c in world["cases"]}
    for row in rows:
        assert split.side_of_patient(row.source_patient) == "train"
        source = by_id[row.source_case]
        image = load_image(out / row.images[0])
        original = load_image(source.image)
        assert image.array.dtype == original.array.dtype
        np.testing.assert_allclose(image.affine, original.affine)
        mask = load_image(out / row.mask)
        assert set(np.unique(mask.array)) <= {0, 1, 2}
        assert (mask.array == 2).sum() > (load_image(source.mask).array == 2).sum()
        assert row.scheduler == "dpmsolver++" and row.steps == 3 and "passed" in row.quality
    options = json.loads((out / "sample_options.json").read_text())
    assert options["mask_source"] == "procedural"


def test_resume_makes_only_missing_cases_with_the_same_seeds(world):
    options = SampleOptions(steps=2, limit=4, mask_source="bank", scheduler="ddim")
    straight = world["root"] / "straight"
    run_sampling(world["model"], world["dataset"], world["splits"], straight, options)
    resumed = world["root"] / "resumed"
    first = run_sampling(
        world["model"],
        world["dataset"],
        world["splits"],
        resumed,
        SampleOptions(steps=2, limit=2, mask_source="bank", scheduler="ddim"),
    )
    assert len(first.written) == 2
    second = run_sampling(world["model"], world["dataset"], world["splits"], resumed, options)
    assert len(second.skipped_existing) == 2 and len(second.written) == 2
    a = {r.case_id: r for r in read_manifest(straight / "manifest.jsonl", straight)}
    b = {r.case_id: r for r in read_manifest(resumed / "manifest.jsonl", resumed)}
    assert a.keys() == b.keys()
    for case_id in a:
        assert a[case_id].seed == b[case_id].seed
        # the same voxels; the files differ only in the mark naming each run
        assert a[case_id].image_voxel_sha256 == b[case_id].image_voxel_sha256
        assert a[case_id].mask_voxel_sha256 == b[case_id].mask_voxel_sha256
        assert a[case_id].mask_source_patient in world["split"].patients("train")
    # a rerun with settings that change what a case holds is refused: it would keep the old
    # cases under a record of the new settings (limit, device, batch size may change)
    from synthlesion.provenance.errors import ProvenanceError

    before = (resumed / "sample_options.json").read_bytes()
    with pytest.raises(
        ProvenanceError, match=r"4 case\(s\) made with other settings \(seed: 0 -> 8\)"
    ):
        run_sampling(world["model"], world["dataset"], world["splits"], resumed,
                     SampleOptions(steps=2, limit=4, mask_source="bank", scheduler="ddim", seed=8))  # fmt: skip
    assert (resumed / "sample_options.json").read_bytes() == before
    # the same run named by relative paths from another folder resumes (paths are recorded
    # resolved)
    import os

    here = os.getcwd()
    try:
        os.chdir(world["root"])
        again = run_sampling(
            os.path.relpath(world["model"]), os.path.relpath(world["dataset"]),
            os.path.relpath(world["splits"]), "resumed", options,
        )  # fmt: skip
    finally:
        os.chdir(here)
    assert len(again.skipped_existing) == 4 and not again.written
    # a settings record that cannot be read cannot vouch for the folder's cases
    (resumed / "sample_options.json").write_text("{trunc")
    with pytest.raises(ProvenanceError, match="unreadable"):
        run_sampling(world["model"], world["dataset"], world["splits"], resumed, options)


def test_a_model_trained_on_an_evaluation_patient_is_refused(world):
    with pytest.raises(SynthesisError, match="evaluation patient"):
        run_sampling(world["leaky"], world["dataset"], world["splits"], world["root"] / "leak")
    assert not (world["root"] / "leak" / "manifest.jsonl").exists()


def test_model_without_training_record_and_foreign_manifest(world, tmp_path):
    bare = tmp_path / "bare"
    LesionDiffusionModel.from_pretrained(world["model"]).save_pretrained(bare)
    with pytest.raises(SynthesisError, match="training_record"):
        run_sampling(bare, world["dataset"], world["splits"], tmp_path / "x")
    out = world["root"] / "syn_cli"  # holds the good model's manifest
    other = tmp_path / "other"
    import shutil

    shutil.copytree(world["model"], other)
    record = json.loads((other / "training_record.json").read_text())
    record["note"] = "another model"
    (other / "training_record.json").write_text(json.dumps(record))
    with pytest.raises(SynthesisError, match="manifest was made by .*new folder"):
        run_sampling(other, world["dataset"], world["splits"], out, SampleOptions(steps=1, limit=1))


def test_user_mask_outside_the_tissue_is_reported(world, tmp_path):
    split = world["split"]
    source = next(c for c in world["cases"] if split.side_of_patient(c.patient_id) == "train")
    labels = load_image(source.mask)
    bad = np.zeros(labels.shape, np.uint8)
    bad[0:3, 0:3] = 1  # air in the corner
    from synthlesion.data.io import save_image

    masks = tmp_path / "masks"
    save_image(labels.with_array(bad), masks / f"{source.case_id}.nii.gz")
    report = run_sampling(
        world["model"],
        world["dataset"],
        world["splits"],
        tmp_path / "user",
        SampleOptions(steps=1, mask_source="user", user_masks=masks, limit=8),
    )
    problems = {f["source"]: f["problem"] for f in report.failed}
    assert "outside the placement region" in problems[source.case_id]
    assert all(c not in report.written for c in [f"syn_{source.case_id}_00"])


def test_splits_that_do_not_match_the_data_are_refused(world, tmp_path):
    other = split_patients(load_cases(world["dataset"])[:-2], seed=1)
    save_splits(other, tmp_path / "s.json")
    from synthlesion.errors import SplitError

    with pytest.raises(SplitError, match="not in the splits"):
        run_sampling(world["model"], world["dataset"], tmp_path / "s.json", tmp_path / "o")
    assert load_splits(tmp_path / "s.json").sha256 == other.sha256


def test_shards_merge_into_the_same_cases_as_one_run(world):
    from synthlesion.pipelines.sampling import merge_manifest_shards

    options = SampleOptions(steps=1, limit=3, mask_source="procedural", scheduler="ddim")
    single = world["root"] / "single"
    run_sampling(world["model"], world["dataset"], world["splits"], single, options)
    sharded = world["root"] / "sharded"
    for rank in range(2):
        run_sampling(
            world["model"], world["dataset"], world["splits"], sharded, options, shard=(rank, 2)
        )
    merged = merge_manifest_shards(sharded)
    a = {r.case_id: r for r in read_manifest(single / "manifest.jsonl", single)}
    b = {r.case_id: r for r in read_manifest(merged, sharded)}
    assert a.keys() == b.keys() and len(a) == 3
    assert all(a[k].image_voxel_sha256 == b[k].image_voxel_sha256 for k in a)  # marks differ
    assert merge_manifest_shards(sharded) == merged  # merging again adds nothing
    assert len(list(read_manifest(merged, sharded))) == 3
    # each shard records the settings of its own cases: another shard cannot rewrite them
    assert sorted(p.name for p in sharded.glob("sample_options*.json")) == [
        "sample_options.shard-000-of-002.json",
        "sample_options.shard-001-of-002.json",
    ]


def test_attribute_conditioned_model_samples_and_records_its_attributes(world):
    torch.manual_seed(0)
    model = LesionDiffusionModel.from_config(
        ModelConfig(
            spatial_dims=2, sample_size=32, channels=(8, 16), attention_levels=(False, False),
            layers_per_block=1, norm_num_groups=4, num_train_timesteps=50, num_attributes=2,
        )
    )  # fmt: skip
    record = training_record(
        world["split"].patients("train"), attributes=["volume_fraction", "mean_intensity"]
    )
    folder = world["root"] / "attribute_model"
    model.save_pretrained(folder, training_record=record)
    out = world["root"] / "syn_attributes"
    status = main([
        "sample", "--model", str(folder), "--data", str(world["dataset"]),
        "--splits", str(world["splits"]), "--out", str(out), "--steps", "2", "--limit", "2",
        "--attribute", "mean_intensity=90",
    ])  # fmt: skip
    assert status == 0
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    cases = [r for r in rows if r.get("case_id", "").startswith("syn_")]
    assert len(cases) == 2
    for row in cases:
        values = row["quality"]["attributes"]
        assert len(values) >= 1 and 0 < values[0]["volume_fraction"] < 1
        assert -1 <= values[0]["mean_intensity"] <= 1  # 90 HU in the model's normalisation


def test_bank_lesions_from_2d_scans_whose_masks_are_stored_x_y_1(world, tmp_path):
    # a 2D image (X, Y) with its mask saved as (X, Y, 1) is one grid: the bank cuts 2D lesions
    import shutil

    import nibabel as nib

    data = tmp_path / "data"
    shutil.copytree(world["dataset"].parent, data)
    for path in sorted((data / "labelsTr").glob("*.nii.gz")):
        mask = nib.load(str(path))
        array = np.asarray(mask.dataobj)[..., None]
        nib.save(nib.Nifti1Image(array, mask.affine, mask.header), str(path))
    report = run_sampling(
        world["model"], data / "dataset.json", world["splits"], tmp_path / "o",
        SampleOptions(steps=1, limit=2, mask_source="bank"),
    )  # fmt: skip
    assert len(report.written) == 2 and not report.failed
    for row in read_manifest(tmp_path / "o" / "manifest.jsonl", tmp_path / "o"):
        assert load_image(tmp_path / "o" / row.mask).array.ndim == 2
