"""The CPU fused warp: evaluate the coarse map and sample, one pass, numba-compiled.

``grid_sample`` on the CPU needs a dense grid ``(B, *spatial, d)`` (as large as three
images) and its 3D kernel is parallel only over the batch. Here every output row first
blends the coarse nodes of its two outer axes (``n_2`` points), then each voxel of the row
interpolates its position from that short row and samples the source: linear for images,
nearest (raw element copy) for label maps. Work is split over ``(batch, slice)`` pairs.

2D batches run as 3D with a depth of one. Positions are float32 (float64 for float64
sources), the same precision as the ``grid_sample`` path.

The parallel kernel is used in the process that first called it while torch uses more than
one thread; DataLoader workers (one torch thread, possibly forked after a parallel call)
get the serial kernel, which is fork-safe.
"""

from __future__ import annotations

import os
import threading
import types

import numpy as np
import torch

try:
    import numba
except ImportError:  # the torch sampler is used instead
    numba = None

_LINEAR_DTYPES = (torch.float32, torch.float64)
_RAW_VIEWS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_PADDING_CODES = {"zeros": 0, "border": 1, "reflection": 2}
_LOCK = threading.Lock()
_PARALLEL_PID: int | None = None


def _after_fork() -> None:  # a lock held by another thread at fork time stays held otherwise
    global _LOCK
    _LOCK = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


def supports(source: torch.Tensor, mode: str) -> bool:
    """Whether this kernel handles ``source`` (CPU; float32/64 for linear, any for nearest;
    not for tensors that need gradients: the ``grid_sample`` path differentiates)."""
    if numba is None or source.device.type != "cpu" or source.ndim not in (4, 5):
        return False
    if source.requires_grad:
        return False
    if mode == "linear":
        return source.dtype in _LINEAR_DTYPES
    return source.element_size() in _RAW_VIEWS


def _pad(p, limit, padding, zero):
    """Border or reflection padding of one position (zeros padding: unchanged).

    ``limit`` is the last index (size - 1) in the position's float type; a size-one axis
    always reads index 0, as ``grid_sample`` does.
    """
    if limit == zero:
        return zero
    if padding == 2:  # align_corners=True reflection about 0 and limit
        p = abs(p)
        flips = np.floor(p / limit)
        p = p - flips * limit
        if flips % 2 != 0:
            p = limit - p
    if padding >= 1:
        p = min(max(p, zero), limit)
    return p


def _corners(p, size, stride, padding, zero, one):
    """Offsets and weights of the two neighbours of padded position ``p`` on one axis.

    Padded positions (border, reflection) lie inside, so both neighbours do; with zeros
    padding a neighbour outside the volume weighs 0 and is read at a clamped offset.
    """
    if size == 1:
        return 0, 0, one, zero
    if padding != 0:  # 0 <= p <= limit: truncation is the floor
        lo = min(int(p), size - 2)
        f = p - np.float32(lo)
        return lo * stride, (lo + 1) * stride, one - f, f
    below = np.floor(p)
    lo = int(below)
    f = p - below
    w_lo = one - f if 0 <= lo < size else zero
    w_hi = f if 0 <= lo + 1 < size else zero
    lo_c = min(max(lo, 0), size - 1)
    hi_c = min(max(lo + 1, 0), size - 1)
    return lo_c * stride, hi_c * stride, w_lo, w_hi


def _row_nodes(coarse, b, c0, w0, c1, w1, row, one):
    """Blend the coarse nodes of one output row over the two outer axes: ``row (n2, 3)``."""
    for m in range(row.shape[0]):
        for a in range(3):
            lo = (one - w1) * coarse[b, c0, c1, m, a] + w1 * coarse[b, c0, c1 + 1, m, a]
            hi = (one - w1) * coarse[b, c0 + 1, c1, m, a] + w1 * coarse[b, c0 + 1, c1 + 1, m, a]
            row[m, a] = (one - w0) * lo + w0 * hi


def _row_positions(coarse, cell, frac, limits, padding, b, i, j, row, pos, one):
    """Padded input positions ``pos (3, size2)`` of output row ``(b, i, j)``."""
    zero = one - one
    _row_nodes(coarse, b, cell[0, i], frac[0, i], cell[1, j], frac[1, j], row, one)
    size2 = pos.shape[1]
    start = 0
    for m in range(row.shape[0] - 1):
        stop = start
        while stop < size2 and cell[2, stop] == m:
            stop += 1
        f2 = frac[2, start:stop]  # 1D views: loops the compiler can vectorise
        for a in range(3):
            base = row[m, a]
            slope = row[m + 1, a] - base
            target = pos[a, start:stop]
            for k in range(f2.shape[0]):
                target[k] = base + slope * f2[k]
        start = stop
    for a in range(3):
        limit = limits[a]
        if limit == zero:
            for k in range(size2):
                pos[a, k] = zero
        elif padding == 1:
            target = pos[a]
            for k in range(size2):
                target[k] = min(max(target[k], zero), limit)
        elif padding == 2:
            for k in range(size2):
                pos[a, k] = _pad(pos[a, k], limit, padding, zero)


