"""Boxes, points and the image affine under spatial transforms.

A detection label is a list of boxes (and points) per image; it must stay true under every
spatial transform, as the image's affine in MONAI metadata must. This module moves them
with the same maps the fused warp resamples with (:mod:`synthlesion.augment.warp`).

Conventions:

* Boxes are corners ``(lo_0, ..., lo_{d-1}, hi_0, ..., hi_{d-1})`` in array-axis order
  (MONAI's ``"xyxy"`` / ``"xyzxyz"`` corner mode). The format is always named:
  ``"xyxy_voxel"``, ``"xyzxyz_voxel"`` (voxel indices: the box holds voxels ``lo`` to
  ``hi - 1``, i.e. ``hi`` is exclusive; floats allowed) or ``"xyxy_world"``,
  ``"xyzxyz_world"`` (world mm through the image affine; the box's edges).
* Points are ``(p_0, ..., p_{d-1})``, ``"voxel"`` (index of a voxel centre) or ``"world"``.
* An item holds ``(N, 2d)`` boxes / ``(N, d)`` points, a batch ``(B, N, 2d)`` / ``(B, N, d)``.
  Rows of NaN are absent boxes (padding, or dropped by a transform): row indices stay aligned
  with per-box class labels.
* A box leaves the image when less than ``min_visible`` of it (share of its size after the
  transform, before clipping; with a mask: no lesion voxel left) lies inside. The rule
  ``"drop"`` turns it into a NaN row, ``"flag"`` keeps it (clipped) and writes ``False`` in
  ``data[key + "_inside"]``. Boxes that stay are clipped to the image.
* With ``box_mask_key`` (a label map), a box becomes the bounding box of the transformed
  mask voxels that lay inside it (exact for rotations and elastic deformations); a box
  holding no mask voxel falls back to the bounding box of its transformed corners.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from synthlesion.augment.base import AugmentationError, BatchInfo, BatchView, as_keys
from synthlesion.augment.grid import coord_dtype

BOX_FORMATS = {"xyxy_voxel": 2, "xyxy_world": 2, "xyzxyz_voxel": 3, "xyzxyz_world": 3}
POINT_FORMATS = ("voxel", "world")
OUTSIDE_RULES = ("drop", "flag")
INSIDE_SUFFIX = "_inside"


@dataclass(frozen=True)
class GeometryKeys:
    """Which entries of an item are boxes and points, and how they are written.

    Attributes:
        box_keys: Keys of boxes ``(N, 2d)`` / ``(B, N, 2d)``.
        box_format: One of :data:`BOX_FORMATS` (required with ``box_keys``).
        point_keys: Keys of points ``(N, d)`` / ``(B, N, d)``.
        point_format: ``"voxel"`` or ``"world"`` (required with ``point_keys``).
        box_mask_key: Label map whose voxels inside a box define it (None: corners).
        outside: ``"drop"`` or ``"flag"`` for boxes and points that leave the image.
        min_visible: Share of a box that must stay inside the image.
    """

    box_keys: tuple[str, ...] = ()
    box_format: str | None = None
    point_keys: tuple[str, ...] = ()
    point_format: str | None = None
    box_mask_key: str | None = None
    outside: str = "drop"
    min_visible: float = 0.0

    @staticmethod
    def build(
        transform: str,
        box_keys: str | Sequence[str] | None = None,
        box_format: str | None = None,
        point_keys: str | Sequence[str] | None = None,
        point_format: str | None = None,
        box_mask_key: str | None = None,
        outside: str = "drop",
        min_visible: float = 0.0,
    ) -> GeometryKeys:
        """Checked settings (the errors name the transform and the key)."""
        boxes = as_keys(box_keys, "box_keys", transform)
        points = as_keys(point_keys, "point_keys", transform)
        if boxes and box_format is None:
            raise AugmentationError(
                f"box_format not named: give one of {sorted(BOX_FORMATS)} (corners in array "
                "axis order, voxel indices or world mm)",
                key=boxes[0],
                transform=transform,
            )
        if box_format is not None and box_format not in BOX_FORMATS:
            raise AugmentationError(
                f"box_format={box_format!r} not in {sorted(BOX_FORMATS)}", transform=transform
            )
        if points and point_format is None:
            raise AugmentationError(
                f"point_format not named: give one of {POINT_FORMATS}",
                key=points[0],
                transform=transform,
            )
        if point_format is not None and point_format not in POINT_FORMATS:
            raise AugmentationError(
                f"point_format={point_format!r} not in {POINT_FORMATS}", transform=transform
            )
        if outside not in OUTSIDE_RULES:
            raise AugmentationError(
                f"outside={outside!r} not in {OUTSIDE_RULES}", transform=transform
            )
        if not 0.0 <= float(min_visible) <= 1.0:
            raise AugmentationError(
                f"min_visible={min_visible!r} must lie in [0, 1]", transform=transform
            )
        if box_mask_key is not None and not boxes:
            raise AugmentationError(
                "box_mask_key without box_keys", key=box_mask_key, transform=transform
            )
        return GeometryKeys(
            boxes, box_format, points, point_format, box_mask_key, outside, float(min_visible)
        )

    def __bool__(self) -> bool:
        return bool(self.box_keys or self.point_keys)

    @property
    def keys(self) -> tuple[str, ...]:
        return self.box_keys + self.point_keys


# --- reading and writing rows ------------------------------------------------------------------


def read_rows(view: BatchView, key: str, width: int, transform: str) -> torch.Tensor | None:
    """``(B, N, width)`` float64 rows of ``key`` on the batch's device (None: key missing)."""
    if key not in view.data:
        return None
    raw = view.data[key]
    try:
        rows = torch.as_tensor(
            raw.as_subclass(torch.Tensor) if isinstance(raw, torch.Tensor) else np.asarray(raw)
        )
    except (TypeError, ValueError) as exc:
        raise AugmentationError(
            f"cannot read as rows of {width} numbers ({exc})", key=key, transform=transform
        ) from None
    rows = rows.to(device=view.info.device, dtype=torch.float64)
    if rows.ndim == 1 and rows.numel() == 0:
        rows = rows.reshape(0, width)
    expected = 3 if view.batched else 2
    if rows.ndim != expected or rows.shape[-1] != width:
        shape = "(B, N, {w})" if view.batched else "(N, {w})"
        raise AugmentationError(
            f"shape {tuple(rows.shape)} is not {shape.format(w=width)} for {view.info.spatial_dims}D "
            "data (boxes: 2d corners, points: d coordinates)",
            key=key,
            transform=transform,
        )
    if not view.batched:
        rows = rows[None]
    if rows.shape[0] != view.info.batch_size:
        raise AugmentationError(
            f"{rows.shape[0]} rows of boxes/points for a batch of {view.info.batch_size}",
            key=key,
            transform=transform,
        )
    if bool(torch.isinf(rows).any()):
        raise AugmentationError("holds infinite values", key=key, transform=transform)
    return rows


