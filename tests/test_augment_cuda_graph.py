"""Compose(cuda_graph=True): replays equal eager calls; outputs are never overwritten."""

from __future__ import annotations

import logging

import pytest
import torch

from synthlesion.augment import (
    APPLIED_KEY,
    AugmentationError,
    Compose,
    RandAffine,
    RandBiasField,
    RandCropByLabel,
    RandElastic,
    RandFlip,
    RandGamma,
    RandGaussianNoise,
)
from synthlesion.augment.cuda_graph import CudaGraphRunner, _Graph

needs_cuda = pytest.mark.skipif(
    not CudaGraphRunner.available(), reason="needs CUDA and PyTorch >= 2.5"
)


def scene(seed: int, shape=(20, 22, 24), batch=3, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape], indexing="ij")
    r2 = sum(a**2 for a in axes)
    image = torch.cos(2 * axes[0]) + axes[-1] + 2.0
    image = image[None, None] + 0.1 * torch.rand((batch, 1, *shape), generator=gen)
    label = (r2 < 0.5).to(torch.uint8) + (r2 < 0.1 + 0.2 * seed % 3).to(torch.uint8)
    label = label[None, None].repeat((batch, 1) + (1,) * len(shape))
    return {"image": image.to(device), "label": label.to(device)}


def transforms() -> list:
    keys = ("image", "label")
    return [
        RandAffine(*keys, rotate=(-10, 10), scale=(0.9, 1.1), spacing=(1.0, 1.0, 2.0)),
        RandElastic(*keys, control_points=5, max_displacement=(0.5, 2.0), spacing=(1.0, 1.0, 2.0)),
        RandFlip(*keys, axes=0),
        RandGaussianNoise("image", std=(0.0, 0.1)),
        RandBiasField("image", coefficients=(-0.2, 0.2)),
        RandGamma("image", p=0.7),
    ]


def pair(backend: str = "eager", seed: int = 5, device: str = "cuda"):
    graphed = Compose(transforms(), backend=backend, cuda_graph=True)
    eager = Compose(transforms(), backend=backend)
    return graphed.set_random_state(seed, device), eager.set_random_state(seed, device)


def assert_same(a: dict, b: dict) -> None:
    torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=1e-6)
    assert a["label"].dtype == b["label"].dtype and torch.equal(a["label"], b["label"])
    assert [r["name"] for r in a[APPLIED_KEY]] == [r["name"] for r in b[APPLIED_KEY]]
    for ra, rb in zip(a[APPLIED_KEY], b[APPLIED_KEY], strict=True):
        assert torch.equal(ra["applied"], rb["applied"]), ra["name"]
        for k in ra["params"]:
            torch.testing.assert_close(ra["params"][k], rb["params"][k], rtol=0, atol=0)


def test_cuda_graph_is_a_no_op_on_cpu_batches() -> None:
    graphed, eager = pair(device="cpu")
    for k in range(2):
        assert_same(graphed(scene(k)), eager(scene(k)))


def test_cuda_graph_refuses_transforms_that_change_the_batch() -> None:
    crop = RandCropByLabel("image", "label", roi_size=(8, 8, 8))
    with pytest.raises(AugmentationError, match="RandCropByLabel.*change the batch"):
        Compose([RandGamma("image"), crop], cuda_graph=True)


def test_signature_holds_shapes_and_host_spacing() -> None:
    runner = CudaGraphRunner(lambda d: d, [], ("image", "label"))
    a = runner.signature(scene(0))
    assert a == runner.signature(scene(1))  # same layout, other values: one graph
    assert a != runner.signature(scene(0, shape=(20, 22, 26)))
    with_spacing = {**scene(0), "spacing": [1.0, 1.0, 2.5]}
    assert runner.signature(with_spacing)[1] == ((3,), (1.0, 1.0, 2.5))
    assert runner.signature({**scene(0), "spacing": object()}) is None