def _linear_kernel(src, coarse, cell, frac, limits, out, size0, size1, size2, padding):
    """src/out ``(B, C, S)``; coarse ``(B, n0, n1, n2, 3)``; cell/frac ``(3, max size)``."""
    nb, nc = src.shape[0], src.shape[1]
    one = frac.dtype.type(1.0)
    zero = one - one
    for task in numba.prange(nb * size0):
        b = task // size0
        i = task - b * size0
        row = np.empty((coarse.shape[3], 3), dtype=frac.dtype)
        pos = np.empty((3, size2), dtype=frac.dtype)
        for j in range(size1):
            _row_positions(coarse, cell, frac, limits, padding, b, i, j, row, pos, one)
            for k in range(size2):
                zl, zh, gz0, gz1 = _corners(pos[0, k], size0, size1 * size2, padding, zero, one)
                yl, yh, gy0, gy1 = _corners(pos[1, k], size1, size2, padding, zero, one)
                xl, xh, gx0, gx1 = _corners(pos[2, k], size2, 1, padding, zero, one)
                o = (i * size1 + j) * size2 + k
                for ch in range(nc):
                    s = src[b, ch]
                    v0 = gx0 * s[zl + yl + xl] + gx1 * s[zl + yl + xh]
                    v1 = gx0 * s[zl + yh + xl] + gx1 * s[zl + yh + xh]
                    v2 = gx0 * s[zh + yl + xl] + gx1 * s[zh + yl + xh]
                    v3 = gx0 * s[zh + yh + xl] + gx1 * s[zh + yh + xh]
                    out[b, ch, o] = gz0 * (gy0 * v0 + gy1 * v1) + gz1 * (gy0 * v2 + gy1 * v3)


def _nearest_kernel(src, coarse, cell, frac, limits, out, size0, size1, size2, padding):
    """Like ``_linear_kernel`` but copies the nearest element (any element type)."""
    nb, nc = src.shape[0], src.shape[1]
    one = frac.dtype.type(1.0)
    for task in numba.prange(nb * size0):
        b = task // size0
        i = task - b * size0
        row = np.empty((coarse.shape[3], 3), dtype=frac.dtype)
        pos = np.empty((3, size2), dtype=frac.dtype)
        for j in range(size1):
            _row_positions(coarse, cell, frac, limits, padding, b, i, j, row, pos, one)
            for k in range(size2):
                iz, iy, ix = (
                    int(np.rint(pos[0, k])),
                    int(np.rint(pos[1, k])),
                    int(np.rint(pos[2, k])),
                )
                o = (i * size1 + j) * size2 + k
                if 0 <= iz < size0 and 0 <= iy < size1 and 0 <= ix < size2:
                    index = (iz * size1 + iy) * size2 + ix
                    for ch in range(nc):
                        out[b, ch, o] = src[b, ch, index]
                else:
                    for ch in range(nc):
                        out[b, ch, o] = 0


if numba is not None:
    _pad = numba.njit(inline="always")(_pad)
    _corners = numba.njit(inline="always")(_corners)
    _row_nodes = numba.njit(inline="always")(_row_nodes)
    _row_positions = numba.njit(inline="always")(_row_positions)

    def _compiled(fn, parallel: bool):
        """``fn`` jitted; the serial variant gets its own name, as numba's on-disk cache
        tells functions apart by name and signature, not by the ``parallel`` flag."""
        if not parallel:
            fn = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial")
            fn.__qualname__ = fn.__name__
        return numba.njit(parallel=parallel, cache=True, nogil=True)(fn)

    _KERNELS = {
        (mode, parallel): _compiled(fn, parallel)
        for mode, fn in (("linear", _linear_kernel), ("nearest", _nearest_kernel))
        for parallel in (True, False)
    }


def _axis_tables(shape: tuple[int, ...], nodes: tuple[int, ...], dtype: np.dtype):
    """Node cell index and weight of every output voxel, per axis: ``(3, max(shape))``."""
    length = max(shape)
    cell = np.zeros((3, length), dtype=np.int64)
    frac = np.zeros((3, length), dtype=dtype)
    for a, (size, n) in enumerate(zip(shape, nodes, strict=True)):
        u = np.arange(size, dtype=np.float64) * ((n - 1) / (size - 1) if size > 1 else 0.0)
        c = np.minimum(np.floor(u), n - 2).astype(np.int64)
        cell[a, :size] = c
        frac[a, :size] = u - c
    return cell, frac


def numba_warp_sample(
    source: torch.Tensor, coarse: torch.Tensor, *, mode: str, padding_mode: str
) -> torch.Tensor:
    """Fused warp on the CPU; same arguments and result as ``reference_warp_sample``."""
    global _PARALLEL_PID
    nd = source.ndim - 2
    batch, channels = source.shape[:2]
    shape = tuple(source.shape[2:])
    coord = np.float64 if source.dtype == torch.float64 else np.float32
    nodes = np.ascontiguousarray(coarse.detach().cpu().numpy().astype(coord, copy=False))
    if nd == 2:  # a depth of one: two identical node planes, depth position 0
        flat = np.zeros((batch, 2) + nodes.shape[1:-1] + (3,), dtype=coord)
        flat[..., 1:] = nodes[:, None]
        nodes, shape = flat, (1,) + shape
    cell, frac = _axis_tables(shape, nodes.shape[1:4], coord)
    limits = np.array([n - 1 for n in shape], dtype=coord)
    if mode == "linear":
        work = source.contiguous()
    else:
        work = source.contiguous().view(_RAW_VIEWS[source.element_size()])
    out = torch.empty_like(work)
    src_np = work.reshape(batch, channels, -1).numpy()
    out_np = out.view(batch, channels, -1).numpy()
    threads = torch.get_num_threads()
    parallel = threads > 1 and _PARALLEL_PID in (None, os.getpid())
    kernel = _KERNELS[(mode, parallel)]
    padding = _PADDING_CODES[padding_mode]
    if parallel:  # one parallel launch at a time (numba's thread pools are not all reentrant)
        with _LOCK:
            _PARALLEL_PID = os.getpid()
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            kernel(src_np, nodes, cell, frac, limits, out_np, *shape, padding)
    else:
        kernel(src_np, nodes, cell, frac, limits, out_np, *shape, padding)
    return out.view(source.dtype) if mode == "nearest" else out
