"""The downstream evaluation: config refusals, metrics, paired statistics, the hand-crafted
baseline through the builder, the harness's guards on bad input, and a tiny end-to-end run."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from synthlesion.cli import main
from synthlesion.config import load_config
from synthlesion.data.io import load_image
from synthlesion.data.sources import load_cases
from synthlesion.data.splits import load_splits
from synthlesion.dataset import BuildConfig, DatasetBuilder
from synthlesion.errors import ConfigError
from synthlesion.evaluation.config import EvaluateConfig, load_evaluate_config
from synthlesion.evaluation.errors import (
    EvaluationConfigError,
    RunFolderError,
    SyntheticTestDataError,
)
from synthlesion.evaluation.harness import run_evaluation
from synthlesion.evaluation.metrics import case_metrics, size_bin_names, summarise
from synthlesion.evaluation.scenario import Scenario, make_scenario
from synthlesion.evaluation.stats import paired_comparison
from synthlesion.pipelines.handcrafted import run_handcrafted
from synthlesion.provenance import read_manifest
from synthlesion.storage import sha256_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("evaluation")
    dataset, splits = make_scenario(
        root / "data", Scenario(lesion=(4, 1, 4), healthy=(8, 1, 3), size=48, seed=1)
    )
    hc = run_handcrafted(dataset, splits, root / "handcrafted")
    return {"root": root, "dataset": dataset, "splits": splits, "handcrafted": hc}


def tiny(world: dict, out: Path, **extra) -> EvaluateConfig:
    raw = {
        "out_dir": str(out),
        "data": str(world["dataset"]),
        "splits": str(world["splits"]),
        "handcrafted_manifest": str(world["handcrafted"].manifest),
        "arms": [
            {"name": "real", "kind": "real"},
            {"name": "classical", "kind": "classical"},
            {"name": "copy-paste", "kind": "copy_paste"},
            {"name": "handcrafted", "kind": "handcrafted", "share": 0.5},
        ],
        "seeds": [0, 1, 2],
        "threads": 1,
        "segmenter": {"steps": 4, "batch_size": 4, "channels": [8, 16, 32]},
        "metrics": {"bootstrap": 200},
        "fidelity": {"crop_size": 8, "grid_rows": 2},
        **extra,
    }
    return load_evaluate_config(raw)


# --- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize("share", [1.5, -0.1])
def test_a_synthetic_share_outside_0_1_is_a_typed_error(share, tmp_path):
    raw = {
        "out_dir": str(tmp_path / "run"),
        "data": "d.json",
        "splits": "s.json",
        "diffusion_manifests": ["m.jsonl"],
        "arms": [
            {"name": "real", "kind": "real"},
            {"name": "diffusion", "kind": "diffusion", "share": share},
        ],
    }
    with pytest.raises(EvaluationConfigError, match=r"share must lie in \[0, 1\]"):
        load_evaluate_config(raw)
    path = tmp_path / "evaluate.yaml"
    path.write_text(
        f"out_dir: {tmp_path / 'run'}\ndata: d.json\nsplits: s.json\n"
        f"diffusion_manifests: [m.jsonl]\narms:\n  - {{name: d, kind: diffusion, share: {share}}}\n"
    )
    assert main(["evaluate", "--config", str(path)]) == 1
    assert not (tmp_path / "run").exists()


def test_config_refuses_unknown_keys_and_inconsistent_arms(tmp_path):
    base = {"out_dir": "o", "data": "d", "splits": "s"}
    with pytest.raises(ConfigError, match="unknown key"):
        load_evaluate_config({**base, "segmenter": {"stepz": 3}})
    with pytest.raises(EvaluationConfigError, match="diffusion_manifests"):
        load_evaluate_config({**base, "arms": [{"name": "d", "kind": "diffusion", "share": 0.5}]})
    with pytest.raises(EvaluationConfigError, match="duplicate"):
        load_evaluate_config(
            {**base, "arms": [{"name": "a", "kind": "real"}, {"name": "a", "kind": "classical"}]}
        )
    with pytest.raises(EvaluationConfigError, match="share applies"):
        load_evaluate_config({**base, "arms": [{"name": "a", "kind": "real", "share": 0.3}]})
    with pytest.raises(ConfigError, match="test_split"):
        load_evaluate_config(
            {**base, "test_split": "train", "arms": [{"name": "a", "kind": "real"}]}
        )
    shipped = load_config(EvaluateConfig, ROOT / "configs" / "evaluate_phantom2d.yaml")
    assert [a.kind for a in shipped.arms].count("diffusion") >= 2 and len(shipped.seeds) >= 3


# --- metrics and statistics -----------------------------------------------------------------


def square(shape, corner, size):
    out = np.zeros(shape, bool)
    out[tuple(slice(c, c + size) for c in corner)] = True
    return out


def test_case_metrics_dice_detection_size_bins_and_surface_distance():
    shape, spacing = (40, 40), (2.0, 2.0)
    ref = square(shape, (5, 5), 4) | square(shape, (20, 20), 12)  # d ~ 9 mm and ~27 mm
    pred = square(shape, (20, 21), 12) | square(shape, (2, 30), 3)  # misses the small one, 1 FP
    m = case_metrics("c", pred, ref, spacing, size_bins_mm=(20.0,))
    assert m.lesions == [1, 1] and m.detected == [0, 1] and m.false_positives == [1, 0]
    inter = 11 * 12
    assert m.dice == pytest.approx(2 * inter / (pred.sum() + ref.sum()))
    assert m.hd95_mm > 0 and m.assd_mm > 0
    shifted = case_metrics(
        "s", square(shape, (20, 21), 12), square(shape, (20, 20), 12), spacing, (20.0,)
    )
    assert shifted.hd95_mm == pytest.approx(2.0)  # one voxel of 2 mm
    missed = case_metrics("m", np.zeros(shape, bool), ref, spacing, (20.0,))
    assert missed.dice == 0 and missed.hd95_mm == pytest.approx(math.hypot(80, 80))
    healthy = case_metrics("h", pred, np.zeros(shape, bool), spacing, (20.0,))
    assert math.isnan(healthy.dice) and sum(healthy.false_positives) == 2
    bins = size_bin_names((20.0,))
    summary = summarise([m, missed, healthy], bins)
    assert summary["sensitivity"] == pytest.approx(1 / 4)
    assert summary[f"sensitivity[{bins[0]}]"] == 0.0
    assert summary["fp_per_case"] == pytest.approx(3 / 3)
    assert summary["dice"] == pytest.approx(m.dice / 2)


def test_paired_comparison_is_case_by_case_with_a_bootstrap_interval():
    def runs(offset):
        return {
            s: [
                case_metrics(
                    f"c{i}",
                    square((20, 20), (5, 5), min(6, 4 + (i % 3) + offset)),
                    square((20, 20), (5, 5), 6),
                    (1.0, 1.0),
                    (),
                )
                for i in range(9)
            ]
            for s in (0, 1, 2)
        }

    better, worse = runs(1), runs(0)
    result = paired_comparison(better, worse, metric="dice", bootstrap=500)
    assert result["cases"] == 9 and result["wins"] == 6 and result["ties"] == 3
    assert 0 < result["ci_low"] <= result["mean_diff"] <= result["ci_high"]
    same = paired_comparison(worse, worse, metric="dice", bootstrap=500)
    assert same["mean_diff"] == 0 and same["wilcoxon_p"] == 1.0


# --- the hand-crafted baseline --------------------------------------------------------------


def test_handcrafted_cases_go_through_the_manifest_and_the_builder(world, tmp_path):
    report = world["handcrafted"]
    splits = load_splits(world["splits"])
    rows = list(read_manifest(report.manifest))
    assert rows and len(rows) == len(report.written) and not report.failed
    by_id = {c.case_id: c for c in load_cases(world["dataset"])}
    for row in rows[:3]:
        assert splits.side_of_patient(row.source_patient) == "train"
        assert row.mask_origin == "procedural" and row.scheduler == "handcrafted"
        source = by_id[row.source_case]
        before, after = load_image(source.image).array, load_image(report.out_dir / row.images[0])
        labels = load_image(report.out_dir / row.mask).array
        lesion = labels == 2
        organ = load_image(source.mask).array == 1
        assert lesion.any() and organ[lesion].all()  # inside the organ
        assert after.array.dtype == before.dtype
        changed = after.array != before
        assert changed[lesion].mean() > 0.5 and not changed[~organ].any()
    built = DatasetBuilder(
        world["dataset"], world["splits"], [report.manifest], BuildConfig(link_mode="none")
    ).build(tmp_path / "build")
    assert built.counts["train"]["synthetic"] == len(rows)
    assert all(g["violations"] == 0 for g in built.guards.values())
    record = json.loads((report.out_dir / "generator" / "training_record.json").read_text())
    assert record["patient_id_hashes"]  # the train patients whose lesions set the sizes


# --- bad input --------------------------------------------------------------------------------


def test_data_pointing_at_a_synthetic_set_is_refused_before_anything_is_written(world, tmp_path):
    out = tmp_path / "run"
    for data in (world["handcrafted"].out_dir, world["handcrafted"].manifest):
        config = tiny(world, out, data=str(data))
        with pytest.raises(SyntheticTestDataError, match="synthetic"):
            run_evaluation(config)
        assert not out.exists()


def test_a_dataset_listing_synthetic_cases_as_test_data_is_refused(world, tmp_path):
    spec = json.loads(Path(world["dataset"]).read_text())
    spec["training"][0] = {**spec["training"][0], "origin": "synthetic"}
    fake = Path(world["dataset"]).parent / "dataset_with_synthetic.json"
    fake.write_text(json.dumps(spec))
    try:
        with pytest.raises(SyntheticTestDataError, match="1 synthetic case"):
            run_evaluation(tiny(world, tmp_path / "run", data=str(fake)))
    finally:
        fake.unlink()
    assert not (tmp_path / "run").exists()


def test_a_test_scan_that_is_a_synthetic_file_stops_the_run(world, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(Path(world["dataset"]).parent, root / "phantom")
    hc = run_handcrafted(root / "phantom" / "dataset.json", world["splits"], root / "hc")
    splits = load_splits(world["splits"])
    test_case = next(
        c for c in load_cases(root / "phantom") if splits.side_of_patient(c.patient_id) == "test"
    )
    row = next(iter(read_manifest(hc.manifest)))
    shutil.copyfile(hc.out_dir / row.images[0], test_case.image)  # a synthetic scan as test
    config = tiny(
        world,
        tmp_path / "run",
        data=str(root / "phantom" / "dataset.json"),
        handcrafted_manifest=str(hc.manifest),
    )
    with pytest.raises(SyntheticTestDataError, match="synthetic"):
        run_evaluation(config)
    assert not (tmp_path / "run" / "results.json").exists()


def test_a_run_folder_of_another_run_is_never_overwritten(world, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="not an evaluation run"):
        run_evaluation(tiny(world, out))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "run.json").write_text(
        json.dumps({"format": "synthlesion-evaluation-run/1", "config_sha256": "0" * 64})
    )
    (other / "results.json").write_text('{"figures": "of another run"}')
    before = {p.name: sha256_file(p) for p in other.iterdir()}
    with pytest.raises(RunFolderError, match="another evaluation run"):
        run_evaluation(tiny(world, other))
    assert {p.name: sha256_file(p) for p in other.iterdir()} == before
    path = tmp_path / "evaluate.yaml"
    path.write_text(
        f"out_dir: {other}\ndata: {world['dataset']}\nsplits: {world['splits']}\n"
        "arms: [{name: real, kind: real}]\n"
    )
    assert main(["evaluate", "--config", str(path), "--no-progress"]) == 1


# --- end to end ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluated(world) -> dict:
    out = world["root"] / "run"
    results = run_evaluation(tiny(world, out))
    return {"out": out, "results": results}


@pytest.mark.slow
def test_every_arm_is_scored_on_the_guarded_test_split_with_spread_and_comparisons(
    evaluated, world
):
    results, out = evaluated["results"], evaluated["out"]
    assert [a["name"] for a in results["arms"]] == [
        "real",
        "classical",
        "copy-paste",
        "handcrafted",
    ]
    splits = load_splits(world["splits"])
    for arm in results["arms"]:
        dice = arm["metrics"]["dice"]
        assert len(dice["values"]) == 3 and dice["sd"] is not None
        assert arm["metrics"]["test_cases"]["mean"] == len(splits.case_ids("test"))
    hand = next(a for a in results["arms"] if a["name"] == "handcrafted")
    assert 0.2 < hand["drawn_share"] < 0.8
    guards = results["guards"]
    assert guards["evaluation"]["probe"]["refused"] is True
    assert guards["evaluation"]["loader_passes"] >= len(results["arms"]) * 3
    assert all(g["violations"] == 0 for g in guards["build"].values())
    pairs = {(c["arm"], c["against"], c["metric"]) for c in results["comparisons"]}
    assert ("handcrafted", "real", "dice") in pairs
    fid = results["fidelity"]["generators"]["handcrafted"]
    assert fid["lesions"] > 0 and 0 <= fid["adherence"]["voxel_fraction"] <= 1
    assert fid["memorisation"]["threshold"] == 0.9
    assert (out / "evaluate_config.yaml").is_file()
    saved = json.loads((out / "results.json").read_text())
    assert saved["config_sha256"] == results["config_sha256"]
    for name in (
        "dice",
        "sensitivity_by_size",
        "fp_by_size",
        "hd95",
        "paired_dice",
        "grid_handcrafted",
    ):
        assert (out / "figures" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_a_rerun_of_the_same_config_resumes_without_retraining(evaluated, world, monkeypatch):
    import synthlesion.evaluation.harness as harness

    def refuse(*args, **kwargs):
        raise AssertionError("retrained a finished arm")

    monkeypatch.setattr(harness, "train_segmenter", refuse)
    again = run_evaluation(tiny(world, evaluated["out"]))
    assert again["arms"][0]["metrics"]["dice"] == evaluated["results"]["arms"][0]["metrics"]["dice"]


@pytest.mark.slow
def test_segmenter_training_is_seeded(world, evaluated):
    from synthlesion.evaluation import datasets as evdata
    from synthlesion.evaluation.config import ArmConfig, SegmenterConfig
    from synthlesion.evaluation.segmenter import ArmBatches, train_segmenter

    cases = load_cases(world["dataset"])
    from synthlesion.data.intensity import IntensityNormaliser

    normaliser = IntensityNormaliser.for_modality(cases[0].modality)
    build = world["root"] / "run" / "build"
    kinds = evdata.generator_kinds({"handcrafted": [world["handcrafted"].manifest]})
    pool = evdata.load_training_pool(build, kinds, normaliser)
    cfg = SegmenterConfig(steps=2, batch_size=2, channels=(4, 8))
    arm = ArmConfig("classical", "classical")
    state = torch.random.get_rng_state()
    nets = [
        train_segmenter(
            ArmBatches(pool.real, arm, cfg, 7, pool.lesion_values, pool.organ_values), cfg, 7
        ).network.state_dict()
        for _ in range(2)
    ]
    assert torch.equal(state, torch.random.get_rng_state())  # no hidden global random state
    assert all(torch.equal(nets[0][k], nets[1][k]) for k in nets[0])


# --- the report, as a person sees it ------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(args: list[str], tmp_path: Path) -> str:
    import subprocess

    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        *args,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (apt-get install chromium); the report is not rendered",
)
def test_the_report_renders_with_its_images_tables_and_plots(evaluated, tmp_path):
    report = evaluated["out"] / "report.html"
    text = report.read_text()
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")  # offline
    dom = chromium(["--dump-dom", report.as_uri()], tmp_path)
    images = dom.count('src="data:image/png;base64,')
    assert images >= 1 and dom.count("<svg") >= 5
    for table in ("arms", "comparisons", "fidelity", "guards"):
        assert f'id="{table}"' in dom
    for arm in ("real", "classical", "copy-paste", "handcrafted"):
        assert f"<td>{arm}</td>" in dom
    assert "Dataset card" in dom and "refused" in dom
    shot = tmp_path / "report.png"
    chromium(
        ["--hide-scrollbars", "--window-size=1200,3000", f"--screenshot={shot}", report.as_uri()],
        tmp_path,
    )
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1200, 3000)
        colours = image.convert("RGB").resize((60, 150)).getcolors(maxcolors=100000)
        assert colours is not None and len(colours) > 50  # not a blank page


@pytest.mark.slow
def test_the_same_harness_runs_on_3d_volumes(tmp_path):
    dataset, splits = make_scenario(
        tmp_path / "data",
        Scenario(lesion=(2, 1, 2), healthy=(3, 0, 1), size=48, spatial_dims=3, seed=2),
    )
    config = load_evaluate_config(
        {
            "out_dir": str(tmp_path / "run"),
            "data": str(dataset),
            "splits": str(splits),
            "arms": [
                {"name": "real", "kind": "real"},
                {"name": "handcrafted", "kind": "handcrafted", "share": 0.5},
            ],
            "seeds": [0, 1, 2],
            "threads": 1,
            "segmenter": {
                "steps": 2,
                "batch_size": 2,
                "channels": [4, 8],
                "patch_size": [16, 16, 8],
            },
            "metrics": {"bootstrap": 100},
            "fidelity": {"crop_size": 8, "grid_rows": 1},
        }
    )
    results = run_evaluation(config)
    assert results["data"]["train_synthetic"]["handcrafted"] == 3
    assert all(len(a["metrics"]["dice"]["values"]) == 3 for a in results["arms"])
    assert (tmp_path / "run" / "figures" / "grid_handcrafted.png").is_file()
