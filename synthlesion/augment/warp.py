"""The fused warp: one coarse grid for a sequence of spatial steps, one sampling per batch.

A step is ``(transform class, parameter values, applied mask)``; the class provides the
static map protocol of :class:`~synthlesion.augment.spatial.SpatialTransform`
(``map_points``, ``inverse_map_points``, ``coarse_shape``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from synthlesion.augment.base import BatchInfo, BatchView, where_applied
from synthlesion.augment.geometry import GeometryKeys, fit_voxel_map, move_geometry
from synthlesion.augment.grid import (
    centred_points,
    coord_dtype,
    dense_grid,
    physical_to_voxel,
    sample_images,
    sample_labels,
)
from synthlesion.augment.sampling import SAMPLERS, prefers_native, warp_sample

Step = tuple[type, dict[str, torch.Tensor], torch.Tensor]
"""A spatial step: (transform class, parameter values, applied mask)."""


def _exact_flips(tensors: dict[str, torch.Tensor], flips: torch.Tensor) -> dict[str, torch.Tensor]:
    """Flip each sample along its axes with ``torch.flip`` (bit-exact).

    On the CPU the samples are grouped by flip pattern; elsewhere reading the patterns
    would wait for the device, so every axis is flipped and selected per sample there.
    """
    if flips.device.type != "cpu":
        return {key: flip_per_axis(x, flips) for key, x in tensors.items()}
    patterns = flips.to(torch.uint8).cpu()
    out = {}
    for key, x in tensors.items():
        y = x.clone()
        for pattern in torch.unique(patterns, dim=0):
            dims = [2 + a for a in range(len(pattern)) if pattern[a]]
            if not dims:
                continue
            rows = (patterns == pattern).all(1).nonzero()[:, 0].to(x.device)
            y[rows] = x[rows].flip(dims)
        out[key] = y
    return out


def flip_per_axis(x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, C, *spatial)`` flipped along axis ``a`` where ``flips[b, a]`` (no host
    read of ``flips``: one flip and one selection per axis)."""
    for a in range(flips.shape[1]):
        x = torch.where(flips[:, a].view((-1,) + (1,) * (x.ndim - 1)), x.flip(2 + a), x)
    return x


def composite_voxel_grid(
    steps: Sequence[Step], info: BatchInfo, *, inverse: bool = False
) -> torch.Tensor:
    """Input voxel positions ``(B, *coarse, d)`` of the coarse output grid.

    The composite map of steps ``T_1 ... T_n`` (applied in that order) is
    ``M_1 o ... o M_n``; the inverse applies ``M_1^-1`` first.
    """
    nd = info.spatial_dims
    coarse = [2] * nd
    for cls, values, _ in steps:
        shape = cls.coarse_shape(values)
        if shape is not None:
            factor = 2 if inverse else 1
            coarse = [max(c, factor * (s - 1) + 1) for c, s in zip(coarse, shape, strict=True)]
    spacing = info.spacing.to(coord_dtype(info.device))
    points = centred_points(info.spatial_shape, coarse, spacing)
    order = steps if inverse else list(reversed(steps))
    for cls, values, _ in order:
        fn = cls.inverse_map_points if inverse else cls.map_points
        points = fn(values, points, info)
    return physical_to_voxel(points, info.spatial_shape, spacing)


