"""The transform model: per-sample parameter drawing, dict handling, input checks, records.

Every transform works in two steps, in the TorchIO spirit:

1. :meth:`Transform.sample` draws the parameters of every sample of a batch from the
   transform's own :class:`torch.Generator` (a range means random, a number means fixed,
   ``p`` decides per sample whether the transform is applied at all);
2. :meth:`Transform.apply` applies those parameters deterministically to the whole batch
   ``(B, C, *spatial)``, 2D or 3D on one code path, on the batch's device and dtype.

Items are MONAI-style dicts: ``keys`` name the images, ``label_keys`` the label maps. A value
is either one item ``(C, *spatial)`` (as in a MONAI per-sample pipeline; give
``spatial_dims``) or a batch ``(B, C, *spatial)`` (after the DataLoader, on the GPU). Every
call appends a record ``{"name", "params", "applied"}`` to ``data["applied_transforms"]``,
with one row per sample, so a batch can be reproduced and its spatial part inverted.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from synthlesion.augment.device_cache import constant
from synthlesion.augment.grid import embed
from synthlesion.errors import SynthlesionError

logger = logging.getLogger(__name__)

APPLIED_KEY = "applied_transforms"
"""Dict key of the list of records every transform appends."""

SPACING_KEY = "spacing"
"""Dict key of the voxel spacing (mm) of an item, ``(spatial_dims,)`` or ``(B, spatial_dims)``."""

MAX_LABEL_VALUE = 255
"""Up to this value integral floats are a label map; above it (e.g. FreeSurfer's labels up to
2035 as MONAI loads them, float32) only with at most ``MAX_FLOAT_LABELS`` distinct values."""

MAX_FLOAT_LABELS = 1000
"""Most distinct values of a floating label map with values above ``MAX_LABEL_VALUE`` (an
image with integral intensities has thousands)."""

_instance_counter = itertools.count()


class AugmentationError(SynthlesionError):
    """An augmentation got input or settings it must refuse.

    Attributes:
        transform: Name of the transform that refused.
        key: The dict key concerned, if any.
        problem: What is wrong.
    """

    def __init__(self, problem: str, *, key: str | None = None, transform: str = "augment") -> None:
        self.transform = transform
        self.key = key
        self.problem = problem
        where = f"{transform}: key {key!r}: " if key is not None else f"{transform}: "
        super().__init__(where + problem)


class AnatomyBoundError(AugmentationError):
    """A setting lies beyond the anatomical bound (pass ``allow_extreme=True`` to allow it)."""


# --- ranges ------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def as_range(value: Any, name: str, transform: str) -> tuple[float, float]:
    """Read a number (fixed) or a ``(low, high)`` pair (uniform) as a closed range."""
    if _is_number(value):
        return float(value), float(value)
    if isinstance(value, Sequence) and len(value) == 2 and all(_is_number(v) for v in value):
        low, high = float(value[0]), float(value[1])
        if low > high:
            raise AugmentationError(
                f"{name}: range ({low}, {high}) has low > high", transform=transform
            )
        return low, high
    raise AugmentationError(
        f"{name}: expected a number or a (low, high) pair, got {value!r}", transform=transform
    )


def as_axis_ranges(value: Any, name: str, n_axes: int, transform: str) -> list[tuple[float, float]]:
    """Read one range for all axes, or a sequence of ``n_axes`` numbers/ranges (one per axis).

    A flat pair ``(low, high)`` is always a range applied to every axis; per-axis settings are
    a sequence of numbers or pairs, e.g. ``((-10, 10), (-5, 5), 0)`` for three axes.
    """
    if _is_number(value) or (
        isinstance(value, Sequence) and len(value) == 2 and all(_is_number(v) for v in value)
    ):
        return [as_range(value, name, transform)] * n_axes
    if isinstance(value, Sequence) and len(value) == n_axes:
        return [as_range(v, f"{name}[{i}]", transform) for i, v in enumerate(value)]
    raise AugmentationError(
        f"{name}: expected a number, a (low, high) pair or {n_axes} per-axis values, got {value!r}",
        transform=transform,
    )


def flat_values(value: Any) -> list[float]:
    """All numbers in a nested range setting (for bound checks)."""
    if _is_number(value):
        return [float(value)]
    if isinstance(value, Sequence):
        return [v for item in value for v in flat_values(item)]
    return []


def check_bound(
    value: Any,
    name: str,
    low: float,
    high: float,
    transform: str,
    allow_extreme: bool,
    unit: str = "",
) -> None:
    """Raise :class:`AnatomyBoundError` when any number in ``value`` lies outside [low, high]."""
    for v in flat_values(value):
        if not (low <= v <= high) and not allow_extreme:
            raise AnatomyBoundError(
                f"{name}={v:g}{unit} lies outside the anatomical bound [{low:g}, {high:g}]{unit}; "
                "pass allow_extreme=True to allow it",
                transform=transform,
            )


def uniform(
    generator: torch.Generator,
    ranges: Sequence[tuple[float, float]],
    batch: int,
    device: torch.device,
) -> torch.Tensor:
    """Draw ``(batch, len(ranges))`` float64 values, column ``j`` uniform in ``ranges[j]``.

    A fixed range (low == high) gives exactly ``low``. Uniform numbers are always consumed, so
    the random stream does not depend on which settings are fixed.
    """
    u = torch.rand((batch, len(ranges)), generator=generator, device=device, dtype=torch.float64)
    low = constant([r[0] for r in ranges], torch.float64, device)
    span = constant([r[1] - r[0] for r in ranges], torch.float64, device)
    return torch.addcmul(low, span, u)


# --- batch view ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchInfo:
    """What a transform needs to know about a batch to draw parameters.

    Attributes:
        batch_size: B.
        spatial_shape: ``(X, Y)`` or ``(X, Y, Z)``.
        device: Device of every tensor under the transform's keys.
        dtype: Floating dtype of the images (float32 when there is none).
        spacing: ``(B, spatial_dims)`` float64 voxel size in mm, on ``device``.
        spacing_host: The same on the CPU, where known without waiting for the device.
    """

    batch_size: int
    spatial_shape: tuple[int, ...]
    device: torch.device
    dtype: torch.dtype
    spacing: torch.Tensor
    spacing_host: torch.Tensor | None = None

    def host_spacing(self) -> torch.Tensor:
        """``spacing`` on the CPU (copied from the device only when not known)."""
        return self.spacing_host if self.spacing_host is not None else self.spacing.cpu()

    @property
    def spatial_dims(self) -> int:
        return len(self.spatial_shape)


@dataclass
class Params:
    """Per-sample parameters of one transform for one batch.

    Attributes:
        values: Name to tensor whose first dimension is the sample (B).
        applied: ``(B,)`` bool, whether the transform was applied to each sample (``p``).
    """

    values: dict[str, torch.Tensor]
    applied: torch.Tensor

    def select(self, index: int | slice | torch.Tensor) -> Params:
        """The parameters of some samples (an int keeps a batch dimension of 1)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Params({k: v[index] for k, v in self.values.items()}, self.applied[index])

    def to_record(self, name: str, batched: bool) -> dict[str, Any]:
        """A plain dict (collates with ``default_collate``); unbatched items drop dim 0."""
        squeeze = (lambda t: t[0]) if not batched else (lambda t: t)
        return {
            "name": name,
            "params": {k: squeeze(v) for k, v in self.values.items()},
            "applied": squeeze(self.applied),
        }

    @staticmethod
    def from_record(record: Mapping[str, Any]) -> Params:
        """Rebuild parameters from a record (batched: ``applied`` is ``(B,)``)."""
        applied = torch.as_tensor(record["applied"])
        if applied.ndim == 0:
            return Params(
                {k: torch.as_tensor(v)[None] for k, v in record["params"].items()}, applied[None]
            )
        return Params({k: torch.as_tensor(v) for k, v in record["params"].items()}, applied)


