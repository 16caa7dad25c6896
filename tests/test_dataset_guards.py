"""Each guard of the dataset builder and the evaluation loader, with the attack it stops."""

from __future__ import annotations

import gzip
import json
import os
import shutil

import pytest
from test_dataset_support import (
    add_synthetic,
    clone_world,
    edit_row,
    forge,
    make_generator,
    make_world,
    populate,
)

from synthlesion.cli import main
from synthlesion.data.cases import Case
from synthlesion.data.splits import Splits, save_splits
from synthlesion.dataset import (
    BuildConfig,
    DatasetBuilder,
    EvaluationDataset,
    SyntheticAwareDataset,
    make_eval_loader,
)
from synthlesion.provenance import (
    DuplicateCase,
    EvaluationPatientLeak,
    GeneratorLeak,
    GeneratorRecordError,
    GuardViolations,
    ManifestTampered,
    PatientOnTwoSides,
    ReusedMask,
    SourceMismatch,
    SyntheticInEvaluation,
    SyntheticRegistry,
    UnsafePath,
)
from synthlesion.storage import canonical_json_hash, sha256_file


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    w = make_world(tmp_path_factory.mktemp("template"))
    populate(w)
    return w


@pytest.fixture
def world(template, tmp_path):
    return clone_world(template, tmp_path)


def build(world, out="out", **config):
    builder = DatasetBuilder(
        world.real_json,
        world.splits_path,
        [(world.manifest, world.synth_root)],
        BuildConfig(**config),
    )
    return builder.build(world.tmp / out)


def first_row(world):
    return json.loads(world.manifest.read_text().splitlines()[1])


def assert_nothing_written(world, out="out"):
    assert not (world.tmp / out).exists()
    assert not [p for p in world.tmp.iterdir() if p.name.startswith(f".{out}.")]


# -- synthetic content in evaluation ---------------------------------------------------------


def test_clean_world_builds(world):
    result = build(world)
    assert result.counts["train"]["synthetic"] == len(world.side_cases("train"))
    assert all(g["violations"] == 0 for g in result.guards.values())


def test_attack_copy_synthetic_over_a_val_image(world):
    victim = world.side_cases("val")[0]
    synthetic = world.synth_root / first_row(world)["images"][0]
    shutil.copyfile(synthetic, victim.image)
    with pytest.raises(SyntheticInEvaluation, match=victim.case_id) as info:
        build(world)
    assert info.value.case_id == victim.case_id
    assert_nothing_written(world)


def test_attack_rename_synthetic_into_the_test_folder(world):
    victim = world.side_cases("test")[0]
    row = first_row(world)
    os.replace(world.synth_root / row["images"][0], victim.image)  # moved, renamed
    builder = DatasetBuilder(
        world.real_json, world.splits_path, [(world.manifest, world.synth_root)]
    )
    report = builder.check()
    guards = {v.guard for v in report.violations}
    assert "synthetic-in-evaluation" in guards and "manifest-integrity" in guards
    registry = SyntheticRegistry.from_manifests(
        [(world.manifest, world.synth_root)], verify_files=False
    )
    with pytest.raises(SyntheticInEvaluation, match=row["case_id"]):
        EvaluationDataset([{"image": str(victim.image), "case_id": victim.case_id}], registry)


def test_attack_recompressed_synthetic_copy_is_caught_by_voxels(world):
    victim = world.side_cases("test")[0]
    synthetic = world.synth_root / first_row(world)["images"][0]
    victim.image.write_bytes(gzip.compress(gzip.decompress(synthetic.read_bytes()), 1))
    assert sha256_file(victim.image) != sha256_file(synthetic)
    with pytest.raises(SyntheticInEvaluation, match="decodes to the voxels"):
        build(world)
    build(world, check_voxels=False)  # the switch exists; the card says it was off
    card = (world.tmp / "out" / "dataset_card.md").read_text()
    assert "were not decoded" in card


