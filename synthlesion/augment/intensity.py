"""Intensity transforms: they change image values only and never touch a label map.

Parameters are drawn per sample; random fields (noise) come from a per-sample seed drawn
from the transform's generator, so a sample gives the same result alone or in any batch,
and a record reproduces it. Every transform applies one set of per-sample parameters to all
its keys (as a MONAI dict transform does); noise fields differ between keys.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.nn.functional as F

from synthlesion.augment import _triton_noise
from synthlesion.augment.base import (
    AugmentationError,
    BatchInfo,
    BatchView,
    Params,
    Transform,
    as_axis_ranges,
    as_range,
    uniform,
    where_applied,
)
from synthlesion.augment.device_cache import constant, device_cache

Values = Mapping[str, torch.Tensor]


def per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(B,)`` or ``(B, C)`` parameters shaped to broadcast over ``x`` ``(B, C, *spatial)``."""
    v = v.to(dtype=x.dtype if x.is_floating_point() else torch.float32, device=x.device)
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def channel_minmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample and channel min and max, shaped ``(B, C, 1, ...)``."""
    flat = x.flatten(2)
    shape = x.shape[:2] + (1,) * (x.ndim - 2)
    return flat.amin(-1).view(shape), flat.amax(-1).view(shape)


class IntensityTransform(Transform):
    """Base of transforms that change image values only.

    ``label_keys`` are accepted so that shapes are checked against the images, and are
    returned untouched (the same tensor objects).

    Subclasses implement :meth:`draw`, optionally :meth:`prepare` (random fields, eager) and
    :meth:`apply_tensor` (pure tensor code; ``fusable`` ones contain no host syncs, so
    :class:`~synthlesion.augment.Compose` can compile them together with the spatial warp).
    """

    is_intensity = True
    fusable = True
    reduces = False  # reduces over the image (min/max, mean): starts a new compiled stage
    neutral_is_identity = False  # apply_tensor with neutral() parameters returns x exactly

    def prepare(self, x: torch.Tensor, values: Values, key_index: int) -> dict[str, torch.Tensor]:
        """Random fields for one key (eager; default: none)."""
        return {}

    def apply_tensor(
        self, x: torch.Tensor, values: Values, extras: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """Transform a batch ``(B, C, *spatial)`` with the given per-sample values."""
        raise NotImplementedError

    def apply_view(self, view: BatchView, params: Params) -> None:
        if params.applied.device.type == "cpu" and not bool(params.applied.any()):
            return
        for index, key in enumerate(self.keys):
            if key not in view.images:
                continue
            x = view.images[key]
            if self.neutral_is_identity:  # no blend: a pass over the batch saved
                values = self.neutral(params.values, params.applied, view.info)
                view.set(key, self.apply_tensor(x, values, self.prepare(x, values, index)))
            else:
                out = self.apply_tensor(x, params.values, self.prepare(x, params.values, index))
                view.set(key, where_applied(params.applied, out, x))

    # random fields from per-sample seeds ----------------------------------------------------------

    def draw_seeds(self, info: BatchInfo, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(
            0, 2**62, (info.batch_size,), generator=generator, device=info.device, dtype=torch.int64
        )

    def noise(self, x: torch.Tensor, seeds: torch.Tensor, stream: int) -> torch.Tensor:
        """Standard normal field shaped like ``x``; sample ``b`` from ``seeds[b]``.

        A seeded CPU generator fills on one thread, so on the CPU the samples are filled
        by a small thread pool (torch releases the GIL), each with its own generator. On
        CUDA with Triton one kernel fills every sample from its seed (Philox), without
        copying the seeds to the host.
        """
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        if x.device.type != "cpu" and _triton_noise.supports(x):
            streamed = (seeds + 1_000_003 * stream) % (2**63 - 1)  # no wait for the device
            return _triton_noise.seeded_normal(tuple(x.shape), streamed, x.device).to(x.dtype)
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
        seeds_list = [(int(s) + 1_000_003 * stream) % (2**63 - 1) for s in seeds.tolist()]

        def fill(b: int) -> None:
            gen = torch.Generator(device=x.device)
            gen.manual_seed(seeds_list[b])
            out[b].normal_(generator=gen)

        workers = min(len(seeds_list), torch.get_num_threads())
        if x.device.type == "cpu" and workers > 1 and out[0].numel() >= 1 << 16:
            list(_pool(workers).map(fill, range(len(seeds_list))))
        else:
            for b in range(len(seeds_list)):
                fill(b)
        return out.to(x.dtype)


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(workers: int) -> ThreadPoolExecutor:
    """A shared thread pool for filling random fields."""
    pool = _POOLS.get(workers)
    if pool is None:
        pool = _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="augment-rng")
    return pool


class RandGaussianNoise(IntensityTransform):
    """Additive Gaussian noise.

    Args:
        keys: Images.
        label_keys: Label maps, only checked against the images, never changed.
        std: Standard deviation in image units (number: fixed; pair: uniform per sample).
        mean: Mean in image units.
        **kwargs: ``p``, ``seed``, ``device``, ...
    """

    def __init__(
        self,
        keys: str | Sequence[str],
        label_keys: str | Sequence[str] = (),
        *,
        std: Any = (0.0, 0.1),
        mean: Any = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, label_keys, **kwargs)
        self.std = as_range(std, "std", self.name)
        self.mean = as_range(mean, "mean", self.name)
        if self.std[0] < 0:
            raise AugmentationError(f"std={std!r} must be >= 0", transform=self.name)

    neutral_is_identity = True  # x + 0 * noise + 0

    def draw(self, info, generator):
        values = uniform(generator, [self.std, self.mean], info.batch_size, info.device)
        return {"std": values[:, 0], "mean": values[:, 1], "seed": self.draw_seeds(info, generator)}

    def neutral(self, values, applied, info):
        return {
            **values,
            "std": torch.where(applied, values["std"], 0),
            "mean": torch.where(applied, values["mean"], 0),
        }

    def prepare(self, x, values, key_index):
        return {"noise": self.noise(x, values["seed"], 2 * key_index)}

    def apply_tensor(self, x, values, extras):
        out = torch.addcmul(x, extras["noise"], per_sample(values["std"], x))
        if self.mean != (0.0, 0.0):
            out = out + per_sample(values["mean"], x)
        return out


class RandRicianNoise(IntensityTransform):
    """Rician noise of magnitude MRI: ``sqrt((x + s n1)^2 + (s n2)^2)``.

    Args:
        keys: Images (magnitudes).
        std: Noise level ``s`` in image units.
        **kwargs: ``p``, ``seed``, ``device``, ...
    """

    def __init__(
        self,
        keys: str | Sequence[str],
        label_keys: str | Sequence[str] = (),
        *,
        std: Any = (0.0, 0.1),
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, label_keys, **kwargs)
        self.std = as_range(std, "std", self.name)
        if self.std[0] < 0:
            raise AugmentationError(f"std={std!r} must be >= 0", transform=self.name)

    def draw(self, info, generator):
        return {
            "std": uniform(generator, [self.std], info.batch_size, info.device)[:, 0],
            "seed": self.draw_seeds(info, generator),
        }

    def prepare(self, x, values, key_index):
        return {
            "real": self.noise(x, values["seed"], 2 * key_index),
            "imag": self.noise(x, values["seed"], 2 * key_index + 1),
        }

    def apply_tensor(self, x, values, extras):
        s = per_sample(values["std"], x)
        return torch.sqrt((x + s * extras["real"]) ** 2 + (s * extras["imag"]) ** 2)


def monomials(order: int, nd: int) -> list[tuple[int, ...]]:
    """Exponent tuples of every monomial of total degree <= ``order`` (TorchIO's order)."""
    if nd == 1:
        return [(i,) for i in range(order + 1)]
    return [(i,) + rest for i in range(order + 1) for rest in monomials(order - i, nd - 1)]


def polynomial_field(
    coefficients: torch.Tensor, order: int, shape: Sequence[int], dtype: torch.dtype
) -> torch.Tensor:
    """Evaluate ``sum_k c_k prod_a u_a^{e_ka}`` on ``[-1, 1]`` axes, separably.

    Args:
        coefficients: ``(B, T)``, one per monomial of :func:`monomials`.
        order: Largest total degree.
        shape: Spatial shape.
        dtype: Output dtype.

    Returns:
        ``(B, 1, *shape)``; the last step is one matmul with ``order + 1`` terms per voxel.
    """
    nd = len(shape)
    batch = coefficients.shape[0]
    device = coefficients.device
    work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    flat = torch.zeros((batch, (order + 1) ** nd), dtype=work, device=device)
    index = []
    for exps in monomials(order, nd):
        i = 0
        for e in exps:
            i = i * (order + 1) + e
        index.append(i)
    if torch.compiler.is_compiling():  # no host constants: each would be copied per call
        column = dict(zip(index, coefficients.to(work).unbind(1), strict=True))
        zero = flat[:, 0]
        flat = torch.stack([column.get(i, zero) for i in range(flat.shape[1])], 1)
        powers = [_powers.__wrapped__(n, order, work, device) for n in shape]
    else:  # eager: cached on the device (no copy, no wait per call)
        flat[:, constant(index, torch.int64, device)] = coefficients.to(work)
        powers = [_powers(n, order, work, device) for n in shape]
    t = flat.view((batch,) + (order + 1,) * nd)
    for a in range(nd - 1, 0, -1):
        t = torch.movedim(torch.tensordot(t, powers[a], dims=([1 + a], [1])), -1, 1 + a)
    if torch.compiler.is_compiling():  # a pointwise sum the compiler fuses into one loop
        rows = powers[0].T  # (order + 1, N_0)
        out = 0
        for k in range(order + 1):
            plane = t[:, k].reshape((batch, 1, 1) + tuple(shape[1:]))
            out = out + rows[k].view((1, 1, -1) + (1,) * (nd - 1)) * plane
        return out.to(dtype)
    out = torch.matmul(powers[0], t.reshape(batch, order + 1, -1))
    return out.view(batch, 1, *shape).to(dtype)


@device_cache
def _powers(n: int, order: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(n, order + 1)``: ``u**k`` on ``n`` points spanning [-1, 1] (cached: read only)."""
    u = torch.linspace(-1, 1, n, dtype=torch.float64, device=device)
    return torch.stack([u**k for k in range(order + 1)], 1).to(dtype)


class RandBiasField(IntensityTransform):
    """Smooth multiplicative MRI bias field ``x * exp(polynomial)`` (as TorchIO).

    Args:
        keys: Images.
        label_keys: Label maps, only checked against the images, never changed.
        coefficients: Range of every polynomial coefficient (coordinates in [-1, 1]).
        order: Largest total degree of the polynomial.
        **kwargs: ``p``, ``seed``, ``device``, ...
    """

    def __init__(
        self,
        keys: str | Sequence[str],
        label_keys: str | Sequence[str] = (),
        *,
        coefficients: Any = (-0.5, 0.5),
        order: int = 3,
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, label_keys, **kwargs)
        if not isinstance(order, int) or order < 0:
            raise AugmentationError(f"order={order!r} must be an integer >= 0", transform=self.name)
        self.coefficients = as_range(coefficients, "coefficients", self.name)
        self.order = order

    def draw(self, info, generator):
        n = len(monomials(self.order, info.spatial_dims))
        return {
            "coefficients": uniform(
                generator, [self.coefficients] * n, info.batch_size, info.device
            )
        }

    neutral_is_identity = True  # x * exp(0)

    def neutral(self, values, applied, info):
        return {"coefficients": torch.where(applied[:, None], values["coefficients"], 0)}

    def apply_tensor(self, x, values, extras):
        field = polynomial_field(values["coefficients"], self.order, x.shape[2:], x.dtype)
        return x * field.exp_()


class RandGamma(IntensityTransform):
    """Gamma on each sample's and channel's own intensity range: ``((x-lo)/(hi-lo))^g``.

    Args:
        keys: Images.
        label_keys: Label maps, only checked against the images, never changed.
        log_gamma: Range of ``log(g)`` (as TorchIO; ``(-0.3, 0.3)`` is g in [0.74, 1.35]).
        **kwargs: ``p``, ``seed``, ``device``, ...
    """

    reduces = True

    def __init__(
        self,
        keys: str | Sequence[str],
        label_keys: str | Sequence[str] = (),
        *,
        log_gamma: Any = (-0.3, 0.3),
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, label_keys, **kwargs)
        self.log_gamma = as_range(log_gamma, "log_gamma", self.name)

    def draw(self, info, generator):
        lg = uniform(generator, [self.log_gamma], info.batch_size, info.device)[:, 0]
        return {"gamma": torch.exp(lg)}

    def apply_tensor(self, x, values, extras):
        low, high = channel_minmax(x)
        span = high - low
        span = torch.where(span > 0, span, torch.ones_like(span))
        out = (x - low).div_(span).clamp_min_(0).pow_(per_sample(values["gamma"], x))
        return out.mul_(span).add_(low)


class RandContrastBrightness(IntensityTransform):
    """Contrast about the channel mean and additive brightness: ``(x-m) c + m + b``.

    Args:
        keys: Images.
        label_keys: Label maps, only checked against the images, never changed.
        contrast: Factor ``c``.
        brightness: Offset ``b`` in image units.
        **kwargs: ``p``, ``seed``, ``device``, ...
    """

    reduces = True

    def __init__(
        self,
        keys: str | Sequence[str],
        label_keys: str | Sequence[str] = (),
        *,
        contrast: Any = (0.75, 1.25),
        brightness: Any = (-0.1, 0.1),
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, label_keys, **kwargs)
        self.contrast = as_range(contrast, "contrast", self.name)
        self.brightness = as_range(brightness, "brightness", self.name)
        if self.contrast[0] < 0:
            raise AugmentationError(f"contrast={contrast!r} must be >= 0", transform=self.name)

    def draw(self, info, generator):
        v = uniform(generator, [self.contrast, self.brightness], info.batch_size, info.device)
        return {"contrast": v[:, 0], "brightness": v[:, 1]}

    def apply_tensor(self, x, values, extras):
        mean = x.flatten(2).mean(-1).view(x.shape[:2] + (1,) * (x.ndim - 2))
        return (
            (x - mean) * per_sample(values["contrast"], x)
            + mean
            + per_sample(values["brightness"], x)
        )


class RandHUWindow(IntensityTransform):
    """CT windowing with a jittered window: clip to ``[c - w/2, c + w/2]`` HU and rescale.

    It normalises (HU to ``output_range``), so in a :class:`Compose` it must come before
    every other random transform.

    Args:
        keys: CT images in HU.
        center: Window centre in HU (e.g. 40 soft tissue, -600 lung).
        width: Window width in HU (e.g. 400 soft tissue, 1500 lung).
        center_shift: Random shift of the centre in HU (number: fixed).
        width_scale: Random factor on the width.
        output_range: Values of the window's low and high ends.
        **kwargs: ``p``, ``seed``, ``device``, ...
    """

    is_normalisation = True

    def __init__(
        self,
        keys: str | Sequence[str],
        label_keys: str | Sequence[str] = (),
        *,
        center: float = 40.0,
        width: float = 400.0,
        center_shift: Any = (-20.0, 20.0),
        width_scale: Any = (0.9, 1.1),
        output_range: tuple[float, float] = (0.0, 1.0),
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, label_keys, **kwargs)
        if width <= 0:
            raise AugmentationError(f"width={width} HU must be > 0", transform=self.name)
        self.center, self.width = float(center), float(width)
        self.center_shift = as_range(center_shift, "center_shift", self.name)
        self.width_scale = as_range(width_scale, "width_scale", self.name)
        if self.width_scale[0] <= 0:
            raise AugmentationError(f"width_scale={width_scale!r} must be > 0", transform=self.name)
        self.output_range = (float(output_range[0]), float(output_range[1]))

    def draw(self, info, generator):
        v = uniform(generator, [self.center_shift, self.width_scale], info.batch_size, info.device)
        return {"center": self.center + v[:, 0], "width": self.width * v[:, 1]}

    def apply_tensor(self, x, values, extras):
        center, width = per_sample(values["center"], x), per_sample(values["width"], x)
        unit = ((x - (center - width / 2)) / width).clamp(0, 1)
        low, high = self.output_range
        return unit * (high - low) + low


def _interp(x: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear ``y(x)`` per row: ``x`` ``(R, N)``, knots ``xs``/``ys`` ``(R, Q)``."""
    q = xs.shape[1]
    hi = torch.searchsorted(xs.contiguous(), x.contiguous()).clamp(1, q - 1)
    lo = hi - 1
    x0, x1 = xs.gather(1, lo), xs.gather(1, hi)
    y0, y1 = ys.gather(1, lo), ys.gather(1, hi)
    span = x1 - x0
    t = torch.where(span > 0, (x - x0) / torch.where(span > 0, span, 1), 0).clamp(0, 1)
    return y0 + t * (y1 - y0)


class HistogramMatching(IntensityTransform):
    """Map each sample's and channel's intensity quantiles onto a reference scan's.

    Args:
        keys: Images.
        label_keys: Label maps, only checked against the images, never changed.
        reference: A reference scan (any shape), whose intensity distribution is the target.
        num_quantiles: Knots of the piecewise-linear mapping.
        strength: Blend ``x + s (matched - x)`` (1: full matching; a pair: random).
        **kwargs: ``p``, ``seed``, ``device``, ...
    """

    is_random = False
    is_normalisation = True
    fusable = False

    def __init__(
        self,
        keys: str | Sequence[str],
        label_keys: str | Sequence[str] = (),
        *,
        reference: torch.Tensor,
        num_quantiles: int = 256,
        strength: Any = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, label_keys, **kwargs)
        ref = torch.as_tensor(reference).detach().to("cpu", torch.float64).flatten()
        if ref.numel() < 2 or not bool(torch.isfinite(ref).all()):
            raise AugmentationError(
                "reference must hold at least 2 finite values", key="reference", transform=self.name
            )
        if num_quantiles < 2:
            raise AugmentationError(
                f"num_quantiles={num_quantiles} must be >= 2", transform=self.name
            )
        self.levels = torch.linspace(0, 1, num_quantiles, dtype=torch.float64)
        self.reference_quantiles = _quantiles(ref[None], self.levels)[0]
        self.strength = as_range(strength, "strength", self.name)

    def draw(self, info, generator):
        return {"strength": uniform(generator, [self.strength], info.batch_size, info.device)[:, 0]}

    def apply_tensor(self, x, values, extras):
        work = x.to(torch.float32 if x.dtype != torch.float64 else torch.float64)
        rows = work.flatten(2).flatten(0, 1)  # (B*C, N)
        src = _quantiles(rows, self.levels.to(x.device, work.dtype))
        ref = self.reference_quantiles.to(x.device, work.dtype).expand_as(src)
        matched = _interp(rows, src, ref).view(work.shape)
        return (work + per_sample(values["strength"], work) * (matched - work)).to(x.dtype)


def _quantiles(rows: torch.Tensor, levels: torch.Tensor, max_values: int = 1 << 22) -> torch.Tensor:
    """Quantiles ``(R, Q)`` of each row (rows over ``max_values`` are evenly subsampled)."""
    if rows.shape[1] > max_values:
        rows = rows[:, :: math.ceil(rows.shape[1] / max_values)]
    return torch.quantile(rows, levels.to(rows.dtype), dim=1).T.contiguous()


class RandHistogramShift(IntensityTransform):
    """Random monotone piecewise-linear intensity mapping (multi-site MRI contrast).

    Knots sit evenly on each sample's and channel's [min, max]; interior knots move by a
    random amount (then sorted, so the mapping stays monotone).

    Args:
        keys: Images.
        label_keys: Label maps, only checked against the images, never changed.
        num_control_points: Knots including both ends (>= 3).
        shift: Range of the knot displacement, in units of the intensity range.
        **kwargs: ``p``, ``seed``, ``device``, ...
    """

    reduces = True

    def __init__(
        self,
        keys: str | Sequence[str],
        label_keys: str | Sequence[str] = (),
        *,
        num_control_points: int = 10,
        shift: Any = (-0.05, 0.05),
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, label_keys, **kwargs)
        if not isinstance(num_control_points, int) or num_control_points < 3:
            raise AugmentationError(
                f"num_control_points={num_control_points!r} must be >= 3", transform=self.name
            )
        self.num_control_points = num_control_points
        self.shift = as_range(shift, "shift", self.name)

    def draw(self, info, generator):
        n = self.num_control_points
        base = torch.linspace(0, 1, n, dtype=torch.float64, device=info.device)
        delta = uniform(generator, [self.shift] * (n - 2), info.batch_size, info.device)
        inner = (base[1:-1] + delta).clamp(0, 1).sort(dim=1).values
        ends = base[[0]].expand(info.batch_size, 1), base[[-1]].expand(info.batch_size, 1)
        return {"knots": torch.cat([ends[0], inner, ends[1]], 1)}

    def neutral(self, values, applied, info):
        n = self.num_control_points
        base = torch.linspace(0, 1, n, dtype=torch.float64, device=info.device)
        return {"knots": torch.where(applied[:, None], values["knots"], base)}

    def apply_tensor(self, x, values, extras):
        low, high = channel_minmax(x)
        span = high - low
        span = torch.where(span > 0, span, torch.ones_like(span))
        unit = ((x - low) / span).clamp(0, 1)
        n = values["knots"].shape[1]
        pos = unit * (n - 1)
        i0 = pos.floor().clamp(0, n - 2)
        t = pos - i0
        batch = x.shape[0]
        knots = values["knots"].to(x.dtype)
        flat = i0.long().reshape(batch, -1)
        y0 = knots.gather(1, flat).view(x.shape)
        y1 = knots.gather(1, flat + 1).view(x.shape)
        return (y0 + t * (y1 - y0)) * span + low


class RandLowResolution(IntensityTransform):
    """Simulate a coarser acquisition: area downsampling by a factor per axis and back.

    Args:
        keys: Images.
        label_keys: Label maps, only checked against the images, never changed.
        factor: Downsampling factor >= 1 (number: fixed; pair: uniform; or one per axis,
            e.g. ``(1, 1, (2, 5))`` for thick slices along the last axis).
        **kwargs: ``p``, ``seed``, ``device``, ...
    """

    fusable = False

    def __init__(
        self,
        keys: str | Sequence[str],
        label_keys: str | Sequence[str] = (),
        *,
        factor: Any = (1.0, 3.0),
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, label_keys, **kwargs)
        self.factor = factor
        for nd in (2, 3):
            try:
                ranges = as_axis_ranges(factor, "factor", nd, self.name)
            except AugmentationError:
                continue
            if min(r[0] for r in ranges) < 1:
                raise AugmentationError(f"factor={factor!r} must be >= 1", transform=self.name)

    def draw(self, info, generator):
        ranges = as_axis_ranges(self.factor, "factor", info.spatial_dims, self.name)
        return {"factor": uniform(generator, ranges, info.batch_size, info.device)}

    def neutral(self, values, applied, info):
        return {"factor": torch.where(applied[:, None], values["factor"], 1.0)}

    def apply_tensor(self, x, values, extras):
        shape = tuple(x.shape[2:])
        mode = "bilinear" if len(shape) == 2 else "trilinear"
        out = x.clone()
        for b, factors in enumerate(values["factor"].tolist()):
            small = tuple(max(1, round(n / f)) for n, f in zip(shape, factors, strict=True))
            if small == shape:
                continue
            work = (
                x[b : b + 1].to(torch.float32)
                if x.dtype in (torch.float16, torch.bfloat16)
                else x[b : b + 1]
            )
            down = F.interpolate(work, size=small, mode="area")
            out[b] = F.interpolate(down, size=shape, mode=mode, align_corners=False)[0].to(x.dtype)
        return out
