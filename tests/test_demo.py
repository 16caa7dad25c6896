"""`synthlesion demo`: the main job end to end (quick profile), and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from synthlesion.cli import main
from synthlesion.evaluation.demo import run_demo
from synthlesion.evaluation.errors import RunFolderError
from synthlesion.provenance import read_manifest
from synthlesion.provenance.identity import PATIENT_HASH_SCHEME


def test_demo_refuses_a_folder_holding_other_files(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="not empty"):
        run_demo(tmp_path)
    assert main(["demo", "--out", str(tmp_path), "--quick", "--no-progress"]) == 1
    assert "nothing was overwritten" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_says_where_everything_is(tmp_path, capsys):
    out = tmp_path / "demo"
    status = main(["demo", "--out", str(out), "--quick", "--threads", "1", "--no-progress"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    for stage in ("1/5 phantom", "2/5 training", "3/5 painting", "4/5 building", "5/5 downstream"):
        assert stage in printed
    assert "Everything is in" in printed and "report.html" in printed
    assert (out / "data" / "phantom" / "dataset.json").is_file()
    model = out / "diffusion" / "model"
    record = json.loads((model / "training_record.json").read_text())
    assert record["patient_id_hashes"]
    assert record["patient_hash_scheme"] == PATIENT_HASH_SCHEME  # complete as training wrote it
    rows = list(read_manifest(out / "synthetic" / "manifest.jsonl"))
    assert rows and all(r.source_split == "train" for r in rows)
    build = json.loads((out / "dataset" / "build.json").read_text())
    assert build["counts"]["train"]["synthetic"] == len(rows)
    assert (out / "dataset" / "dataset_card.md").is_file()
    results = json.loads((out / "evaluation" / "results.json").read_text())
    kinds = {a["kind"] for a in results["arms"].values()}
    assert kinds == {"real", "copy_paste", "handcrafted", "diffusion"}
    assert all(a["runs"] == 1 for a in results["arms"].values())  # one split, one seed (quick)
    assert results["positive_patch_share_spread"] <= 0.02
    assert "diffusion" in results["realism"]["repaint"]
    report = Path(out / "evaluation" / "report.html")
    assert report.is_file() and "Realism" in report.read_text()
    assert json.loads((out / "demo.json").read_text())["paths"]["report"] == str(report)
    # an earlier demo is only replaced on request
    assert main(["demo", "--out", str(out), "--quick", "--no-progress"]) == 1
