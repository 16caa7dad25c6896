"""Training data path: train split only, RAS, resampling, crops, seeded workers, bad inputs;
the config schema; checkpoint files (flattening, markers, pickles, pruning)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import ct_image, lesion_mask, phantom_with_splits, single_torch_thread, write_dataset  # noqa: E402

from synthlesion.data.cases import Case
from synthlesion.data.splits import Splits, save_splits, split_patients
from synthlesion.data.volume import Volume
from synthlesion.errors import ConfigError, LabelError, SplitError
from synthlesion.provenance.identity import hash_patient_id
from synthlesion.training import checkpoint as ckpt
from synthlesion.training.config import load_train_config
from synthlesion.training.crops import (
    CropBatchSampler,
    CropDataset,
    CropMaker,
    DataPosition,
    crop_spec,
    make_loader,
)
from synthlesion.training.data import load_training_data
from synthlesion.training.ema import EMA
from synthlesion.training.errors import CheckpointError, TrainingDataError
from synthlesion.training.preprocess import resample, to_ras

ROOT = Path(__file__).resolve().parents[1]


one_thread = pytest.fixture(autouse=True, scope="module")(single_torch_thread)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return phantom_with_splits(
        tmp_path_factory.mktemp("phantom"), n_patients=12, seed=1, lesion_fraction=0.7
    )


def data_config(dataset: Path, splits: Path, **extra):
    raw = {
        "output_dir": "unused",
        "data": {"dataset": str(dataset), "splits": str(splits), "roi_size": [16, 16], **extra},
    }
    return load_train_config(raw).data


# --- geometry -----------------------------------------------------------------------------


def test_to_ras_reorders_and_flips_keeping_world_positions():
    rng = np.random.default_rng(0)
    array = rng.normal(size=(5, 6, 7)).astype(np.float32)
    lps = np.array([[0, -2.0, 0, 10], [0, 0, -3.0, 20], [1.5, 0, 0, -5], [0, 0, 0, 1]])
    ras = to_ras(Volume(array, lps))
    assert ras.orientation == "RAS"
    assert ras.shape == (6, 7, 5)
    for index in [(0, 0, 0), (4, 5, 6), (2, 3, 1)]:
        world = lps @ np.array([*index, 1.0])
        new_index = np.linalg.solve(ras.affine, world)[:3]
        assert np.allclose(new_index, np.round(new_index))
        assert ras.array[tuple(np.round(new_index).astype(int))] == array[index]


def test_to_ras_2d_keeps_a_2d_array():
    array = np.arange(12, dtype=np.int16).reshape(3, 4)
    affine = np.diag([-1.0, -2.0, 3.0, 1.0])
    ras = to_ras(Volume(array, affine))
    assert ras.shape == (3, 4) and ras.spacing == (1.0, 2.0)
    assert np.array_equal(ras.array, array[::-1, ::-1])
    assert np.allclose(ras.affine @ [0, 0, 0, 1], affine @ [2, 3, 0, 1])


def test_resample_mask_nearest_keeps_labels_and_dtype():
    labels = np.zeros((20, 20, 10), np.uint8)
    labels[5:15, 5:15, 2:8] = 1
    labels[8:12, 8:12, 4:6] = 2
    affine = np.diag([1.0, 1.0, 2.5, 1.0])
    mask = resample(Volume(labels, affine), (0.7, 0.7, 0.7), is_mask=True, label_set=[0, 1, 2])
    assert mask.array.dtype == np.uint8
    assert set(np.unique(mask.array)) == {0, 1, 2}
    assert np.allclose(mask.spacing, (20 / 29, 20 / 29, 25 / 36), atol=1e-6)
    # The grid covers the same extent: the centre of the field of view does not move.
    old_centre = affine @ [9.5, 9.5, 4.5, 1]
    new_centre = mask.affine @ [*((np.array(mask.shape) - 1) / 2), 1]
    assert np.allclose(old_centre, new_centre)
    image = resample(Volume(labels.astype(np.float32), affine), (0.7, 0.7, 0.7), is_mask=False)
    assert image.array.dtype == np.float32 and image.shape == mask.shape
    with pytest.raises(LabelError, match="outside the labels"):
        resample(Volume(labels, affine), (0.7, 0.7, 0.7), is_mask=True, label_set=[0, 1])


# --- train split only, bad inputs ---------------------------------------------------------


def test_only_train_patients_are_used(phantom):
    dataset, splits_path = phantom
    from synthlesion.data.splits import load_splits

    splits = load_splits(splits_path)
    data = load_training_data(data_config(dataset, splits_path), spatial_dims=2, seed=0)
    train_patients = set(splits.patients("train"))
    assert {p.patient_id for p in data.train} <= train_patients
    assert data.record["patient_id_hashes"] == sorted(
        hash_patient_id(p) for p in {p.patient_id for p in data.train}
    )
    held_out = set(splits.patients("val")) | set(splits.patients("test"))
    assert not {hash_patient_id(p) for p in held_out} & set(data.record["patient_id_hashes"])
    case = data.train[0]
    assert case.image.dtype == np.float32 and -1 <= case.image.min() <= case.image.max() <= 1
    assert np.issubdtype(case.labels.dtype, np.integer)


def test_edited_splits_file_is_refused(phantom, tmp_path):
    dataset, splits_path = phantom
    data = json.loads(splits_path.read_text())
    data["sides"]["train"].append(data["sides"]["test"].pop())
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(data))
    with pytest.raises(SplitError, match="edited"):
        load_training_data(data_config(dataset, edited), spatial_dims=2, seed=0)


def test_splits_of_another_dataset_are_refused(phantom, tmp_path):
    dataset, _ = phantom
    other = [Case(f"x{i}", f"x{i}", (f"x{i}.nii.gz",)) for i in range(6)]
    wrong = tmp_path / "wrong.json"
    save_splits(split_patients(other, seed=0), wrong)
    with pytest.raises(SplitError, match="does not match the dataset"):
        load_training_data(data_config(dataset, wrong), spatial_dims=2, seed=0)


def test_no_lesion_in_train_split_is_an_error_before_any_step(tmp_path):
    from synthlesion.training.loop import train

    shape = (24, 20, 12)
    cases = {f"c{i}": (ct_image(shape, seed=i), np.zeros(shape, np.uint8)) for i in range(6)}
    cases["c5"] = (ct_image(shape, seed=5), lesion_mask(shape))
    dataset = write_dataset(tmp_path / "ds", cases)
    sides = {"train": ("c0", "c1", "c2", "c3"), "val": ("c4",), "test": ("c5",)}
    path = tmp_path / "splits.json"
    save_splits(Splits(sides, {c: c for c in cases}), path)
    raw = {
        "output_dir": str(tmp_path / "run"),
        "data": {"dataset": str(dataset), "splits": str(path), "roi_size": [8, 8, 8]},
        "model": {"spatial_dims": 3},
    }
    with pytest.raises(TrainingDataError, match="no lesion .* 4 train case"):
        train(load_train_config(raw))
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").iterdir())


def test_synthetic_case_of_a_test_patient_is_refused(phantom):
    dataset, splits_path = phantom
    from synthlesion.data.splits import load_splits

    test_patient = load_splits(splits_path).patients("test")[0]
    spec = json.loads(dataset.read_text())
    entry = dict(
        spec["training"][0], case_id="syn_0001", origin="synthetic", patient_id=test_patient
    )
    spec["training"].append(entry)
    mixed = dataset.parent / "with_synthetic.json"
    mixed.write_text(json.dumps(spec))
    with pytest.raises(TrainingDataError, match=f"syn_0001 \\(patient {test_patient}: test"):
        load_training_data(data_config(mixed, splits_path), spatial_dims=2, seed=0)


def test_disk_cache_is_reused_and_refreshed(phantom, tmp_path):
    dataset, splits = phantom
    cfg = data_config(dataset, splits, cache_dir=str(tmp_path / "cache"))
    first = load_training_data(cfg, spatial_dims=2, seed=0)
    files = sorted((tmp_path / "cache").glob("*.safetensors"))
    assert len(files) >= len(first.train)
    again = load_training_data(cfg, spatial_dims=2, seed=0)
    for a, b in zip(first.train, again.train, strict=True):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
        assert a.components == b.components
        assert np.array_equal(a.healthy_centres, b.healthy_centres)
    other = data_config(dataset, splits, cache_dir=str(tmp_path / "cache"), spacing=[8.0, 8.0])
    load_training_data(other, spatial_dims=2, seed=0)  # other settings: new cache entries
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) > len(files)


def test_worker_init_seeds_global_generators_per_worker():
    from synthlesion.training.crops import seed_worker

    class Draw(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, index: int) -> float:
            return float(np.random.random())  # noqa: NPY002 - what third-party code does

    def draws(seed: int) -> list[float]:
        loader = torch.utils.data.DataLoader(
            Draw(),
            batch_size=1,
            num_workers=2,
            worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(seed),
        )
        return [float(x) for x in loader]

    values = draws(0)
    assert values[0] != values[1]  # items 0 and 1 come from different workers
    assert draws(0) == values and draws(1) != values


def test_report_to_tensorboard_without_it_is_a_config_error():
    import importlib.util

    from synthlesion.training.monitor import tracker_name

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    cfg = load_train_config(
        {"output_dir": "x", "report_to": "tensorboard", "data": {"dataset": "d", "splits": "s"}}
    )
    with pytest.raises(ConfigError, match="tensorboard is not installed"):
        tracker_name(cfg)
    assert (
        tracker_name(
            load_train_config({"output_dir": "x", "data": {"dataset": "d", "splits": "s"}})
        )
        is None
    )


# --- crops and workers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def maker(phantom) -> CropMaker:
    dataset, splits = phantom
    cfg = data_config(dataset, splits, healthy_fraction=0.4)
    data = load_training_data(cfg, spatial_dims=2, seed=0)
    return CropMaker(data.train, crop_spec(cfg, data, None))


def test_crops_follow_the_contract(maker):
    dataset = CropDataset(maker, seed=0, samples_per_epoch=64)
    healthy = lesion = 0
    for index in range(40):
        item = dataset[(0, index)]
        assert item["image"].shape == (1, 16, 16) and item["image"].dtype == torch.float32
        assert item["region"].shape == (1, 16, 16) and item["lesion"].shape == (1, 16, 16)
        assert set(item["region"].unique().tolist()) <= {0.0, 1.0}
        assert item["region"].sum() > 0
        if item["lesion"].sum() > 0:
            lesion += 1
            assert torch.all(item["region"][0][item["lesion"][0] > 0] == 1)  # region covers it
        else:
            healthy += 1
    assert healthy and lesion


def test_workers_draw_distinct_crops_and_a_seed_reproduces(maker):
    # healthy crops only: random blobs, so two equal crops can only come from equal draws (a
    # small lesion crop has few jitter positions and repeats by chance)
    maker = CropMaker(maker.cases, dataclasses.replace(maker.spec, healthy_fraction=1.0))

    def batches(seed: int, workers: int) -> list[dict]:
        dataset = CropDataset(maker, seed=seed, samples_per_epoch=32)
        sampler = CropBatchSampler(32, 4)
        loader = make_loader(
            dataset, sampler, num_workers=workers, generator=torch.Generator().manual_seed(seed)
        )
        out = []
        for batch in loader:
            out.append(batch)
            if len(out) == 6:
                break
        return out

    two = batches(0, 2)
    crops = [b["image"][i] + 3 * b["region"][i] for b in two for i in range(4)]
    distinct = {tuple(c.flatten().tolist()) for c in crops}
    assert len(distinct) == len(crops)  # batches 0, 2, 4 (worker 0) and 1, 3, 5 (worker 1)
    again = batches(0, 2)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(two, again, strict=True))
    serial = batches(0, 0)
    assert all(torch.equal(a["region"], b["region"]) for a, b in zip(two, serial, strict=True))
    other = batches(1, 2)
    assert not torch.equal(two[0]["image"], other[0]["image"])


def test_sampler_resumes_at_a_position_and_shards_ranks():
    full = CropBatchSampler(24, 4)
    it = iter(full)
    first = [next(it) for _ in range(8)]
    assert first[6] == [(1, 0), (1, 1), (1, 2), (1, 3)]  # 6 batches per epoch
    later = iter(CropBatchSampler(24, 4, start=DataPosition(1, 0)))
    assert next(later) == first[6]
    rank0, rank1 = (next(iter(CropBatchSampler(24, 4, rank=r, world_size=2))) for r in (0, 1))
    assert not set(rank0) & set(rank1)


# --- config -------------------------------------------------------------------------------


def test_unknown_config_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: x\ndata: {dataset: d, splits: s, roi_sizes: [8, 8]}\n")
    with pytest.raises(ConfigError, match=r"data\.roi_sizes"):
        load_train_config(path)
    path.write_text("output_dir: x\nlearning_rate: 1\ndata: {dataset: d, splits: s}\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_train_config(path)


def test_overrides_and_shipped_configs_parse():
    configs = sorted((ROOT / "configs").glob("train_*.yaml"))
    assert len(configs) >= 5
    for path in configs:
        config = load_train_config(path)
        assert len(config.data.roi_size) == config.model.spatial_dims, path
    tiny = load_train_config(
        ROOT / "configs" / "train_phantom2d_cpu.yaml",
        ["optim.learning_rate=0.5", "data.roi_size=[16, 16]"],
    )
    assert tiny.optim.learning_rate == 0.5 and tiny.data.roi_size == (16, 16)
    with pytest.raises(ConfigError, match="roi_size"):
        load_train_config(ROOT / "configs" / "train_phantom2d_cpu.yaml", ["data.roi_size=[8]"])


# --- checkpoint files ---------------------------------------------------------------------


def test_state_flattening_round_trips_an_optimizer(tmp_path):
    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, betas=(0.8, 0.9))
    layer(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    ckpt.write_state(tmp_path, "optimizer", optimizer.state_dict())
    assert not list(tmp_path.glob("*.pt")) and (tmp_path / "optimizer.safetensors").is_file()
    loaded = ckpt.read_state(tmp_path, "optimizer")
    original = optimizer.state_dict()
    assert loaded["param_groups"] == original["param_groups"]
    assert loaded["param_groups"][0]["betas"] == (0.8, 0.9)
    for key, value in original["state"][0].items():
        assert torch.equal(loaded["state"][0][key], value)
    fresh = torch.optim.AdamW(layer.parameters(), lr=0.5)
    fresh.load_state_dict(loaded)
    assert fresh.param_groups[0]["lr"] == 0.1


def test_rng_state_round_trips(tmp_path):
    generator = torch.Generator().manual_seed(3)
    ckpt.write_state(tmp_path, "rng", ckpt.capture_rng({"noise": generator}))
    expected = (torch.rand(3), np.random.rand(3), torch.rand(2, generator=generator))  # noqa: NPY002
    torch.manual_seed(99)
    generator.manual_seed(99)
    ckpt.restore_rng(ckpt.read_state(tmp_path, "rng"), {"noise": generator}, "rng")
    got = (torch.rand(3), np.random.rand(3), torch.rand(2, generator=generator))  # noqa: NPY002
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert torch.equal(got[2], expected[2])


def _fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    def writer(folder: Path) -> None:
        ckpt.write_state(folder, "model", {"w": torch.ones(2) * step})

    path = ckpt.write_checkpoint(
        root,
        step,
        [writer],
        is_main=True,
        barrier=lambda: None,
        rank_writer=lambda d: ckpt.write_state(d, "rng_state_0", {}),
        total_limit=None,
        info={"world_size": 1},
    )
    if not complete:
        (path / ckpt.COMPLETE).unlink()
    return path


def test_latest_skips_half_written_and_markers_are_checked(tmp_path, caplog):
    _fake_checkpoint(tmp_path, 2)
    _fake_checkpoint(tmp_path, 4, complete=False)
    with caplog.at_level(logging.WARNING):
        assert ckpt.resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-2"
    assert "checkpoint-4" in caplog.text and "half-written" in caplog.text
    with pytest.raises(CheckpointError, match="no COMPLETE marker"):
        ckpt.verify_checkpoint(tmp_path / "checkpoint-4", [])
    good = tmp_path / "checkpoint-2"
    ckpt.verify_checkpoint(good, ["model.safetensors", "rng_state_0.json"])
    (good / "rng_state_0.json").unlink()
    with pytest.raises(CheckpointError, match="random-state file"):
        ckpt.verify_checkpoint(good, ["model.safetensors", "rng_state_0.json"])


def test_pickle_and_damaged_checkpoints_are_refused(tmp_path):
    path = _fake_checkpoint(tmp_path, 3)
    blob = bytearray((path / "model.safetensors").read_bytes())
    blob[-1] ^= 1
    (path / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="differs from the COMPLETE record"):
        ckpt.verify_checkpoint(path, [])
    (path / "optimizer.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(CheckpointError, match=r"pickle file\(s\) optimizer.bin"):
        ckpt.verify_checkpoint(path, [])


def test_old_checkpoints_are_pruned_only_after_the_new_one_is_complete(tmp_path):
    for step in (1, 2):
        _fake_checkpoint(tmp_path, step)

    def failing(folder: Path) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        ckpt.write_checkpoint(
            tmp_path,
            3,
            [failing],
            is_main=True,
            barrier=lambda: None,
            rank_writer=lambda d: None,
            total_limit=1,
            info={},
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-2"]
    ckpt.write_checkpoint(
        tmp_path,
        3,
        [],
        is_main=True,
        barrier=lambda: None,
        rank_writer=lambda d: None,
        total_limit=2,
        info={},
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]


def test_ema_state_round_trips():
    layer = torch.nn.Linear(2, 2)
    ema = EMA(list(layer.named_parameters()), decay=0.9, use_warmup=False)
    for _ in range(3):
        with torch.no_grad():
            layer.weight.add_(1.0)
        ema.step()
    state = ema.state_dict()
    other = EMA(list(layer.named_parameters()), decay=0.9, use_warmup=False)
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow, other.shadow, strict=True))
    before = layer.weight.detach().clone()
    with ema.applied():
        assert torch.equal(layer.weight, ema.shadow[0])
    assert torch.equal(layer.weight, before)


def test_prepare_case_turns_an_lps_slice_to_ras(tmp_path):
    # A 2D slice saved LPS (negative x and y) comes out RAS with the same labels.
    from synthlesion.data.intensity import IntensityNormaliser
    from synthlesion.training.preprocess import Preprocessing, prepare_case

    image = np.arange(64, dtype=np.int16).reshape(8, 8) * 10
    mask = np.zeros((8, 8), np.uint8)
    mask[1:3, 5:7] = 1
    affine = np.diag([-2.0, -2.0, 1.0, 1.0])
    for name, array in (("img", image), ("msk", mask)):
        nib.save(nib.Nifti1Image(array, affine), str(tmp_path / f"{name}.nii.gz"))
    case = Case(
        "a",
        "a",
        (tmp_path / "img.nii.gz",),
        tmp_path / "msk.nii.gz",
        modality="CT",
        labels={0: "background", 1: "lesion"},
    )
    pre = Preprocessing(2, (1.0, 1.0), IntensityNormaliser("window", (0, 630)), (1,), (), 1)
    prepared = prepare_case(case, pre)
    assert prepared.image.shape == (1, 16, 16) and prepared.labels.dtype == np.uint8
    assert set(np.unique(prepared.labels)) == {0, 1}
    # The lesion sat at low x / high y in LPS voxels, so at high x / low y in RAS voxels.
    coords = np.argwhere(prepared.labels == 1).mean(axis=0)
    assert coords[0] > 8 and coords[1] < 8
