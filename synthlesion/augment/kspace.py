"""MRI artifacts simulated in k-space: motion, ghosting and spikes.

The image is Fourier transformed over its spatial axes (centred spectrum), the spectrum is
changed, and the real part of the inverse transform is kept. All three work on the whole
batch at once; per-sample choices (phase-encoding axis, number of ghosts) become per-sample
line profiles, so no sample waits for another.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from synthlesion.augment.base import (
    AugmentationError,
    BatchInfo,
    as_axis_ranges,
    as_range,
    check_bound,
    uniform,
)
from synthlesion.augment.intensity import IntensityTransform, per_sample
from synthlesion.augment.spatial import MAX_ROTATION_DEG, RandAffine, _planes
from synthlesion.augment.warp import warp_tensors


def to_kspace(x: torch.Tensor) -> torch.Tensor:
    """Centred spectrum of ``(B, C, *spatial)`` over the spatial axes (complex)."""
    dims = tuple(range(2, x.ndim))
    work = x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32)
    return torch.fft.fftshift(torch.fft.fftn(work, dim=dims), dim=dims)


def from_kspace(k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Real part of the inverse of :func:`to_kspace`, in ``dtype``."""
    dims = tuple(range(2, k.ndim))
    return torch.fft.ifftn(torch.fft.ifftshift(k, dim=dims), dim=dims).real.to(dtype)


def _int_range(value: Any, name: str, transform: str, minimum: int) -> tuple[int, int]:
    low, high = as_range(value, name, transform)
    if low != int(low) or high != int(high) or low < minimum:
        raise AugmentationError(
            f"{name}={value!r} must be integers >= {minimum}", transform=transform
        )
    return int(low), int(high)


def _draw_int(
    generator: torch.Generator, bounds: tuple[int, int], batch: int, device: torch.device
) -> torch.Tensor:
    u = torch.rand((batch,), generator=generator, device=device, dtype=torch.float64)
    return (bounds[0] + torch.floor(u * (bounds[1] - bounds[0] + 1))).long().clamp(max=bounds[1])


def _draw_axis(
    generator: torch.Generator, axes: Sequence[int] | None, info: BatchInfo, transform: str
) -> torch.Tensor:
    nd = info.spatial_dims
    choices = list(range(nd)) if axes is None else [a % nd for a in axes if -nd <= a < nd]
    if not choices or (axes is not None and len(choices) != len(axes)):
        raise AugmentationError(f"axes={axes!r} out of range for {nd}D data", transform=transform)
    pick = _draw_int(generator, (0, len(choices) - 1), info.batch_size, info.device)
    return torch.tensor(choices, device=info.device)[pick]


def _axis_profile(profile: torch.Tensor, axis: int, nd: int) -> torch.Tensor:
    """``(B, N_a)`` profile shaped to broadcast along spatial axis ``axis`` of a 2+nd batch."""
    shape = [profile.shape[0], 1] + [1] * nd
    shape[2 + axis] = profile.shape[1]
    return profile.view(shape)


