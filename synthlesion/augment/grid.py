"""Sampling grids: coarse physical grids, separable upsampling and the two samplers.

Coordinates used here:

* physical: millimetres, centred on the middle of the volume, array axis order;
* voxel: array indices (float), axis order of the tensor's spatial dimensions;
* normalised: ``grid_sample``'s ``[-1, 1]`` with ``align_corners=True`` and the last spatial
  axis first (x, y, z order).

A composite map is only evaluated on a coarse grid (the elastic control grid, or 2 points
per axis for affines and flips, which trilinear interpolation reproduces exactly). The fused
kernels (:mod:`synthlesion.augment.sampling`) interpolate it per voxel; the ``grid_sample``
path here upsamples it once, separably, as matrix products. Images are sampled linearly,
labels with nearest neighbour on the same grid, so label values are copied, never blended.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from synthlesion.augment.device_cache import constant, device_cache

PADDING_MODES = ("zeros", "border", "reflection")


def coord_dtype(device: torch.device) -> torch.dtype:
    """float64 for the (tiny) coarse-grid arithmetic, except where the device lacks it."""
    return torch.float32 if device.type == "mps" else torch.float64


def centred_points(
    shape: Sequence[int], coarse: Sequence[int], spacing: torch.Tensor
) -> torch.Tensor:
    """Physical positions (mm, centred) of a regular coarse grid spanning the volume.

    Args:
        shape: Spatial shape ``(N_0, ..., N_{d-1})`` of the volume.
        coarse: Number of grid points per axis (>= 2).
        spacing: ``(B, d)`` voxel size in mm.

    Returns:
        ``(B, *coarse, d)``: node ``k`` of axis ``a`` sits on voxel ``k (N_a - 1) / (n_a - 1)``.
    """
    dtype, device = spacing.dtype, spacing.device
    axes = [
        torch.linspace(0, n - 1, c, dtype=dtype, device=device) - (n - 1) / 2
        for n, c in zip(shape, coarse, strict=True)
    ]
    mesh = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (*coarse, d)
    view = (spacing.shape[0],) + (1,) * len(shape) + (len(shape),)
    return mesh[None] * spacing.view(view)


def physical_to_voxel(
    points: torch.Tensor, shape: Sequence[int], spacing: torch.Tensor
) -> torch.Tensor:
    """Centred mm ``(B, ..., d)`` to voxel indices ``(B, ..., d)``."""
    centre = constant([(n - 1) / 2 for n in shape], points.dtype, points.device)
    view = (spacing.shape[0],) + (1,) * (points.ndim - 2) + (len(shape),)
    return points / spacing.view(view).to(points.dtype) + centre


def embed(matrix: torch.Tensor, size: int) -> torch.Tensor:
    """A ``(B, d+1, d+1)`` voxel map embedded in ``(B, size, size)`` (identity elsewhere)."""
    nd = matrix.shape[-1] - 1
    out = torch.eye(size, dtype=matrix.dtype, device=matrix.device).repeat(matrix.shape[0], 1, 1)
    out[:, :nd, :nd] = matrix[:, :nd, :nd]
    out[:, :nd, size - 1] = matrix[:, :nd, nd]
    return out


@device_cache
def interp_matrix(size: int, nodes: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(size, nodes)`` linear interpolation weights (``align_corners=True`` semantics)."""
    if size == 1:
        u = torch.zeros(1, dtype=torch.float64)
    else:
        u = torch.arange(size, dtype=torch.float64) * (nodes - 1) / (size - 1)
    i0 = u.floor().clamp(max=nodes - 2).long()
    w = u - i0
    m = torch.zeros(size, nodes, dtype=torch.float64)
    rows = torch.arange(size)
    m[rows, i0] = 1 - w
    m[rows, i0 + 1] += w
    return m.to(device=device, dtype=dtype)


