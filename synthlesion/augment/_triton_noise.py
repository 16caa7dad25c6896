"""Per-sample seeded Gaussian noise for a CUDA batch in one Triton launch.

On the CPU every sample gets its own seeded ``torch.Generator`` (see
``IntensityTransform.noise``). On CUDA that costs a copy of the seeds to the host (a wait for
the device) and one generator and launch per sample; here sample ``b`` is filled with
Philox normals keyed by ``seeds[b]`` and the voxel index instead, read on the device. The
noise of a sample depends only on its seed, so a batch equals its elements done alone.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the per-sample generator loop is used instead
    triton = None

_BLOCK = 1024

if triton is not None:

    @triton.jit
    def _normal_kernel(out_ptr, seeds_ptr, per_sample, BLOCK: tl.constexpr):
        b = tl.program_id(1)
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        seed = tl.load(seeds_ptr + b)
        noise = tl.randn(seed, offsets)
        tl.store(out_ptr + b.to(tl.int64) * per_sample + offsets, noise, mask=offsets < per_sample)


def supports(x: torch.Tensor) -> bool:
    """Whether the Triton noise kernel can fill a batch like ``x``."""
    if triton is None:
        return False
    on_device = x.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    return on_device and x.ndim >= 2 and x[0].numel() < 2**31


def seeded_normal(shape: tuple[int, ...], seeds: torch.Tensor, device: torch.device
                  ) -> torch.Tensor:  # fmt: skip
    """float32 standard normal ``(B, *rest)``; sample ``b`` from ``seeds[b]`` (int64, B).

    Philox takes the low 64 bits of the seed; the seeds stay on the device.
    """
    out = torch.empty(shape, dtype=torch.float32, device=device)
    per_sample = out[0].numel()
    if per_sample == 0:
        return out
    grid = (triton.cdiv(per_sample, _BLOCK), shape[0])
    _normal_kernel[grid](out, seeds.to(device=device, dtype=torch.int64), per_sample, BLOCK=_BLOCK)
    return out