def test_real_case_tagged_synthetic_is_refused(world):
    cases = [
        Case(c.case_id, c.patient_id, c.images, c.mask, origin="synthetic")
        if c in world.side_cases("val")[:1]
        else c
        for c in world.cases
    ]
    with pytest.raises(SyntheticInEvaluation, match="tagged synthetic"):
        DatasetBuilder(cases, world.splits).build(world.tmp / "out")


# -- evaluation patients in training ---------------------------------------------------------


def test_synthetic_case_of_a_test_patient_is_refused_naming_case_and_patient(world):
    source = world.side_cases("test")[0]
    with world.writer() as writer:
        add_synthetic(world, writer, source, "syn_from_test", seed=50)
    with pytest.raises(EvaluationPatientLeak, match=f"syn_from_test.*{source.patient_id}") as info:
        build(world)
    assert (info.value.case_id, info.value.patient_id) == ("syn_from_test", source.patient_id)


def test_forged_source_patient_still_refused(world):
    """A forger re-points an eval-patient row at a train patient and re-hashes everything."""
    source = world.side_cases("val")[0]
    train_patient = world.splits.patients("train")[0]
    with world.writer() as writer:
        add_synthetic(world, writer, source, "syn_from_val", seed=51)
    forge(world.manifest, lambda r: [*r[:-1], {**r[-1], "source_patient": train_patient}])
    with pytest.raises(EvaluationPatientLeak, match=source.patient_id):
        build(world)


def test_source_hashes_must_match_the_real_case(world):
    forge(world.manifest, lambda r: [r[0], {**r[1], "source_image_sha256": ["a" * 64]}, *r[2:]])
    with pytest.raises(SourceMismatch, match="source file hashes"):
        build(world)


# -- generators ------------------------------------------------------------------------------


def test_generator_trained_on_a_test_patient_is_refused(tmp_path):
    world = make_world(tmp_path)
    leaked = world.splits.patients("test")[0]
    world.generator = make_generator(world.model_dir, [*world.splits.patients("train"), leaked])
    populate(world)
    with pytest.raises(GeneratorLeak, match=f"evaluation patient.*{leaked}"):
        build(world)


def test_generator_record_edited_after_sampling_is_refused(world):
    record = world.model_dir / "training_record.json"
    data = json.loads(record.read_text())
    record.write_text(json.dumps({**data, "patient_id_hashes": data["patient_id_hashes"][:1]}))
    with pytest.raises(GeneratorRecordError, match="differs from the training record"):
        build(world)


def test_generator_weights_swapped_or_record_missing_is_refused(world):
    (world.model_dir / "weights.safetensors").write_bytes(b"other weights")
    with pytest.raises(GeneratorRecordError, match="model folder hash"):
        build(world)
    build(world, verify_generators=False)
    (world.model_dir / "training_record.json").unlink()
    with pytest.raises(GeneratorRecordError, match="not found"):
        build(world, "out2")


# -- manifests and paths -------------------------------------------------------------------


def test_hand_edited_manifest_row_refused_by_the_builder(world):
    edit_row(world.manifest, 3, source_split="train", seed=1)
    with pytest.raises(ManifestTampered, match=r"row 3\b"):
        build(world)


@pytest.mark.parametrize("bad", ["/tmp/x.nii.gz", "../real/imagesTr/x.nii.gz", "masks/out.nii.gz"])
def test_unsafe_manifest_paths_refused_by_the_builder(world, bad):
    if bad == "masks/out.nii.gz":
        os.symlink(world.real_json.parent / "labelsTr", world.synth_root / "masks" / "out.nii.gz")
    forge(world.manifest, lambda r: [r[0], {**r[1], "mask": bad}, *r[2:]])
    with pytest.raises(UnsafePath, match="row 1"):
        build(world, verify_files=False)


# -- split integrity -----------------------------------------------------------------------


def test_patient_on_two_sides_in_an_edited_splits_file(world):
    data = json.loads(world.splits_path.read_text())
    moved = data["sides"]["train"][0]
    data["sides"]["test"].append(moved)
    data.pop("sha256")
    data["sha256"] = canonical_json_hash(data)  # even re-locked
    world.splits_path.write_text(json.dumps(data))
    with pytest.raises(PatientOnTwoSides, match=moved):
        build(world)


