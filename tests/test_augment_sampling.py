"""The fused CPU warp (numba) against the ``grid_sample`` reference, and the dispatcher."""

from __future__ import annotations

import pytest
import torch

from synthlesion.augment import grid as G
from synthlesion.augment.sampling import (
    native_available,
    prefers_native,
    reference_warp_sample,
    warp_sample,
)

pytest.importorskip("numba")

SHAPES = [((9, 7, 5), (3, 4, 3)), ((6, 1, 5), (2, 2, 3)), ((11, 8), (4, 3)), ((1, 6), (2, 3))]


def random_map(shape: tuple[int, ...], nodes: tuple[int, ...], batch: int = 2,
               jitter: float = 2.5, seed: int = 0) -> torch.Tensor:  # fmt: skip
    """Coarse voxel map: the identity nodes moved by up to a few voxels (some outside)."""
    gen = torch.Generator().manual_seed(seed)
    ones = torch.ones(batch, len(shape), dtype=torch.float64)
    points = G.centred_points(shape, nodes, ones)
    moved = points + torch.randn(points.shape, generator=gen, dtype=torch.float64) * jitter
    return G.physical_to_voxel(moved, shape, ones)


@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
@pytest.mark.parametrize(("shape", "nodes"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_matches_grid_sample(shape, nodes, padding: str, dtype: torch.dtype) -> None:
    coarse = random_map(shape, nodes)
    image = torch.randn((2, 3, *shape), generator=torch.Generator().manual_seed(1)).to(dtype)
    ours = warp_sample(image, coarse, mode="linear", padding_mode=padding, sampler="native")
    ref = reference_warp_sample(image, coarse, mode="linear", padding_mode=padding)
    assert ours.dtype == dtype and ours.shape == image.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(ours, ref, atol=tol, rtol=0)


@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
@pytest.mark.parametrize(("shape", "nodes"), SHAPES)
@pytest.mark.parametrize(
    "dtype", [torch.uint8, torch.int16, torch.int64, torch.bool, torch.float32]
)
def test_nearest_copies_values_like_grid_sample(shape, nodes, padding: str, dtype) -> None:
    coarse = random_map(shape, nodes, seed=2)
    gen = torch.Generator().manual_seed(3)
    label = torch.randint(0, 4, (2, 2, *shape), generator=gen)
    if dtype == torch.int64:
        label = label * (2**40 + 1)  # beyond float32's exact integers: copied, never rounded
    label = label.to(dtype)
    ours = warp_sample(label, coarse, mode="nearest", padding_mode=padding, sampler="native")
    ref = reference_warp_sample(label, coarse, mode="nearest", padding_mode=padding)
    assert ours.dtype == dtype
    assert set(ours.unique().tolist()) <= set(label.unique().tolist()) | {0}
    assert torch.equal(ours, ref)


def test_identity_map_returns_the_input_exactly() -> None:
    shape = (7, 6, 5)
    ones = torch.ones(1, 3, dtype=torch.float64)
    coarse = G.physical_to_voxel(G.centred_points(shape, (3, 3, 3), ones), shape, ones)
    image = torch.rand(1, 2, *shape)
    for mode in ("linear", "nearest"):
        out = warp_sample(image, coarse, mode=mode, sampler="native")
        torch.testing.assert_close(out, image, atol=1e-6, rtol=0)


def test_auto_uses_the_kernel_only_where_it_applies() -> None:
    assert native_available(torch.zeros(1, 1, 4, 4), "linear")
    assert native_available(torch.zeros(1, 1, 4, 4, dtype=torch.int64), "nearest")
    assert not native_available(torch.zeros(1, 1, 4, 4, dtype=torch.bfloat16), "linear")
    assert prefers_native(torch.zeros(1, 1, 4, 4, 4), "linear")
    assert not prefers_native(torch.zeros(1, 1, 4, 4), "linear")  # 2D: torch's kernel is faster
    coarse = random_map((6, 5), (2, 3), batch=1)
    image = torch.rand(1, 1, 6, 5).to(torch.bfloat16)
    out = warp_sample(image, coarse)  # auto: the grid_sample path for bf16
    ref = reference_warp_sample(image, coarse)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)


def test_bad_maps_are_refused() -> None:
    image = torch.rand(1, 1, 6, 5)
    with pytest.raises(ValueError, match="does not fit"):
        warp_sample(image, torch.zeros(1, 2, 2, 2, 3))
    with pytest.raises(ValueError, match=">= 2 nodes"):
        warp_sample(image, torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="sampler"):
        warp_sample(image, torch.zeros(1, 2, 2, 2), sampler="fast")


def test_native_refuses_what_it_cannot_do() -> None:
    image = torch.rand(1, 1, 6, 5).to(torch.bfloat16)
    with pytest.raises(ValueError, match="no fused kernel"):
        warp_sample(image, random_map((6, 5), (2, 3), batch=1), sampler="native")


def test_serial_kernel_equals_parallel() -> None:
    """DataLoader workers (one torch thread) use the serial kernel: same values."""
    coarse = random_map((9, 7, 5), (3, 4, 3))
    image = torch.randn(2, 2, 9, 7, 5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        parallel = warp_sample(image, coarse, sampler="native")
        torch.set_num_threads(1)
        serial = warp_sample(image, coarse, sampler="native")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(parallel, serial)


def test_tensors_that_need_gradients_take_the_differentiable_path() -> None:
    coarse = random_map((6, 5), (2, 3), batch=1)
    image = torch.rand(1, 1, 6, 5, requires_grad=True)
    assert not native_available(image, "linear")
    out = warp_sample(image, coarse)
    out.sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
