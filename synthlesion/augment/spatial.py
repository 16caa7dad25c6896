"""Spatial transforms (affine, elastic, flips), the fused warp and its inverse.

Every spatial transform defines a map from output to input positions in centred physical
coordinates (mm), so rotations and displacements are isotropic in the patient even for
anisotropic voxels. Consecutive spatial transforms (see :class:`~synthlesion.augment.Compose`)
compose their maps on one coarse grid and resample once: the images linearly, the labels
with nearest neighbour (values and dtype preserved); see :mod:`synthlesion.augment.sampling`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from synthlesion.augment.base import (
    APPLIED_KEY,
    AnatomyBoundError,
    AugmentationError,
    BatchInfo,
    BatchView,
    Params,
    Transform,
    as_axis_ranges,
    as_keys,
    check_bound,
    uniform,
)
from synthlesion.augment.device_cache import constant, device_cache
from synthlesion.augment.geometry import GeometryKeys, fit_voxel_map, move_geometry
from synthlesion.augment.grid import PADDING_MODES, coord_dtype
from synthlesion.augment.sampling import SAMPLERS
from synthlesion.augment.warp import (
    Step,
    composite_voxel_grid,
    has_metadata,
    warp_tensors,
    warp_view,
)

MAX_ROTATION_DEG = 30.0
SCALE_BOUNDS = (0.7, 1.4)
MAX_SHEAR = 0.3
NOT_INVERTIBLE = {"RandCropByLabel", "LesionMixup", "LesionCopyPaste", "LesionCutMix"}


def _planes(nd: int) -> list[tuple[int, int]]:
    """Rotation planes: 2D one angle; 3D angle ``k`` rotates in the plane without axis ``k``."""
    return [(0, 1)] if nd == 2 else [(1, 2), (0, 2), (0, 1)]


def _pairs(nd: int) -> list[tuple[int, int]]:
    return [(0, 1)] if nd == 2 else [(0, 1), (0, 2), (1, 2)]


class SpatialTransform(Transform):
    """Base of transforms that move voxels; they fuse into one sampling grid.

    Args:
        padding_mode: Image values outside the field of view: ``"border"`` (repeat the edge,
            right for CT air and MRI background), ``"zeros"`` or ``"reflection"``. Labels
            always pad with 0 (background).
        sampler: ``"auto"`` (a fused kernel where available: numba on the CPU, Triton on
            CUDA), ``"native"`` (require it) or ``"torch"`` (dense grid + ``grid_sample``);
            see :mod:`synthlesion.augment.sampling`.
        box_keys, box_format: Boxes that move with the voxels, and their named format
            (``"xyxy_voxel"``, ``"xyzxyz_world"``, ...; see
            :mod:`synthlesion.augment.geometry`).
        point_keys, point_format: Points that move with the voxels (``"voxel"``/``"world"``).
        box_mask_key: A label key whose voxels inside each box define it after the move.
        outside: ``"drop"`` (NaN row) or ``"flag"`` (``key + "_inside"`` False) for boxes and
            points that leave the image; ``min_visible``: share of a box that must stay.

    MONAI MetaTensors (and ``<key>_meta_dict`` entries) keep their metadata; their affine
    becomes ``affine @ M`` with ``M`` the output-to-input voxel map (its best linear part for
    elastic deformations), as MONAI's own spatial transforms do.
    """

    is_spatial = True
    is_flip = False

    def __init__(
        self,
        keys: str | Sequence[str] | None,
        label_keys: str | Sequence[str] = (),
        *,
        padding_mode: str = "border",
        allow_extreme: bool = False,
        sampler: str = "auto",
        box_keys: str | Sequence[str] | None = None,
        box_format: str | None = None,
        point_keys: str | Sequence[str] | None = None,
        point_format: str | None = None,
        box_mask_key: str | None = None,
        outside: str = "drop",
        min_visible: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, label_keys, **kwargs)
        self.geometry = GeometryKeys.build(
            self.name, box_keys, box_format, point_keys, point_format, box_mask_key, outside,
            min_visible,
        )  # fmt: skip
        if box_mask_key is not None and box_mask_key not in self.label_keys:
            raise AugmentationError(
                "box_mask_key must be one of label_keys", key=box_mask_key, transform=self.name
            )
        if padding_mode not in PADDING_MODES:
            raise AugmentationError(
                f"padding_mode={padding_mode!r} not in {PADDING_MODES}", transform=self.name
            )
        if sampler not in SAMPLERS:
            raise AugmentationError(f"sampler={sampler!r} not in {SAMPLERS}", transform=self.name)
        self.padding_mode = padding_mode
        self.sampler = sampler
        self.allow_extreme = allow_extreme

    # the map protocol: static, so records can be inverted without the transform object
    @staticmethod
    def map_points(
        values: Mapping[str, torch.Tensor], points: torch.Tensor, info: BatchInfo
    ) -> torch.Tensor:
        """Output to input position, ``(B, ..., d)`` centred mm."""
        raise NotImplementedError

    @staticmethod
    def inverse_map_points(
        values: Mapping[str, torch.Tensor], points: torch.Tensor, info: BatchInfo
    ) -> torch.Tensor:
        """Input to output position."""
        raise NotImplementedError

    @staticmethod
    def coarse_shape(values: Mapping[str, torch.Tensor]) -> tuple[int, ...] | None:
        """Coarse grid this map needs (None: linear, two nodes per axis suffice)."""
        return None

    def sample(self, info: BatchInfo) -> Params:
        """Draw the parameters; the record also keeps the spacing (mm) used for the maps."""
        params = super().sample(info)
        params.values["spacing"] = info.spacing
        return params

    def apply_view(self, view: BatchView, params: Params) -> None:
        warp_view(
            view, [(type(self), params.values, params.applied)], self.padding_mode, self.sampler,
            self.geometry, transform=self.name,
        )  # fmt: skip


class RandAffine(SpatialTransform):
    """Random rotation, scale, shear and translation about the volume centre, in mm.

    The content is moved by ``p -> R Sh S p + t`` (``R`` rotations, ``Sh`` shear, ``S``
    scale). Settings: a number is fixed, a ``(low, high)`` pair uniform, a sequence gives one
    setting per axis (per rotation plane for ``rotate``).

    Args:
        keys, label_keys: Images and label maps.
        rotate: Degrees; 2D one angle, 3D three (planes without axis 0, 1, 2). Bound: 30.
        scale: Zoom factor per axis. Bound: [0.7, 1.4].
        shear: Shear factors per axis pair. Bound: 0.3.
        translate: Millimetres per axis.
        isotropic_scale: Draw one scale for all axes.
        allow_extreme: Accept settings beyond the anatomical bounds.
        **kwargs: ``p``, ``seed``, ``device``, ``spacing``, ``padding_mode``, ...
    """

    def __init__(
        self,
        keys: str | Sequence[str] | None,
        label_keys: str | Sequence[str] = (),
        *,
        rotate: Any = (-10.0, 10.0),
        scale: Any = (0.9, 1.1),
        shear: Any = 0.0,
        translate: Any = 0.0,
        isotropic_scale: bool = False,
        allow_extreme: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, label_keys, allow_extreme=allow_extreme, **kwargs)
        check_bound(
            rotate, "rotate", -MAX_ROTATION_DEG, MAX_ROTATION_DEG, self.name, allow_extreme, " deg"
        )
        check_bound(scale, "scale", *SCALE_BOUNDS, self.name, allow_extreme)
        check_bound(shear, "shear", -MAX_SHEAR, MAX_SHEAR, self.name, allow_extreme)
        check_bound(scale, "scale", 1e-3, math.inf, self.name, False)
        self.rotate, self.scale, self.shear, self.translate = rotate, scale, shear, translate
        self.isotropic_scale = isotropic_scale
        problems = []
        for nd in (2, 3):  # fail at construction on settings that fit neither 2D nor 3D
            try:
                self._ranges(nd)
            except AugmentationError as exc:
                problems.append(exc)
        if len(problems) == 2:
            raise problems[-1]

    def _ranges(self, nd: int) -> dict[str, list[tuple[float, float]]]:
        name = self.name
        return {
            "rotation": as_axis_ranges(self.rotate, "rotate", len(_planes(nd)), name),
            "scale": as_axis_ranges(self.scale, "scale", 1 if self.isotropic_scale else nd, name),
            "shear": as_axis_ranges(self.shear, "shear", len(_pairs(nd)), name),
            "translation": as_axis_ranges(self.translate, "translate", nd, name),
        }

    def draw(self, info: BatchInfo, generator: torch.Generator) -> dict[str, torch.Tensor]:
        ranges = self._ranges(info.spatial_dims)
        values = {k: uniform(generator, r, info.batch_size, info.device) for k, r in ranges.items()}
        if self.isotropic_scale:
            values["scale"] = values["scale"].expand(-1, info.spatial_dims).contiguous()
        return values

    def neutral(
        self, values: dict[str, torch.Tensor], applied: torch.Tensor, info: BatchInfo
    ) -> dict[str, torch.Tensor]:
        keep = applied[:, None]
        return {
            k: torch.where(keep, v, torch.ones_like(v) if k == "scale" else torch.zeros_like(v))
            for k, v in values.items()
        }

    @staticmethod
    def matrix(values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``(B, d, d)`` linear part ``R Sh S`` of the forward (content) map.

        Built with a few batched scatters into identity matrices (the entry positions are
        cached constants), so a batch costs the same handful of operations at any size.
        """
        scale = values["scale"]
        batch, nd = scale.shape
        dtype, device = scale.dtype, scale.device
        planes, pairs = _planes(nd), _pairs(nd)
        eye = constant([float(r == q) for r in range(nd) for q in range(nd)], dtype, device)
        angles = torch.deg2rad(values["rotation"].to(dtype))  # (B, P)
        cos, sin = torch.cos(angles), torch.sin(angles)
        where = constant([[i * nd + i, i * nd + j, j * nd + i, j * nd + j] for i, j in planes],
                         torch.int64, device)  # fmt: skip
        rot = eye.expand(batch, len(planes), nd * nd).clone()
        rot.scatter_(2, where.expand(batch, -1, -1), torch.stack([cos, -sin, sin, cos], -1))
        rot = rot.view(batch, len(planes), nd, nd)
        out = rot[:, 0]
        for k in range(1, len(planes)):
            out = out @ rot[:, k]
        upper = constant([i * nd + j for i, j in pairs], torch.int64, device)
        sheared = eye.expand(batch, nd * nd).clone()
        sheared.scatter_(1, upper.expand(batch, -1), values["shear"].to(dtype))
        return out @ sheared.view(batch, nd, nd) * scale[:, None, :]

    @staticmethod
    def map_points(values, points, info):
        a = RandAffine.matrix({k: v.to(points.dtype) for k, v in values.items()})
        t = values["translation"].to(points.dtype)
        shape = (t.shape[0],) + (1,) * (points.ndim - 2) + (t.shape[1],)
        inverse = torch.linalg.inv_ex(a).inverse  # no singularity check: it would wait for
        # the device, and the bounded scale and shear keep the matrix invertible
        return torch.einsum("bij,b...j->b...i", inverse, points - t.view(shape))

    @staticmethod
    def inverse_map_points(values, points, info):
        a = RandAffine.matrix({k: v.to(points.dtype) for k, v in values.items()})
        t = values["translation"].to(points.dtype)
        shape = (t.shape[0],) + (1,) * (points.ndim - 2) + (t.shape[1],)
        return torch.einsum("bij,b...j->b...i", a, points) + t.view(shape)