def test_cached_tensors_used_during_a_capture_are_kept_alive() -> None:
    from synthlesion.augment.device_cache import constant, keep_cached_alive
    from synthlesion.augment.grid import interp_matrix

    with keep_cached_alive() as kept:
        a = constant([1.0, 2.0], torch.float32, "cpu")
        m = interp_matrix(7, 3, torch.float64, torch.device("cpu"))
    assert interp_matrix(7, 3, torch.float64, torch.device("cpu")) is m  # made once
    assert any(t is a for t in kept) and any(t is m for t in kept)
    constant([3.0], torch.float32, "cpu")
    assert len(kept) == 2  # nothing collected outside the block


def test_graphs_beyond_the_limit_drop_the_oldest(monkeypatch, caplog) -> None:
    runner = CudaGraphRunner(lambda d: d, [], ("image", "label"), max_graphs=2)
    monkeypatch.setattr(runner, "_capture", lambda data: (data, _Graph(None, ())))
    monkeypatch.setattr(CudaGraphRunner, "available", staticmethod(lambda: True))
    with caplog.at_level(logging.WARNING, logger="synthlesion.augment.cuda_graph"):
        for n in (20, 21, 22, 21):
            runner(scene(0, shape=(n, 22, 24)))
    assert [key[0][0][1][2] for key in runner._graphs] == [21, 22]
    assert sum("more than 2 input shapes" in r.message for r in caplog.records) == 1


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_replays_equal_the_eager_calls(backend: str) -> None:
    graphed, eager = pair(backend)
    outputs = []
    for k in range(5):  # call 1 eager + capture, then replays on new data each time
        data = scene(k, device="cuda")
        a, b = graphed(data), eager(data)
        assert_same(a, b)
        outputs.append((a, {key: a[key].clone() for key in ("image", "label")}))
    assert len(graphed._graphs._graphs) == 1
    entry = next(iter(graphed._graphs._graphs.values()))
    assert entry.graph is not None
    for out, copy in outputs:  # a later replay never overwrote an earlier result
        assert torch.equal(out["image"], copy["image"]) and torch.equal(out["label"], copy["label"])
    assert not torch.equal(outputs[-1][0]["image"], outputs[-2][0]["image"])


@pytest.mark.gpu
@needs_cuda
def test_reseeding_captures_again_and_2d_batches_get_their_own_graph() -> None:
    graphed, eager = pair()
    for k in range(3):
        graphed(scene(k, device="cuda"))
    graphed.set_random_state(11, "cuda")
    eager.set_random_state(11, "cuda")
    for k in range(3):
        data = scene(k, device="cuda")
        assert_same(graphed(data), eager(data))
    flat = Compose([RandAffine("image", "label", rotate=(-10, 10)), RandGamma("image")],
                   cuda_graph=True).set_random_state(1, "cuda")  # fmt: skip
    reference = Compose([RandAffine("image", "label", rotate=(-10, 10)), RandGamma("image")])
    reference.set_random_state(1, "cuda")
    for k in range(3):
        data = {key: v[:, :, :, :, 0] for key, v in scene(k, device="cuda").items()}
        assert_same(flat(data), reference(data))
    for pipe in (graphed, flat):  # the flip alone (other spacing: not fused) is captured too
        assert all(e.graph is not None for e in pipe._graphs._graphs.values())


class _WaitsForTheDevice(RandGamma):
    """A transform that reads a value back from the device (not capturable)."""

    def apply_view(self, view, params) -> None:
        if float(view.images["image"].mean()) > -1e9:
            super().apply_view(view, params)


@pytest.mark.gpu
@needs_cuda
def test_a_pipeline_that_cannot_be_captured_runs_eagerly_with_a_warning(caplog) -> None:
    graphed = Compose([RandAffine("image", "label"), _WaitsForTheDevice("image")], cuda_graph=True)
    eager = Compose([RandAffine("image", "label"), _WaitsForTheDevice("image")])
    graphed.set_random_state(3, "cuda")
    eager.set_random_state(3, "cuda")
    with caplog.at_level(logging.WARNING, logger="synthlesion.augment.cuda_graph"):
        for k in range(3):
            data = scene(k, device="cuda")
            assert_same(graphed(data), eager(data))
    warnings = [r.message for r in caplog.records if "runs eagerly" in r.message]
    assert len(warnings) == 1 and "test_augment_cuda_graph.py" in warnings[0]