def write_rows(view: BatchView, key: str, rows: torch.Tensor, original: Any) -> None:
    """Store rows in the original's dtype and type (tensor or numpy), unbatched for items."""
    value = rows if view.batched else rows[0]
    if isinstance(original, np.ndarray):
        view.data[key] = (
            value.cpu().numpy().astype(original.dtype if original.dtype.kind == "f" else np.float64)
        )
        return
    dtype = original.dtype if isinstance(original, torch.Tensor) else torch.float64
    view.data[key] = value.to(dtype if dtype.is_floating_point else torch.float64)


# --- affines -------------------------------------------------------------------------------------


def spatial_affine(affine: torch.Tensor, nd: int, key: str, transform: str) -> torch.Tensor:
    """The ``(B, d+1, d+1)`` voxel-to-world part of a (possibly larger, e.g. MONAI's 4x4 for
    2D) affine; refuses one that mixes the spatial axes with the others."""
    a = affine.to(torch.float64)
    if a.ndim == 2:
        a = a[None]
    r = a.shape[-1] - 1
    if r < nd:
        raise AugmentationError(
            f"affine of shape {tuple(affine.shape)} for {nd}D data", key=key, transform=transform
        )
    if r > nd and (
        bool(a[:, nd:r, :nd].abs().gt(0).any()) or bool(a[:, :nd, nd:r].abs().gt(0).any())
    ):
        raise AugmentationError(
            f"the {r + 1}x{r + 1} affine mixes the {nd} spatial axes with the others",
            key=key,
            transform=transform,
        )
    out = torch.zeros(a.shape[0], nd + 1, nd + 1, dtype=torch.float64, device=a.device)
    out[:, :nd, :nd] = a[:, :nd, :nd]
    out[:, :nd, nd] = a[:, :nd, r]
    out[:, nd, nd] = 1
    return out