def test_same_patient_under_two_spellings_on_two_sides(world):
    train_case = world.side_cases("train")[0]
    test_case = world.side_cases("test")[0]
    twin = train_case.patient_id.upper()
    cases = [
        Case(c.case_id, twin, c.images, c.mask, labels=c.labels)
        if c.patient_id == test_case.patient_id
        else c
        for c in world.cases
    ]
    sides = {
        s: tuple(twin if p == test_case.patient_id else p for p in world.splits.patients(s))
        for s in ("train", "val", "test")
    }
    splits = Splits(sides, {c.case_id: c.patient_id for c in cases})
    with pytest.raises(PatientOnTwoSides, match=train_case.patient_id):
        DatasetBuilder(cases, splits).build(world.tmp / "out")


def test_one_scan_under_two_ids_on_two_sides(world):
    train_case = world.side_cases("train")[0]
    test_case = world.side_cases("test")[0]
    shutil.copyfile(train_case.image, test_case.image)
    with pytest.raises(PatientOnTwoSides, match="same image"):
        DatasetBuilder(world.real_json, world.splits_path).build(world.tmp / "out")


def test_synthetic_case_id_colliding_with_a_real_id(world):
    source = world.side_cases("train")[0]
    with world.writer() as writer:
        add_synthetic(world, writer, source, source.case_id.upper(), seed=60)
    with pytest.raises(DuplicateCase, match=source.case_id):
        build(world)


# -- reused masks ----------------------------------------------------------------------------


def test_bank_mask_of_a_test_patient_transplanted_into_training(world):
    donor = world.side_cases("test")[0]
    with world.writer() as writer:
        add_synthetic(
            world,
            writer,
            world.side_cases("train")[0],
            "syn_bank",
            seed=70,
            mask_origin="bank",
            mask_source_sha256=sha256_file(donor.mask),
        )
    with pytest.raises(ReusedMask, match=f"syn_bank.*{donor.patient_id}"):
        build(world)


def test_second_transplanted_lesion_from_a_val_patient(world):
    """A case with two bank lesions: the first from a train mask, the second from a val mask."""
    first, second = world.side_cases("train")[0], world.side_cases("val")[0]
    sources = [
        {"sha256": sha256_file(c.mask), "case": c.case_id, "patient": c.patient_id}
        for c in (first, second)
    ]
    with world.writer() as writer:
        add_synthetic(
            world,
            writer,
            world.side_cases("train")[1],
            "syn_two_lesions",
            seed=73,
            mask_origin="bank",
            mask_source_sha256=sources[0]["sha256"],
            mask_source_case=first.case_id,
            mask_source_patient=first.patient_id,
            mask_sources=sources,
        )
    with pytest.raises(ReusedMask, match=f"syn_two_lesions.*{second.patient_id}"):
        build(world)


def test_one_real_mask_reused_for_train_and_eval_patients(world):
    donor = world.side_cases("train")[0]
    bank = {
        "mask_origin": "bank",
        "mask_source_sha256": sha256_file(donor.mask),
        "mask_source_case": donor.case_id,
        "mask_source_patient": donor.patient_id,
    }
    with world.writer() as writer:
        add_synthetic(
            world, writer, world.side_cases("train")[1], "syn_bank_train", seed=71, **bank
        )
        add_synthetic(world, writer, world.side_cases("val")[0], "syn_bank_val", seed=72, **bank)
    with pytest.raises(GuardViolations) as info:
        DatasetBuilder(
            world.real_json, world.splits_path, [(world.manifest, world.synth_root)]
        ).build(world.tmp / "out", report=True)
    kinds = {type(v) for v in info.value.violations}
    assert {ReusedMask, EvaluationPatientLeak} <= kinds
    assert any("both training" in v.message for v in info.value.violations)


# -- report mode -----------------------------------------------------------------------------


