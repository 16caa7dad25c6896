"""The CUDA fused warp: evaluate the coarse map and sample, one pass, in Triton.

One program handles a tile of output voxels (a few rows along the last axis, in one slice
of one batch element, so no per-voxel integer division): it finds each voxel's cell of the
coarse map, blends the ``2^d`` surrounding nodes (a tiny, cached tensor) into the input
position, applies the padding and then samples every channel at that position:
multilinear for images, nearest (a raw element copy) for label maps. No dense grid is
built. 2D batches run as 3D with a depth of one (the depth axis is compiled out).

Positions are float32 (float64 for float64 sources, and for nearest sampling on a float64
map), like the ``grid_sample`` path. Triton is optional: without it :func:`supports` is
False and the torch sampler is used.
"""

from __future__ import annotations

import contextlib
import os

import torch

from synthlesion.augment.device_cache import constant

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch sampler is used instead
    triton = None

_LINEAR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_RAW_VIEWS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_PADDING_CODES = {"zeros": 0, "border": 1, "reflection": 2}
_BLOCK = 512  # voxels per program: a tile of rows of at most _ROW voxels
_ROW = 128
_NUM_WARPS = 4


def supports(source: torch.Tensor, mode: str) -> bool:
    """Whether this kernel handles ``source`` (CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
    if triton is None or source.ndim not in (4, 5) or source.requires_grad:
        return False
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if not (source.is_cuda or (interpret and source.device.type == "cpu")):
        return False
    if mode == "linear":
        return source.dtype in _LINEAR_DTYPES
    return mode == "nearest" and not source.is_complex() and source.element_size() in _RAW_VIEWS


if triton is not None:

    @triton.jit
    def _cell(i, size, nodes, FT: tl.constexpr):
        """Coarse cell (left node) and weight of output index ``i`` along one axis."""
        u = (i * (nodes - 1)).to(FT) / tl.maximum(size - 1, 1)
        c = tl.minimum(tl.floor(u).to(tl.int32), nodes - 2)
        return c, u - c

    @triton.jit
    def _blend(p, s0, s1, s2, w0, w1, w2, live, FT: tl.constexpr, ND: tl.constexpr):
        """Multilinear blend of one component of the cell's nodes (last axis first)."""
        a = tl.load(p, mask=live, other=0).to(FT)
        b = tl.load(p + s2, mask=live, other=0).to(FT)
        c = tl.load(p + s1, mask=live, other=0).to(FT)
        d = tl.load(p + s1 + s2, mask=live, other=0).to(FT)
        r = (a * (1 - w2) + b * w2) * (1 - w1) + (c * (1 - w2) + d * w2) * w1
        if ND == 3:
            a = tl.load(p + s0, mask=live, other=0).to(FT)
            b = tl.load(p + s0 + s2, mask=live, other=0).to(FT)
            c = tl.load(p + s0 + s1, mask=live, other=0).to(FT)
            d = tl.load(p + s0 + s1 + s2, mask=live, other=0).to(FT)
            q = (a * (1 - w2) + b * w2) * (1 - w1) + (c * (1 - w2) + d * w2) * w1
            r = r * (1 - w0) + q * w0
        return r

    @triton.jit
    def _pad(x, size, PADDING: tl.constexpr):
        """Padding of one coordinate; an axis of size 1 always reads 0 (as grid_sample)."""
        hi = size - 1
        if PADDING == 2:  # reflection about 0 and size - 1 (align_corners=True)
            span = tl.maximum(hi, 1).to(x.dtype)
            a = tl.abs(x)
            flips = tl.floor(a / span)
            extra = a - flips * span
            x = tl.where(flips - 2 * tl.floor(flips * 0.5) == 0, extra, span - extra)
        if PADDING >= 1:
            x = tl.minimum(tl.maximum(x, 0), hi)
        else:  # zeros: keep the (harmless) out-of-range part small for the int casts
            x = tl.minimum(tl.maximum(x, -2), size + 1)
        return tl.where(size > 1, x, 0)

    @triton.jit
    def _corners(x, size, live):
        """Left corner, its weight and the in-range masks of both corners."""
        f = tl.floor(x)
        i = f.to(tl.int32)
        return i, x - f, live & (i >= 0) & (i < size), live & (i >= -1) & (i < size - 1)

    @triton.jit
    def _nearest(x, size, live):
        """Round half to even (``nearbyint``) and the in-range mask."""
        f = tl.floor(x)
        d = x - f
        i = f.to(tl.int32)
        i += ((d > 0.5) | ((d == 0.5) & ((i & 1) == 1))).to(tl.int32)
        return i, live & (i >= 0) & (i < size)

    @triton.jit
    def _plane(p, o0, o1, m0, m1, t, q0, q1, n0, n1, u, FT: tl.constexpr):
        """Bilinear sample of one plane: rows ``o0/o1`` (weight ``t``), columns ``q0/q1``."""
        a = tl.load(p + o0 + q0, mask=m0 & n0, other=0).to(FT)
        b = tl.load(p + o0 + q1, mask=m0 & n1, other=0).to(FT)
        c = tl.load(p + o1 + q0, mask=m1 & n0, other=0).to(FT)
        d = tl.load(p + o1 + q1, mask=m1 & n1, other=0).to(FT)
        return (a * (1 - u) + b * u) * (1 - t) + (c * (1 - u) + d * u) * t

    @triton.jit
    def _warp_kernel(
        src, dst, coarse, applied, C, N0, N1, N2, n0, n1, n2, sb, s0, s1, s2, sc,
        ND: tl.constexpr, LINEAR: tl.constexpr, PADDING: tl.constexpr,
        FT: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(2).to(tl.int64)
        i = tl.program_id(1)
        tiles = (N2 + BK - 1) // BK
        j = (tl.program_id(0) // tiles) * BJ + tl.arange(0, BJ)
        k = (tl.program_id(0) % tiles) * BK + tl.arange(0, BK)
        plane = N1 * N2
        nvox = N0 * plane
        live = (j < N1)[:, None] & (k < N2)[None, :]
        vox = i * plane + j[:, None] * N2 + k[None, :]
        if tl.load(applied + b) == 0:  # not applied to this sample: an exact copy
            sp = src + b * C * nvox
            dp = dst + b * C * nvox
            for _ in range(C):
                tl.store(dp + vox, tl.load(sp + vox, mask=live, other=0), mask=live)
                sp += nvox
                dp += nvox
        else:
            _warp_tile(src, dst, coarse, b, i, j, k, live, vox, C, N0, N1, N2, n0, n1, n2,
                       sb, s0, s1, s2, sc, ND, LINEAR, PADDING, FT)  # fmt: skip

    @triton.jit
    def _warp_tile(
        src, dst, coarse, b, i, j, k, live, vox, C, N0, N1, N2, n0, n1, n2, sb, s0, s1, s2, sc,
        ND: tl.constexpr, LINEAR: tl.constexpr, PADDING: tl.constexpr, FT: tl.constexpr,
    ):  # fmt: skip
        """Sample one tile of output voxels of sample ``b`` on the coarse map."""
        plane = N1 * N2
        nvox = N0 * plane
        c0, w0 = _cell(i, N0, n0, FT)
        c1, w1 = _cell(j, N1, n1, FT)
        c2, w2 = _cell(k, N2, n2, FT)
        w1 = w1[:, None]
        w2 = w2[None, :]
        node = coarse + b * sb + c0 * s0 + c1[:, None] * s1 + c2[None, :] * s2
        x1 = _pad(_blend(node + (ND - 2) * sc, s0, s1, s2, w0, w1, w2, live, FT, ND), N1, PADDING)
        x2 = _pad(_blend(node + (ND - 1) * sc, s0, s1, s2, w0, w1, w2, live, FT, ND), N2, PADDING)
        if ND == 3:
            x0 = _pad(_blend(node, s0, s1, s2, w0, w1, w2, live, FT, ND), N0, PADDING)
        else:
            x0 = x1 * 0  # a depth of one
        sp = src + b * C * nvox
        dp = dst + b * C * nvox
        if LINEAR:
            i0, t0, v0, u0 = _corners(x0, N0, live)
            i1, t1, v1, u1 = _corners(x1, N1, live)
            i2, t2, v2, u2 = _corners(x2, N2, live)
            r0 = i0 * plane + i1 * N2
            r1 = r0 + N2
            for _ in range(C):
                acc = _plane(sp, r0, r1, v0 & v1, v0 & u1, t1, i2, i2 + 1, v2, u2, t2, FT)
                if ND == 3:
                    top = _plane(sp + plane, r0, r1, u0 & v1, u0 & u1, t1, i2, i2 + 1, v2, u2,
                                 t2, FT)  # fmt: skip
                    acc = acc * (1 - t0) + top * t0
                tl.store(dp + vox, acc.to(dst.dtype.element_ty), mask=live)
                sp += nvox
                dp += nvox
        else:
            i0, v0 = _nearest(x0, N0, live)
            i1, v1 = _nearest(x1, N1, live)
            i2, v2 = _nearest(x2, N2, live)
            at = i0 * plane + i1 * N2 + i2
            hit = v0 & v1 & v2
            for _ in range(C):
                tl.store(dp + vox, tl.load(sp + at, mask=hit, other=0), mask=live)
                sp += nvox
                dp += nvox


def triton_warp_sample(
    source: torch.Tensor,
    coarse: torch.Tensor,
    *,
    mode: str,
    padding_mode: str,
    applied: torch.Tensor | None = None,
) -> torch.Tensor:
    """Resample ``source`` on a coarse map in one fused Triton pass.

    Args:
        source: ``(B, C, *spatial)`` 2D or 3D; floating (linear) or any dtype of 1, 2, 4 or
            8 bytes (nearest: elements are copied bit for bit).
        coarse: ``(B, *nodes, d)`` float32/float64 input voxel positions of the nodes
            (array axis order), ``nodes >= 2`` per axis, on the device of ``source``.
        mode: ``"linear"`` or ``"nearest"``.
        padding_mode: ``"zeros"``, ``"border"`` or ``"reflection"``.
        applied: Optional ``(B,)`` bool: samples where it is False are copied unchanged
            (bit for bit), which spares the blend with the input afterwards.

    Returns:
        ``(B, C, *spatial)``, a new tensor of the dtype and device of ``source``.
    """
    if padding_mode not in _PADDING_CODES:
        raise ValueError(f"padding_mode={padding_mode!r} not in {tuple(_PADDING_CODES)}")
    if not supports(source, mode):
        raise ValueError(f"no Triton kernel for a {source.dtype} {source.device} source ({mode})")
    nd = source.ndim - 2
    if coarse.ndim != nd + 2 or coarse.shape[0] != source.shape[0] or coarse.shape[-1] != nd:
        raise ValueError(f"coarse map {tuple(coarse.shape)} does not fit {tuple(source.shape)}")
    if any(n < 2 for n in coarse.shape[1:-1]):
        raise ValueError(f"coarse map needs >= 2 nodes per axis, got {tuple(coarse.shape)}")
    if coarse.dtype not in (torch.float32, torch.float64) or coarse.device != source.device:
        raise ValueError(f"coarse map must be float32/64 on {source.device}")
    spatial = (1,) * (3 - nd) + tuple(source.shape[2:])
    if spatial[0] * spatial[1] * spatial[2] >= 2**31:
        raise ValueError(f"volume {tuple(source.shape[2:])} too large (>= 2**31 voxels)")
    batch, channels = source.shape[:2]
    if applied is None:
        flags = constant([1] * batch, torch.uint8, source.device)
    elif applied.shape != (batch,) or applied.device != source.device:
        raise ValueError(f"applied must be ({batch},) on {source.device}")
    else:
        flags = applied.to(torch.uint8)
    src = source.contiguous()
    if mode == "nearest":
        src = src.view(_RAW_VIEWS[src.element_size()])
    out = torch.empty_like(src)
    if out.numel() == 0:
        return out.view(source.dtype)
    nodes = (2,) * (3 - nd) + tuple(coarse.shape[1:-1])
    strides = (0,) * (3 - nd) + tuple(coarse.stride()[1:-1])
    f64 = source.dtype == torch.float64 or (mode == "nearest" and coarse.dtype == torch.float64)
    bk = min(triton.next_power_of_2(spatial[2]), _ROW)
    bj = min(max(_BLOCK // bk, 1), triton.next_power_of_2(spatial[1]))
    grid = (triton.cdiv(spatial[1], bj) * triton.cdiv(spatial[2], bk), spatial[0], batch)
    with torch.cuda.device(source.device) if source.is_cuda else contextlib.nullcontext():
        _warp_kernel[grid](
            src, out, coarse, flags, channels, *spatial, *nodes, coarse.stride(0), *strides,
            coarse.stride(-1), ND=nd, LINEAR=mode == "linear",
            PADDING=_PADDING_CODES[padding_mode], FT=tl.float64 if f64 else tl.float32,
            BJ=bj, BK=bk, num_warps=_NUM_WARPS,
        )  # fmt: skip
    return out.view(source.dtype)
