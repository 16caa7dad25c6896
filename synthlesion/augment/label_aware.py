"""Label-aware transforms: crop by label, lesion mixup and lesion copy-paste.

Labels are only ever copied or combined by union, never blended: a pasted or mixed lesion
keeps a valid mask with the dtype and values of the input label map.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from synthlesion.augment.base import (
    APPLIED_KEY,
    SPACING_KEY,
    AugmentationError,
    BatchInfo,
    BatchView,
    Params,
    Transform,
    as_keys,
    as_range,
    uniform,
)
from synthlesion.augment.geometry import (
    INSIDE_SUFFIX,
    GeometryKeys,
    crop_geometry,
    translation_map,
)


def _partners(generator: torch.Generator, info: BatchInfo) -> torch.Tensor:
    """Another sample of the batch for every sample (itself only when B == 1)."""
    batch = info.batch_size
    u = torch.rand((batch,), generator=generator, device=info.device, dtype=torch.float64)
    offset = 1 + torch.floor(u * max(batch - 1, 1)).long().clamp(max=max(batch - 2, 0))
    partner = (torch.arange(batch, device=info.device) + offset) % batch
    return partner if batch > 1 else torch.zeros_like(partner)


def _pick(mask: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick voxels of boolean ``mask`` ``(B, N)``: one per column of ``u`` ``(B, K)`` in [0, 1).

    Returns the flat indices ``(B, K)`` and whether the mask had any voxel ``(B,)``.
    """
    cum = mask.to(torch.int64).cumsum(1)
    count = cum[:, -1]
    rank = (
        torch.floor(u * count[:, None].to(u.dtype))
        .long()
        .clamp(max=(count - 1).clamp_min(0)[:, None])
        + 1
    )
    index = torch.searchsorted(cum, rank).clamp(max=mask.shape[1] - 1)
    return index, count > 0


