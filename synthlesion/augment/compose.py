"""Compose: runs transforms in order, fusing consecutive spatial ones into one warp.

Consecutive spatial transforms with the same keys draw their parameters one after the
other (each from its own generator), their maps are composed on one coarse grid (the
affine folded into the elastic control grid) and the batch is resampled once on that map:
linear for images, nearest for labels (see :mod:`synthlesion.augment.sampling`).

``backend="compiled"`` additionally compiles (``torch.compile``) every run of consecutive
pointwise intensity transforms (noise, bias field, gamma, ...) into a few fused loops over
the voxels instead of one pass per operation; random fields are still drawn eagerly and
the warp is the same. The first call per shape pays the compilation.

``cuda_graph=True`` replays the whole pipeline on CUDA batches as one CUDA graph per input
signature (see :mod:`synthlesion.augment.cuda_graph`): the same results, without the host
cost of issuing a few hundred operations per batch. CPU batches are unaffected.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from synthlesion.augment.base import AugmentationError, BatchView, Params, Transform
from synthlesion.augment.cuda_graph import CudaGraphRunner
from synthlesion.augment.geometry import GeometryKeys
from synthlesion.augment.intensity import IntensityTransform
from synthlesion.augment.warp import Step, warp_view

logger = logging.getLogger(__name__)

BACKENDS = ("eager", "compiled")


def _fusable_intensity(t: Transform) -> bool:
    return isinstance(t, IntensityTransform) and t.fusable


def _fusable_spatial(a: Transform, b: Transform) -> bool:
    return (
        a.is_spatial
        and b.is_spatial
        and a.keys == b.keys
        and a.label_keys == b.label_keys
        and a.padding_mode == b.padding_mode
        and a.sampler == b.sampler
        and a.spacing == b.spacing  # type: ignore[attr-defined]
        and a.spatial_dims == b.spatial_dims
        and a.geometry == b.geometry  # type: ignore[attr-defined]
    )


LABEL_LIKE_NAMES = {
    "label", "labels", "labelmap", "seg", "segs", "segmentation", "mask", "masks", "gt",
    "annotation", "annotations", "aseg", "parc",
}  # fmt: skip


def _looks_like_label(key: str) -> bool:
    """``label``, ``seg0``, ``liver_mask``, ``label_map``, ``gt``, ``tumour-seg`` ..."""
    words = [w for w in re.split(r"[^a-z]+", key.lower()) if w]
    return any(w in LABEL_LIKE_NAMES for w in words) or "".join(words) in LABEL_LIKE_NAMES


def check_order(transforms: Sequence[Transform]) -> None:
    """Refuse the orders the field forbids.

    * an intensity normalisation of a key after a random transform of that key (the
      normalisation would undo or depend on the augmentation: normalise first);
    * a label map treated as an image: a key that is a label key of one transform and an
      image key (linear interpolation, noise, ...) of another, or a key named like a label map
      (``label``, ``seg0``, ``liver_mask``, ``gt`` ...) among any transform's image keys;
    * boxes or points that follow some spatial transforms but not others (they would miss a
      move): every spatial transform of a pipeline names the same box and point keys.
    """
    randomised: dict[str, Transform] = {}
    for t in transforms:
        if t.is_normalisation:
            touched = [k for k in t.keys if k in randomised]
            if touched:
                raise AugmentationError(
                    f"{t.name} normalises intensities after the random transform "
                    f"{randomised[touched[0]].name}: put the normalisation first (normalising "
                    "after augmentation undoes it and leaks its statistics)",
                    key=touched[0],
                    transform="Compose",
                )
        if t.is_random:
            for k in (*t.keys, *t.label_keys):
                randomised.setdefault(k, t)
    label_keys = {k for t in transforms for k in t.label_keys}
    for t in transforms:
        for key in t.keys:
            if key in label_keys:
                raise AugmentationError(
                    f"is a label key elsewhere in the pipeline but an image key of {t.name}, "
                    "which would interpolate or change its values: list it in label_keys",
                    key=key,
                    transform="Compose",
                )
            if _looks_like_label(key):
                raise AugmentationError(
                    f"is named like a label map but is an image key of {t.name}, which would "
                    "interpolate or change its values: list it in label_keys (nearest "
                    "neighbour, values kept), or rename it if it really is an image",
                    key=key,
                    transform="Compose",
                )
    moving = [t for t in transforms if t.is_spatial or t.changes_batch]
    followed = {k for t in moving for k in getattr(t, "geometry", GeometryKeys()).keys}
    for t in moving:
        missing = followed - set(getattr(t, "geometry", GeometryKeys()).keys)
        if missing and (t.is_spatial or getattr(t, "geometry", None) is not None):
            raise AugmentationError(
                f"boxes/points follow other spatial transforms but not {t.name}: give it the "
                "same box_keys/point_keys (and formats), or they miss its move",
                key=sorted(missing)[0],
                transform="Compose",
            )


class Compose:
    """Run transforms in order; fuse consecutive spatial transforms into one warp.

    Args:
        transforms: The transforms, in application order.
        fuse: Fuse consecutive spatial transforms (False: each resamples on its own).
        backend: ``"eager"`` or ``"compiled"`` (see the module docstring).
        seed: Seeds every transform from one number (None: keep their own seeds).
        cuda_graph: On CUDA batches, capture the pipeline once per input signature and
            replay it (needs PyTorch >= 2.5; not with transforms that change the batch).
    """

    def __init__(
        self,
        transforms: Sequence[Transform],
        *,
        fuse: bool = True,
        backend: str = "eager",
        seed: int | None = None,
        cuda_graph: bool = False,
    ) -> None:
        if backend not in BACKENDS:
            raise AugmentationError(f"backend={backend!r} not in {BACKENDS}", transform="Compose")
        for t in transforms:
            if not isinstance(t, Transform):
                raise AugmentationError(
                    f"{t!r} is not a synthlesion transform", transform="Compose"
                )
        self.transforms = list(transforms)
        check_order(self.transforms)
        self.fuse = fuse
        self.backend = backend
        self.groups = self._group()
        self._compiled: dict[int, Any] = {}
        self._graphs: CudaGraphRunner | None = None
        if cuda_graph:
            batch_changing = [t.name for t in self.transforms if t.changes_batch]
            if batch_changing:
                raise AugmentationError(
                    f"cuda_graph=True cannot replay {batch_changing} (they change the batch "
                    "size); compose them separately",
                    transform="Compose",
                )
            keys = tuple(dict.fromkeys(k for t in self.transforms for k in t.keys + t.label_keys))
            self._graphs = CudaGraphRunner(self._run, self.transforms, keys)
        if seed is not None:
            self.set_random_state(seed)

    def _group(self) -> list[list[Transform]]:
        groups: list[list[Transform]] = []
        for t in self.transforms:
            last = groups[-1][-1] if groups else None
            if self.fuse and last is not None and _fusable_spatial(last, t):
                groups[-1].append(t)
            elif (
                self.backend == "compiled"
                and last is not None
                and _fusable_intensity(last)
                and _fusable_intensity(t)
                and last.spatial_dims == t.spatial_dims
            ):
                groups[-1].append(t)
            else:
                groups.append([t])
        return groups

    def set_random_state(self, seed: int, device: str | torch.device | None = None) -> Compose:
        """Seed every transform with its own number derived from ``seed``."""
        gen = torch.Generator().manual_seed(int(seed))
        for t in self.transforms:
            t.set_random_state(int(torch.randint(0, 2**62, (1,), generator=gen)), device)
        return self

    def __call__(self, data: Mapping[str, Any]) -> Any:
        if self._graphs is not None and self._graphs.applies(data):
            return self._graphs(data)
        return self._run(data)

    def _run(self, data: Mapping[str, Any]) -> Any:
        """The eager pipeline."""
        checked: set[str] = set()
        index = 0
        while index < len(self.groups):
            group = self.groups[index]
            if isinstance(data, list):  # a crop turned one item into several
                rest = Compose(
                    [t for g in self.groups[index:] for t in g],
                    fuse=self.fuse,
                    backend=self.backend,
                )
                return [rest(item) for item in data]
            first = group[0]
            keys = set(first.keys) | set(first.label_keys)
            if first.is_spatial:
                view = first.view(data, validate=first.validate and not keys <= checked)
                params = [(t, t.sample(view.info)) for t in group]
                steps: list[Step] = [(type(t), p.values, p.applied) for t, p in params]
                warp_view(
                    view,
                    steps,
                    first.padding_mode,
                    first.sampler,  # type: ignore[attr-defined]
                    first.geometry,
                    transform=first.name,
                )  # type: ignore[attr-defined]
                for t, p in params:
                    view.record(t.name, p)
                data = view.finish()
            elif first.changes_batch:
                data = first(data)
            elif len(group) > 1 or (self.backend == "compiled" and _fusable_intensity(first)):
                image_keys = list(dict.fromkeys(k for t in group for k in t.keys))
                label_keys = list(dict.fromkeys(k for t in group for k in t.label_keys))
                keys = set(image_keys) | set(label_keys)
                view = BatchView(
                    data, image_keys, [k for k in label_keys if k not in image_keys],
                    transform=first.name, spatial_dims=first.spatial_dims,
                    allow_missing_keys=first.allow_missing_keys,
                    validate=first.validate and not keys <= checked,
                    default_spacing=first.spacing, values_checked=first._values_checked,
                )  # fmt: skip
                for t, p in self._run_chain(view, group, index):  # type: ignore[arg-type]
                    view.record(t.name, p)
                data = view.finish()
            else:
                view = first.view(data, validate=first.validate and not keys <= checked)
                p = first.sample(view.info)
                first.apply_view(view, p)
                view.record(first.name, p)
                data = view.finish()
            checked |= keys
            index += 1
        return data

    # compiled backend -----------------------------------------------------------------------------

    def _run_chain(self, view: BatchView, chain: list[IntensityTransform],
                   index: int) -> list[tuple[Transform, Params]]:  # fmt: skip
        """Run pointwise intensity transforms as compiled stages (eager for odd dtypes)."""
        info = view.info
        drawn = [(t, t.sample(info)) for t in chain]
        if any(x.dtype not in (torch.float32, torch.float64) for x in view.images.values()):
            for t, p in drawn:
                t.apply_view(view, p)
            return drawn
        extras = [
            {key: t.prepare(view.images[key], p.values, i) for i, key in enumerate(t.keys)
             if key in view.images}
            for t, p in drawn
        ]  # fmt: skip
        stages = self._compiled.get(index)
        if stages is None:
            stages = [(len(part), torch.compile(_make_stage(part)))
                      for part in _split_at_reductions(chain)]  # fmt: skip
            self._compiled[index] = stages
        images = dict(view.images)
        start = 0
        for count, fn in stages:
            part = slice(start, start + count)
            images = fn(images, [p.values for _, p in drawn[part]], extras[part],
                        [p.applied for _, p in drawn[part]])  # fmt: skip
            start += count
        for key, value in images.items():
            view.set(key, value)
        return drawn


def _split_at_reductions(chain: list[IntensityTransform]) -> list[list[IntensityTransform]]:
    """Stages: a new one starts at every transform that reduces over the image (min, mean).

    One stage compiles to one vectorised, parallel loop over the voxels (plus the reduction
    loop of its first transform).
    """
    stages: list[list[IntensityTransform]] = [[]]
    for t in chain:
        if t.reduces and stages[-1]:
            stages.append([])
        stages[-1].append(t)
    return stages


def _make_stage(chain: list[IntensityTransform]):
    """A pure function applying ``chain`` (per-sample ``applied`` masks included)."""

    def stage(
        images: dict[str, torch.Tensor],
        values: list[dict[str, torch.Tensor]],
        extras: list[dict[str, dict[str, torch.Tensor]]],
        applied: list[torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        out = dict(images)
        for t, v, e, a in zip(chain, values, extras, applied, strict=True):
            for key in t.keys:
                if key in out:
                    x = out[key]
                    y = t.apply_tensor(x, v, e[key])
                    out[key] = torch.where(a.view((-1,) + (1,) * (x.ndim - 1)), y, x)
        return out

    return stage
