"""The built dataset folder: nnU-Net v2 raw layout, MONAI datalist, card, ratios, atomic and
refused overwrites, the CLI."""

from __future__ import annotations

import json
import os

import pytest
from monai.data import load_decathlon_datalist
from test_dataset_support import make_world, populate

from synthlesion.cli import main
from synthlesion.dataset import BuildConfig, BuildExistsError, DatasetBuilder, read_build_record
from synthlesion.provenance import EvaluationPatientLeak
from synthlesion.storage import sha256_file

NNUNET_KEYS = {"channel_names", "labels", "numTraining", "file_ending"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    world = make_world(tmp_path_factory.mktemp("built"))
    populate(world, per_case=2)
    builder = DatasetBuilder(
        world.real_json,
        world.splits_path,
        [(world.manifest, world.synth_root)],
        BuildConfig(synthetic_share=0.25, name="Dataset501_Phantom"),
    )
    return world, builder.build(world.tmp / "Dataset501_Phantom")


def test_layout_is_nnunet_v2_raw(built):
    world, result = built
    out = result.out_dir
    spec = json.loads((out / "dataset.json").read_text())
    assert NNUNET_KEYS <= spec.keys()
    assert spec["file_ending"] == ".nii.gz"
    assert spec["channel_names"] == {"0": "CT"}
    assert spec["labels"] == {"background": 0, "liver": 1, "lesion": 2}
    images = sorted(p.name for p in (out / "imagesTr").iterdir())
    labels = sorted(p.name for p in (out / "labelsTr").iterdir())
    cases = sorted(e["case_id"] for e in spec["training"])
    assert images == [f"{c}_0000.nii.gz" for c in cases]
    assert labels == [f"{c}.nii.gz" for c in cases]
    assert spec["numTraining"] == len(images) == len(labels)
    for entry in spec["training"]:  # every link resolves to the bytes the sources hold
        assert (out / entry["image"][0]).is_file() and (out / entry["label"]).is_file()
    real = {c.case_id: c for c in world.cases}
    entry = next(e for e in spec["training"] if e["origin"] == "real")
    assert sha256_file(out / entry["image"][0]) == sha256_file(real[entry["case_id"]].image)


def test_monai_reads_the_training_and_evaluation_lists(built):
    world, result = built
    out = result.out_dir
    training = load_decathlon_datalist(str(out / "dataset.json"), data_list_key="training")
    assert len(training) == result.counts["train"]["real"] + result.counts["train"]["synthetic"]
    assert all(os.path.isfile(i["image"][0]) and os.path.isfile(i["label"]) for i in training)
    assert {i["origin"] for i in training} == {"real", "synthetic"}
    synthetic = [i for i in training if i["origin"] == "synthetic"]
    assert all(i["source_patient"] in world.splits.patients("train") for i in synthetic)
    assert all(i["generator"] == world.generator.sha256 for i in synthetic)
    for side in ("val", "test"):
        items = load_decathlon_datalist(
            str(out / f"{side}.json"), data_list_key=side, base_dir=str(out)
        )
        assert {i["case_id"] for i in items} == {c.case_id for c in world.side_cases(side)}
        assert all(i["origin"] == "real" and os.path.isfile(i["image"][0]) for i in items)


def test_synthetic_list_card_and_record(built):
    world, result = built
    out = result.out_dir
    synthetic = json.loads((out / "synthetic.json").read_text())["synthetic"]
    assert (
        len(synthetic) == result.counts["train"]["synthetic"] == 2 * len(world.side_cases("train"))
    )
    assert {s["manifest"] for s in synthetic} == {world.manifest.as_posix()}
    card = (out / "dataset_card.md").read_text()
    for text in (
        "| train |",
        "| val |",
        "| test |",
        world.generator.sha256[:16],
        "| evaluation-patient |",
        "Expected synthetic share per epoch: 0.250",
        read_build_record(out)["files"]["dataset.json"],
    ):
        assert text in card
    weights = json.loads((out / "dataset.json").read_text())["synthlesion"]["sample_weight"]
    n_real, n_syn = result.counts["train"]["real"], result.counts["train"]["synthetic"]
    share = n_syn * weights["synthetic"] / (n_syn * weights["synthetic"] + n_real * weights["real"])
    assert share == pytest.approx(0.25)


def test_fixed_ratio_and_copy_mode(tmp_path):
    world = make_world(tmp_path)
    populate(world, per_case=3)
    config = BuildConfig(synthetic_share=0.4, share_mode="fixed", seed=3, link_mode="copy")
    builder = DatasetBuilder(
        world.real_json, world.splits_path, [(world.manifest, world.synth_root)], config
    )
    first = builder.build(tmp_path / "a")
    n_real = first.counts["train"]["real"]
    assert first.counts["train"]["synthetic"] == round(0.4 * n_real / 0.6)
    again = builder.build(tmp_path / "b")
    names = [
        sorted(p.name for p in (d / "imagesTr").iterdir()) for d in (tmp_path / "a", tmp_path / "b")
    ]
    assert names[0] == names[1]  # the seed fixes the draw
    assert not any(p.is_symlink() for p in (tmp_path / "a" / "imagesTr").iterdir())
    assert again.counts == first.counts


def test_refuses_to_overwrite_a_build_unless_asked(built, tmp_path):
    world, result = built
    builder = DatasetBuilder(world.real_json, world.splits_path)
    with pytest.raises(BuildExistsError, match="another dataset build"):
        builder.build(result.out_dir)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    with pytest.raises(BuildExistsError, match="not a synthlesion build"):
        builder.build(other, overwrite=True)
    assert (other / "mine.txt").read_text() == "keep me"
    replaced = builder.build(result.out_dir, overwrite=True)
    assert replaced.build_id != result.build_id
    assert replaced.counts["train"]["synthetic"] == 0
    siblings = [p for p in result.out_dir.parent.iterdir() if p.name.startswith(".")]
    assert not siblings


def test_failed_build_leaves_nothing(tmp_path):
    world = make_world(tmp_path)
    populate(world, sides=("train", "test"))
    with pytest.raises(EvaluationPatientLeak):
        DatasetBuilder(
            world.real_json, world.splits_path, [(world.manifest, world.synth_root)]
        ).build(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_cli_build_dataset(tmp_path, capsys):
    world = make_world(tmp_path)
    populate(world)
    code = main(
        [
            "build-dataset",
            str(world.real_json),
            "--splits",
            str(world.splits_path),
            "--manifest",
            str(world.manifest),
            "--out",
            str(tmp_path / "out"),
            "--synthetic-share",
            "0.5",
            "--link",
            "copy",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert "train" in capsys.readouterr().out
    record = read_build_record(tmp_path / "out")
    assert record["config"]["synthetic_share"] == 0.5 and record["link_mode"] == "copy"
    code = main(
        [
            "build-dataset",
            str(world.real_json),
            "--splits",
            str(world.splits_path),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 1 and "another dataset build" in capsys.readouterr().err


def test_link_mode_none_lists_files_in_place_for_nnunet_and_monai(tmp_path):
    world = make_world(tmp_path)
    populate(world)
    builder = DatasetBuilder(
        world.real_json,
        world.splits_path,
        [(world.manifest, world.synth_root)],
        BuildConfig(link_mode="none"),
    )
    out = builder.build(tmp_path / "out").out_dir
    spec = json.loads((out / "dataset.json").read_text())
    assert not any((out / "imagesTr").iterdir()) and (out / "labelsTr").is_dir()
    assert set(spec["dataset"]) == {e["case_id"] for e in spec["training"]}
    assert len(spec["dataset"]) == spec["numTraining"]
    for files in spec["dataset"].values():  # nnU-Net v2 resolves these from `out`
        assert os.path.isfile(os.path.join(out, files["label"]))
        assert all(os.path.isfile(os.path.join(out, p)) for p in files["images"])
    training = load_decathlon_datalist(str(out / "dataset.json"), data_list_key="training")
    assert all(os.path.isfile(i["image"][0]) for i in training)
