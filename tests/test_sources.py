"""Case sources: Decathlon/nnU-Net dataset.json, CSV/JSONL manifests, paired folders."""

from __future__ import annotations

import json

import pytest
from conftest import ct_image, lesion_mask, write_dataset, write_nifti

from synthlesion.data.cases import Case, patient_from_case_id
from synthlesion.data.sources import (
    duplicate_case_ids,
    load_cases,
    load_decathlon,
    require_unique_case_ids,
)
from synthlesion.errors import CaseSourceError


def test_decathlon_nnunet_v2_labels_and_patients(tmp_path):
    path = write_dataset(
        tmp_path / "ds",
        {"liver_001_t0": (ct_image(), lesion_mask()), "liver_001_t1": (ct_image(), lesion_mask())},
        labels={"background": 0, "liver": 1, "tumour": 2},
    )
    cases = load_decathlon(path, patient_pattern=r"(?P<patient>liver_\d+)_t\d")
    assert [c.case_id for c in cases] == ["liver_001_t0", "liver_001_t1"]
    assert {c.patient_id for c in cases} == {"liver_001"}
    assert cases[0].labels == {0: "background", 1: "liver", 2: "tumour"}
    assert cases[0].lesion_labels == (2,)
    assert cases[0].modality == "CT"
    assert cases[0].images[0].exists() and cases[0].mask.exists()


def test_msd_style_labels_and_multichannel(tmp_path):
    root = tmp_path / "msd"
    (root / "imagesTr").mkdir(parents=True)
    spec = {
        "modality": {"0": "FLAIR", "1": "T1w"},
        "labels": {"0": "background", "1": "edema", "2": "tumor"},
        "training": [
            {
                "image": ["./imagesTr/b_0000.nii.gz", "./imagesTr/b_0001.nii.gz"],
                "label": "./labelsTr/b.nii.gz",
            }
        ],
    }
    (root / "dataset.json").write_text(json.dumps(spec))
    (case,) = load_cases(root)
    assert case.case_id == "b" and case.patient_id == "b"
    assert len(case.images) == 2 and case.modalities == ("FLAIR", "T1w")
    assert case.labels[2] == "tumor" and case.lesion_labels == (2,)


def test_nnunet_folder_without_training_list(tmp_path):
    root = tmp_path / "nn"
    write_dataset(root, {"c1": (ct_image(), lesion_mask()), "c2": (ct_image(), None)})
    spec = json.loads((root / "dataset.json").read_text())
    del spec["training"]
    (root / "dataset.json").write_text(json.dumps(spec))
    cases = load_cases(root)
    assert [c.case_id for c in cases] == ["c1", "c2"]
    assert cases[1].mask is None


def test_jsonl_and_csv_manifests(tmp_path):
    write_nifti(tmp_path / "a.nii.gz", ct_image())
    (tmp_path / "m.jsonl").write_text(
        json.dumps(
            {
                "case_id": "a",
                "patient_id": "P1",
                "image": "a.nii.gz",
                "mask": "a.nii.gz",
                "modality": "CT",
                "scanner": "X",
            }
        )
        + "\n\n"
    )
    (case,) = load_cases(tmp_path / "m.jsonl")
    assert case.patient_id == "P1" and case.provenance["scanner"] == "X"
    (tmp_path / "m.csv").write_text("case_id,image,images\nscan_7_a,a.nii.gz,\n")
    (case,) = load_cases(tmp_path / "m.csv", patient_pattern=r"scan_(\d+)")
    assert case.patient_id == "7" and case.images[0] == tmp_path / "a.nii.gz"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("image\nx.nii.gz\n", "case_id"),
        ("case_id,image\nq,\n", "'image' is missing"),
        ("case_id,image,origin\nq,x.nii.gz,fake\n", "origin"),
    ],
)
def test_bad_manifests_name_the_line(tmp_path, text, match):
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(CaseSourceError, match=match):
        load_cases(tmp_path / "m.csv")


def test_bad_dataset_json(tmp_path):
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(CaseSourceError, match="invalid JSON"):
        load_cases(tmp_path)


def test_patient_pattern_that_does_not_match(tmp_path):
    with pytest.raises(ValueError, match="does not match"):
        patient_from_case_id("abc", r"\d+")
    assert patient_from_case_id("abc", None) == "abc"


def test_duplicates_are_found_ignoring_case():
    cases = [Case(i, "p", ("x",)) for i in ("A1", "a1", "b", "b")]
    assert sorted(map(sorted, duplicate_case_ids(cases))) == [["A1", "a1"], ["b", "b"]]
    with pytest.raises(CaseSourceError, match="duplicate"):
        require_unique_case_ids(cases)