class RandGhosting(IntensityTransform):
    """Ghosting from periodic k-space errors along a phase-encoding axis (as TorchIO).

    Every ``n``-th k-space plane along the axis is scaled by ``1 - intensity``, except the
    central ``restore`` fraction, which keeps the image contrast.

    Args:
        keys: Images.
        label_keys: Label maps, only checked against the images, never changed.
        num_ghosts: Integer range of ``n`` (ghost spacing in the image).
        axes: Candidate phase-encoding axes (one is drawn per sample); None: all.
        intensity: Strength in [0, 1].
        restore: Central fraction of k-space left intact.
        **kwargs: ``p``, ``seed``, ``device``, ...
    """

    fusable = False

    def __init__(
        self,
        keys: str | Sequence[str],
        label_keys: str | Sequence[str] = (),
        *,
        num_ghosts: Any = (4, 10),
        axes: Sequence[int] | None = None,
        intensity: Any = (0.5, 1.0),
        restore: float = 0.02,
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, label_keys, **kwargs)
        self.num_ghosts = _int_range(num_ghosts, "num_ghosts", self.name, 2)
        self.axes = tuple(axes) if axes is not None else None
        self.intensity = as_range(intensity, "intensity", self.name)
        check_bound(intensity, "intensity", 0.0, 1.0, self.name, False)
        if not 0.0 <= restore < 1.0:
            raise AugmentationError(f"restore={restore} must lie in [0, 1)", transform=self.name)
        self.restore = float(restore)

    def draw(self, info, generator):
        return {
            "axis": _draw_axis(generator, self.axes, info, self.name),
            "num_ghosts": _draw_int(generator, self.num_ghosts, info.batch_size, info.device),
            "intensity": uniform(generator, [self.intensity], info.batch_size, info.device)[:, 0],
        }

    def apply_tensor(self, x, values, extras):
        k = to_kspace(x)
        nd = x.ndim - 2
        real = torch.float64 if x.dtype == torch.float64 else torch.float32
        for a in range(nd):
            n = x.shape[2 + a]
            line = torch.arange(n, device=x.device)
            ghost = (line[None] % values["num_ghosts"][:, None]) == 0
            centre = (line - n // 2).abs().to(real) <= self.restore * n / 2
            active = ghost & ~centre[None] & (values["axis"][:, None] == a)
            factor = 1 - values["intensity"].to(real)[:, None] * active.to(real)
            k = k * _axis_profile(factor, a, nd)
        return from_kspace(k, x.dtype)


class RandSpike(IntensityTransform):
    """Herringbone artifact: bright spikes at random k-space positions (as TorchIO).

    Args:
        keys: Images.
        label_keys: Label maps, only checked against the images, never changed.
        num_spikes: Integer range of spikes per sample.
        intensity: Spike height as a multiple of the spectrum's largest magnitude.
        **kwargs: ``p``, ``seed``, ``device``, ...
    """

    fusable = False

    def __init__(
        self,
        keys: str | Sequence[str],
        label_keys: str | Sequence[str] = (),
        *,
        num_spikes: Any = 1,
        intensity: Any = (0.1, 0.5),
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, label_keys, **kwargs)
        self.num_spikes = _int_range(num_spikes, "num_spikes", self.name, 0)
        self.intensity = as_range(intensity, "intensity", self.name)

    def draw(self, info, generator):
        batch, nd = info.batch_size, info.spatial_dims
        most = max(self.num_spikes[1], 1)
        position = torch.rand(
            (batch, most, nd), generator=generator, device=info.device, dtype=torch.float64
        )
        count = _draw_int(generator, self.num_spikes, batch, info.device)
        return {
            "position": position,
            "count": count,
            "intensity": uniform(generator, [self.intensity], batch, info.device)[:, 0],
        }

    def neutral(self, values, applied, info):
        return {**values, "count": torch.where(applied, values["count"], 0)}

    def apply_tensor(self, x, values, extras):
        k = to_kspace(x)
        batch, channels = x.shape[:2]
        shape = x.shape[2:]
        flat = k.reshape(batch, channels, -1)
        size = torch.tensor(shape, device=x.device, dtype=torch.float64)
        index = (values["position"] * size).long().clamp(max=size.long() - 1)  # (B, S, d)
        lin = torch.zeros(index.shape[:2], dtype=torch.long, device=x.device)
        for a, n in enumerate(shape):
            lin = lin * n + index[..., a]
        active = torch.arange(index.shape[1], device=x.device)[None] < values["count"][:, None]
        peak = flat.abs().amax(-1, keepdim=True)  # (B, C, 1)
        height = peak * per_sample(values["intensity"], peak) * active[:, None].to(peak.dtype)
        spikes = torch.zeros(flat.shape, dtype=peak.dtype, device=x.device)
        spikes.scatter_add_(2, lin[:, None].expand(-1, channels, -1), height)
        return from_kspace((flat + spikes).view(k.shape), x.dtype)


class RandMotion(IntensityTransform):
    """Rigid patient motion during the acquisition (as TorchIO's ``RandomMotion``).

    The scan is split in time into ``num_transforms + 1`` segments along the phase-encoding
    axis; segment ``j``'s k-space lines come from the image moved by the ``j``-th rigid
    transform (rotation in degrees and translation in mm, physical space).

    Args:
        keys: Images.
        label_keys: Label maps, only checked against the images, never changed.
        num_transforms: Integer range of movements per sample.
        degrees: Rotation range (bound: 30).
        translation: Translation range in mm.
        axes: Candidate phase-encoding axes; None: all.
        **kwargs: ``p``, ``seed``, ``device``, ``spacing``, ``allow_extreme``.
    """

    fusable = False

    def __init__(
        self,
        keys: str | Sequence[str],
        label_keys: str | Sequence[str] = (),
        *,
        num_transforms: Any = (1, 2),
        degrees: Any = (-5.0, 5.0),
        translation: Any = (-5.0, 5.0),
        axes: Sequence[int] | None = None,
        allow_extreme: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, label_keys, **kwargs)
        self.num_transforms = _int_range(num_transforms, "num_transforms", self.name, 0)
        check_bound(
            degrees,
            "degrees",
            -MAX_ROTATION_DEG,
            MAX_ROTATION_DEG,
            self.name,
            allow_extreme,
            " deg",
        )
        self.degrees = degrees
        self.translation = translation
        self.axes = tuple(axes) if axes is not None else None

    def draw(self, info, generator):
        batch, nd = info.batch_size, info.spatial_dims
        most = max(self.num_transforms[1], 1)
        rot = as_axis_ranges(self.degrees, "degrees", len(_planes(nd)), self.name)
        shift = as_axis_ranges(self.translation, "translation", nd, self.name)
        rotation = uniform(generator, rot * most, batch, info.device).view(batch, most, -1)
        translation = uniform(generator, shift * most, batch, info.device).view(batch, most, nd)
        times = (
            torch.rand((batch, most), generator=generator, device=info.device, dtype=torch.float64)
            .sort(1)
            .values
            * 0.9
            + 0.05
        )
        count = _draw_int(generator, self.num_transforms, batch, info.device)
        return {
            "rotation": rotation,
            "translation": translation,
            "times": times,
            "count": count,
            "axis": _draw_axis(generator, self.axes, info, self.name),
            "spacing": info.spacing,
        }

    def neutral(self, values, applied, info):
        return {**values, "count": torch.where(applied, values["count"], 0)}

    def apply_tensor(self, x, values, extras):
        batch, nd = x.shape[0], x.ndim - 2
        shape = tuple(x.shape[2:])
        info = BatchInfo(batch, shape, x.device, x.dtype, values["spacing"].to(x.device))
        real = torch.float64 if x.dtype == torch.float64 else torch.float32
        count = values["count"]
        most = values["times"].shape[1]
        k = to_kspace(x)
        # line -> segment index, per axis (only the sample's own axis is segmented)
        segments = []
        for a in range(nd):
            frac = (torch.arange(shape[a], device=x.device, dtype=torch.float64) + 0.5) / shape[a]
            live = torch.arange(most, device=x.device)[None] < count[:, None]
            times = torch.where(live, values["times"], 2.0)  # inactive movements never start
            seg = (frac[None, :, None] >= times[:, None, :]).sum(-1)  # (B, N_a)
            seg = torch.where(values["axis"][:, None] == a, seg, -1)  # -1: not this axis
            segments.append(seg)
        total = k * self._mask(segments, 0, nd, real)
        for j in range(1, most + 1):
            active = count >= j
            if not bool(active.any()):
                break
            moved = {
                "rotation": torch.where(active[:, None], values["rotation"][:, j - 1], 0),
                "scale": torch.ones((batch, nd), dtype=torch.float64, device=x.device),
                "shear": torch.zeros(
                    (batch, len(_planes(nd)) if nd == 3 else 1),
                    dtype=torch.float64,
                    device=x.device,
                ),
                "translation": torch.where(active[:, None], values["translation"][:, j - 1], 0),
            }
            images, _ = warp_tensors({"x": x}, {}, [(RandAffine, moved, active)], info, "border")
            total = total + to_kspace(images["x"]) * self._mask(segments, j, nd, real)
        return from_kspace(total, x.dtype)

    @staticmethod
    def _mask(segments: list[torch.Tensor], j: int, nd: int, dtype: torch.dtype) -> torch.Tensor:
        mask = None
        for a, seg in enumerate(segments):
            m = _axis_profile(((seg == j) | (seg < 0)).to(dtype), a, nd)
            mask = m if mask is None else mask * m
        return mask