def upsample_partial(coarse: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Linearly upsample ``(B, n_0, ..., n_{d-1}, K)`` along every axis but the first.

    Returns ``(B, n_0, N_1, ..., N_{d-1}, K)`` (small: one coarse row of full planes).
    """
    t = coarse
    for a in range(len(shape) - 1, 0, -1):
        m = interp_matrix(shape[a], coarse.shape[1 + a], t.dtype, t.device)
        t = torch.movedim(torch.tensordot(t, m, dims=([1 + a], [1])), -1, 1 + a)
    return t.contiguous()


def upsample(coarse: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Linearly upsample ``(B, *coarse, K)`` to ``(B, *shape, K)`` (separable matmuls).

    Equal to ``F.interpolate(..., mode='(bi|tri)linear', align_corners=True)`` on the
    channel-first layout, without a full-resolution intermediate in the wrong layout.
    """
    t = upsample_partial(coarse, shape)
    batch, n0 = t.shape[:2]
    m0 = interp_matrix(shape[0], n0, t.dtype, t.device)
    return torch.matmul(m0, t.reshape(batch, n0, -1)).view(batch, *shape, coarse.shape[-1])


def voxel_to_normalised(voxel: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Voxel indices ``(..., d)`` to ``grid_sample`` coordinates (last axis first)."""
    scale = constant([2.0 / (n - 1) if n > 1 else 0.0 for n in shape], voxel.dtype, voxel.device)
    shift = constant([1.0 if n > 1 else 0.0 for n in shape], voxel.dtype, voxel.device)
    return (voxel * scale - shift).flip(-1)


def dense_grid(
    coarse_voxel: torch.Tensor, shape: Sequence[int], dtype: torch.dtype
) -> torch.Tensor:
    """The full ``grid_sample`` grid ``(B, *shape, d)`` from coarse voxel positions."""
    return upsample(voxel_to_normalised(coarse_voxel, shape).to(dtype), shape)


def sample_images(images: torch.Tensor, grid: torch.Tensor, padding_mode: str = "border",
                  mode: str = "bilinear") -> torch.Tensor:  # fmt: skip
    """Resample ``(B, C, *spatial)`` images on ``grid`` (linear by default), dtype kept."""
    src = images if images.dtype == grid.dtype else images.to(grid.dtype)
    out = F.grid_sample(src, grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    return out.to(images.dtype)


def _cell_bounds(nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max input position over the corners of every cell of a grid of nodes.

    Inside a cell the dense grid is a multilinear blend of the cell's corners, so these
    bound every position the cell's output voxels read. ``(B, *n, d)`` gives
    ``(B, d, *(n-1))`` twice.
    """
    nd = nodes.shape[-1]
    x = torch.movedim(nodes, -1, 1)  # (B, d, *n)
    pool = F.max_pool2d if nd == 2 else F.max_pool3d
    return -pool(-x, 2, 1), pool(x, 2, 1)


def _foreground(labels: torch.Tensor) -> torch.Tensor:
    """``(*spatial)`` bool: a non-zero label in any sample or channel (cheap reductions)."""
    flat = labels.flatten(0, 1)
    if flat.dtype == torch.bool:
        return flat.any(0)
    fg = flat.amax(0) != 0
    if flat.dtype.is_floating_point or flat.dtype.is_signed:
        fg |= flat.amin(0) != 0
    return fg


def sample_labels(labels: torch.Tensor, grid: torch.Tensor,
                  coarse_voxel: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Nearest-neighbour resampling of ``(B, L, *spatial)`` label maps (dtype and values kept).

    Same result as ``grid_sample(labels.float(), grid, mode="nearest")`` cast back, but only
    the box of output voxels that can reach the labels' foreground is sampled; the rest is
    background 0. The box is found on a refined coarse grid: inside one of its cells the
    grid is a multilinear blend of the cell's corners, so the corners bound every position
    the cell reads. Label maps are mostly background, so this costs a fraction of a full
    ``grid_sample``.

    Args:
        labels: Label maps, any dtype.
        grid: ``(B, *spatial, d)`` normalised grid (the images' grid).
        coarse_voxel: ``(B, *coarse, d)`` input voxel positions of the coarse nodes.
    """
    shape = tuple(labels.shape[2:])
    nd = len(shape)
    out = torch.zeros_like(labels)
    if labels.numel() == 0:
        return out
    fg = _foreground(labels).to(torch.uint8)
    extent = []
    for a in range(nd):
        hit = fg.amax(dim=tuple(d for d in range(nd) if d != a)).nonzero()
        if hit.numel() == 0:
            return out
        extent.append((int(hit[0]), int(hit[-1])))
    coarse = coarse_voxel.shape[1:-1]
    fine = [
        (c - 1) * max(1, math.ceil((n - 1) / (c - 1) / 8)) + 1
        for n, c in zip(shape, coarse, strict=True)
    ]  # fmt: skip  (cells of about 8 voxels)
    nodes = coarse_voxel.to(torch.float32)
    nodes = upsample(nodes, fine) if list(fine) != list(coarse) else nodes
    low, high = _cell_bounds(nodes)
    reach = torch.ones(low.shape[:1] + low.shape[2:], dtype=torch.bool, device=low.device)
    for a, (first, last) in enumerate(extent):  # a margin > 0.5 covers rounding
        reach &= (high[:, a] >= first - 1) & (low[:, a] <= last + 1)
    reach = reach.any(0)
    box = []
    for a in range(nd):
        cells = reach.any(dim=tuple(d for d in range(nd) if d != a)).nonzero()
        if cells.numel() == 0:
            return out
        step = (shape[a] - 1) / reach.shape[a]
        start = max(math.floor(int(cells[0]) * step) - 1, 0)
        stop = min(math.ceil((int(cells[-1]) + 1) * step) + 2, shape[a])
        box.append(slice(start, stop))
    big = labels.dtype in (torch.int32, torch.int64) and bool(labels.abs().max() >= 2**24)
    work = torch.float64 if big else grid.dtype
    sub = grid[(slice(None),) + tuple(box)].to(work)
    sampled = F.grid_sample(labels.to(work), sub, mode="nearest", padding_mode="zeros",
                            align_corners=True)  # fmt: skip
    out[(slice(None), slice(None)) + tuple(box)] = sampled.to(labels.dtype)
    return out