@device_cache
def _smoothing_matrix(
    n: int, sigma: float, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``(n, n)`` row-normalised Gaussian smoothing weights (a cached constant: read only)."""
    idx = torch.arange(n, dtype=torch.float64)
    w = torch.exp(-0.5 * ((idx[:, None] - idx[None]) / sigma) ** 2)
    return (w / w.sum(1, keepdim=True)).to(device=device, dtype=dtype)


class RandElastic(SpatialTransform):
    """Random smooth deformation from a coarse control grid of displacements (mm).

    Each control node gets a uniform random displacement per axis, the grid is smoothed
    with a Gaussian (``smoothing`` in control-point units) and rescaled so that its largest
    displacement along axis ``a`` equals the sample's ``max_displacement[a]``; the field is
    upsampled linearly. Displacements map output to input positions (as in TorchIO).

    Args:
        keys, label_keys: Images and label maps.
        control_points: Nodes per axis (int or one per axis, >= 4).
        max_displacement: Peak displacement in mm (number: fixed; pair: uniform per sample;
            or one per axis). Bound: half the control-node spacing (no folding).
        smoothing: Gaussian sigma on the control grid (0: none).
        lock_borders: Zero displacement on the outer control nodes.
        **kwargs: ``p``, ``seed``, ``device``, ``spacing``, ``padding_mode``, ``allow_extreme``.
    """

    def __init__(
        self,
        keys: str | Sequence[str] | None,
        label_keys: str | Sequence[str] = (),
        *,
        control_points: int | Sequence[int] = 7,
        max_displacement: Any = 7.5,
        smoothing: float = 1.0,
        lock_borders: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, label_keys, **kwargs)
        cps = [control_points] if isinstance(control_points, int) else list(control_points)
        if not cps or any((not isinstance(c, int)) or c < 4 for c in cps):
            raise AugmentationError(
                f"control_points={control_points!r} must be integers >= 4", transform=self.name
            )
        check_bound(max_displacement, "max_displacement", 0.0, math.inf, self.name, False, " mm")
        if smoothing < 0:
            raise AugmentationError(f"smoothing={smoothing} must be >= 0", transform=self.name)
        self.control_points = control_points
        self.max_displacement = max_displacement
        self.smoothing = float(smoothing)
        self.lock_borders = lock_borders
        as_axis_ranges(max_displacement, "max_displacement", 3, self.name)

    def _control(self, nd: int) -> tuple[int, ...]:
        if isinstance(self.control_points, int):
            return (self.control_points,) * nd
        if len(self.control_points) != nd:
            raise AugmentationError(
                f"control_points={self.control_points!r} has not {nd} entries", transform=self.name
            )
        return tuple(self.control_points)

    def draw(self, info: BatchInfo, generator: torch.Generator) -> dict[str, torch.Tensor]:
        nd, batch, device = info.spatial_dims, info.batch_size, info.device
        ctrl = self._control(nd)
        amp_ranges = as_axis_ranges(self.max_displacement, "max_displacement", nd, self.name)
        node_mm = (  # node spacing in mm, on the CPU (the bound check needs no device wait)
            torch.tensor(
                [(n - 1) / (c - 1) for n, c in zip(info.spatial_shape, ctrl, strict=True)],
                dtype=torch.float64,
            )
            * info.host_spacing()
        )
        for a, (_, high) in enumerate(amp_ranges):
            limit = 0.5 * float(node_mm[:, a].min())
            if high > limit and not self.allow_extreme:
                raise AnatomyBoundError(
                    f"max_displacement {high:g} mm on axis {a} exceeds half the control-node "
                    f"spacing ({limit:.3g} mm) and may fold the anatomy; use fewer control "
                    "points, a smaller displacement, or allow_extreme=True",
                    transform=self.name,
                )
        amp = uniform(generator, amp_ranges, batch, device)  # (B, d)
        dtype = coord_dtype(device)
        field = (
            torch.rand(
                (batch, nd, *ctrl), generator=generator, device=device, dtype=torch.float64
            ).to(dtype)
            * 2
            - 1
        )
        if self.smoothing > 0:
            for a, c in enumerate(ctrl):
                m = _smoothing_matrix(c, self.smoothing, dtype, device)
                field = torch.movedim(torch.tensordot(field, m, dims=([2 + a], [1])), -1, 2 + a)
        if self.lock_borders:
            field = F.pad(field[(slice(None), slice(None)) + (slice(1, -1),) * nd], (1, 1) * nd)
        peak = field.abs().flatten(2).amax(-1).clamp_min(1e-12)  # (B, d)
        field = (
            field / peak.view(batch, nd, *([1] * nd)) * amp.to(dtype).view(batch, nd, *([1] * nd))
        )
        return {"displacement": field.contiguous()}

    def neutral(self, values, applied, info):
        d = values["displacement"]
        return {"displacement": torch.where(applied.view((-1,) + (1,) * (d.ndim - 1)), d, 0)}

    @staticmethod
    def coarse_shape(values):
        return tuple(values["displacement"].shape[2:])

    @staticmethod
    def displacement_at(
        values: Mapping[str, torch.Tensor], points: torch.Tensor, info: BatchInfo
    ) -> torch.Tensor:
        """Displacement (mm) at centred points ``(B, *grid, d)`` (linear, border-clamped)."""
        field = values["displacement"].to(points.dtype)
        nd = field.shape[1]
        half = constant([(n - 1) / 2 for n in info.spatial_shape], points.dtype, points.device)
        half = half * info.spacing.to(points.dtype)  # (B, d)
        norm = points / half.clamp_min(1e-12).view((-1,) + (1,) * (points.ndim - 2) + (nd,))
        grid = norm.flip(-1).reshape(points.shape[0], *([1] * (nd - 1)), -1, nd)
        out = F.grid_sample(
            field, grid, mode="bilinear", padding_mode="border", align_corners=True
        )  # (B, d, 1.., P)
        return out.reshape(points.shape[0], nd, -1).transpose(1, 2).reshape(points.shape)

    @staticmethod
    def map_points(values, points, info):
        return points + RandElastic.displacement_at(values, points, info)

    @staticmethod
    def inverse_map_points(values, points, info, iterations: int = 30):
        q = points
        for _ in range(iterations):  # fixed point of q = p - u(q)
            q = points - RandElastic.displacement_at(values, q, info)
        return q


class RandFlip(SpatialTransform):
    """Random flips along chosen spatial axes (exact voxel copies when not fused).

    Args:
        keys, label_keys: Images and label maps.
        axes: Spatial axes that may flip (0-based, negative allowed); None: all.
        flip_probability: Per sample and axis.
        **kwargs: ``p``, ``seed``, ``device``, ...
    """

    is_flip = True  # a group of flips only is applied exactly with torch.flip

    def __init__(
        self,
        keys: str | Sequence[str] | None,
        label_keys: str | Sequence[str] = (),
        *,
        axes: int | Sequence[int] | None = None,
        flip_probability: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, label_keys, **kwargs)
        if not 0.0 <= flip_probability <= 1.0:
            raise AugmentationError(
                f"flip_probability={flip_probability} must lie in [0, 1]", transform=self.name
            )
        self.axes = (
            (axes,) if isinstance(axes, int) else (tuple(axes) if axes is not None else None)
        )
        self.flip_probability = float(flip_probability)

    def draw(self, info, generator):
        nd = info.spatial_dims
        axes = range(nd) if self.axes is None else self.axes
        for a in axes:
            if not -nd <= a < nd:
                raise AugmentationError(
                    f"axis {a} out of range for {nd}D data", transform=self.name
                )
        flipped = {a % nd for a in axes}
        chosen = constant([a in flipped for a in range(nd)], torch.bool, info.device)
        u = torch.rand(
            (info.batch_size, nd), generator=generator, device=info.device, dtype=torch.float64
        )
        return {"flip": (u < self.flip_probability) & chosen}

    def neutral(self, values, applied, info):
        return {"flip": values["flip"] & applied[:, None]}

    @staticmethod
    def map_points(values, points, info):
        sign = 1 - 2 * values["flip"].to(points.dtype)
        return points * sign.view((-1,) + (1,) * (points.ndim - 2) + (sign.shape[1],))

    inverse_map_points = map_points


SPATIAL_TRANSFORMS: dict[str, type[SpatialTransform]] = {
    cls.__name__: cls for cls in (RandAffine, RandElastic, RandFlip)
}


# --- the fused warp -------------------------------------------------------------------------------


def invert(
    data: Mapping[str, Any],
    keys: str | Sequence[str],
    label_keys: str | Sequence[str] = (),
    *,
    spatial_dims: int | None = None,
    padding_mode: str = "zeros",
    image_mode: str = "bilinear",
    box_keys: str | Sequence[str] | None = None,
    box_format: str | None = None,
    point_keys: str | Sequence[str] | None = None,
    point_format: str | None = None,
    outside: str = "drop",
) -> dict[str, Any]:
    """Map tensors of an augmented item back into the original space.

    Undoes every spatial record in ``data["applied_transforms"]`` (in reverse), fused into
    one sampling grid; intensity records are skipped. Used e.g. on predictions made on an
    augmented batch (give the prediction under a key and the records of the batch).

    Args:
        data: Item or batch holding the tensors and the records.
        keys: Keys resampled with ``image_mode`` (probabilities, logits, images).
        label_keys: Keys resampled with nearest neighbour.
        spatial_dims: For single items.
        padding_mode: Padding for ``keys`` (regions never seen stay 0 by default).
        image_mode: ``"bilinear"`` or ``"nearest"``.
        box_keys, box_format, point_keys, point_format, outside: Boxes and points mapped back
            (by their corners; see :mod:`synthlesion.augment.geometry`).

    MetaTensor affines (and ``<key>_meta_dict`` ones) are mapped back too.

    Raises:
        AugmentationError: A record changed the batch (crop, mixup) and cannot be undone.
    """
    view = BatchView(
        data,
        as_keys(keys, "keys", "invert"),
        as_keys(label_keys, "label_keys", "invert"),
        transform="invert",
        spatial_dims=spatial_dims,
        validate=False,
    )
    steps: list[Step] = []
    spacing = None
    for record in view.data.get(APPLIED_KEY, []):
        name = record["name"]
        name = name[0] if isinstance(name, (list, tuple)) else name
        if name in SPATIAL_TRANSFORMS:
            params = Params.from_record(record)
            values = {k: v.to(view.info.device) for k, v in params.values.items()}
            spacing = values.get("spacing", spacing)
            steps.append((SPATIAL_TRANSFORMS[name], values, params.applied.to(view.info.device)))
        elif name in NOT_INVERTIBLE:
            raise AugmentationError(
                f"record {name!r} changed the batch and cannot be inverted", transform="invert"
            )
    info = view.info
    if spacing is not None:
        info = BatchInfo(
            info.batch_size, info.spatial_shape, info.device, info.dtype, spacing.to(torch.float64)
        )
    geometry = GeometryKeys.build(
        "invert", box_keys, box_format, point_keys, point_format, None, outside
    )
    moves_geometry = steps and any(k in view.data for k in geometry.keys)
    if steps and (moves_geometry or has_metadata(view)):
        forward = fit_voxel_map(composite_voxel_grid(steps, info), info.spatial_shape)
        if moves_geometry:
            view.info = info
            move_geometry(
                view, geometry, steps, inverse=True, voxel_map=forward, transform="invert"
            )
        view.compose_voxel_map(torch.linalg.inv(forward))
    images, labels = warp_tensors(
        view.images, view.labels, steps, info, padding_mode, inverse=True, image_mode=image_mode
    )
    for key, value in {**images, **labels}.items():
        view.set(key, value)
    return view.finish()