def fit_voxel_map(input_voxels: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Least-squares affine ``(B, d+1, d+1)`` from output to input voxel indices.

    ``input_voxels`` ``(B, *coarse, d)`` are the input positions of a regular coarse grid
    spanning the output (as :func:`~synthlesion.augment.warp.composite_voxel_grid` gives).
    Exact for flips and affines; for an elastic deformation its best linear part.
    """
    nd = len(spatial_shape)
    batch = input_voxels.shape[0]
    coarse = input_voxels.shape[1:-1]
    axes = [
        torch.linspace(0, n - 1, c, dtype=torch.float64, device=input_voxels.device)
        for n, c in zip(spatial_shape, coarse, strict=True)
    ]
    out = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, nd)
    live = [a for a, n in enumerate(spatial_shape) if n > 1]  # an axis of one voxel has no
    # spread to fit: it maps onto itself
    design = torch.cat([out[:, live], torch.ones_like(out[:, :1])], 1)  # (P, k+1)
    target = input_voxels.reshape(batch, -1, nd).to(torch.float64)[..., live]  # (B, P, k)
    solution = torch.linalg.lstsq(design.expand(batch, -1, -1), target).solution  # (B, k+1, k)
    m = torch.eye(nd + 1, dtype=torch.float64, device=input_voxels.device).repeat(batch, 1, 1)
    index = torch.tensor(live, device=m.device)
    fitted = solution.transpose(1, 2)  # (B, k, k+1)
    for row, a in enumerate(live):
        m[:, a, index] = fitted[:, row, :-1]
        m[:, a, nd] = fitted[:, row, -1]
    snapped = m.round()  # flips and identities exactly (the fit leaves ~1e-15 residues)
    return torch.where((m - snapped).abs() < 1e-9, snapped, m)


def _apply_affine(matrix: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``(B, d+1, d+1)`` applied to points ``(B, ..., d)``."""
    nd = points.shape[-1]
    flat = points.reshape(points.shape[0], -1, nd)
    out = torch.einsum("bij,bpj->bpi", matrix[:, :nd, :nd], flat) + matrix[:, None, :nd, nd]
    return out.reshape(points.shape)


# --- moving points -------------------------------------------------------------------------------


def move_voxel_points(
    points: torch.Tensor, steps: Sequence[tuple], info: BatchInfo, *, inverse: bool = False
) -> torch.Tensor:
    """Voxel positions ``(B, ..., d)`` of the input mapped to the output of ``steps`` (or,
    ``inverse``: output back to input)."""
    dtype = coord_dtype(info.device)
    centre = torch.tensor(
        [(n - 1) / 2 for n in info.spatial_shape], dtype=dtype, device=points.device
    )
    spacing = info.spacing.to(dtype).view((-1,) + (1,) * (points.ndim - 2) + (points.shape[-1],))
    mm = (points.to(dtype) - centre) * spacing
    if inverse:
        for cls, values, _ in reversed(steps):
            mm = cls.map_points(values, mm, info)
    else:
        for cls, values, _ in steps:
            mm = cls.inverse_map_points(values, mm, info)
    return (mm / spacing + centre).to(torch.float64)


def _box_corners(lo_edge: torch.Tensor, hi_edge: torch.Tensor) -> torch.Tensor:
    """``(B, N, 2^d, d)`` corners of boxes given by their edges ``(B, N, d)``."""
    nd = lo_edge.shape[-1]
    picks = torch.tensor(
        list(itertools.product((0, 1), repeat=nd)), dtype=torch.bool, device=lo_edge.device
    )
    return torch.where(picks, hi_edge[:, :, None], lo_edge[:, :, None])


def _edges_to_box(corners: torch.Tensor) -> torch.Tensor:
    """Voxel box ``[lo, hi)`` ``(B, N, 2d)`` around corner edges ``(B, N, K, d)``."""
    return torch.cat([corners.amin(2) + 0.5, corners.amax(2) + 0.5], -1)


def world_to_voxel_boxes(boxes: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """World-mm corner boxes to voxel boxes ``[lo, hi)`` (the voxel box around them)."""
    nd = boxes.shape[-1] // 2
    corners = _box_corners(boxes[..., :nd], boxes[..., nd:])
    return _edges_to_box(_apply_affine(torch.linalg.inv(affine), corners))


def voxel_to_world_boxes(boxes: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """Voxel boxes ``[lo, hi)`` to the world-mm box around them."""
    nd = boxes.shape[-1] // 2
    world = _apply_affine(affine, _box_corners(boxes[..., :nd] - 0.5, boxes[..., nd:] - 0.5))
    return torch.cat([world.amin(2), world.amax(2)], -1)


def move_voxel_boxes(
    boxes: torch.Tensor, steps: Sequence[tuple], info: BatchInfo, *, inverse: bool = False
) -> torch.Tensor:
    """Voxel boxes ``(B, N, 2d)`` to the voxel box around their moved corners (unclipped)."""
    nd = info.spatial_dims
    corners = _box_corners(boxes[..., :nd] - 0.5, boxes[..., nd:] - 0.5)
    return _edges_to_box(move_voxel_points(corners, steps, info, inverse=inverse))


def box_masks(mask: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """``(B, N, *spatial)`` uint8: the lesion voxels inside each box.

    ``mask`` is a boolean ``(B, *spatial)`` (every true voxel counts), or a label map
    ``(B, *spatial)``: then a box's lesion is the label most frequent among the non-zero
    voxels inside it (an instance map gives each box its own lesion, and a neighbour reaching
    into the box does not count).
    """
    if mask.dtype != torch.bool:
        label = mask
        inside = box_masks(label != 0, boxes)  # (B, N, *spatial)
        chosen = torch.zeros(inside.shape[:2], dtype=label.dtype, device=label.device)
        for b in range(inside.shape[0]):
            for n in range(inside.shape[1]):
                values = torch.unique(label[b][inside[b, n].bool()])
                if values.numel() == 1:
                    chosen[b, n] = values[0]
                elif values.numel() > 1:  # the label whose voxels fill the box best
                    own = torch.stack([inside[b, n].bool() & (label[b] == v) for v in values])
                    fits = _box_iou(mask_boxes(own[None].to(torch.uint8))[0], boxes[b, n])
                    chosen[b, n] = values[int(torch.argmax(fits))]
        shape = chosen.shape + (1,) * (label.ndim - 1)
        return inside * (label[:, None] == chosen.view(shape)).to(torch.uint8)
    nd = mask.ndim - 1
    out = mask[:, None].to(torch.uint8).expand(-1, boxes.shape[1], *mask.shape[1:]).clone()
    for a in range(nd):
        idx = torch.arange(mask.shape[1 + a], device=mask.device, dtype=torch.float64)
        lo = torch.ceil(boxes[..., a] - 0.5)[..., None]
        hi = torch.floor(boxes[..., nd + a] - 0.5)[..., None]
        inside = (idx >= lo) & (idx <= hi)  # (B, N, n_a); NaN boxes: all False
        shape = [inside.shape[0], inside.shape[1]] + [1] * nd
        shape[2 + a] = inside.shape[-1]
        out = out * inside.view(shape).to(torch.uint8)
    return out


def _box_iou(candidates: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """IoU of voxel boxes ``(K, 2d)`` with one box ``(2d,)``."""
    nd = box.shape[-1] // 2
    lo = torch.maximum(candidates[:, :nd], box[:nd])
    hi = torch.minimum(candidates[:, nd:], box[nd:])
    inter = (hi - lo).clamp_min(0).prod(-1)
    volume = (candidates[:, nd:] - candidates[:, :nd]).prod(-1)
    return inter / (volume + (box[nd:] - box[:nd]).prod() - inter).clamp_min(1e-12)


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Voxel boxes ``[lo, hi)`` ``(B, N, 2d)`` of channel masks ``(B, N, *spatial)``; NaN
    where a channel is empty."""
    nd = masks.ndim - 2
    lo, hi = [], []
    empty = None
    for a in range(nd):
        other = [2 + k for k in range(nd) if k != a]
        proj = masks.amax(dim=other) > 0 if other else masks > 0  # (B, N, n_a)
        n = proj.shape[-1]
        idx = torch.arange(n, device=masks.device, dtype=torch.float64)
        first = torch.where(proj, idx, torch.full_like(idx, float(n))).amin(-1)
        last = torch.where(proj, idx, torch.full_like(idx, -1.0)).amax(-1)
        lo.append(first)
        hi.append(last + 1)
        empty = ~proj.any(-1) if empty is None else empty
    out = torch.stack(lo + hi, -1)
    return torch.where(empty[..., None], torch.full_like(out, float("nan")), out)


def clip_boxes(
    boxes: torch.Tensor, shape: Sequence[int], min_visible: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes clipped to the image and whether each stays (``(B, N)`` bool; NaN rows: False)."""
    nd = len(shape)
    size = torch.tensor(shape, dtype=torch.float64, device=boxes.device)
    lo, hi = boxes[..., :nd], boxes[..., nd:]
    clo = torch.minimum(torch.maximum(lo, torch.zeros_like(lo)), size)
    chi = torch.minimum(torch.maximum(hi, torch.zeros_like(hi)), size)
    full = (hi - lo).clamp_min(1e-12).prod(-1)
    visible = (chi - clo).clamp_min(0).prod(-1)
    share = visible / full
    inside = (visible > 0) & (share >= min_visible) & ~torch.isnan(boxes).any(-1)
    return torch.cat([clo, chi], -1), inside


def check_input_rows(
    rows: torch.Tensor,
    shape: Sequence[int],
    key: str,
    transform: str,
    *,
    boxes: bool,
    given: torch.Tensor | None = None,
    flagged: torch.Tensor | None = None,
) -> None:
    """Refuse boxes (voxel ``[lo, hi)``) or points that do not lie in the image as given, and
    boxes whose ``hi`` is below ``lo``. NaN rows are absent, and rows an earlier transform
    flagged as outside (``flagged`` False) pass. World boxes (``given``: the rows as the user
    wrote them) need only overlap the image: the voxel box around an oblique world box may
    reach past it."""
    nd = len(shape)
    present = ~torch.isnan(rows).any(-1)
    if flagged is not None:
        present = present & flagged.to(torch.bool)
    if not bool(present.any()):
        return
    size = torch.tensor(shape, dtype=torch.float64, device=rows.device)
    tol = 1e-3
    if boxes:
        lo, hi = rows[..., :nd], rows[..., nd:]
        bad_order = present & (hi < lo).any(-1)
        if given is not None:
            outside = present & ((hi <= 0) | (lo >= size)).any(-1)
        else:
            outside = present & ((lo < -tol) | (hi > size + tol)).any(-1)
        what = "box"
    else:
        bad_order = torch.zeros_like(present)
        outside = present & ((rows < -0.5 - tol) | (rows > size - 0.5 + tol)).any(-1)
        what = "point"
    shown = given if given is not None else rows
    unit = "world mm" if given is not None else "voxels"
    for bad, problem in ((bad_order, "has hi < lo on some axis"),
                         (outside, f"lies outside the image (shape {tuple(shape)})")):  # fmt: skip
        if bool(bad.any()):
            b, n = (int(v) for v in bad.nonzero()[0].tolist())
            raise AugmentationError(
                f"{what} {n} of sample {b} ({[round(float(v), 3) for v in shown[b, n]]} {unit}) "
                f"{problem}; check the format (corners lo..., hi... in array axis order) and "
                "the coordinates",
                key=key,
                transform=transform,
            )


def points_inside(points: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``(B, N)`` bool: voxel points within the image's extent (NaN rows: False)."""
    size = torch.tensor(shape, dtype=torch.float64, device=points.device)
    return ((points >= -0.5) & (points <= size - 0.5)).all(-1)


# --- the whole step --------------------------------------------------------------------------------


def item_affine(view: BatchView) -> tuple[str, torch.Tensor] | None:
    """``(key, affine)`` of the first image or label with an affine in its metadata."""
    for key in itertools.chain(view.images, view.labels):
        affine = view.affine(key)
        if affine is not None:
            return key, affine
    return None


def move_geometry(
    view: BatchView,
    geometry: GeometryKeys,
    steps: Sequence[tuple],
    *,
    inverse: bool = False,
    voxel_map: torch.Tensor | None = None,
    transform: str = "augment",
    warp_labels: Any = None,
) -> None:
    """Move the boxes and points of ``view`` with ``steps`` (in place, in ``view.data``).

    Args:
        view: The batch (labels still before the warp: box masks are read from them).
        geometry: Which keys and how.
        steps: The spatial steps, in application order.
        inverse: Undo the steps (augmented back to original space).
        voxel_map: ``(B, d+1, d+1)`` output-to-input voxel map (for world coordinates: the
            output affine is ``affine @ voxel_map``); computed when needed and not given.
        transform: Name for errors.
        warp_labels: ``callable(dict of (B, N, *spatial) uint8) -> dict`` resampling channel
            masks with the steps (nearest); needed with ``box_mask_key``.
    """
    nd = view.info.spatial_dims
    linear = all(cls.coarse_shape(values) is None for cls, values, _ in steps)
    affines = None
    before = _world_affine(view, geometry, transform)
    if before is not None:
        if voxel_map is None:
            raise AugmentationError("world coordinates need the voxel map", transform=transform)
        m = voxel_map.to(torch.float64)
        affines = (before, before @ (torch.linalg.inv(m) if inverse else m))

    if geometry.box_format is not None:
        if geometry.box_format.split("_")[0] != ("xyxy" if nd == 2 else "xyzxyz"):
            present = [k for k in geometry.box_keys if k in view.data]
            if present:
                raise AugmentationError(
                    f"box_format={geometry.box_format!r} does not fit {nd}D data",
                    key=present[0],
                    transform=transform,
                )
        world = geometry.box_format.endswith("_world")
        for key in geometry.box_keys:
            original = view.data.get(key)
            rows = read_rows(view, key, 2 * nd, transform)
            if rows is None:
                continue
            flagged = _flags(view, key)
            voxel = world_to_voxel_boxes(rows, affines[0]) if world else rows
            if not inverse:
                check_input_rows(voxel, view.info.spatial_shape, key, transform, boxes=True,
                                 given=rows if world else None, flagged=flagged)  # fmt: skip
            if world and linear and geometry.box_mask_key is None:
                # the affine follows the anatomy: a world box stays where it is (clipped)
                out, inside = _clip_world_boxes(rows, affines[1], view.info.spatial_shape,
                                                geometry.min_visible)  # fmt: skip
                _store(view, key, rows, out, inside, flagged, geometry, original)
                continue
            moved = move_voxel_boxes(voxel, steps, view.info, inverse=inverse)
            if geometry.box_mask_key is not None and rows.shape[1] > 0:
                if geometry.box_mask_key not in view.labels:
                    raise AugmentationError(
                        "box_mask_key is not one of the transform's label keys in the item",
                        key=geometry.box_mask_key,
                        transform=transform,
                    )
                label = view.labels[geometry.box_mask_key]
                label = label[:, 0] if label.shape[1] == 1 else (label > 0).any(1)
                channels = box_masks(label, voxel)
                had_mask = channels.flatten(2).amax(-1) > 0
                from_mask = mask_boxes(warp_labels({"_boxes": channels})["_boxes"])
                moved = torch.where(had_mask[..., None], from_mask, moved)
                clipped, inside = clip_boxes(moved, view.info.spatial_shape, geometry.min_visible)
                inside = torch.where(had_mask, ~torch.isnan(from_mask).any(-1), inside)
            else:
                clipped, inside = clip_boxes(moved, view.info.spatial_shape, geometry.min_visible)
            out = voxel_to_world_boxes(clipped, affines[1]) if world else clipped
            _store(view, key, rows, out, inside, flagged, geometry, original)

    if geometry.point_format is not None:
        world = geometry.point_format == "world"
        for key in geometry.point_keys:
            original = view.data.get(key)
            rows = read_rows(view, key, nd, transform)
            if rows is None:
                continue
            flagged = _flags(view, key)
            voxel = _apply_affine(torch.linalg.inv(affines[0]), rows) if world else rows
            if not inverse:
                check_input_rows(voxel, view.info.spatial_shape, key, transform, boxes=False,
                                 flagged=flagged)  # fmt: skip
            moved = move_voxel_points(voxel, steps, view.info, inverse=inverse)
            inside = points_inside(moved, view.info.spatial_shape)
            out = _apply_affine(affines[1], moved) if world else moved
            if world and linear:
                out = rows  # the anatomy keeps its world position
            _store(view, key, rows, out, inside, flagged, geometry, original)


def _world_affine(view: BatchView, geometry: GeometryKeys, transform: str) -> torch.Tensor | None:
    """``(B, d+1, d+1)`` voxel-to-world affine of the item when some box or point key in it is
    in world coordinates (None otherwise); refused when the item has no affine."""
    world = (geometry.box_format or "").endswith("_world") or geometry.point_format == "world"
    present = [k for k in geometry.keys if k in view.data]
    if not world or not present:
        return None
    found = item_affine(view)
    if found is None:
        raise AugmentationError(
            "world coordinates need the image's affine: give the images as MONAI "
            "MetaTensors (LoadImaged) or with a '<key>_meta_dict' holding 'affine'",
            key=present[0],
            transform=transform,
        )
    affine = spatial_affine(found[1], view.info.spatial_dims, found[0], transform)
    affine = affine.to(view.info.device)
    if affine.shape[0] == 1 and view.info.batch_size > 1:
        affine = affine.expand(view.info.batch_size, -1, -1)
    return affine


def _flags(view: BatchView, key: str) -> torch.Tensor | None:
    """``(B, N)`` inside flags an earlier transform wrote (``outside="flag"``), if any."""
    flags = view.data.get(key + INSIDE_SUFFIX)
    if flags is None:
        return None
    flags = torch.as_tensor(flags, device=view.info.device).to(torch.bool)
    return flags if view.batched else flags[None]


def _store(
    view: BatchView,
    key: str,
    rows: torch.Tensor,
    out: torch.Tensor,
    inside: torch.Tensor,
    flagged: torch.Tensor | None,
    geometry: GeometryKeys,
    original: Any,
) -> None:
    """Write moved rows with the outside rule (a row once flagged outside stays flagged)."""
    out, inside = _outside_rule(rows, out, inside, flagged, geometry)
    write_rows(view, key, out, original)
    if geometry.outside == "flag":
        view.data[key + INSIDE_SUFFIX] = inside if view.batched else inside[0]


def _outside_rule(
    rows: torch.Tensor,
    out: torch.Tensor,
    inside: torch.Tensor,
    flagged: torch.Tensor | None,
    geometry: GeometryKeys,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``"drop"``: rows outside become NaN; ``"flag"``: they stay (absent rows stay NaN).
    A row flagged outside by an earlier transform stays flagged."""
    if flagged is not None and flagged.shape == inside.shape:
        inside = inside & flagged
    keep = inside if geometry.outside == "drop" else ~torch.isnan(rows).any(-1)
    return torch.where(keep[..., None], out, torch.full_like(out, float("nan"))), inside


def _clip_world_boxes(
    boxes: torch.Tensor, affine: torch.Tensor, shape: Sequence[int], min_visible: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """World boxes intersected with the world box around the image, and whether each keeps
    ``min_visible`` of itself inside the image (judged on its voxel box)."""
    nd = len(shape)
    size = torch.tensor(shape, dtype=torch.float64, device=boxes.device)
    image = torch.cat([torch.zeros_like(size), size])[None, None].expand(boxes.shape[0], 1, -1)
    extent = voxel_to_world_boxes(image, affine)  # (B, 1, 2d)
    lo = torch.maximum(boxes[..., :nd], extent[..., :nd])
    hi = torch.minimum(boxes[..., nd:], extent[..., nd:])
    _, inside = clip_boxes(world_to_voxel_boxes(boxes, affine), shape, min_visible)
    inside = inside & (hi > lo).all(-1)
    return torch.cat([lo, hi], -1), inside


def translation_map(start: torch.Tensor) -> torch.Tensor:
    """``(B, d+1, d+1)`` output-to-input voxel map of a crop starting at ``start`` ``(B, d)``."""
    batch, nd = start.shape
    m = torch.eye(nd + 1, dtype=torch.float64, device=start.device).repeat(batch, 1, 1)
    m[:, :nd, nd] = start.to(torch.float64)
    return m


def crop_geometry(
    view: BatchView,
    geometry: GeometryKeys,
    start: torch.Tensor,
    roi: Sequence[int],
    per_input: int,
    transform: str,
) -> dict[str, torch.Tensor]:
    """Boxes and points of a batch cut into crops: ``(B * K, N, w)`` rows per key.

    Crop ``i`` (of input ``i // K``) starts at voxel ``start[i]`` ``(B * K, d)`` and has the
    size ``roi``; voxel rows shift by ``-start``, boxes are clipped to the crop, and rows that
    leave it follow ``geometry.outside``. World rows keep their world coordinates (the crop's
    affine moves its origin instead), clipped to the crop. ``<key>_inside`` flags are returned
    under that name with ``"flag"``.
    """
    nd = view.info.spatial_dims
    out: dict[str, torch.Tensor] = {}
    shift = start.to(torch.float64)[:, None]  # (B*K, 1, d)
    affines = None
    before = _world_affine(view, geometry, transform)
    if before is not None:
        before = before.repeat_interleave(per_input, 0)
        affines = (before, before @ translation_map(start))
    for keys, is_box in ((geometry.box_keys, True), (geometry.point_keys, False)):
        fmt = geometry.box_format if is_box else geometry.point_format
        if fmt is None:
            continue
        world = fmt.endswith("world")
        for key in keys:
            rows = read_rows(view, key, 2 * nd if is_box else nd, transform)
            if rows is None:
                continue
            flagged = _flags(view, key)
            if flagged is not None:
                flagged = flagged.repeat_interleave(per_input, 0)
            rows = rows.repeat_interleave(per_input, 0)
            if is_box:
                voxel = world_to_voxel_boxes(rows, affines[0]) if world else rows
                check_input_rows(voxel, view.info.spatial_shape, key, transform, boxes=True,
                                 given=rows if world else None, flagged=flagged)  # fmt: skip
                if world:  # the crop's affine moves its origin: the world box stays (clipped)
                    result, inside = _clip_world_boxes(rows, affines[1], roi,
                                                       geometry.min_visible)  # fmt: skip
                else:
                    result, inside = clip_boxes(voxel - shift.repeat(1, 1, 2), roi,
                                                geometry.min_visible)  # fmt: skip
            else:
                voxel = _apply_affine(torch.linalg.inv(affines[0]), rows) if world else rows
                check_input_rows(voxel, view.info.spatial_shape, key, transform, boxes=False,
                                 flagged=flagged)  # fmt: skip
                inside = points_inside(voxel - shift, roi)
                result = rows if world else voxel - shift
            out[key], inside = _outside_rule(rows, result, inside, flagged, geometry)
            if geometry.outside == "flag":
                out[key + INSIDE_SUFFIX] = inside
    return out
