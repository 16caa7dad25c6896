"""The downstream evaluation: config refusals, metrics, paired statistics, the hand-crafted
baseline through the builder, the harness's guards on bad input, and a tiny end-to-end run."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from synthlesion.cli import main
from synthlesion.data.io import load_image
from synthlesion.data.sources import load_cases
from synthlesion.data.splits import load_splits
from synthlesion.dataset import BuildConfig, DatasetBuilder
from synthlesion.errors import ConfigError
from synthlesion.evaluation.config import EvaluateConfig, load_evaluate_config
from synthlesion.evaluation.errors import (
    EvaluationConfigError,
    EvaluationError,
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
        root / "data",
        Scenario(lesion=(4, 1, 5), healthy=(8, 1, 3), size=48, seed=1, splits=2),
    )
    hc = run_handcrafted(dataset, splits[0], root / "handcrafted")
    return {
        "root": root,
        "dataset": dataset,
        "splits": splits[0],
        "all_splits": splits,
        "handcrafted": hc,
    }


def tiny(world: dict, out: Path, **extra) -> EvaluateConfig:
    raw = {
        "out_dir": str(out),
        "data": str(world["dataset"]),
        "splits": str(world["splits"]),
        "handcrafted_manifest": str(world["handcrafted"].manifest),
        "arms": [
            {"name": "real", "kind": "real"},
            {"name": "copy-paste", "kind": "copy_paste", "share": 0.5},
            {"name": "handcrafted", "kind": "handcrafted", "share": 0.5},
        ],
        "seeds": [0, 1],
        "threads": 1,
        "protocol": {"min_test_lesion_cases": 4, "convergence_check": False},
        "segmenter": {
            "steps": 4,
            "batch_size": 4,
            "channels": [8, 16, 32],
            "patch_size": [32, 32],
            "validate_every": 2,
        },
        "gate": {"min_dice": 0.0},
        "metrics": {"bootstrap": 200},
        "fidelity": {"crop_size": 8, "grid_rows": 2, "classifier_folds": 2, "kid_subsets": 5},
        **extra,
    }
    return load_evaluate_config(raw)


# --- config ---------------------------------------------------------------------------------


def test_steps_by_budget_reads_yaml_and_json_keys_and_refuses_nonsense():
    from synthlesion.evaluation.config import SegmenterConfig

    cfg = SegmenterConfig(steps=100, steps_by_budget={16: 300, "4": 50})
    assert (cfg.steps_for("16"), cfg.steps_for("4"), cfg.steps_for("8")) == (300, 50, 100)
    assert cfg.steps_for("all") == 300  # the upper reference: the largest
    assert SegmenterConfig(steps=100, steps_by_budget={"all": 70}).steps_for("all") == 70
    for bad in ({"b4": 10}, {4: 0}, {"x": 5}, {"04": 5}, {"\u00b2": 7}, {0: 5}, {4: True}):
        with pytest.raises(EvaluationConfigError, match="steps_by_budget"):
            SegmenterConfig(steps_by_budget=bad)
    for field, value in (("schedule", "WSD"), ("select", "best"), ("norm", "layer")):
        with pytest.raises(EvaluationConfigError, match=f"segmenter.{field} must be one of"):
            SegmenterConfig(**{field: value})


def test_steps_for_a_budget_the_protocol_does_not_have_is_refused(tmp_path):
    raw = {
        "out_dir": str(tmp_path / "run"),
        "data": "d.json",
        "splits": "s.json",
        "arms": [{"name": "real", "kind": "real"}],
        "protocol": {"budgets": [2, 3]},
        "segmenter": {"steps_by_budget": {40: 10000}},  # a typo for 4 (or 3)
        "device": " cpu ",
    }
    with pytest.raises(
        EvaluationConfigError, match=r"budget\(s\) \['40'\] are not in protocol.budgets"
    ):
        load_evaluate_config(raw)
    raw["segmenter"] = {"steps_by_budget": {3: 50, "all": 80}}
    config = load_evaluate_config(raw)
    assert config.device == "cpu"  # stored as torch takes it


@pytest.mark.parametrize("share", [1.5, -0.1])
def test_a_synthetic_share_outside_0_1_is_a_typed_error(share, tmp_path):
    raw = {
        "out_dir": str(tmp_path / "run"),
        "data": "d.json",
        "splits": "s.json",
        "diffusion": {"manifests": ["m.jsonl"]},
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
        f"diffusion: {{manifests: [m.jsonl]}}\narms:\n  - {{name: d, kind: diffusion, share: {share}}}\n"
    )
    assert main(["evaluate", "--config", str(path)]) == 1
    assert not (tmp_path / "run").exists()


def test_config_refuses_unknown_keys_and_inconsistent_arms(tmp_path):
    base = {"out_dir": "o", "data": "d", "splits": "s"}
    with pytest.raises(ConfigError, match="unknown key"):
        load_evaluate_config({**base, "segmenter": {"stepz": 3}})
    with pytest.raises(EvaluationConfigError, match="diffusion.train_config"):
        load_evaluate_config({**base, "arms": [{"name": "d", "kind": "diffusion", "share": 0.5}]})
    with pytest.raises(EvaluationConfigError, match="duplicate"):
        load_evaluate_config(
            {**base, "arms": [{"name": "a", "kind": "real"}, {"name": "a", "kind": "copy_paste",
                                                           "share": 0.5}]}
        )  # fmt: skip
    with pytest.raises(EvaluationConfigError, match="one split and one budget"):
        load_evaluate_config(
            {
                **base,
                "splits": ["s0", "s1"],
                "diffusion": {"manifests": ["m.jsonl"]},
                "arms": [{"name": "d", "kind": "diffusion", "share": 0.5}],
            }
        )
    with pytest.raises(EvaluationConfigError, match="budgets"):
        load_evaluate_config({**base, "protocol": {"budgets": [4, 4]}})
    with pytest.raises(ConfigError, match="kind must be one of"):
        load_evaluate_config({**base, "arms": [{"name": "c", "kind": "classical"}]})
    with pytest.raises(EvaluationConfigError, match="share applies"):
        load_evaluate_config({**base, "arms": [{"name": "a", "kind": "real", "share": 0.3}]})
    with pytest.raises(ConfigError, match="test_split"):
        load_evaluate_config(
            {**base, "test_split": "train", "arms": [{"name": "a", "kind": "real"}]}
        )
    shipped = load_evaluate_config(ROOT / "configs" / "evaluate_phantom2d.yaml")
    assert shipped.protocol.budgets and len(shipped.splits) >= 1
    assert {a.kind for a in shipped.arms} == {"real", "copy_paste", "handcrafted", "diffusion"}


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
    passed = [r for r in rows if r.quality["passed"]]
    # the same gate as diffusion lesions: each lesion's figures and reasons are recorded, and
    # the builder leaves a rejected case out
    assert all("z_std" in lesion for r in rows for lesion in r.quality["lesions"])
    assert all(
        lesion["reasons"]
        for r in rows
        if r not in passed
        for lesion in r.quality["lesions"]
        if not lesion["passed"]
    )
    assert built.counts["train"]["synthetic"] == len(passed)
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


# --- the protocol's bad input, before anything trains ---------------------------------------


def test_a_budget_beyond_the_lesion_scans_or_a_small_test_side_is_refused_first(world, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(EvaluationConfigError, match=r"budget\(s\) \[9\] exceed the 4 lesion"):
        run_evaluation(
            tiny(
                world,
                out,
                handcrafted_manifest=None,
                protocol={"budgets": [2, 9], "min_test_lesion_cases": 4},
            )
        )
    with pytest.raises(EvaluationConfigError, match="holds 5 lesion scan.*at least 30"):
        run_evaluation(tiny(world, out, protocol={"min_test_lesion_cases": 30}))
    with pytest.raises(EvaluationConfigError, match="needs a real arm"):
        run_evaluation(tiny(world, out, arms=[{"name": "h", "kind": "handcrafted", "share": 0.5}]))
    assert not out.exists()


# --- batches: the same share of lesion patches for every arm -----------------------------------


def _pool(world):
    from synthlesion.data.intensity import IntensityNormaliser
    from synthlesion.evaluation import datasets as evdata
    from synthlesion.evaluation.datasets import build_dataset

    build = world["root"] / "pool-build"
    build_dataset(
        world["dataset"], world["splits"], [world["handcrafted"].manifest], build,
        reuse=(build / "build.json").is_file(),
    )  # fmt: skip
    kinds = evdata.generator_kinds({"handcrafted": [world["handcrafted"].manifest]})
    cases = load_cases(world["dataset"])
    return evdata.load_training_pool(
        build, kinds, IntensityNormaliser.for_modality(cases[0].modality)
    )


def test_every_arm_sees_the_same_share_of_lesion_patches_and_negatives_hold_no_lesion(world):
    from synthlesion.evaluation.config import ArmConfig, SegmenterConfig
    from synthlesion.evaluation.segmenter import ArmBatches

    pool = _pool(world)
    cfg = SegmenterConfig(steps=30, batch_size=12, patch_size=(24, 24), foreground_share=0.33)
    shares = {}
    for arm in (
        ArmConfig("real", "real"),
        ArmConfig("cp", "copy_paste", 0.5),
        ArmConfig("hc", "handcrafted", 0.5),
    ):
        new = pool.synthetic.get("handcrafted", []) if arm.kind == "handcrafted" else []
        batches = ArmBatches(pool.real, new, arm, cfg, 3, pool.lesion_values, pool.organ_values)
        for image, target in batches:
            assert image.shape == (12, 1, 24, 24) and target.shape == (12, 1, 24, 24)
            assert set(torch.unique(target).tolist()) <= {0, 1}
        counts = batches.counts.to_dict()
        shares[arm.name] = counts["positive_patch_share"]
        if arm.kind != "real":
            assert counts["new_lesion_patches"] > 0.3 * 30 * 4 * 0.5  # about half the positives
    assert max(shares.values()) - min(shares.values()) <= 0.02, shares
    assert all(abs(v - 4 / 12) <= 0.03 for v in shares.values()), shares  # k = round(.33 * 12)


def test_segmenter_training_is_seeded_and_leaves_global_random_state_alone(world):
    from synthlesion.evaluation.config import ArmConfig, SegmenterConfig
    from synthlesion.evaluation.segmenter import ArmBatches, train_segmenter

    pool = _pool(world)
    cfg = SegmenterConfig(steps=2, batch_size=4, channels=(4, 8), patch_size=(16, 16))
    arm = ArmConfig("real", "real")
    state = torch.random.get_rng_state()
    nets = [
        train_segmenter(
            ArmBatches(pool.real, [], arm, cfg, 7, pool.lesion_values, pool.organ_values), cfg, 7
        ).network.state_dict()
        for _ in range(2)
    ]
    assert torch.equal(state, torch.random.get_rng_state())  # no hidden global random state
    assert all(torch.equal(nets[0][k], nets[1][k]) for k in nets[0])


@pytest.mark.parametrize("schedule", ["wsd", "cosine"])
def test_a_budget_trained_beside_a_longer_one_gives_the_weights_of_a_run_alone(world, schedule):
    """The convergence check branches its run of twice the steps off the real arm's run
    (``wsd``): each budget must still be exactly what a run of that many steps gives."""
    from synthlesion.evaluation.config import ArmConfig, SegmenterConfig
    from synthlesion.evaluation.segmenter import ArmBatches, train_segmenters

    pool = _pool(world)
    cfg = SegmenterConfig(
        steps=6, batch_size=4, channels=(4, 8), patch_size=(16, 16), schedule=schedule,
        validate_every=2, decay_fraction=0.5,
    )  # fmt: skip
    arm = ArmConfig("real", "real")
    val = [c for c in pool.real if c.label.max() > 1][:2]

    def batches():
        return ArmBatches(pool.real, [], arm, cfg, 7, pool.lesion_values, pool.organ_values)

    both = train_segmenters(batches(), cfg, 7, [6, 12], validation=val)
    for budget in (6, 12):
        alone = train_segmenters(batches(), cfg, 7, [budget], validation=val)[budget]
        got = both[budget]
        assert got.steps == budget and got.losses == alone.losses
        assert got.validation == alone.validation and got.selected_step == alone.selected_step
        a, b = got.network.state_dict(), alone.network.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert got.counts == alone.counts
    if schedule == "wsd":
        assert both[6].losses[:3] == both[12].losses[:3]  # the stable part (3 of 6 steps)
        assert both[6].losses[3:] != both[12].losses[3:6]  # then they part


def test_best_validation_selection_keeps_the_weights_of_the_best_step(world):
    from synthlesion.evaluation.config import ArmConfig, SegmenterConfig
    from synthlesion.evaluation.segmenter import ArmBatches, train_segmenters, validation_dice

    pool = _pool(world)
    val = [c for c in pool.real if c.label.max() > 1][:2]
    arm = ArmConfig("real", "real")
    runs = {}
    for select in ("best_validation", "last"):
        cfg = SegmenterConfig(
            steps=8, batch_size=4, channels=(4, 8), patch_size=(16, 16), validate_every=2,
            select=select,
        )  # fmt: skip
        batches = ArmBatches(pool.real, [], arm, cfg, 5, pool.lesion_values, pool.organ_values)
        runs[select] = train_segmenters(batches, cfg, 5, [8], validation=val)[8]
    best, last = runs["best_validation"], runs["last"]
    assert [s for s, _ in best.validation] == [2, 4, 6, 8] and best.validation == last.validation
    scores = dict(best.validation)
    top = max(scores.values())
    assert best.selected_step == min(s for s, v in scores.items() if v == top)
    assert last.selected_step == 8
    # the kept weights score what the curve says at that step
    assert validation_dice(best, val, pool.lesion_values) == pytest.approx(top)
    assert validation_dice(last, val, pool.lesion_values) == pytest.approx(scores[8])


# --- end to end ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluated(world) -> dict:
    out = world["root"] / "run"
    config = tiny(
        world,
        out,
        splits=[str(p) for p in world["all_splits"]],
        handcrafted_manifest=None,
        protocol={"budgets": [2, 3], "min_test_lesion_cases": 4},
    )
    # the larger budget gets steps of its own (and the upper reference the largest)
    config = replace(config, segmenter=replace(config.segmenter, steps_by_budget={"3": 6}))
    results = run_evaluation(config)
    return {"out": out, "results": results, "config": config}


@pytest.mark.slow
def test_the_protocol_pools_splits_budgets_and_seeds_with_every_figure(evaluated, world):
    results, out = evaluated["results"], evaluated["out"]
    assert results["format"] == "synthlesion-evaluation/2"
    assert results["budgets"] == ["b2", "b3"]
    names = {f"{a}@{b}" for a in ("real", "copy-paste", "handcrafted") for b in ("b2", "b3")}
    assert set(results["arms"]) == names
    for arm in results["arms"].values():
        low, high = arm["dice_ci"]
        assert low <= arm["dice_mean"] <= high and arm["runs"] == 4  # 2 splits x 2 seeds
        assert abs(arm["positive_patch_share"] - 1 / 4) <= 0.03  # round(.33 * 4) of 4
    assert results["positive_patch_share_spread"] <= 0.02
    comparisons = results["comparisons"]
    assert "handcrafted@b2_vs_real" in comparisons and "copy-paste@b3_vs_real" in comparisons
    ps = [c["p_holm"] for c in comparisons.values()]
    assert all(0 <= p <= 1 for p in ps if p is not None)
    assert all(
        c["p_holm"] >= c["p_wilcoxon"] for c in comparisons.values() if c["p_wilcoxon"] is not None
    )
    assert results["budget_steps"] == {"b2": 4, "b3": 6}
    for budget, steps in (("b2", 4), ("b3", 6)):
        conv = results["convergence"][budget]
        assert conv["doubled_steps"] == 2 * steps
        assert conv["test_dice_change_when_doubled"] is not None
        val = conv["validation"]
        assert val["gain_when_doubled"] == pytest.approx(
            val["val_dice_best_doubled"] - val["val_dice_best"]
        )
        assert isinstance(val["plateaued"], bool) and 0 < val["selected_step_share"] <= 1
    # the doubled run branched off the real arm's run: its first (stable) steps are the same
    cell = evaluated["out"] / "cells" / "s0-b2" / "arms"
    once = json.loads((cell / "real" / "seed-0" / "result.json").read_text())
    twice = json.loads((cell / "real@2x" / "seed-0" / "result.json").read_text())
    assert (once["steps"], twice["steps"], once["schedule"]) == (4, 8, "wsd")
    b3 = evaluated["out"] / "cells" / "s0-b3" / "arms"
    assert json.loads((b3 / "real@2x" / "seed-0" / "result.json").read_text())["steps"] == 12
    assert json.loads((b3 / "handcrafted" / "seed-1" / "result.json").read_text())["steps"] == 6
    upper = evaluated["out"] / "cells" / "s0-upper" / "arms"
    assert json.loads((upper / "real" / "seed-0" / "result.json").read_text())["steps"] == 6
    assert once["validation"][0] == twice["validation"][0]  # step 2 of 4 and of 8: shared
    assert once["selected_step"] in [s for s, _ in once["validation"]]
    assert isinstance(results["real_converged"], bool)
    assert results["upper_reference"]["runs"] == 4 and results["upper_reference_dice"] is not None
    assert set(results["threshold_floor"]) == {"b2", "b3"} and results["threshold_floor_dice"] >= 0
    gate = results["gate"]
    assert 0 <= gate["rejected_share"]["handcrafted"] <= 1
    realism = results["realism"]
    assert realism["repaint"]["mean_fill"]["lesions"] > 0
    for name in ("mean_fill", "copy_paste", "handcrafted"):
        assert {"mse", "psnr", "ssim"} <= set(realism["repaint"][name])
    assert "handcrafted" in realism["kid"] and "mean" in realism["kid_floor"]
    assert 0 <= realism["classifier_auc"]["copy_paste"]["auc"] <= 1
    assert 0 <= realism["classifier_auc_floor"]["auc"] <= 1
    assert 0 <= realism["classifier_auc_control"]["auc"] <= 1  # the positive control
    splits = load_splits(world["all_splits"][0])
    cell = next(c for c in results["cells"] if c["name"] == "s0-b2")
    assert cell["data"]["test_cases"] == len(splits.case_ids("test"))
    assert cell["data"]["train_real_lesion"] == 2  # the budget, not the 4 of the train side
    assert cell["build"]["evaluation_guard"]["probe"]["refused"] is True
    assert all(g["violations"] == 0 for g in cell["build"]["guards"].values())
    saved = json.loads((out / "results.json").read_text())
    assert saved["arms"].keys() == results["arms"].keys()


@pytest.mark.slow
def test_a_budget_is_a_nested_draw_and_its_generators_see_only_its_labels(evaluated):
    out = evaluated["out"]
    small = json.loads((out / "cells" / "s0-b2" / "real" / "dataset.json").read_text())
    large = json.loads((out / "cells" / "s0-b3" / "real" / "dataset.json").read_text())
    les = lambda spec: {e["case_id"] for e in spec["training"] if e["has_lesion"]}  # noqa: E731
    assert les(small) < les(large)
    record = json.loads(
        (out / "cells" / "s0-b2" / "handcrafted" / "generator" / "training_record.json").read_text()
    )
    splits = load_splits(out / "cells" / "s0-b2" / "real" / "splits.json")
    from synthlesion.provenance.identity import hash_patient_id

    labelled = {
        hash_patient_id(e["patient_id"])
        for e in small["training"]
        if e["has_lesion"] and splits.side_of_patient(e["patient_id"]) == "train"
    }
    assert set(record["patient_id_hashes"]) == labelled and len(labelled) == 2


@pytest.mark.slow
def test_a_rerun_of_the_same_config_resumes_without_retraining(evaluated, monkeypatch):
    import synthlesion.evaluation.cell as cell

    def refuse(*args, **kwargs):
        raise AssertionError("retrained a finished arm")

    monkeypatch.setattr(cell, "train_segmenters", refuse)
    again = run_evaluation(evaluated["config"])
    assert again["arms"] == evaluated["results"]["arms"]


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
    for table in ("arms", "comparisons", "convergence", "realism", "repaint", "gate", "guards"):
        assert f'id="{table}"' in dom
    for arm in ("real", "copy-paste", "handcrafted"):
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
        Scenario(lesion=(2, 1, 3), healthy=(3, 0, 1), size=48, spatial_dims=3, seed=2),
    )
    config = load_evaluate_config(
        {
            "out_dir": str(tmp_path / "run"),
            "data": str(dataset),
            "splits": str(splits[0]),
            "arms": [
                {"name": "real", "kind": "real"},
                {"name": "handcrafted", "kind": "handcrafted", "share": 0.5},
            ],
            "seeds": [0, 1],
            "threads": 1,
            "protocol": {"min_test_lesion_cases": 2, "convergence_check": False},
            "segmenter": {
                "steps": 2,
                "batch_size": 2,
                "channels": [4, 8],
                "patch_size": [16, 16, 8],
                "validate_every": 0,
            },
            "gate": {"min_dice": 0.0},
            "metrics": {"bootstrap": 100},
            "fidelity": {"crop_size": 8, "grid_rows": 1, "classifier_folds": 2},
            "include_rejected": True,  # two real lesions make a strict z-score gate
        }
    )
    results = run_evaluation(config)
    assert results["cells"][0]["data"]["train_synthetic"]["handcrafted"] == 3
    assert results["gate"]["cases"]["handcrafted"] == 3
    assert all(a["runs"] == 2 for a in results["arms"].values())


@pytest.mark.slow
def test_cases_the_segmenter_gate_refuses_leave_the_build_and_the_card_says_so(world, tmp_path):
    out = tmp_path / "run"
    config = tiny(world, out, gate={"min_dice": 1.0}, report=False)  # nothing reaches Dice 1
    results = run_evaluation(config)
    gate = results["gate"]
    assert gate["rejected_by_segmenter"]["handcrafted"] > 0
    assert gate["rejected"]["handcrafted"] == gate["cases"]["handcrafted"]
    assert gate["kept"]["handcrafted"] == 0
    cell = out / "cells" / "s0-all"
    card = (cell / "build-gated" / "dataset_card.md").read_text()
    assert "refused by a later gate" in card
    built = json.loads((cell / "build-gated" / "build.json").read_text())
    assert built["counts"]["train"]["synthetic"] == 0
    assert (
        built["counts"]["synthetic_excluded_by_later_gate"]
        == gate["rejected_by_segmenter"]["handcrafted"]
    )
    recorded = json.loads((cell / "gate.json").read_text())["handcrafted"]["rejected_cases"]
    assert all(r["dice"] < 1.0 for r in recorded)
    # the arm trained without a single hand-crafted lesion, and says so
    assert results["arms"]["handcrafted@all"]["new_lesion_patches"] == 0


def test_copy_paste_finds_a_place_in_scans_without_an_organ_label():
    """MRI-like scans labelled 0 background / 3 lesion only: lesions are pasted into the scan's
    foreground (never the air), as the generators place theirs."""
    from synthlesion.evaluation.config import ArmConfig, SegmenterConfig
    from synthlesion.evaluation.segmenter import ArmBatches, ArrayCase

    rng = np.random.default_rng(0)
    grid = np.mgrid[:48, :48]
    head = ((grid[0] - 24) ** 2 + (grid[1] - 24) ** 2) < 20**2
    cases = []
    for index in range(6):
        raw = np.where(head, 300.0, 0.0) + rng.normal(0, 5, (48, 48)) * head
        label = np.zeros((48, 48), np.int16)
        if index < 3:
            lesion = ((grid[0] - 20 - index) ** 2 + (grid[1] - 26) ** 2) < 16
            raw[lesion] += 200
            label[lesion] = 3
        image = (raw / 300.0 - 0.5).astype(np.float32)
        cases.append(ArrayCase(f"c{index}", image, label, (1.0, 1.0), raw=raw.astype(np.float32)))
    cfg = SegmenterConfig(steps=20, batch_size=6, patch_size=(24, 24), augment=False)
    batches = ArmBatches(
        cases, [], ArmConfig("cp", "copy_paste", 1.0), cfg, 0, (3,), (), modality="MRI"
    )
    for _batch in batches:
        pass
    counts = batches.counts.to_dict()
    assert counts["new_lesion_patches"] >= 0.8 * 20 * 2  # two lesion patches per batch
    assert counts["paste_failed"] <= 0.2 * 20 * 2
    pasted = batches.pasted_patch()
    assert pasted is not None
    image, label, case = pasted
    assert (label == 3).any()


def test_the_augmentation_recipe_never_folds_a_small_patch():
    """A 32-voxel patch at 1 mm: the recipe's elastic warp stays within half its node spacing
    (a fixed 4 mm used to stop training with an anatomy-bound error)."""
    from synthlesion.evaluation.segmenter import augmentation_recipe

    recipe = augmentation_recipe(0, 2, [31.0, 31.0])
    batch = {
        "image": torch.randn(4, 1, 32, 32),
        "label": torch.zeros(4, 1, 32, 32, dtype=torch.long),
        "spacing": torch.ones(4, 2, dtype=torch.float64),
    }
    for _ in range(5):
        out = recipe(batch)
        assert out["image"].shape == (4, 1, 32, 32)


def test_no_convergence_check_reads_as_not_checked_not_as_no(world, tmp_path):
    from synthlesion.evaluation.summary import summarise_protocol

    config = tiny(world, tmp_path / "unused")  # convergence_check off
    assert summarise_protocol(config, [], [])["real_converged"] is None


# --- attacks on the protocol (an adversarial review) -----------------------------------------


def test_a_rerun_on_changed_splits_is_refused_not_served_old_results(world, tmp_path):
    import shutil as sh

    splits = tmp_path / "splits.json"
    sh.copyfile(world["all_splits"][0], splits)
    config = tiny(world, tmp_path / "run", splits=str(splits), report=False)
    run_evaluation(config)
    sh.copyfile(world["all_splits"][1], splits)  # other test patients, the same path
    with pytest.raises(RunFolderError, match="other content of splits_sha256"):
        run_evaluation(config)


def test_the_same_split_listed_twice_is_refused(world, tmp_path):
    import shutil as sh

    twin = tmp_path / "twin.json"
    sh.copyfile(world["splits"], twin)
    config = tiny(world, tmp_path / "run", splits=[str(world["splits"]), str(twin)],
                  handcrafted_manifest=None)  # fmt: skip
    with pytest.raises(EvaluationConfigError, match="the same split as"):
        run_evaluation(config)
    assert not (tmp_path / "run").exists()


def test_a_wrong_has_lesion_flag_does_not_turn_a_lesion_patient_into_a_negative(world):
    from dataclasses import replace as dc_replace

    from synthlesion.evaluation.protocol import lesion_flags

    cases = load_cases(world["dataset"])
    lying = [dc_replace(c, has_lesion=False) if c.has_lesion else c for c in cases]
    assert lesion_flags(lying) == {c.case_id: bool(c.has_lesion) for c in cases}


def test_a_given_set_whose_generator_saw_more_than_the_budget_is_refused(world, tmp_path):
    # the world's hand-crafted set was fitted on all 4 train lesion patients; budget 2
    config = tiny(world, tmp_path / "run", protocol={"budgets": [2], "min_test_lesion_cases": 4})
    with pytest.raises(EvaluationConfigError, match="outside the train side of cell s0-b2"):
        run_evaluation(config)
    assert not list((tmp_path / "run").rglob("result.json"))


@pytest.mark.slow
def test_an_edited_result_is_refused_on_resume(evaluated):
    out = evaluated["out"]
    path = out / "cells" / "s0-b2" / "arms" / "copy-paste" / "seed-0" / "result.json"
    original = path.read_bytes()
    data = json.loads(original)
    for case in data["cases"]:
        case["dice"] = 0.9
    path.write_text(json.dumps(data))
    try:
        with pytest.raises(EvaluationError, match="edited after it was written"):
            run_evaluation(evaluated["config"])
    finally:
        path.write_bytes(original)


def test_overlapping_splits_count_a_case_once_in_the_paired_test():
    from synthlesion.evaluation.stats import protocol_comparison

    rng = np.random.default_rng(0)
    a = {("s0", 0): {f"c{i}": float(rng.random()) for i in range(12)}}
    b = {("s0", 0): {f"c{i}": float(rng.random()) for i in range(12)}}
    once = protocol_comparison(a, b, resamples=200)
    twice = protocol_comparison(
        {**a, ("s1", 0): a[("s0", 0)]}, {**b, ("s1", 0): b[("s0", 0)]}, resamples=200
    )
    assert twice["pairs"] == once["pairs"] == 12
    assert twice["p_wilcoxon"] == pytest.approx(once["p_wilcoxon"])


def test_the_reference_arm_is_the_real_arm_wherever_it_is_listed(tmp_path):
    config = load_evaluate_config(
        {
            "out_dir": "o",
            "data": "d",
            "splits": "s",
            "arms": [
                {"name": "hc", "kind": "handcrafted", "share": 0.5},
                {"name": "real", "kind": "real"},
            ],
        }
    )
    assert config.reference_arm == "real"


def test_the_set_up_cache_beside_the_splits_is_not_a_change_of_the_data(world, tmp_path):
    """``synthlesion sample`` caches what it learnt beside the splits file; with the splits
    inside the data folder that file must not make a resumed evaluation look like new data."""
    from types import SimpleNamespace

    from synthlesion.evaluation.harness import input_hashes

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "case_0000.nii.gz").write_bytes(b"scan")
    splits = shutil.copy(world["splits"], folder / "splits.json")
    config = SimpleNamespace(data=folder, splits=[Path(splits)])
    before = input_hashes(config)
    (folder / "splits.json.train-lesions-0123456789ab.npz").write_bytes(b"cache")
    assert input_hashes(config) == before
    (folder / "case_0001.nii.gz").write_bytes(b"another scan")
    assert input_hashes(config) != before


def test_the_plateau_check_needs_one_validation_point_per_run_not_two(world, tmp_path):
    """``validate_every`` >= the steps leaves one point per run; twice the steps finding a far
    better validation Dice must still read as no plateau."""
    from types import SimpleNamespace

    from synthlesion.evaluation.summary import _convergence

    config = tiny(world, tmp_path / "unused")
    case = SimpleNamespace(case_id="c", dice=0.5, has_lesion=True)

    def run(validation, steps):
        return {"validation": validation, "steps": steps, "selected_step": steps, "cases": [case]}

    outcome = SimpleNamespace(
        cell=SimpleNamespace(split="s0"),
        runs={"real": {0: run([[4, 0.30]], 4)}, "real@2x": {0: run([[4, 0.30], [8, 0.70]], 8)}},
    )
    got = _convergence(config, [outcome], "real", "b2")["validation"]
    assert got["gain_when_doubled"] == pytest.approx(0.40) and got["plateaued"] is False
