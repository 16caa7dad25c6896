"""Regional dropout and CutMix that respect lesions.

:class:`RandCutout` punches holes (coarse dropout) but never erases more than a set share of
any lesion, so a classifier never learns from an image whose lesion was wiped out.
:class:`LesionCutMix` pastes a box of another case in (CutMix); the label maps take the
patch's labels exactly (never blended), boxes follow, scalar labels are mixed with the
patch's share of the image, and no lesion is cut into a fragment under a set size.

Lesions are the connected components of the lesion labels (or the given boxes). Placement
is decided on the host per sample (a few small box sums); the drawn boxes are recorded, so
a record replays exactly on any batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from synthlesion.augment.base import (
    AugmentationError,
    BatchInfo,
    BatchView,
    Params,
    Transform,
    as_axis_ranges,
    as_keys,
    as_range,
    flat_values,
)
from synthlesion.augment.geometry import (
    BOX_FORMATS,
    box_masks,
    clip_boxes,
    mask_boxes,
    read_rows,
    write_rows,
)
from synthlesion.augment.label_aware import _member, _partners, check_scalars, mix_scalars

logger = logging.getLogger(__name__)

ON_FAILURE = ("skip", "raise")


@dataclass
class _Lesion:
    """One lesion: its box (slices) and its voxels inside the box."""

    box: tuple[slice, ...]
    mask: np.ndarray

    @property
    def size(self) -> int:
        return int(self.mask.sum())

    def voxels_in(self, region: tuple[slice, ...], exclude: np.ndarray | None = None) -> int:
        """Voxels of the lesion inside ``region`` (not in ``exclude``, a whole-image mask)."""
        inter = []
        for b, r in zip(self.box, region, strict=True):
            lo, hi = max(b.start, r.start), min(b.stop, r.stop)
            if hi <= lo:
                return 0
            inter.append(slice(lo, hi))
        local = tuple(
            slice(i.start - b.start, i.stop - b.start) for i, b in zip(inter, self.box, strict=True)
        )
        part = self.mask[local]
        if exclude is not None:
            part = part & ~exclude[tuple(inter)]
        return int(part.sum())


def lesions_of(
    mask: np.ndarray | None, boxes: np.ndarray | None, shape: Sequence[int]
) -> list[_Lesion]:
    """The lesions of one sample: the connected components (full connectivity) of each lesion
    label of ``mask`` (a label map, 0 background: two touching lesions of different labels
    stay two) and the voxel boxes ``(N, 2d)`` (NaN rows skipped)."""
    out: list[_Lesion] = []
    structure = None if mask is None else np.ones((3,) * mask.ndim, dtype=bool)
    for value in np.unique(mask[mask != 0]) if mask is not None else []:
        labels, _ = ndimage.label(mask == value, structure=structure)
        for index, box in enumerate(ndimage.find_objects(labels), start=1):
            if box is not None:
                out.append(_Lesion(box, labels[box] == index))
    if boxes is not None:
        nd = len(shape)
        for row in boxes:
            if np.isnan(row).any():
                continue
            lo = [max(0, int(np.ceil(v - 0.5))) for v in row[:nd]]
            hi = [min(n, int(np.floor(v - 0.5)) + 1) for v, n in zip(row[nd:], shape, strict=True)]
            if all(h > lo_ for lo_, h in zip(lo, hi, strict=True)):
                box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
                out.append(
                    _Lesion(box, np.ones([b - a for a, b in zip(lo, hi, strict=True)], bool))
                )
    return out


def _region(lo: Sequence[int], hi: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def _voxel_sizes(
    ranges: list[tuple[float, float]], u: np.ndarray, spacing: np.ndarray, shape: Sequence[int]
) -> np.ndarray:
    """Hole sizes in voxels (>= 1, <= the image) from sizes in mm drawn with ``u`` in [0, 1)."""
    low = np.array([r[0] for r in ranges])
    span = np.array([r[1] - r[0] for r in ranges])
    mm = low + span * u
    return np.clip(np.round(mm / spacing), 1, np.array(shape)).astype(int)


def _protection(
    view: BatchView,
    protect_key: str | None,
    lesion_values: tuple[int, ...] | None,
    box_key: str | None,
    box_format: str | None,
    transform: str,
) -> list[list[_Lesion]]:
    """The lesions of every sample of the batch."""
    shape = view.info.spatial_shape
    masks = None
    if protect_key is not None:
        if protect_key not in view.labels:
            raise AugmentationError(
                "the lesion label key is not in the item", key=protect_key, transform=transform
            )
        label = view.labels[protect_key]
        member = _member(label, lesion_values)
        value = label.max(1).values if label.shape[1] > 1 else label[:, 0]
        masks = torch.where(member, value.to(torch.int64), 0).cpu().numpy()
    boxes = None
    if box_key is not None:
        if box_format is not None and not box_format.endswith("_voxel"):
            raise AugmentationError(
                f"box_format={box_format!r}: lesion protection reads voxel boxes only",
                key=box_key,
                transform=transform,
            )
        rows = read_rows(view, box_key, 2 * view.info.spatial_dims, transform)
        boxes = rows.cpu().numpy() if rows is not None else None
    return [
        lesions_of(
            masks[b] if masks is not None else None,
            boxes[b] if boxes is not None else None,
            shape,
        )
        for b in range(view.info.batch_size)
    ]


class RandCutout(Transform):
    """Coarse dropout with lesion protection: holes never erase more than
    ``max_lesion_share`` of any lesion.

    Each sample gets ``num_holes`` boxes (sizes in mm per axis), filled with ``fill`` in every
    channel of the image keys. A hole is tried ``max_tries`` times at random places; a place
    is taken only if, with the holes already placed, no lesion (a connected component of the
    lesion labels of ``lesion_key``, or a box of ``box_key``) is covered beyond
    ``max_lesion_share``. Holes that find no place are reported per sample (``"skip"``: a
    warning naming the key and the samples, and ``params["unplaced"]``; ``"raise"``: an
    error), never retried without end. Label maps are not changed (the lesion stays
    labelled; at most the set share of it is hidden).

    Args:
        keys: Images (floating point) to punch.
        label_keys: Label maps (read for protection; never changed).
        num_holes: Holes per sample (number or ``(low, high)`` integers, inclusive).
        size: Hole size in mm (number, ``(low, high)``, or one per axis).
        fill: A number (e.g. 0, or -1000 for CT air in HU), ``"mean"`` (the sample's channel
            mean) or ``"noise"`` (Gaussian with the sample's channel mean and std).
        lesion_key: Label map whose lesion labels are protected.
        lesion_values: Labels that are lesions (None: any label > 0).
        box_key, box_format: Voxel boxes (``"xyxy_voxel"`` / ``"xyzxyz_voxel"``) that are
            protected lesions too.
        max_lesion_share: Largest share of any lesion the holes may cover together.
        max_hole_fraction: Largest side of a hole as a share of the image's side (small
            fields of view or fine pixels would otherwise let a hole in mm cover everything).
        max_tries: Places tried per hole.
        on_failure: ``"skip"`` or ``"raise"`` when a hole finds no place.
        **kwargs: ``p``, ``seed``, ``device``, ``spatial_dims``, ``spacing``, ...
    """

    def __init__(
        self,
        keys: str | Sequence[str],
        label_keys: str | Sequence[str] = (),
        *,
        num_holes: Any = (1, 4),
        size: Any = (8.0, 24.0),
        fill: float | str = 0.0,
        lesion_key: str | None = None,
        lesion_values: Sequence[int] | None = None,
        box_key: str | None = None,
        box_format: str | None = None,
        max_lesion_share: float = 0.1,
        max_hole_fraction: float = 0.5,
        max_tries: int = 20,
        on_failure: str = "skip",
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, label_keys, **kwargs)
        low, high = as_range(num_holes, "num_holes", self.name)
        if low < 0 or low != int(low) or high != int(high):
            raise AugmentationError(
                f"num_holes={num_holes!r} must be integers >= 0", transform=self.name
            )
        self.num_holes = (int(low), int(high))
        self.size = size
        if not flat_values(size) or min(flat_values(size)) <= 0:
            raise AugmentationError(f"size={size!r} must be > 0 mm", transform=self.name)
        if isinstance(fill, str) and fill not in ("mean", "noise"):
            raise AugmentationError(
                f"fill={fill!r} must be a number, 'mean' or 'noise'", transform=self.name
            )
        self.fill = fill
        if lesion_key is not None and lesion_key not in self.label_keys:
            raise AugmentationError(
                "lesion_key must be one of label_keys", key=lesion_key, transform=self.name
            )
        if box_key is not None and box_format not in BOX_FORMATS:
            raise AugmentationError(
                f"box_format not named: give one of {sorted(BOX_FORMATS)}",
                key=box_key,
                transform=self.name,
            )
        if box_key is not None and not box_format.endswith("_voxel"):
            raise AugmentationError(
                f"box_format={box_format!r}: lesion protection reads voxel boxes "
                "('xyxy_voxel' / 'xyzxyz_voxel')",
                key=box_key,
                transform=self.name,
            )
        if not 0.0 < max_hole_fraction <= 1.0:
            raise AugmentationError(
                f"max_hole_fraction={max_hole_fraction!r} must lie in (0, 1]", transform=self.name
            )
        self.max_hole_fraction = float(max_hole_fraction)
        self.lesion_key = lesion_key
        self.lesion_values = tuple(lesion_values) if lesion_values is not None else None
        self.box_key, self.box_format = box_key, box_format
        if not 0.0 <= max_lesion_share <= 1.0:
            raise AugmentationError(
                f"max_lesion_share={max_lesion_share!r} must lie in [0, 1]", transform=self.name
            )
        if max_tries < 1:
            raise AugmentationError("max_tries must be >= 1", transform=self.name)
        if on_failure not in ON_FAILURE:
            raise AugmentationError(
                f"on_failure={on_failure!r} not in {ON_FAILURE}", transform=self.name
            )
        self.max_lesion_share = float(max_lesion_share)
        self.max_tries = int(max_tries)
        self.on_failure = on_failure

    def draw(self, info: BatchInfo, generator: torch.Generator) -> dict[str, torch.Tensor]:
        nd, batch, holes = info.spatial_dims, info.batch_size, self.num_holes[1]
        as_axis_ranges(self.size, "size", nd, self.name)
        u = torch.rand((batch, 1 + holes * self.max_tries * 2 * nd), generator=generator,
                       device=info.device, dtype=torch.float64)  # fmt: skip
        seeds = torch.randint(0, 2**62, (batch,), generator=generator, device=info.device)
        return {"u": u, "noise_seed": seeds}

    def place(self, view: BatchView, params: Params) -> torch.Tensor:
        """``(B, H, 2d)`` hole boxes ``[lo, hi)`` in voxels (-1 rows: no hole)."""
        info = view.info
        nd, shape, batch = info.spatial_dims, info.spatial_shape, info.batch_size
        ranges = as_axis_ranges(self.size, "size", nd, self.name)
        lesions = _protection(view, self.lesion_key, self.lesion_values, self.box_key,
                              self.box_format, self.name)  # fmt: skip
        u = params.values["u"].cpu().numpy()
        applied = params.applied.cpu().numpy()
        spacing = info.host_spacing().numpy()
        high = self.num_holes[1]
        holes = np.full((batch, high, 2 * nd), -1, dtype=np.int64)
        unplaced = np.zeros(batch, dtype=np.int64)
        for b in range(batch):
            if not applied[b]:
                continue
            count = self.num_holes[0] + min(
                int(u[b, 0] * (high - self.num_holes[0] + 1)), high - self.num_holes[0]
            )
            tries = u[b, 1:].reshape(high, self.max_tries, 2, nd)
            covered = np.zeros(shape, dtype=bool)
            done = [0] * len(lesions[b])
            for h in range(count):
                for t in range(self.max_tries):
                    size = _voxel_sizes(ranges, tries[h, t, 0], spacing[b], shape)
                    size = np.minimum(
                        size, np.maximum(1, np.floor(self.max_hole_fraction * np.array(shape)))
                    ).astype(int)
                    lo = np.floor(tries[h, t, 1] * (np.array(shape) - size + 1)).astype(int)
                    region = _region(lo, lo + size)
                    new = [les.voxels_in(region, covered) for les in lesions[b]]
                    if all(
                        (d + n) <= self.max_lesion_share * les.size
                        for d, n, les in zip(done, new, lesions[b], strict=True)
                    ):
                        done = [d + n for d, n in zip(done, new, strict=True)]
                        covered[region] = True
                        holes[b, h] = np.concatenate([lo, lo + size])
                        break
                else:
                    unplaced[b] += 1
        return torch.from_numpy(holes).to(info.device), torch.from_numpy(unplaced).to(info.device)

    def apply_view(self, view: BatchView, params: Params) -> None:
        if "holes" not in params.values:
            holes, unplaced = self.place(view, params)
            params.values["holes"], params.values["unplaced"] = holes, unplaced
            failed = unplaced.nonzero()[:, 0].tolist()
            if failed:
                key = self.lesion_key or self.box_key or self.keys[0]
                message = (
                    f"{int(unplaced.sum())} hole(s) found no place that keeps every lesion "
                    f"at most {self.max_lesion_share:.0%} covered in {self.max_tries} tries "
                    f"(samples {failed}); use smaller holes or a larger max_lesion_share"
                )
                if self.on_failure == "raise":
                    raise AugmentationError(message, key=key, transform=self.name)
                logger.warning("%s: key %r: %s", self.name, key, message)
        holes = params.values["holes"].cpu()
        nd = view.info.spatial_dims
        for key, x in list(view.images.items()):
            out = None
            for b in range(x.shape[0]):
                rows = [r for r in holes[b].tolist() if r[0] >= 0]
                if not rows:
                    continue
                out = x.clone() if out is None else out
                fill = self._fill_values(x[b], int(params.values["noise_seed"][b]))
                for r in rows:
                    region = (slice(None),) + _region(r[:nd], r[nd:])
                    out[b][region] = fill[region]
            if out is not None:
                view.set(key, out)

    def _fill_values(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """What a hole shows, shaped like one sample ``(C, *spatial)``."""
        if not isinstance(self.fill, str):
            return torch.full_like(x, float(self.fill))
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        mean = flat.mean(1).view((-1,) + (1,) * (x.ndim - 1))
        if self.fill == "mean":
            return mean.expand_as(x).to(x.dtype)
        std = flat.std(1, unbiased=False).view((-1,) + (1,) * (x.ndim - 1))
        gen = torch.Generator(device=x.device).manual_seed(seed)
        noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=torch.float64)
        return (mean + std * noise).to(x.dtype)


class LesionCutMix(Transform):
    """CutMix between samples of a batch that keeps label maps exact and lesions whole.

    Each sample takes a box of its partner (another sample of the batch) at the same place:
    the images take the partner's voxels, every label map the partner's labels (copied,
    never blended). A place is taken only if no lesion (a connected component of the lesion
    labels) of the sample, outside the box, nor of the partner, inside it, is cut into a
    piece smaller than ``min_fragment`` voxels (a lesion wholly in or out is fine); otherwise
    up to ``max_tries`` places, then the sample is left unchanged (``applied`` False).
    Scalar labels (``scalar_keys``, floating, e.g. one-hot) are mixed with the box's share
    of the image, ``lam``: ``y = (1 - lam) y + lam y_partner`` — the same weight the pixels
    have on average. Boxes (``box_keys``, voxel format): the sample's boxes outside the box
    keep what remains of them (with ``box_mask_key``: the bounding box of their remaining
    lesion voxels), then the partner's boxes inside the patch follow (rows ``N .. 2N-1``);
    emptied boxes are NaN rows.

    Args:
        keys, label_keys: Images and label maps.
        size: Box side as a share of each axis (number or range, or one per axis).
        lesion_key, lesion_values: Label map and labels of the lesions (default: the first
            label key, any label > 0).
        min_fragment: Smallest piece of a cut lesion, in voxels.
        max_tries: Places tried per sample.
        scalar_keys: Scalar / per-scan labels to mix.
        box_keys, box_format, box_mask_key: Boxes updated with the patch.
        **kwargs: ``p``, ``seed``, ``device``, ``spatial_dims``, ...
    """

    cross_sample = True

    def __init__(
        self,
        keys: str | Sequence[str] | None,
        label_keys: str | Sequence[str] = (),
        *,
        size: Any = (0.25, 0.5),
        lesion_key: str | None = None,
        lesion_values: Sequence[int] | None = None,
        min_fragment: int = 20,
        max_tries: int = 20,
        scalar_keys: str | Sequence[str] | None = None,
        box_keys: str | Sequence[str] | None = None,
        box_format: str | None = None,
        box_mask_key: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, label_keys, **kwargs)
        self.size = size
        values = flat_values(size)
        if not values or not all(0 < v <= 1 for v in values):
            raise AugmentationError(f"size={size!r} must be shares in (0, 1]", transform=self.name)
        self.lesion_key = lesion_key or (self.label_keys[0] if self.label_keys else None)
        if self.lesion_key is not None and self.lesion_key not in self.label_keys:
            raise AugmentationError(
                "lesion_key must be one of label_keys", key=self.lesion_key, transform=self.name
            )
        self.lesion_values = tuple(lesion_values) if lesion_values is not None else None
        if min_fragment < 0 or max_tries < 1:
            raise AugmentationError(
                "min_fragment must be >= 0 and max_tries >= 1", transform=self.name
            )
        self.min_fragment = int(min_fragment)
        self.max_tries = int(max_tries)
        self.scalar_keys = as_keys(scalar_keys, "scalar_keys", self.name)
        self.box_keys = as_keys(box_keys, "box_keys", self.name)
        if self.box_keys and box_format not in ("xyxy_voxel", "xyzxyz_voxel"):
            raise AugmentationError(
                f"box_format={box_format!r}: LesionCutMix moves voxel boxes "
                "('xyxy_voxel' / 'xyzxyz_voxel')",
                key=self.box_keys[0],
                transform=self.name,
            )
        if box_mask_key is not None and box_mask_key not in self.label_keys:
            raise AugmentationError(
                "box_mask_key must be one of label_keys", key=box_mask_key, transform=self.name
            )
        self.box_format, self.box_mask_key = box_format, box_mask_key

    def draw(self, info: BatchInfo, generator: torch.Generator) -> dict[str, torch.Tensor]:
        nd = info.spatial_dims
        for low, high in as_axis_ranges(self.size, "size", nd, self.name):
            if not 0 < low <= high <= 1:
                raise AugmentationError(
                    f"size={self.size!r} must be shares in (0, 1]", transform=self.name
                )
        u = torch.rand((info.batch_size, self.max_tries, 2, nd), generator=generator,
                       device=info.device, dtype=torch.float64)  # fmt: skip
        return {"partner": _partners(generator, info), "u": u}

    def neutral(self, values, applied, info):
        own = torch.arange(info.batch_size, device=info.device)
        return {**values, "partner": torch.where(applied, values["partner"], own)}

    def _fits(self, lesions: list[_Lesion], region: tuple[slice, ...], inside: bool) -> bool:
        """No lesion cut by ``region`` keeps a connected piece (inside it, or outside)
        under ``min_fragment`` voxels (a lesion wholly in or out is fine)."""
        for les in lesions:
            part = les.voxels_in(region)
            kept = part if inside else les.size - part
            if not 0 < kept < les.size:
                continue
            if kept < self.min_fragment:
                return False
            local = np.zeros(les.mask.shape, dtype=bool)  # the patch inside the lesion's box
            inter = tuple(
                slice(max(r.start, b.start) - b.start, max(min(r.stop, b.stop) - b.start, 0))
                for r, b in zip(region, les.box, strict=True)
            )
            local[inter] = True
            piece = les.mask & (local if inside else ~local)
            pieces, count = ndimage.label(piece, structure=np.ones((3,) * piece.ndim, bool))
            if count > 1 and np.bincount(pieces.ravel())[1:].min() < self.min_fragment:
                return False
        return True

    def place(self, view: BatchView, params: Params) -> torch.Tensor:
        """``(B, 2d)`` patch boxes ``[lo, hi)`` (-1 rows: no patch)."""
        info = view.info
        nd, shape = info.spatial_dims, np.array(info.spatial_shape)
        ranges = as_axis_ranges(self.size, "size", nd, self.name)
        low = np.array([r[0] for r in ranges])
        span = np.array([r[1] - r[0] for r in ranges])
        lesions = (
            _protection(view, self.lesion_key, self.lesion_values, None, None, self.name)
            if self.lesion_key is not None
            else [[] for _ in range(info.batch_size)]
        )
        u = params.values["u"].cpu().numpy()
        partner = params.values["partner"].cpu().tolist()
        out = np.full((info.batch_size, 2 * nd), -1, dtype=np.int64)
        for b, j in enumerate(partner):
            if j == b:
                continue
            for t in range(self.max_tries):
                size = np.clip(np.round((low + span * u[b, t, 0]) * shape), 1, shape).astype(int)
                lo = np.floor(u[b, t, 1] * (shape - size + 1)).astype(int)
                region = _region(lo, lo + size)
                if self._fits(lesions[b], region, inside=False) and self._fits(
                    lesions[j], region, inside=True
                ):
                    out[b] = np.concatenate([lo, lo + size])
                    break
        return torch.from_numpy(out).to(info.device)

    def apply_view(self, view: BatchView, params: Params) -> None:
        info = view.info
        nd = info.spatial_dims
        scalars = check_scalars(view, self.scalar_keys, self.name)
        if "patch" not in params.values:
            params.values["patch"] = self.place(view, params)
        patch = params.values["patch"]
        params.applied = params.applied & (patch[:, 0] >= 0)
        partner = torch.where(
            params.applied,
            params.values["partner"],
            torch.arange(info.batch_size, device=patch.device),
        )
        rows = patch.cpu().tolist()
        inside = torch.zeros((info.batch_size, 1, *info.spatial_shape), dtype=torch.bool,
                             device=info.device)  # fmt: skip
        for b, r in enumerate(rows):
            if r[0] >= 0 and bool(params.applied[b]):
                inside[(b, slice(None)) + _region(r[:nd], r[nd:])] = True
        boxes_before = {
            key: read_rows(view, key, 2 * nd, self.name)
            for key in self.box_keys
            if key in view.data
        }
        mask_before = (
            (view.labels[self.box_mask_key] > 0).any(1) if self.box_mask_key is not None else None
        )
        for key, x in {**view.images, **view.labels}.items():
            view.set(key, torch.where(inside, x[partner], x))
        volume = float(np.prod(info.spatial_shape))
        lam = inside.flatten(1).sum(1).to(torch.float64) / volume
        mix_scalars(view, scalars, partner, lam)
        for key, boxes in boxes_before.items():
            self._boxes(view, key, boxes, partner, inside[:, 0], mask_before)

    def _boxes(
        self,
        view: BatchView,
        key: str,
        boxes: torch.Tensor,
        partner: torch.Tensor,
        inside: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> None:
        """The sample's boxes outside the patch, then the partner's inside it."""
        shape = view.info.spatial_shape
        original = view.data[key]
        if mask is None:  # regions of the boxes themselves
            mask = torch.ones_like(inside)
        own = mask_boxes(box_masks(mask & ~inside, boxes))
        other = mask_boxes(box_masks(mask[partner] & inside, boxes[partner]))
        own_region = mask_boxes(box_masks(~inside, boxes))
        if self.box_mask_key is not None:  # boxes without lesion voxels: by region
            had = box_masks(mask, boxes).flatten(2).amax(-1) > 0
            own = torch.where(had[..., None], own, own_region)
            had_other = box_masks(mask[partner], boxes[partner]).flatten(2).amax(-1) > 0
            other_region = mask_boxes(box_masks(inside, boxes[partner]))
            other = torch.where(had_other[..., None], other, other_region)
        same = (partner == torch.arange(len(partner), device=partner.device))[:, None, None]
        other = torch.where(same, torch.full_like(other, float("nan")), other)
        own = torch.where(same, boxes, own)
        out = torch.cat([own, other], 1)
        clipped, _ = clip_boxes(out, shape, 0.0)
        out = torch.where(torch.isnan(out), out, clipped)
        write_rows(view, key, out, original)
