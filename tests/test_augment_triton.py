"""The Triton fused warp against the ``grid_sample`` reference.

On a machine with CUDA the kernel runs on the GPU; elsewhere it runs on CPU tensors in
Triton's interpreter (``TRITON_INTERPRET=1``, read when the kernels are defined, so it is
set before the kernel module is imported). Skipped where Triton is not installed.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

from synthlesion.augment import _triton_warp  # noqa: E402
from synthlesion.augment.grid import upsample  # noqa: E402
from synthlesion.augment.sampling import reference_warp_sample, warp_sample  # noqa: E402

if not CUDA and type(_triton_warp._warp_kernel).__name__ != "InterpretedFunction":
    _triton_warp = importlib.reload(_triton_warp)  # imported earlier without the interpreter

DEVICE = torch.device("cuda" if CUDA else "cpu")
PADDINGS = ("zeros", "border", "reflection")
SHAPES = [(9, 7, 5), (6, 1, 5), (7, 10), (1, 6)]


def coarse_map(shape, nodes=3, batch=2, seed=0, spread=0.4) -> torch.Tensor:
    """``(batch, *nodes, d)`` float64 node positions: identity plus large random offsets."""
    gen = torch.Generator().manual_seed(seed)
    axes = [torch.linspace(0, n - 1, nodes, dtype=torch.float64) for n in shape]
    ident = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    scale = torch.tensor([max(n, 2) * spread for n in shape], dtype=torch.float64)
    noise = torch.randn((batch,) + ident.shape, generator=gen, dtype=torch.float64)
    return (ident + noise * scale).to(DEVICE)


def near_tie(coarse: torch.Tensor, shape) -> torch.Tensor:
    """``(B, 1, *shape)``: voxels whose position is within rounding of a half-integer."""
    pos = upsample(coarse.double(), shape)
    sized = torch.tensor([n > 1 for n in shape], device=pos.device)
    close = ((pos - pos.floor() - 0.5).abs() < 1e-4) & sized
    return close.any(-1)[:, None]


def assert_nearest_equal(out, ref, coarse) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    differ = out != ref
    assert not (differ & ~near_tie(coarse, out.shape[2:])).any()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_matches_reference(shape, padding, dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    source = torch.randn((2, 2) + shape, generator=gen, dtype=dtype).to(DEVICE)
    for coarse in (coarse_map(shape).float(), coarse_map(shape, nodes=2, seed=3)):
        out = _triton_warp.triton_warp_sample(source, coarse, mode="linear", padding_mode=padding)
        ref = reference_warp_sample(source, coarse, mode="linear", padding_mode=padding)
        assert out.dtype == dtype and out.device == source.device
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-4 * float(source.abs().max()))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("padding", PADDINGS)
def test_nearest_matches_reference(shape, padding) -> None:
    gen = torch.Generator().manual_seed(2)
    source = torch.randn((2, 2) + shape, generator=gen).to(DEVICE)
    coarse = coarse_map(shape, seed=4)
    out = _triton_warp.triton_warp_sample(source, coarse, mode="nearest", padding_mode=padding)
    ref = reference_warp_sample(source, coarse, mode="nearest", padding_mode=padding)
    assert_nearest_equal(out, ref, coarse)


@pytest.mark.parametrize(
    "dtype", [torch.uint8, torch.int16, torch.bool, torch.int64, torch.float16, torch.bfloat16]
)
@pytest.mark.parametrize("shape", [(4, 6, 5), (9, 7)])
def test_labels_keep_dtype_and_values(dtype, shape) -> None:
    gen = torch.Generator().manual_seed(5)
    raw = torch.randint(0, 4, (2, 1) + shape, generator=gen)
    if dtype == torch.int64:
        raw = raw * (2**40 + 3)
    labels = raw.to(dtype).to(DEVICE)
    coarse = coarse_map(shape, seed=6)
    for padding in PADDINGS:
        out = _triton_warp.triton_warp_sample(labels, coarse, mode="nearest", padding_mode=padding)
        ref = reference_warp_sample(labels, coarse, mode="nearest", padding_mode=padding)
        assert_nearest_equal(out, ref, coarse)
        allowed = set(labels.unique().tolist()) | {0}
        assert set(out.unique().tolist()) <= allowed


def test_bfloat16_linear_close_to_reference() -> None:
    shape = (8, 7, 6)
    gen = torch.Generator().manual_seed(7)
    source = torch.randn((2, 1) + shape, generator=gen).to(torch.bfloat16).to(DEVICE)
    coarse = coarse_map(shape, seed=8)
    out = _triton_warp.triton_warp_sample(source, coarse, mode="linear", padding_mode="zeros")
    ref = reference_warp_sample(source, coarse, mode="linear", padding_mode="zeros")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=2e-2)


def test_non_contiguous_inputs() -> None:
    shape = (6, 5, 7)
    gen = torch.Generator().manual_seed(9)
    source = torch.randn(2, 3, 7, 5, 6, generator=gen).to(DEVICE).transpose(2, 4)[:, ::2]
    coarse = coarse_map(shape, seed=10).float()
    coarse = coarse.movedim(-1, 1).contiguous().movedim(1, -1)  # channels-last view
    assert not source.is_contiguous() and not coarse.is_contiguous()
    out = _triton_warp.triton_warp_sample(source, coarse, mode="linear", padding_mode="border")
    ref = reference_warp_sample(source, coarse, mode="linear", padding_mode="border")
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4 * float(source.abs().max()))


@pytest.mark.parametrize("mode", ["linear", "nearest"])
def test_samples_not_applied_are_copied_bit_for_bit(mode) -> None:
    shape = (6, 5, 7)
    gen = torch.Generator().manual_seed(12)
    source = torch.randn((3, 2) + shape, generator=gen).to(DEVICE)
    if mode == "nearest":
        source = (source > 0).to(torch.uint8)
    coarse = coarse_map(shape, batch=3, seed=13).float()
    applied = torch.tensor([True, False, True], device=DEVICE)
    out = _triton_warp.triton_warp_sample(
        source, coarse, mode=mode, padding_mode="border", applied=applied
    )
    full = _triton_warp.triton_warp_sample(source, coarse, mode=mode, padding_mode="border")
    assert torch.equal(out[1], source[1])
    assert torch.equal(out[0], full[0]) and torch.equal(out[2], full[2])
    with pytest.raises(ValueError, match="applied"):
        _triton_warp.triton_warp_sample(source, coarse, mode=mode, padding_mode="border",
                                        applied=applied[:2])  # fmt: skip


def test_supports_and_errors() -> None:
    image = torch.zeros(1, 1, 4, 4, device=DEVICE)
    assert _triton_warp.supports(image, "linear")
    assert not _triton_warp.supports(image.long(), "linear")
    assert _triton_warp.supports(image.bool(), "nearest")
    assert not _triton_warp.supports(image.to(torch.complex64), "nearest")
    coarse = coarse_map((4, 4), batch=1)
    with pytest.raises(ValueError, match="padding_mode"):
        _triton_warp.triton_warp_sample(image, coarse, mode="linear", padding_mode="wrap")
    with pytest.raises(ValueError, match="does not fit"):
        _triton_warp.triton_warp_sample(image, coarse[..., :1], mode="linear", padding_mode="zeros")
    with pytest.raises(ValueError, match="no Triton kernel"):
        _triton_warp.triton_warp_sample(image.long(), coarse, mode="linear", padding_mode="zeros")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_volume_matches_reference_and_native_sampler() -> None:
    shape = (40, 48, 36)
    gen = torch.Generator().manual_seed(11)
    image = torch.randn((3, 2) + shape, generator=gen).to(DEVICE)
    labels = torch.randint(0, 5, (3, 1) + shape, generator=gen, dtype=torch.uint8).to(DEVICE)
    coarse = coarse_map(shape, nodes=6, batch=3, seed=12, spread=0.1)
    for padding in PADDINGS:
        out = warp_sample(image, coarse, padding_mode=padding, sampler="native")
        ref = reference_warp_sample(image, coarse, padding_mode=padding)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-4 * float(image.abs().max()))
        out = warp_sample(labels, coarse, mode="nearest", padding_mode=padding, sampler="native")
        ref = reference_warp_sample(labels, coarse, mode="nearest", padding_mode=padding)
        assert_nearest_equal(out, ref, coarse)


NOISE_CHECK = """
import torch
from synthlesion.augment import _triton_noise as noise
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
seeds = torch.tensor([5, 2**62 + 7, 5], device=device)
out = noise.seeded_normal((3, 2, 40, 30), seeds, device)
assert out.dtype == torch.float32 and out.shape == (3, 2, 40, 30)
assert torch.equal(out[0], out[2]) and not torch.equal(out[0], out[1])
alone = noise.seeded_normal((1, 2, 40, 30), seeds[1:2], device)
assert torch.equal(alone[0], out[1])  # a batch equals each element done alone
assert abs(float(out.mean())) < 0.05 and abs(float(out.std()) - 1) < 0.05
print("ok")
"""


def test_seeded_noise_depends_only_on_the_sample_seed() -> None:
    """Run in a fresh process: Triton's own jit helpers (``tl.randn``) only run in the
    interpreter when ``TRITON_INTERPRET`` is set before Triton is first imported."""
    env = {**os.environ, "TRITON_INTERPRET": "0" if CUDA else "1"}
    done = subprocess.run([sys.executable, "-c", NOISE_CHECK], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gaussian_noise_on_cuda_uses_the_kernel_and_keeps_the_contract() -> None:
    from synthlesion.augment import RandGaussianNoise

    image = torch.rand(4, 1, 16, 18, 20, device="cuda")
    t = RandGaussianNoise("image", std=(0.05, 0.1)).set_random_state(3, device="cuda")
    out = t({"image": image})
    t.set_random_state(3, device="cuda")
    again = t({"image": image})
    assert torch.equal(out["image"], again["image"])
    diff = out["image"] - image
    assert 0.03 < float(diff.std()) < 0.12
