"""The synthetic-aware training loader: batches tagged by origin, loss weights, share schedules,
the epoch sampler's own generator, and worker seeding (checklist row 34)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_dataset_support import make_world, populate
from torch.utils.data import get_worker_info

from synthlesion.dataset import (
    BuildConfig,
    ConstantShare,
    DatasetBuilder,
    LinearShare,
    OriginLossWeights,
    SyntheticAwareDataset,
    SyntheticShareSampler,
    WorkerSeeder,
    make_train_loader,
    parse_schedule,
    set_epoch,
)
from synthlesion.dataset.errors import DatasetError


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    world = make_world(tmp_path_factory.mktemp("loader"))
    populate(world)
    builder = DatasetBuilder(
        world.real_json,
        world.splits_path,
        [(world.manifest, world.synth_root)],
        BuildConfig(synthetic_share=0.5),
    )
    return builder.build(world.tmp / "out").out_dir


def test_batches_carry_is_synthetic_and_tags(build_dir):
    dataset = SyntheticAwareDataset.from_build(build_dir, spatial_dims=2)
    loader = make_train_loader(dataset, batch_size=4, seed=1)
    batch = next(iter(loader))
    assert batch["is_synthetic"].dtype == torch.bool and batch["is_synthetic"].shape == (4,)
    assert batch["image"].shape == (4, 1, 24, 24) and batch["label"].shape == (4, 1, 24, 24)
    for flag, origin, generator in zip(
        batch["is_synthetic"], batch["origin"], batch["generator"], strict=True
    ):
        assert bool(flag) == (origin == "synthetic") == bool(generator)
    weights = OriginLossWeights(real=1.0, synthetic=0.25)
    w = weights(batch)
    assert torch.equal(w, torch.where(batch["is_synthetic"], 0.25, 1.0))
    loss = torch.arange(4, dtype=torch.float32)
    assert weights.reduce(loss, batch) == pytest.approx(float((w * loss).sum() / w.sum()))


def test_share_schedules():
    ramp = LinearShare(0.5, 0.0, start_epoch=80, end_epoch=100)
    assert [ramp(e) for e in (0, 80, 90, 100, 120)] == pytest.approx([0.5, 0.5, 0.25, 0.0, 0.0])
    assert ConstantShare(0.3)(7) == 0.3
    assert parse_schedule("linear:0.5:0.0:80:100") == ramp
    assert parse_schedule("constant:0.3") == ConstantShare(0.3)
    with pytest.raises(DatasetError):
        parse_schedule("cosine:1")
    with pytest.raises(DatasetError):
        ConstantShare(1.5)


def test_sampler_follows_the_schedule_with_its_own_generator():
    flags = np.array([False] * 30 + [True] * 70)
    ramp = LinearShare(0.6, 0.0, start_epoch=0, end_epoch=10)
    sampler = SyntheticShareSampler(flags, num_samples=4000, schedule=ramp, seed=5)
    state = torch.random.get_rng_state()
    shares = []
    for epoch in (0, 5, 10):
        sampler.set_epoch(epoch)
        drawn = list(sampler)
        shares.append(flags[drawn].mean())
        sampler.set_epoch(epoch)
        assert list(sampler) == drawn  # a fixed seed repeats the epoch
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    assert shares == pytest.approx([0.6, 0.3, 0.0], abs=0.03)
    no_schedule = SyntheticShareSampler(
        flags, num_samples=4000, base_weights=np.where(flags, 0.1, 1.0), seed=5
    )
    assert flags[list(no_schedule)].mean() == pytest.approx(7 / 37, abs=0.03)


def _draws(item, rng, generator):
    info = get_worker_info()
    item["worker"] = info.id if info is not None else -1
    item["own_numpy"] = float(rng.random())
    item["own_torch"] = float(torch.rand(1, generator=generator))
    item["global_torch"] = float(torch.rand(1))
    item["global_numpy"] = float(np.random.rand())  # noqa: NPY002 - what third-party code does
    return item


def _epoch(build_dir, epoch, seed=11):
    dataset = SyntheticAwareDataset.from_build(build_dir, random_transform=_draws)
    loader = make_train_loader(dataset, batch_size=1, num_samples=8, seed=seed, num_workers=2)
    set_epoch(loader, epoch)
    rows = []
    for batch in loader:
        rows.append(
            tuple(
                float(batch[k][0])
                for k in ("worker", "own_numpy", "own_torch", "global_torch", "global_numpy")
            )
        )
    return rows


def test_two_workers_draw_differently_and_a_seed_repeats_the_run(build_dir):
    first = _epoch(build_dir, epoch=0)
    by_worker = {w: [r[1:] for r in first if r[0] == w] for w in (0, 1)}
    assert len(by_worker[0]) == len(by_worker[1]) == 4
    for column in range(4):  # each source of randomness differs between the two workers
        zero = [r[column] for r in by_worker[0]]
        one = [r[column] for r in by_worker[1]]
        assert not set(zero) & set(one)
    assert _epoch(build_dir, epoch=0) == first  # same seed, same epoch: the same draws
    assert _epoch(build_dir, epoch=1) != first  # another epoch: new draws
    assert _epoch(build_dir, epoch=0, seed=12) != first


def test_worker_seeds_are_distinct_per_epoch_and_worker():
    seeder = WorkerSeeder(3)
    seeds = set()
    for epoch in range(5):
        seeder.epoch = epoch
        seeds.update(seeder.seed_for(w) for w in range(4))
    assert len(seeds) == 20
