"""Patient-level splits: locked by hash, one patient never on two sides."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synthlesion.cli import main
from synthlesion.data.cases import Case
from synthlesion.data.splits import Splits, load_splits, save_splits, split_patients
from synthlesion.errors import SplitError


def make_cases(layout: list[tuple[int, bool]]) -> list[Case]:
    """``layout[i] = (n_scans, has_lesion)`` for patient i."""
    return [
        Case(f"p{i}_s{s}", f"p{i}", (f"p{i}_s{s}.nii.gz",), has_lesion=lesion)
        for i, (n, lesion) in enumerate(layout)
        for s in range(n)
    ]


def test_holdout_split_is_by_patient_stratified_and_seeded():
    cases = make_cases([(1 + i % 3, i % 2 == 0) for i in range(40)])
    splits = split_patients(cases, seed=3)
    sides = {s: set(splits.patients(s)) for s in ("train", "val", "test")}
    assert sum(len(v) for v in sides.values()) == 40
    assert len(sides["train"]) == 28 and len(sides["val"]) == 6 and len(sides["test"]) == 6
    for side, patients in sides.items():
        lesion = sum(int(p[1:]) % 2 == 0 for p in patients)
        assert abs(lesion - len(patients) / 2) <= 1, side
    assert split_patients(cases, seed=3).sha256 == splits.sha256
    assert split_patients(cases, seed=4).sha256 != splits.sha256
    for case in cases:
        assert splits.side_of_case(case.case_id) == splits.side_of_patient(case.patient_id)


def test_kfold_and_fold_view():
    cases = make_cases([(2, i % 3 == 0) for i in range(25)])
    splits = split_patients(cases, folds=5, fractions=(0.8, 0.0, 0.2), seed=0)
    assert len(splits.folds) == 5
    fold = splits.for_fold(2)
    assert set(fold.patients("val")) == set(splits.folds[2])
    assert not set(fold.patients("train")) & set(fold.patients("val"))
    assert set(fold.patients("test")) == set(splits.patients("test"))
    with pytest.raises(SplitError):
        splits.for_fold(9)


def test_locked_file_refuses_edits_and_patients_on_two_sides(tmp_path):
    cases = make_cases([(2, True)] * 10)
    splits = split_patients(cases)
    path = tmp_path / "splits.json"
    digest = save_splits(splits, path)
    loaded = load_splits(path)
    assert loaded.sha256 == digest and loaded.sides == splits.sides
    data = json.loads(path.read_text())
    moved = data["sides"]["test"][0]
    data["sides"]["train"].append(moved)
    path.write_text(json.dumps(data))
    with pytest.raises(SplitError, match="edited"):
        load_splits(path)
    data.pop("sha256")
    from synthlesion.storage import canonical_json_hash

    data["sha256"] = canonical_json_hash(data)
    path.write_text(json.dumps(data))
    with pytest.raises(SplitError, match=f"{moved} in"):
        load_splits(path)


def test_require_matches_refuses_a_foreign_dataset():
    splits = split_patients(make_cases([(1, True)] * 6))
    with pytest.raises(SplitError, match="not in the splits"):
        splits.require_matches([Case("other", "p0", ("x",))])
    with pytest.raises(SplitError, match="belongs to patient"):
        splits.require_matches([Case("p0_s0", "p9", ("x",))])


def test_bad_arguments():
    cases = make_cases([(1, True)] * 4)
    with pytest.raises(SplitError, match="fractions"):
        split_patients(cases, fractions=(0.5, 0.5, 0.5))
    with pytest.raises(SplitError, match="synthetic"):
        split_patients([Case("s", "p", ("x",), origin="synthetic")])
    with pytest.raises(SplitError, match="two sides"):
        Splits({"train": ("a",), "val": ("a",), "test": ()}, {})


@settings(max_examples=60, deadline=None)
@given(
    layout=st.lists(st.tuples(st.integers(1, 4), st.booleans()), min_size=1, max_size=40),
    seed=st.integers(0, 2**16),
    folds=st.sampled_from([None, 2, 3, 5]),
)
def test_property_no_patient_on_two_sides(layout, seed, folds):
    cases = make_cases(layout)
    splits = split_patients(cases, seed=seed, folds=folds)
    views = [splits] if folds is None else [splits.for_fold(i) for i in range(folds)]
    for view in views:
        side_of = {}
        for case in cases:
            side = view.side_of_patient(case.patient_id)
            assert side is not None
            assert side_of.setdefault(case.patient_id, side) == side
        members = [set(view.case_ids(s)) for s in ("train", "val", "test")]
        assert sum(map(len, members)) == len(cases)
        assert not (members[0] & members[1] or members[0] & members[2] or members[1] & members[2])


def test_cli_split(tmp_path, capsys):
    from conftest import ct_image, lesion_mask, write_dataset

    path = write_dataset(
        tmp_path / "ds",
        {f"c{i}": (ct_image(), lesion_mask()) for i in range(6)},
        patients={f"c{i}": f"p{i // 2}" for i in range(6)},
    )
    out = tmp_path / "splits.json"
    assert main(["split", str(path), "--out", str(out), "--seed", "1"]) == 0
    splits = load_splits(out)
    assert sorted(splits.cases) == [f"c{i}" for i in range(6)]
    assert main(["split", str(path), "--out", str(out)]) == 1  # never overwritten
    assert "never overwritten" in capsys.readouterr().err