def test_report_lists_every_violation_and_the_cli_exits_1(world, capsys):
    with world.writer() as writer:
        add_synthetic(world, writer, world.side_cases("test")[0], "syn_test_a", seed=80)
    edit_row(world.manifest, 1, seed=5)
    report = DatasetBuilder(
        world.real_json, world.splits_path, [(world.manifest, world.synth_root)]
    ).check()
    assert not report.ok and {v.guard for v in report.violations} >= {
        "manifest-integrity",
        "evaluation-patient",
    }
    code = main(
        [
            "build-dataset",
            str(world.real_json),
            "--splits",
            str(world.splits_path),
            "--manifest",
            str(world.manifest),
            "--out",
            str(world.tmp / "out"),
            "--report",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "[manifest-integrity]" in err and "[evaluation-patient]" in err
    assert_nothing_written(world)


# -- evaluation loaders ----------------------------------------------------------------------


def test_evaluation_loader_yields_only_real_and_refuses_synthetic(world):
    out = build(world).out_dir
    val = EvaluationDataset.from_build(out, "val")
    batches = list(make_eval_loader(val))
    assert len(batches) == len(world.side_cases("val"))
    assert not any(bool(b["is_synthetic"].any()) for b in batches)
    train = SyntheticAwareDataset.from_build(out)
    with pytest.raises(SyntheticInEvaluation):
        make_eval_loader(train)  # a training set in an evaluation loader
    with pytest.raises(SyntheticInEvaluation):
        val + train  # noqa: B018 - concatenation
    synthetic_items = [i for i in train.items if i["origin"] == "synthetic"]
    with pytest.raises(SyntheticInEvaluation, match="tagged synthetic"):
        EvaluationDataset(synthetic_items[:1], val.registry)
    retagged = [{**synthetic_items[0], "origin": "real"}]  # tags stripped: content still known
    with pytest.raises(SyntheticInEvaluation, match="copied or renamed"):
        EvaluationDataset(retagged, val.registry)


def test_evaluation_files_swapped_after_the_build(world):
    out = build(world).out_dir
    victim = world.side_cases("test")[0]
    synthetic = world.synth_root / first_row(world)["images"][0]
    victim.image.write_bytes(gzip.compress(gzip.decompress(synthetic.read_bytes()), 9))
    with pytest.raises(SyntheticInEvaluation, match="re-saved copy"):
        EvaluationDataset.from_build(out, "test")
    item = {"image": str(victim.image), "case_id": victim.case_id}  # no recorded hash: voxels
    dataset = EvaluationDataset([item], SyntheticRegistry.load(out / "synthetic_registry.npz"))
    batches = iter(make_eval_loader(dataset, num_workers=1))  # raised in a worker process
    try:
        next(batches)
    except SyntheticInEvaluation as exc:  # the type crosses the process boundary
        assert "decodes to the voxels" in str(exc)
    else:
        pytest.fail("the worker yielded a re-compressed synthetic copy")
    finally:  # stop the worker now: left to the garbage collector it takes 5 s
        batches._shutdown_workers()


def test_edited_training_list_is_refused_by_the_loader(world):
    out = build(world).out_dir
    spec = json.loads((out / "dataset.json").read_text())
    val_patient = world.side_cases("val")[0].patient_id
    spec["training"][0]["patient_id"] = val_patient
    (out / "dataset.json").write_text(json.dumps(spec))
    from synthlesion.dataset import DatasetError

    with pytest.raises(DatasetError, match="changed after the build"):
        SyntheticAwareDataset.from_build(out)
    record = json.loads((out / "build.json").read_text())
    record["files"]["dataset.json"] = sha256_file(out / "dataset.json")
    (out / "build.json").write_text(json.dumps(record))
    with pytest.raises(EvaluationPatientLeak, match=val_patient):
        SyntheticAwareDataset.from_build(out)


def test_splits_object_is_reused_unchanged(world):
    save_splits(world.splits, world.tmp / "copy.json")
    assert build(world).counts["val"]["real"] == len(world.side_cases("val"))