def _to_tensor(value: Any, key: str, transform: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.as_subclass(torch.Tensor) if type(value) is not torch.Tensor else value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    raise AugmentationError(
        f"expected a torch.Tensor or numpy array, got {type(value).__name__}",
        key=key,
        transform=transform,
    )


class BatchView:
    """The tensors of one dict under a transform's keys, as batches ``(B, C, *spatial)``.

    Checks, once: keys present, tensors, 2D/3D shapes, one batch size, one spatial shape and
    one device for every key, images floating point and not masks, labels integral.

    The checks of values (an image holding only 0 and 1, a label map with fractions or
    negatives) read a result back from the tensor's device. On an accelerator that wait
    would stall the pipeline, so there they run on the first batch per key only: keys in
    ``values_checked`` (a set the transform keeps) are skipped, and checked keys are added.
    """

    def __init__(
        self,
        data: Mapping[str, Any],
        keys: Sequence[str],
        label_keys: Sequence[str],
        *,
        transform: str,
        spatial_dims: int | None,
        allow_missing_keys: bool = False,
        validate: bool = True,
        default_spacing: Sequence[float] | None = None,
        values_checked: set[str] | None = None,
    ) -> None:
        if not isinstance(data, Mapping):
            raise AugmentationError(
                f"expected a dict of tensors, got {type(data).__name__}", transform=transform
            )
        self.transform = transform
        self.data = dict(data)
        self.images: dict[str, torch.Tensor] = {}
        self.labels: dict[str, torch.Tensor] = {}
        self.meta_tensors: dict[str, Any] = {}  # MONAI MetaTensors given, by key
        self.voxel_map: torch.Tensor | None = None  # (B, d+1, d+1) output -> input voxels
        self._affines: dict[str, torch.Tensor | None] = {}  # affines as given, by key
        reference: tuple[str, torch.Tensor] | None = None
        batched: bool | None = None
        nd = spatial_dims
        for key in list(keys) + list(label_keys):
            if key not in self.data:
                if allow_missing_keys:
                    continue
                raise AugmentationError(
                    f"unknown key; the item holds {sorted(map(str, self.data))}",
                    key=key,
                    transform=transform,
                )
            raw = self.data[key]
            if isinstance(raw, torch.Tensor) and hasattr(raw, "meta") and hasattr(raw, "affine"):
                self.meta_tensors[key] = raw
            x = _to_tensor(raw, key, transform)
            if nd is None:
                nd = _dims_from_metadata(self.data, key, raw, x, transform)
            if nd is None:
                if x.ndim not in (4, 5):
                    raise AugmentationError(
                        f"shape {tuple(x.shape)}: a batch must be (B, C, X, Y) or (B, C, X, Y, Z); "
                        "for one item (C, *spatial) pass spatial_dims",
                        key=key,
                        transform=transform,
                    )
                nd = x.ndim - 2
            if x.ndim == nd + 2:
                is_batched = True
            elif x.ndim == nd + 1:
                is_batched = False
                x = x[None]
            else:
                raise AugmentationError(
                    f"shape {tuple(x.shape)} is neither (C, *spatial) nor (B, C, *spatial) "
                    f"for spatial_dims={nd}",
                    key=key,
                    transform=transform,
                )
            if batched is None:
                batched = is_batched
            elif batched != is_batched:
                raise AugmentationError(
                    "mixes a batch and a single item in one dict", key=key, transform=transform
                )
            if reference is not None:
                ref_key, ref = reference
                if ref.shape[0] != x.shape[0] or ref.shape[2:] != x.shape[2:]:
                    raise AugmentationError(
                        f"shape {tuple(x.shape)} does not match key {ref_key!r} shape "
                        f"{tuple(ref.shape)} (batch and spatial sizes must agree)",
                        key=key,
                        transform=transform,
                    )
                if ref.device != x.device:
                    raise AugmentationError(
                        f"on {x.device} but key {ref_key!r} is on {ref.device}",
                        key=key,
                        transform=transform,
                    )
            else:
                reference = (key, x)
            values = True
            if x.device.type != "cpu" and values_checked is not None:
                values = key not in values_checked
                values_checked.add(key)
            if key in label_keys:
                if validate:
                    check_label(x, key, transform, values=values)
                self.labels[key] = x
            else:
                if validate:
                    check_image(x, key, transform, values=values)
                self.images[key] = x
        if reference is None:
            raise AugmentationError("none of the keys is in the item", transform=transform)
        self.batched = bool(batched)
        ref = reference[1]
        shape = tuple(int(s) for s in ref.shape[2:])
        dtype = next((x.dtype for x in self.images.values()), torch.float32)
        host = self._spacing(default_spacing, ref.shape[0], len(shape))
        if ref.device == host.device:
            spacing = host
        else:  # cached on the device: no copy per batch (and none inside a CUDA graph)
            spacing = constant(host.tolist(), torch.float64, ref.device)
        self.info = BatchInfo(
            int(ref.shape[0]), shape, ref.device, dtype, spacing,
            host if host.device.type == "cpu" else None,
        )  # fmt: skip

    def _spacing(self, default: Sequence[float] | None, batch: int, nd: int) -> torch.Tensor:
        """``(B, nd)`` float64 spacing in mm, checked; on the CPU unless given as a device
        tensor."""
        raw = self.data.get(SPACING_KEY, default)
        if raw is None:
            for key in itertools.chain(self.images, self.labels):
                affine = self.affine(key)
                if affine is not None:  # MONAI metadata: the spacing is the affine's columns
                    a = affine[None] if affine.ndim == 2 else affine
                    rows = min(3, a.shape[-1] - 1)  # every world axis (a 2D slice may be
                    # coronal or tilted: its columns reach into the third world axis)
                    value = a[:, :rows, :nd].pow(2).sum(1).sqrt().to(torch.float64)
                    if value.shape[0] == 1:
                        value = value.expand(batch, -1)
                    if tuple(value.shape) == (batch, nd) and bool((value > 0).all()):
                        return value.contiguous()
            return torch.ones((batch, nd), dtype=torch.float64)
        try:
            if isinstance(raw, (list, tuple)) and raw and isinstance(raw[0], torch.Tensor):
                value = torch.stack([torch.as_tensor(r, dtype=torch.float64) for r in raw], -1)
            else:
                value = torch.as_tensor(np.asarray(raw, dtype=np.float64))
        except (TypeError, ValueError) as exc:
            raise AugmentationError(
                f"cannot read spacing {raw!r} ({exc})", key=SPACING_KEY, transform=self.transform
            ) from None
        value = value.to(dtype=torch.float64)
        if value.ndim == 1:
            value = value[None].expand(batch, -1)
        if tuple(value.shape) != (batch, nd) or not bool((value > 0).all()):
            raise AugmentationError(
                f"spacing {tuple(value.shape)} must be {nd} positive mm values (or (B, {nd}))",
                key=SPACING_KEY,
                transform=self.transform,
            )
        return value.contiguous()

    def set(self, key: str, value: torch.Tensor) -> None:
        """Replace the batch under ``key``."""
        if key in self.labels:
            self.labels[key] = value
        else:
            self.images[key] = value

    def record(self, name: str, params: Params) -> None:
        """Append a record of ``params`` to the item's list of applied transforms."""
        records = list(self.data.get(APPLIED_KEY, []))
        records.append(params.to_record(name, self.batched))
        self.data[APPLIED_KEY] = records

    def affine(self, key: str) -> torch.Tensor | None:
        """The voxel-to-world affine of ``key`` from its metadata as given (a MONAI
        MetaTensor's ``affine``, or ``data[key + "_meta_dict"]["affine"]``); None if absent."""
        if key not in self._affines:
            affine = None
            if key in self.meta_tensors:
                affine = torch.as_tensor(self.meta_tensors[key].affine, dtype=torch.float64)
            else:
                meta = self.data.get(f"{key}_meta_dict")
                if isinstance(meta, Mapping) and meta.get("affine") is not None:
                    affine = torch.as_tensor(np.asarray(meta["affine"]), dtype=torch.float64)
            self._affines[key] = affine
        return self._affines[key]

    def compose_voxel_map(self, matrix: torch.Tensor) -> None:
        """Record that the batch was resampled with the output-to-input voxel map ``matrix``
        ``(B, d+1, d+1)``: the affines in the metadata become ``affine @ matrix`` (as MONAI
        does, so the anatomy keeps its world position)."""
        matrix = matrix.to(torch.float64)
        self.voxel_map = matrix if self.voxel_map is None else self.voxel_map @ matrix

    def updated_affine(self, key: str, rows: slice | None = None) -> torch.Tensor | None:
        """The affine of ``key`` after the recorded voxel maps (``rows`` of the maps: for
        crops that turned one item into several)."""
        affine = self.affine(key)
        if affine is None or self.voxel_map is None:
            return affine
        m = self.voxel_map if rows is None else self.voxel_map[rows]
        single = affine.ndim == 2
        a = affine[None] if single else affine
        if a.shape[0] != m.shape[0]:
            if a.shape[0] == 1:
                a = a.expand(m.shape[0], -1, -1)
            elif m.shape[0] % a.shape[0] == 0:  # crops: K rows per input
                a = a.repeat_interleave(m.shape[0] // a.shape[0], 0)
        out = a @ embed(m.to(a.device), a.shape[-1])
        return out[0] if single and out.shape[0] == 1 else out

    def wrap(
        self,
        key: str,
        value: torch.Tensor,
        rows: slice | None = None,
        target: dict[str, Any] | None = None,
    ) -> Any:
        """``value`` as given (a MetaTensor keeps its metadata, with the updated affine); a
        ``<key>_meta_dict`` gets the updated affine too (in ``target``, default the item)."""
        target = self.data if target is None else target
        meta_dict = self.data.get(f"{key}_meta_dict")
        if isinstance(meta_dict, Mapping) and "affine" in meta_dict and self.voxel_map is not None:
            new = self.updated_affine(key, rows)
            old = meta_dict["affine"]
            meta_dict = dict(meta_dict)
            meta_dict["affine"] = new.cpu().numpy() if isinstance(old, np.ndarray) else new
            target[f"{key}_meta_dict"] = meta_dict
        original = self.meta_tensors.get(key)
        if original is None:
            return value
        affine = self.updated_affine(key, rows)
        out = value.as_subclass(type(original))
        out.copy_meta_from(original)
        out.meta = copy.deepcopy(dict(original.meta))  # the input keeps its own metadata
        out.applied_operations = list(getattr(original, "applied_operations", []))
        out.affine = affine.to(torch.as_tensor(original.affine).dtype)
        out.is_batch = bool(getattr(original, "is_batch", False)) and self.batched
        return out

    def finish(self) -> dict[str, Any]:
        """The output dict (single items lose the batch dimension again; MONAI MetaTensors
        stay MetaTensors, with the affine updated by the spatial transforms)."""
        for key, value in itertools.chain(self.images.items(), self.labels.items()):
            self.data[key] = self.wrap(key, value if self.batched else value[0])
        return self.data


def _dims_from_metadata(
    data: Mapping[str, Any], key: str, raw: Any, x: torch.Tensor, transform: str
) -> int | None:
    """Spatial dims of ``key`` told by MONAI metadata, or None when there is none.

    A MetaTensor or a ``<key>_meta_dict`` knows whether it is one item: its ``spatial_shape``
    (written by ``LoadImage``) gives the dims; a batched affine ``(B, 4, 4)`` or ``is_batch``
    marks a batch (``(B, C, *spatial)``); otherwise it is one item ``(C, *spatial)``.
    """
    meta = getattr(raw, "meta", None) if hasattr(raw, "affine") else None
    if meta is None:
        meta = data.get(f"{key}_meta_dict")
        if not isinstance(meta, Mapping) or meta.get("affine") is None:
            return None
        affine_ndim = np.asarray(meta["affine"]).ndim
        batched = affine_ndim == 3
    else:
        batched = bool(getattr(raw, "is_batch", False)) or raw.affine.ndim == 3
    shape = meta.get("spatial_shape")
    if shape is not None:
        nd = int(np.asarray(shape).shape[-1])
    else:
        nd = x.ndim - (2 if batched else 1)
    if nd not in (2, 3) or x.ndim not in (nd + 1, nd + 2):
        raise AugmentationError(
            f"shape {tuple(x.shape)}: its metadata make it {'a batch' if batched else 'one item'}"
            f" with {nd} spatial axes; pass spatial_dims (a torch.stack of MetaTensors is not a "
            "MONAI batch: use MONAI's DataLoader or list_data_collate)",
            key=key,
            transform=transform,
        )
    return nd


def check_image(x: torch.Tensor, key: str, transform: str, *, values: bool = True) -> None:
    """Refuse a mask where an image is expected (integer dtype, or only the values 0 and 1;
    ``values=False`` checks the dtype only)."""
    if not x.is_floating_point():
        raise AugmentationError(
            f"dtype {x.dtype} is not floating point: this looks like a label map (put the key in "
            "label_keys), or convert the image first (e.g. CT in HU with .float())",
            key=key,
            transform=transform,
        )
    if values and x.numel() >= 64:
        probe = x.reshape(-1)[:: max(1, x.numel() // 4096)]  # cheap: most images fail here
        if not bool(((probe == 0) | (probe == 1)).all()):
            return
        zero, one = (x == 0), (x == 1)
        if bool((zero | one).all()) and bool(zero.any()) and bool(one.any()):
            raise AugmentationError(
                "holds only the values 0 and 1: this looks like a mask; put the key in label_keys",
                key=key,
                transform=transform,
            )


def check_label(x: torch.Tensor, key: str, transform: str, *, values: bool = True) -> None:
    """Refuse an image where a label map is expected (fractions, negatives, huge values;
    ``values=False`` checks the dtype only)."""
    if x.is_complex():
        raise AugmentationError(
            f"dtype {x.dtype} cannot be a label map", key=key, transform=transform
        )
    if not values or x.dtype in (torch.bool, torch.uint8) or x.numel() == 0:
        return
    low, high = x.min(), x.max()
    if x.is_floating_point():
        if not bool(torch.equal(x, torch.round(x))):
            raise AugmentationError(
                f"dtype {x.dtype} with non-integer values: this looks like an image, not a label "
                "map; put the key in keys",
                key=key,
                transform=transform,
            )
        if float(high) > MAX_LABEL_VALUE and (
            float(high) >= 2**24 or torch.unique(x).numel() > MAX_FLOAT_LABELS
        ):
            raise AugmentationError(
                f"floating values up to {float(high):g} with more than {MAX_FLOAT_LABELS} "
                "distinct values: this looks like an image, not a label map; store label maps "
                "with an integer dtype",
                key=key,
                transform=transform,
            )
    if float(low) < 0:
        raise AugmentationError(
            f"negative value {float(low):g}: a label map holds labels >= 0 (an image, e.g. CT "
            "in HU, belongs in keys)",
            key=key,
            transform=transform,
        )


def as_keys(keys: str | Sequence[str] | None, name: str, transform: str) -> tuple[str, ...]:
    if keys is None:
        return ()
    if isinstance(keys, str):
        return (keys,)
    if not all(isinstance(k, str) for k in keys):
        raise AugmentationError(f"{name} must be strings, got {keys!r}", transform=transform)
    return tuple(keys)


# --- the transform base class ---------------------------------------------------------------------


class Transform:
    """Base of every transform: keys, ``p``, the generator and the call protocol.

    Subclasses implement :meth:`draw` (the per-sample parameters) and :meth:`apply_view`
    (deterministic application to the whole batch).

    Args:
        keys: Image key(s) (floating point).
        label_keys: Label-map key(s) (integer dtype or integral floats).
        p: Probability, per sample, that the transform is applied.
        seed: Seed of the transform's generator; ``None`` derives one from
            ``torch.initial_seed()`` (different in every DataLoader worker) and the instance.
        device: Device of the generator; ``None`` uses the device of the first batch. A batch
            on another device is refused.
        spatial_dims: 2 or 3; needed only for single items ``(C, *spatial)``.
        spacing: Default voxel size in mm when the item has no ``"spacing"`` entry.
        allow_missing_keys: Skip keys that are not in the item instead of raising.
        validate: Check images and labels (one pass over the data).
    """

    is_spatial = False
    is_intensity = False
    changes_batch = False
    is_random = True  # draws random parameters (False: the same output for the same input)
    is_normalisation = False  # normalises intensities (must precede every random transform)

    def __init__(
        self,
        keys: str | Sequence[str] | None,
        label_keys: str | Sequence[str] = (),
        *,
        p: float = 1.0,
        seed: int | None = None,
        device: str | torch.device | None = None,
        spatial_dims: int | None = None,
        spacing: Sequence[float] | None = None,
        allow_missing_keys: bool = False,
        validate: bool = True,
    ) -> None:
        name = type(self).__name__
        self.keys = as_keys(keys, "keys", name)
        self.label_keys = as_keys(label_keys, "label_keys", name)
        overlap = set(self.keys) & set(self.label_keys)
        if overlap:
            raise AugmentationError(
                f"{sorted(overlap)} listed both as image and label keys", transform=name
            )
        if not self.keys and not self.label_keys:
            raise AugmentationError("no keys given", transform=name)
        if not (_is_number(p) and 0.0 <= float(p) <= 1.0):
            raise AugmentationError(f"p={p!r} must lie in [0, 1]", transform=name)
        if spatial_dims not in (None, 2, 3):
            raise AugmentationError(f"spatial_dims={spatial_dims!r} must be 2 or 3", transform=name)
        if spacing is not None and (len(spacing) not in (2, 3) or min(spacing) <= 0):
            raise AugmentationError(
                f"spacing={spacing!r} must be 2 or 3 positive mm values", transform=name
            )
        self.p = float(p)
        self.spatial_dims = spatial_dims
        self.spacing = tuple(float(s) for s in spacing) if spacing is not None else None
        self.allow_missing_keys = allow_missing_keys
        self.validate = validate
        self._values_checked: set[str] = set()  # keys value-checked on an accelerator
        self._instance = next(_instance_counter)
        self._device = torch.device(device) if device is not None else None
        self._seed = seed
        self._generator: torch.Generator | None = None
        self._owner: tuple[int, int | None] = (os.getpid(), None)

    @property
    def name(self) -> str:
        return type(self).__name__

    # random state -------------------------------------------------------------------------------

    def set_random_state(
        self, seed: int | None = None, device: str | torch.device | None = None
    ) -> Transform:
        """Seed the transform's generator (on ``device``, default: the current one)."""
        self._seed = seed
        if device is not None:
            self._device = torch.device(device)
        self._generator = None
        return self

    def generator(self, device: torch.device) -> torch.Generator:
        """The transform's generator; refuses a batch on another device.

        In a DataLoader worker every worker draws its own stream: without a seed from the
        worker's torch seed (which the DataLoader's generator fixes), with a seed from that
        seed and the worker id. So workers never repeat each other's augmentations, and a
        fixed seed (and worker count) reproduces the run.
        """
        worker = torch.utils.data.get_worker_info()
        owner = (os.getpid(), worker.id if worker is not None else None)
        if self._generator is not None and owner != self._owner:
            self._generator = None  # a DataLoader worker (or another process): its own stream
        if self._generator is None:
            self._owner = owner
            gen_device = self._device if self._device is not None else device
            seed = self._seed
            if seed is None:
                seed = (torch.initial_seed() * 1_000_003 + self._instance * 7919) % (2**63 - 1)
            elif worker is not None:
                seed = (int(seed) * 1_000_003 + 7919 * (worker.id + 1)) % (2**63 - 1)
            self._generator = torch.Generator(device=gen_device)
            self._generator.manual_seed(int(seed))
        gen_device = self._generator.device
        if gen_device.type != device.type or (
            gen_device.index is not None
            and device.index is not None
            and gen_device.index != device.index
        ):
            raise AugmentationError(
                f"the batch is on {device} but the transform's generator is on {gen_device}; "
                f"call set_random_state(seed, device={str(device)!r}) or move the batch",
                key=(self.keys + self.label_keys)[0],
                transform=self.name,
            )
        return self._generator

    # protocol -----------------------------------------------------------------------------------

    def view(self, data: Mapping[str, Any], validate: bool | None = None) -> BatchView:
        """Wrap ``data`` as batches under this transform's keys (with the input checks)."""
        return BatchView(
            data,
            self.keys,
            self.label_keys,
            transform=self.name,
            spatial_dims=self.spatial_dims,
            allow_missing_keys=self.allow_missing_keys,
            validate=self.validate if validate is None else validate,
            default_spacing=self.spacing,
            values_checked=self._values_checked,
        )

    def draw(self, info: BatchInfo, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Draw the per-sample parameters (each tensor's first dimension is B)."""
        raise NotImplementedError

    def neutral(
        self, values: dict[str, torch.Tensor], applied: torch.Tensor, info: BatchInfo
    ) -> dict[str, torch.Tensor]:
        """Set the parameters of samples that are not applied to the identity (default: keep)."""
        return values

    def sample(self, info: BatchInfo) -> Params:
        """Draw ``applied`` (probability ``p``) and the parameters for every sample."""
        gen = self.generator(info.device)
        u = torch.rand((info.batch_size,), generator=gen, device=info.device, dtype=torch.float64)
        applied = u < self.p
        values = self.draw(info, gen)
        return Params(self.neutral(values, applied, info), applied)

    def apply_view(self, view: BatchView, params: Params) -> None:
        """Apply ``params`` to the batches of ``view`` in place (deterministic)."""
        raise NotImplementedError

    def apply(self, data: Mapping[str, Any], params: Params) -> dict[str, Any]:
        """Apply given parameters (e.g. a record, or one row of a batch's parameters)."""
        view = self.view(data)
        if params.applied.shape[0] != view.info.batch_size:
            raise AugmentationError(
                f"parameters for {params.applied.shape[0]} samples, batch of "
                f"{view.info.batch_size}",
                transform=self.name,
            )
        params = Params(
            {k: v.to(view.info.device) for k, v in params.values.items()},
            params.applied.to(view.info.device),
        )
        self.apply_view(view, params)
        view.record(self.name, params)
        return view.finish()

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        view = self.view(data)
        params = self.sample(view.info)
        self.apply_view(view, params)
        view.record(self.name, params)
        return view.finish()

    def __repr__(self) -> str:
        return f"{self.name}(keys={self.keys}, label_keys={self.label_keys}, p={self.p})"


def where_applied(applied: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Per sample: ``new`` where applied, ``old`` (byte-identical) elsewhere.

    On the CPU the common cases (all or none applied) skip the blend; on an accelerator the
    blend always runs, as asking first would wait for the device.
    """
    if applied.device.type == "cpu":
        if bool(applied.all()):
            return new
        if not bool(applied.any()):
            return old
    mask = applied.view((-1,) + (1,) * (old.ndim - 1))
    return torch.where(mask, new, old)