def warp_tensors(
    images: dict[str, torch.Tensor],
    labels: dict[str, torch.Tensor],
    steps: Sequence[Step],
    info: BatchInfo,
    padding_mode: str = "border",
    *,
    inverse: bool = False,
    image_mode: str = "bilinear",
    sampler: str = "auto",
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Apply (or undo) a sequence of spatial steps with one sampling grid.

    Args:
        images: Key to ``(B, C, *spatial)`` floating tensors.
        labels: Key to ``(B, L, *spatial)`` label maps (any dtype; kept).
        steps: ``(class, values, applied)`` in application order.
        info: Batch geometry (shape, spacing).
        padding_mode: Image padding.
        inverse: Undo the steps instead (input space from output space).
        image_mode: ``"bilinear"`` or ``"nearest"`` for the images.
        sampler: ``"auto"``, ``"native"`` or ``"torch"`` (see
            :mod:`synthlesion.augment.sampling`).

    Returns:
        New image and label dicts; samples no step applied to are returned unchanged.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} not in {SAMPLERS}")
    if not steps:
        return dict(images), dict(labels)
    applied = steps[0][2].clone()
    for _, _, a in steps[1:]:
        applied = applied | a
    if applied.device.type == "cpu" and not bool(applied.any()):  # elsewhere: no device wait
        return dict(images), dict(labels)
    if all(getattr(cls, "is_flip", False) for cls, _, _ in steps):
        flips = torch.zeros_like(steps[0][1]["flip"])
        for _, values, _ in steps:
            flips = flips ^ values["flip"]
        return _exact_flips(images, flips), _exact_flips(labels, flips)
    voxel = composite_voxel_grid(steps, info, inverse=inverse)
    grids: dict[torch.dtype, torch.Tensor] = {}  # dense grids of the torch sampler, by dtype
    maps: dict[torch.dtype, torch.Tensor] = {}  # the coarse map in the kernels' position dtype

    def resample(stack: torch.Tensor, mode: str, is_label: bool) -> torch.Tensor:
        """``stack`` warped where applied, unchanged elsewhere."""
        # positions in float32 (float64 for float64 images), for both samplers
        dtype = torch.float64 if stack.dtype == torch.float64 else torch.float32
        if sampler == "native" or (sampler == "auto" and prefers_native(stack, mode)):
            padding = "zeros" if is_label else padding_mode
            if dtype not in maps:
                maps[dtype] = voxel.to(dtype)
            return warp_sample(stack, maps[dtype], mode=mode, padding_mode=padding,
                               sampler=sampler, applied=applied)  # fmt: skip
        if dtype not in grids:
            grids[dtype] = dense_grid(voxel, info.spatial_shape, dtype)
        if is_label:
            out = sample_labels(stack, grids[dtype], voxel)
        else:
            out = sample_images(stack, grids[dtype], padding_mode, image_mode)
        return where_applied(applied, out, stack)

    image_mode_name = "linear" if image_mode == "bilinear" else "nearest"
    out_images: dict[str, torch.Tensor] = {}
    out_labels: dict[str, torch.Tensor] = {}
    for source, out, is_label in ((images, out_images, False), (labels, out_labels, True)):
        groups: dict[torch.dtype, list[str]] = {}
        for key, x in source.items():
            groups.setdefault(x.dtype, []).append(key)
        for keys in groups.values():
            stack = torch.cat([source[k] for k in keys], 1) if len(keys) > 1 else source[keys[0]]
            result = resample(stack, "nearest" if is_label else image_mode_name, is_label)
            sizes = [source[k].shape[1] for k in keys]
            for key, part in zip(keys, torch.split(result, sizes, 1), strict=True):
                out[key] = part
    return out_images, out_labels


def has_metadata(view: BatchView) -> bool:
    """Whether some image or label of ``view`` carries an affine to keep up to date."""
    return bool(view.meta_tensors) or any(
        isinstance(view.data.get(f"{k}_meta_dict"), dict)
        and "affine" in view.data[f"{k}_meta_dict"]
        for k in (*view.images, *view.labels)
    )


def warp_view(
    view: BatchView,
    steps: Sequence[Step],
    padding_mode: str,
    sampler: str = "auto",
    geometry: GeometryKeys | None = None,
    *,
    transform: str = "augment",
) -> None:
    """Warp every image and label of ``view`` in place with the fused grid of ``steps``; move
    the boxes and points named by ``geometry`` with the same maps, and update the affines of
    the metadata (``affine @ voxel map``)."""
    moves_geometry = geometry is not None and any(k in view.data for k in geometry.keys)
    voxel_map = None
    if moves_geometry or has_metadata(view):
        voxel_map = fit_voxel_map(composite_voxel_grid(steps, view.info), view.info.spatial_shape)
    if moves_geometry:
        move_geometry(
            view, geometry, steps, voxel_map=voxel_map, transform=transform,
            warp_labels=lambda masks: warp_tensors({}, masks, steps, view.info)[1],
        )  # fmt: skip
    images, labels = warp_tensors(
        view.images, view.labels, steps, view.info, padding_mode, sampler=sampler
    )
    for key, value in {**images, **labels}.items():
        view.set(key, value)
    if voxel_map is not None:
        view.compose_voxel_map(voxel_map)