def _unravel(index: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    coords = []
    for n in reversed(shape):
        coords.append(index % n)
        index = index // n
    return torch.stack(coords[::-1], -1)


class RandCropByLabel(Transform):
    """Several crops per volume centred on foreground or background (batched).

    Like MONAI's ``RandCropByPosNegLabeld``: each crop's centre is a foreground voxel with
    probability ``pos / (pos + neg)``, otherwise a background voxel, moved inwards so that
    the crop fits. A batch of B volumes becomes a batch of ``B * num_samples`` crops (sample
    ``b``'s crops are rows ``b*K ... b*K+K-1``); a single item becomes a list of items.
    Samples not applied (``p``) get uniformly random centres.

    Args:
        keys, label_keys: Images and label maps (all are cropped).
        roi_size: Crop size in voxels per axis.
        num_samples: Crops per volume (K).
        pos, neg: Weights of foreground and background centres.
        label_key: Label map deciding foreground (> 0); default the first label key.
        box_keys, box_format, point_keys, point_format, outside, min_visible: Boxes and
            points cut with the crops (shifted, clipped; see
            :mod:`synthlesion.augment.geometry`).
        **kwargs: ``p``, ``seed``, ``device``, ``spatial_dims``, ...
    """

    changes_batch = True

    def __init__(
        self,
        keys: str | Sequence[str] | None,
        label_keys: str | Sequence[str],
        *,
        roi_size: Sequence[int],
        num_samples: int = 4,
        pos: float = 1.0,
        neg: float = 1.0,
        label_key: str | None = None,
        box_keys: str | Sequence[str] | None = None,
        box_format: str | None = None,
        point_keys: str | Sequence[str] | None = None,
        point_format: str | None = None,
        outside: str = "drop",
        min_visible: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, label_keys, **kwargs)
        self.geometry = GeometryKeys.build(
            self.name, box_keys, box_format, point_keys, point_format, None, outside, min_visible
        )
        if not self.label_keys:
            raise AugmentationError("needs a label key", transform=self.name)
        self.label_key = label_key or self.label_keys[0]
        if self.label_key not in self.label_keys:
            raise AugmentationError(
                "label_key must be one of label_keys", key=self.label_key, transform=self.name
            )
        if pos < 0 or neg < 0 or pos + neg <= 0:
            raise AugmentationError(
                f"pos={pos}, neg={neg} must be >= 0, not both 0", transform=self.name
            )
        if num_samples < 1 or any(int(r) < 1 for r in roi_size):
            raise AugmentationError(
                f"num_samples={num_samples}, roi_size={roi_size!r} must be >= 1",
                transform=self.name,
            )
        self.roi_size = tuple(int(r) for r in roi_size)
        self.num_samples = int(num_samples)
        self.pos_ratio = pos / (pos + neg)

    def draw(self, info, generator):
        if len(self.roi_size) != info.spatial_dims or any(
            r > n for r, n in zip(self.roi_size, info.spatial_shape, strict=True)
        ):
            raise AugmentationError(
                f"roi_size {self.roi_size} does not fit the spatial shape {info.spatial_shape}",
                transform=self.name,
            )
        shape = (info.batch_size, self.num_samples)
        u = torch.rand((2,) + shape, generator=generator, device=info.device, dtype=torch.float64)
        return {"positive": u[0] < self.pos_ratio, "pick": u[1]}

    def apply_view(self, view: BatchView, params: Params) -> None:
        info = view.info
        shape, roi = info.spatial_shape, self.roi_size
        batch, k = params.values["pick"].shape
        label = view.labels[self.label_key]
        fg = (label > 0).any(1).reshape(batch, -1)
        fg_index, has_fg = _pick(fg, params.values["pick"])
        bg_index, has_bg = _pick(~fg, params.values["pick"])
        any_index, _ = _pick(torch.ones_like(fg), params.values["pick"])
        positive = params.values["positive"] & has_fg[:, None]
        positive = positive | (~has_bg[:, None] & has_fg[:, None])
        index = torch.where(positive, fg_index, bg_index)
        index = torch.where(params.applied[:, None], index, any_index)
        centre = _unravel(index, shape)  # (B, K, d)
        half = torch.tensor([r // 2 for r in roi], device=centre.device)
        top = torch.tensor([n - r for n, r in zip(shape, roi, strict=True)], device=centre.device)
        start = torch.minimum((centre - half).clamp_min(0), top)
        params.values["start"] = start
        params.values["positive"] = positive & params.applied[:, None]
        if self.geometry:
            moved = crop_geometry(
                view, self.geometry, start.reshape(-1, len(shape)), roi, k, self.name
            )
            for key, rows in moved.items():
                view.data[key] = rows
        starts = start.reshape(-1, len(shape)).tolist()
        for key, x in {**view.images, **view.labels}.items():
            crops = [
                x[b // k][
                    (slice(None),) + tuple(slice(s, s + r) for s, r in zip(st, roi, strict=True))
                ]
                for b, st in enumerate(starts)
            ]
            view.set(key, torch.stack(crops))
        if SPACING_KEY in view.data and view.batched:
            view.data[SPACING_KEY] = view.info.spacing.repeat_interleave(k, 0)
        if view.batched:
            _repeat_per_scan(view, batch, k, set(self.geometry.keys))
        if view.voxel_map is not None:
            view.voxel_map = view.voxel_map.repeat_interleave(k, 0)
        view.compose_voxel_map(translation_map(start.reshape(-1, len(shape))))
        view.info = BatchInfo(
            batch * k, roi, info.device, info.dtype, info.spacing.repeat_interleave(k, 0)
        )

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any] | list[dict[str, Any]]:
        view = self.view(data)
        params = self.sample(view.info)
        self.apply_view(view, params)
        view.record(self.name, params)
        if view.batched:
            return view.finish()
        items = []
        for j in range(self.num_samples):
            item = dict(view.data)
            for key, value in {**view.images, **view.labels}.items():
                item[key] = view.wrap(key, value[j], slice(j, j + 1), item)
            for key in self.geometry.keys:
                for name in (key, key + INSIDE_SUFFIX):
                    if name in view.data and isinstance(view.data[name], torch.Tensor):
                        item[name] = view.data[name][j]
            items.append(item)
        return items


def check_scalars(view: BatchView, keys: Sequence[str], transform: str) -> dict[str, torch.Tensor]:
    """The scalar labels under ``keys``: floating ``(B,)`` or ``(B, K)`` (items: ``()`` or
    ``(K,)``), e.g. one-hot or probability vectors; integer class ids are refused."""
    out = {}
    for key in keys:
        if key not in view.data:
            raise AugmentationError(
                "scalar label key is not in the item", key=key, transform=transform
            )
        value = torch.as_tensor(view.data[key])
        if not value.is_floating_point():
            raise AugmentationError(
                f"dtype {value.dtype}: mixing makes soft labels, give a floating value, a "
                "one-hot or probability vector (e.g. torch.nn.functional.one_hot(y, K).float())",
                key=key,
                transform=transform,
            )
        value = value.to(view.info.device)
        if not view.batched:
            value = value[None]
        if value.ndim not in (1, 2) or value.shape[0] != view.info.batch_size:
            raise AugmentationError(
                f"shape {tuple(torch.as_tensor(view.data[key]).shape)}: a scalar label is () or "
                "(K,) per item, (B,) or (B, K) for a batch",
                key=key,
                transform=transform,
            )
        out[key] = value
    return out


def mix_scalars(
    view: BatchView,
    scalars: dict[str, torch.Tensor],
    partner: torch.Tensor,
    weight: torch.Tensor,
) -> None:
    """``y <- (1 - w) y + w y_partner`` per sample, written back into the item."""
    for key, y in scalars.items():
        w = weight.to(y.dtype).view((-1,) + (1,) * (y.ndim - 1))
        mixed = y * (1 - w) + y[partner] * w
        view.data[key] = mixed if view.batched else mixed[0]


def _repeat_per_scan(view: BatchView, batch: int, k: int, geometry: set[str]) -> None:
    """Per-scan entries of a batch (scalar labels, ids, flags) repeated for the K crops of
    each scan, so they stay aligned with the B * K crops."""
    handled = {*view.images, *view.labels, SPACING_KEY, APPLIED_KEY, *geometry}
    handled |= {key + "_inside" for key in geometry}
    for key, value in list(view.data.items()):
        if key in handled or key.endswith("_meta_dict"):
            continue
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch:
            view.data[key] = value.repeat_interleave(k, 0)
        elif isinstance(value, np.ndarray) and value.ndim >= 1 and value.shape[0] == batch:
            view.data[key] = np.repeat(value, k, axis=0)
        elif isinstance(value, (list, tuple)) and len(value) == batch:
            view.data[key] = type(value)(item for item in value for _ in range(k))


def mix_pair(
    x: torch.Tensor, x_other: torch.Tensor, lesion_other: torch.Tensor | None, lam: torch.Tensor
) -> torch.Tensor:
    """Blend ``x_other`` into ``x`` with weight ``lam`` (inside ``lesion_other`` if given)."""
    w = lam.view((-1,) + (1,) * (x.ndim - 1)).to(x.dtype)
    if lesion_other is not None:
        w = w * lesion_other.to(x.dtype)
    return x * (1 - w) + x_other * w


def label_union(
    label: torch.Tensor,
    other: torch.Tensor,
    region: torch.Tensor | None = None,
    lesion: torch.Tensor | None = None,
    other_lesion: torch.Tensor | None = None,
) -> torch.Tensor:
    """Union of two label maps (values copied, never blended).

    Args:
        label: ``(B, L, *spatial)`` labels of the samples.
        other: Labels of their partners (same shape and dtype).
        region: ``(B, 1, *spatial)`` bool, where ``other`` may contribute (None: everywhere).
        lesion: ``(B, 1, *spatial)`` bool, the samples' lesions (never overwritten).
        other_lesion: The partners' lesions, written over the samples' other labels.

    Returns:
        ``label`` where it is set, ``other`` where ``label`` is background; inside
        ``other_lesion`` the partner's lesion label wins over non-lesion labels.
    """
    take = label == 0
    if other_lesion is not None and lesion is not None:
        take = take | (other_lesion & ~lesion)
    if region is not None:
        take = take & region
    return torch.where(take, other, label)


class LesionMixup(Transform):
    """Lesion-aware mixup between samples of a batch; labels stay valid masks (union).

    Each sample is mixed with another sample of the batch (a partner drawn per sample):
    ``region="lesion"`` blends the partner's lesion into the sample (weight ``lam`` inside
    the partner's lesion mask, untouched elsewhere); ``region="image"`` blends the whole
    images. Labels are never blended: the result is the union of both label maps. Where the
    partner's lesion lands on the sample's tissue label, the lesion label wins; where two
    lesions overlap, the sample's own lesion label stays.

    Args:
        keys, label_keys: Images and label maps.
        lam: Weight of the partner (number or range).
        region: ``"lesion"`` or ``"image"``.
        label_key: Label map giving the lesions; default the first label key.
        lesion_values: Labels of ``label_key`` that are lesions; None: any label > 0.
        scalar_keys: Scalar / per-scan labels (floating, e.g. one-hot) mixed with the mean
            weight the pixels got: ``lam`` for ``"image"``, ``lam`` times the partner
            lesion's share of the image for ``"lesion"``.
        **kwargs: ``p``, ``seed``, ``device``, ...
    """

    cross_sample = True

    def __init__(
        self,
        keys: str | Sequence[str] | None,
        label_keys: str | Sequence[str],
        *,
        lam: Any = (0.5, 1.0),
        region: str = "lesion",
        label_key: str | None = None,
        lesion_values: Sequence[int] | None = None,
        scalar_keys: str | Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, label_keys, **kwargs)
        self.scalar_keys = as_keys(scalar_keys, "scalar_keys", self.name)
        if region not in ("lesion", "image"):
            raise AugmentationError(
                f"region={region!r} must be 'lesion' or 'image'", transform=self.name
            )
        if not self.label_keys:
            raise AugmentationError("needs a label key", transform=self.name)
        self.lam = as_range(lam, "lam", self.name)
        if not 0 <= self.lam[0] <= self.lam[1] <= 1:
            raise AugmentationError(f"lam={lam!r} must lie in [0, 1]", transform=self.name)
        self.region = region
        self.label_key = label_key or self.label_keys[0]
        if self.label_key not in self.label_keys:
            raise AugmentationError(
                "label_key must be one of label_keys", key=self.label_key, transform=self.name
            )
        self.lesion_values = tuple(lesion_values) if lesion_values is not None else None

    def draw(self, info, generator):
        return {
            "partner": _partners(generator, info),
            "lam": uniform(generator, [self.lam], info.batch_size, info.device)[:, 0],
        }

    def neutral(self, values, applied, info):
        own = torch.arange(info.batch_size, device=info.device)
        return {"partner": torch.where(applied, values["partner"], own), "lam": values["lam"]}

    def apply_view(self, view: BatchView, params: Params) -> None:
        partner = params.values["partner"]
        scalars = check_scalars(view, self.scalar_keys, self.name)
        mixed = partner != torch.arange(view.info.batch_size, device=partner.device)
        if not bool(mixed.any()):
            return
        weight = torch.where(mixed, params.values["lam"], torch.zeros_like(params.values["lam"]))
        if self.region == "lesion":
            lesion_share = _member(view.labels[self.label_key], self.lesion_values).flatten(1)
            weight = weight * lesion_share.to(weight.dtype).mean(1)[partner]
        mix_scalars(view, scalars, partner, weight)
        rows = mixed.nonzero()[:, 0]
        others = partner[rows]
        lesion_map = view.labels[self.label_key]
        own_lesion = _member(lesion_map[rows], self.lesion_values)[:, None]
        other_lesion = _member(lesion_map[others], self.lesion_values)[:, None]
        region = other_lesion if self.region == "lesion" else None
        for key, x in view.images.items():
            out = x.clone()
            out[rows] = mix_pair(x[rows], x[others], region, params.values["lam"][rows])
            view.set(key, out)
        for key, lab in view.labels.items():
            out = lab.clone()
            if key == self.label_key:
                out[rows] = label_union(lab[rows], lab[others], region, own_lesion, other_lesion)
            else:
                out[rows] = label_union(lab[rows], lab[others], region)
            view.set(key, out)


def _member(label: torch.Tensor, values: tuple[int, ...] | None) -> torch.Tensor:
    """``(B, *spatial)`` bool: any channel of ``label`` ``(B, C, *spatial)`` in ``values``."""
    if values is None:
        return (label > 0).any(1)
    table = torch.tensor(values, device=label.device, dtype=label.dtype)
    return torch.isin(label, table).any(1)


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of ``(*spatial)`` bool by a cube of half-size ``radius``."""
    pool = F.max_pool2d if mask.ndim == 2 else F.max_pool3d
    return pool(mask[None, None].float(), 2 * radius + 1, 1, radius)[0, 0] > 0


def _mean_std(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of ``x`` ``(C, *spatial)`` over ``mask``."""
    values = x[:, mask].to(torch.float64)
    if values.shape[1] == 0:
        return x.new_zeros(x.shape[0], dtype=torch.float64), x.new_ones(
            x.shape[0], dtype=torch.float64
        )
    return values.mean(1), values.std(1, unbiased=False)


class LesionCopyPaste(Transform):
    """Paste the lesion of another scan into this one, inside a given tissue, matched.

    The donor (another sample of the batch) gives its lesion voxels (``lesion_key`` > 0)
    and their bounding box. A position is drawn among the recipient's tissue voxels
    (``tissue_key`` in ``tissue_values``) until the whole lesion falls inside the tissue
    (``max_tries``; otherwise the sample is left unchanged). Pasted intensities are matched:
    ``"mean_std"`` maps the donor lesion's contrast to its own surrounding tissue onto the
    recipient tissue (``mu_t + (v - mu_d) sigma_t / sigma_d``), ``"mean"`` keeps the
    difference to the surrounding tissue, ``"none"`` copies values. The donor's lesion labels
    are written where the recipient has no lesion yet (a union); a separate tissue map is
    kept. Lesion and tissue may share one label map (e.g. liver 1, tumour 2).

    Args:
        keys, label_keys: Images and label maps (must contain both keys below).
        lesion_key: Label map of the lesions.
        tissue_key: Label map of the tissues (may be ``lesion_key``).
        tissue_values: Labels of the tissue the lesion must lie in; None: any label > 0.
        lesion_values: Labels that make up a lesion; None: any label > 0.
        max_tries: Positions tried per sample.
        intensity_matching: ``"mean_std"``, ``"mean"`` or ``"none"``.
        margin: Width in voxels of the ring around a lesion used for tissue statistics.
        **kwargs: ``p``, ``seed``, ``device``, ...
    """

    cross_sample = True

    def __init__(
        self,
        keys: str | Sequence[str] | None,
        label_keys: str | Sequence[str],
        *,
        lesion_key: str,
        tissue_key: str,
        tissue_values: Sequence[int] | None = None,
        lesion_values: Sequence[int] | None = None,
        max_tries: int = 20,
        intensity_matching: str = "mean_std",
        margin: int = 2,
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, label_keys, **kwargs)
        for key in (lesion_key, tissue_key):
            if key not in self.label_keys:
                raise AugmentationError("must be one of label_keys", key=key, transform=self.name)
        if intensity_matching not in ("mean_std", "mean", "none"):
            raise AugmentationError(
                f"intensity_matching={intensity_matching!r} unknown", transform=self.name
            )
        if max_tries < 1 or margin < 1:
            raise AugmentationError("max_tries and margin must be >= 1", transform=self.name)
        self.lesion_key, self.tissue_key = lesion_key, tissue_key
        self.tissue_values = tuple(tissue_values) if tissue_values is not None else None
        self.lesion_values = tuple(lesion_values) if lesion_values is not None else None
        self.max_tries = int(max_tries)
        self.intensity_matching = intensity_matching
        self.margin = int(margin)

    def draw(self, info, generator):
        u = torch.rand(
            (info.batch_size, self.max_tries),
            generator=generator,
            device=info.device,
            dtype=torch.float64,
        )
        return {"partner": _partners(generator, info), "pick": u}

    def neutral(self, values, applied, info):
        own = torch.arange(info.batch_size, device=info.device)
        return {**values, "partner": torch.where(applied, values["partner"], own)}

    @staticmethod
    def _member(label: torch.Tensor, values: tuple[int, ...] | None) -> torch.Tensor:
        """``(*spatial)`` bool: any channel of ``label`` ``(C, *spatial)`` in ``values``."""
        return _member(label[None], values)[0]

    def apply_view(self, view: BatchView, params: Params) -> None:
        info = view.info
        nd = info.spatial_dims
        partner = params.values["partner"].tolist()
        lesion_map = view.labels[self.lesion_key]
        tissue_map = view.labels[self.tissue_key]
        images = {k: v.clone() for k, v in view.images.items()}
        lesion_out = lesion_map.clone()
        start_out = torch.full((info.batch_size, nd), -1, dtype=torch.long, device=info.device)
        for b, j in enumerate(partner):
            if j == b:
                continue
            donor = self._member(lesion_map[j], self.lesion_values)
            found = donor.nonzero()
            tissue = self._member(tissue_map[b], self.tissue_values)
            if found.shape[0] == 0 or not bool(tissue.any()):
                continue
            low = found.amin(0).tolist()
            high = (found.amax(0) + 1).tolist()
            size = [h - lo for h, lo in zip(high, low, strict=True)]
            box = tuple(slice(lo, h) for lo, h in zip(low, high, strict=True))
            mask = donor[box]
            index, _ = _pick(tissue.reshape(1, -1), params.values["pick"][b : b + 1])
            centres = _unravel(index[0], info.spatial_shape).tolist()
            placed = None
            for centre in centres:
                start = [c - s // 2 for c, s in zip(centre, size, strict=True)]
                if any(
                    s < 0 or s + n > dim
                    for s, n, dim in zip(start, size, info.spatial_shape, strict=True)
                ):
                    continue
                target = tuple(slice(s, s + n) for s, n in zip(start, size, strict=True))
                if not bool((mask & ~tissue[target]).any()):
                    placed = start, target
                    break
            if placed is None:
                continue
            start, target = placed
            start_out[b] = torch.tensor(start, device=info.device)
            ring_donor = _dilate(donor, self.margin) & ~donor
            ring_target = torch.zeros_like(donor)
            ring_target[target] = mask
            ring_target = _dilate(ring_target, self.margin) & ~ring_target & tissue
            for key, x in view.images.items():
                patch = x[j][(slice(None),) + box]
                if self.intensity_matching != "none":
                    mu_d, sd_d = _mean_std(x[j], ring_donor)
                    mu_t, sd_t = _mean_std(x[b], ring_target if bool(ring_target.any()) else tissue)
                    shape = (-1,) + (1,) * nd
                    ratio = (
                        sd_t / sd_d.clamp_min(1e-6)
                        if self.intensity_matching == "mean_std"
                        else torch.ones_like(sd_t)
                    )
                    patch = (
                        (patch.to(torch.float64) - mu_d.view(shape)) * ratio.view(shape)
                        + mu_t.view(shape)
                    ).to(x.dtype)
                region = images[key][b][(slice(None),) + target]
                region[:, mask] = patch[:, mask]
            region = lesion_out[b][(slice(None),) + target]
            keep = self._member(region, self.lesion_values)  # lesions already there stay
            paste = mask & ~keep
            region[:, paste] = lesion_map[j][(slice(None),) + box][:, paste]
        params.values["start"] = start_out
        params.applied = params.applied & (start_out[:, 0] >= 0)
        for key, x in images.items():
            view.set(key, x)
        view.set(self.lesion_key, lesion_out)
