"""Rendering of the typed phantom lesions of :mod:`synthlesion.data.phantom_lesion_types`.

It holds the smooth random field behind a lesion's ragged border, texture, rim, core and halo
(a cubic B-spline through white noise on a lattice of lesion-local mm), the painting of the
placed lesions and their halos into the image (:func:`paint_typed_lesions`, with the texture of
each type), and their mass effect on the anatomy around them (:func:`mass_effect_coords`).

Mass effect (:func:`mass_effect_coords`) re-renders the anatomy near the lesions with its
coordinates pulled radially towards each lesion centre (so the anatomy appears pushed away):
the displacement is ``mass * R`` at the lesion rim (``R`` its equivalent radius; a few mm for
large lesions), decays as ``R / r`` and is tapered to zero between ``2 R`` and ``3 R``. The
map stays one-to-one, and the organ label and the image come from the same re-rendered
anatomy.

Parts thinner than a voxel (rims, calcification specks) are painted over a voxel's width at
their share of it, so that on coarse grids each part keeps its weight in the lesion's mean.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from synthlesion.data.phantom_anatomy import Coords, bbox, crop

if TYPE_CHECKING:
    from synthlesion.data.phantom_lesion_types import TypedLesion

logger = logging.getLogger(__name__)

_MASS_REACH = 3.0  # mass-effect displacement is zero beyond this many lesion radii
_HALO_REACH = 2.5  # halo painted out to this many halo widths
_BORDER_CLIP = (-2.0, 1.2)  # ragged border noise range (sd units)


class _Noise:
    """Smooth random field of sd ~1 over lesion-local mm: a cubic B-spline with white-noise
    coefficients on a lattice of spacing ``grain_mm`` (per axis, so it can be anisotropic)
    covering ``[-half_extent, half_extent]`` mm on every axis."""

    def __init__(
        self, rng: np.random.Generator, half_extent: float, grain_mm: Any, stretch: float = 1.0
    ) -> None:
        self.inv = (1.0 / np.broadcast_to(np.asarray(grain_mm, float), 3)).tolist()
        n = [int(math.ceil(2 * half_extent * k)) + 4 for k in self.inv]
        # the B-spline weights of a point have squared sum ~0.48 per axis, so sd ~0.33 in 3D
        self.coef = rng.standard_normal(n, dtype=np.float32) * np.float32(3.0)
        self.offset = [(m - 1) / 2 for m in n]
        self.stretch = stretch  # > 1: sampled radially compressed (streaks along rays)
        self.reference = half_extent

    def __call__(self, local: Coords, r: np.ndarray | None = None) -> np.ndarray:
        shape = np.broadcast_shapes(*(c.shape for c in local))
        pts = local
        if self.stretch != 1.0 and r is not None:
            # keep the direction, shrink the radius: radial streaks, finger-like projections
            a = 0.35 * self.reference
            scale = (a + r / self.stretch) / np.maximum(r, 1e-3)
            pts = tuple(c * scale for c in local)  # type: ignore[assignment]
        idx = np.stack(
            [
                np.broadcast_to(
                    pts[i] * np.float32(self.inv[i]) + np.float32(self.offset[i]), shape
                )
                for i in range(3)
            ]
        ).reshape(3, -1)
        out = ndimage.map_coordinates(self.coef, idx, order=3, prefilter=False, mode="nearest")
        return out.reshape(shape)


# --- mass effect ------------------------------------------------------------------------------


def _push_profile(t: np.ndarray) -> np.ndarray:
    """Displacement over ``mass * R`` at ``t = r / R``: linear inside, ``1 / t`` outside,
    tapered to zero between 2 and 3 radii (decreasing, so the map stays one-to-one)."""
    taper = 0.5 * (1 + np.cos(np.pi * np.clip(t - 2.0, 0.0, 1.0)))
    return np.where(t < 1, t, taper / np.maximum(t, 1.0))


def mass_effect_coords(
    p: Coords, specs: list[TypedLesion], time_point: int, shape: tuple[int, ...]
) -> tuple[tuple[slice, ...], Coords] | None:
    """Anatomy coordinates pushed away from the lesions, on the box where they moved.

    A grid point at distance ``r`` from a lesion centre shows the anatomy found at
    ``r - mass * R * profile(r / R)`` (``R`` the lesion's equivalent radius in mm, grown to the
    time point): tissue appears pushed outward by ``mass * R`` mm at the rim, by ``mass * R**2
    / r`` further out, tapered to nothing between ``2 R`` and ``3 R``.

    Returns:
        ``(box, coordinates)``: the slices of the grid to re-render and the displaced mm
        coordinates there (full arrays), or None when no lesion pushes.
    """
    pushers = [s for s in specs if s.mass > 0]
    if not pushers:
        return None
    near = np.zeros(shape, bool)
    for s in pushers:
        reach = _MASS_REACH * s.radius * s.growth[time_point]
        r2 = sum((p[i] - np.float32(s.centre[i])) ** 2 for i in range(3))
        near |= np.broadcast_to(r2 < reach**2, shape)
    if not near.any():
        return None
    box = bbox(near, pad=1)
    sub_shape = tuple(b.stop - b.start for b in box)
    base = [np.broadcast_to(c, sub_shape) for c in crop(p, box)]
    q = [c.astype(np.float32, copy=True) for c in base]
    for s in pushers:
        big_r = s.radius * s.growth[time_point]
        d = [base[i] - np.float32(s.centre[i]) for i in range(3)]
        r = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2)
        shift = np.float32(s.mass * big_r) * _push_profile(r / np.float32(big_r))
        ratio = (shift / np.maximum(r, np.float32(1e-3))).astype(np.float32)
        for i in range(3):
            q[i] -= ratio * d[i]
    return box, tuple(q)  # type: ignore[return-value]


# --- painting ---------------------------------------------------------------------------------


def _largest_component(mask: np.ndarray) -> np.ndarray:
    components, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(sizes.argmax())


def _texture(spec: TypedLesion, local: Coords, r: np.ndarray) -> np.ndarray:
    """Texture of the lesion body (contrast units) by type."""
    kind = spec.type.texture
    n = spec.texture(local, r)
    amp = np.float32(spec.texture_amp)
    if kind == "fibrous":  # bright strands along the rays (ridges of radial noise), mottled
        ridge = np.exp(-((n / np.float32(0.45)) ** 2))
        return amp * (ridge - np.float32(0.35) + np.float32(0.3) * n)
    if kind == "granular":  # mottling with a skewed (dark-tailed) intensity distribution
        return amp * (0.55 * n - 0.25 * (np.maximum(-n, 0) ** 2)).astype(np.float32)
    if kind == "mosaic" and spec.seeds is not None and spec.seed_values is not None:
        d2 = np.stack([sum((local[i] - c[i]) ** 2 for i in range(3)) for c in spec.seeds])
        part = np.partition(d2, 1, axis=0)[:2] if len(spec.seeds) > 1 else np.stack([d2[0]] * 2)
        cell = np.asarray(spec.seed_values, np.float32)[d2.argmin(axis=0)]
        gap = np.sqrt(part[1]) - np.sqrt(part[0])
        septum = np.clip(1.2 - gap, 0.0, 1.0) * np.float32(spec.septum)
        return cell + septum + np.float32(0.25) * amp * n
    return amp * n


def _paint_one(
    img: np.ndarray,
    region: np.ndarray,
    allowed: np.ndarray,
    p: Coords,
    spec: TypedLesion,
    time_point: int,
    level: float,
    kind: str,
    spacing: tuple[float, ...],
) -> np.ndarray:
    """Paint one lesion (and its halo) into ``img``; return its crisp mask (full grid)."""
    g = spec.growth[time_point]
    shape = img.shape
    reach = spec.extent * g + spec.edge_mm + 2 * max(spacing[: img.ndim])
    if spec.halo:
        reach += _HALO_REACH * spec.halo_mm
    sl = bbox(region, pad=1)
    r2 = sum((c - np.float32(spec.centre[i])) ** 2 for i, c in enumerate(crop(p, sl)))
    near = np.broadcast_to(r2 < reach**2, tuple(s.stop - s.start for s in sl))
    mask = np.zeros(shape, bool)
    if not near.any():
        return mask
    inner = bbox(near, pad=1)
    box = tuple(slice(a.start + b.start, a.start + b.stop) for a, b in zip(sl, inner, strict=True))
    bshape = tuple(b.stop - b.start for b in box)
    q = crop(p, box)
    m = spec.rotation
    d = [q[i] - np.float32(spec.centre[i]) for i in range(3)]
    inv_g = np.float32(1.0 / g)
    local = tuple(
        np.broadcast_to((m[0][j] * d[0] + m[1][j] * d[1] + m[2][j] * d[2]) * inv_g, bshape)
        for j in range(3)
    )
    r = np.sqrt(local[0] ** 2 + local[1] ** 2 + local[2] ** 2)
    rho = np.sqrt(sum((local[j] * np.float32(1.0 / spec.radii[j])) ** 2 for j in range(3)))
    rho = rho * (1 + spec.deform(local))
    if spec.lobes is not None:
        unit = tuple(c / np.maximum(r, np.float32(1e-3)) for c in local)
        rho = rho / (1 + spec.lobes(unit))  # type: ignore[arg-type]
    rho_r = rho
    if spec.border is not None:
        fb = np.clip(spec.border(local, r), *_BORDER_CLIP)
        rho_r = rho - np.float32(spec.border_amp) * fb * np.clip((rho - 0.55) / 0.35, 0.0, 1.0)
    r_surf = np.where(rho > 0.05, r / np.maximum(rho, np.float32(0.05)), np.float32(spec.radius))
    d_in = (1 - rho_r) * r_surf * np.float32(g)  # mm inside the border (< 0 outside)
    reg = region[box]
    lesion = (d_in > 0) & (r < spec.extent) & allowed[box]
    lesion = _largest_component(lesion) if lesion.any() else lesion
    lesion = ndimage.binary_fill_holes(lesion) & allowed[box]
    if lesion.sum() < int(((d_in > 0) & (r < spec.extent)).sum()):
        logger.debug("%s lesion trimmed to one component inside the organ", spec.name)
    near_lesion = ndimage.binary_dilation(lesion, iterations=2)
    w = np.clip(d_in / np.float32(spec.edge_mm) + 0.5, 0.0, 1.0) * near_lesion
    w = np.where(lesion, np.maximum(w, 0.5), np.minimum(w, 0.5)) * reg  # >= 0.5: labelled
    tex = _texture(spec, local, r)
    value = np.float32(spec.body) + tex
    if spec.core is not None and spec.core_noise is not None:
        cn = spec.core_noise(local)
        radius = np.float32(spec.core_fraction) * (1 + np.float32(0.3) * cn)
        cw = np.clip((radius - rho) * r_surf * np.float32(g / 1.5) + 0.5, 0.0, 1.0)
        value = value + cw * (np.float32(spec.core) + 0.3 * tex - value)
    # structures thinner than a voxel are painted over a voxel's width at their share of it
    # (partial volume), so coarse grids keep each part's weight in the lesion's mean
    voxel = float(np.prod(spacing[: img.ndim])) ** (1 / img.ndim)
    if spec.rim_mm > 0 and spec.rim_noise is not None:
        width = np.float32(spec.rim_mm) * (1 + np.float32(0.35) * spec.rim_noise(local))
        band = np.maximum(width, np.float32(voxel))
        share = np.minimum(width / np.float32(voxel), 1)
        rw = np.clip((band - d_in) / np.float32(max(1.0, 0.5 * voxel)) + 0.5, 0.0, 1.0) * share
        value = value + rw * (np.float32(spec.rim) + 0.4 * tex - value)
    if spec.calcs is not None and spec.calc_mm is not None:
        for c, rc in zip(spec.calcs, spec.calc_mm, strict=True):
            reach = max(rc * g, 0.5 * voxel)
            share = (rc * g / reach) ** img.ndim  # keeps the speck's mass on coarse grids
            dist = np.sqrt(sum((local[i] - c[i]) ** 2 for i in range(3))) * np.float32(g)
            cw = np.clip((np.float32(reach) - dist) / np.float32(0.8) + 0.5, 0.0, 1.0)
            value = value + np.float32(share) * cw * (np.float32(spec.calc) - value)
    sub = img[box]
    if spec.halo and spec.halo_noise is not None:
        hn = np.clip(spec.halo_noise(local, r), -1.3, 1.3)
        width = np.float32(spec.halo_mm) * (1 + np.float32(0.55) * hn)
        # a band about ``width`` mm wide, then a soft fall-off
        hw = 0.5 * (1 - np.tanh((np.maximum(-d_in, 0) - width) / (0.35 * width))) * reg
        if kind == "mri":  # oedema spreads in white matter, much less in grey matter
            hw = hw * np.clip((np.float32(1.1 * level) - sub) / np.float32(0.08 * level), 0.3, 1)
        sub += np.float32(spec.halo) * hw * (1 - w)
    target = sub + value if spec.type.additive else np.float32(level) + value
    sub += w * (target - sub)
    mask[box] = lesion
    return mask


def paint_typed_lesions(
    img: np.ndarray,
    p: Coords,
    region: np.ndarray,
    level: float,
    specs: list[TypedLesion],
    time_point: int,
    kind: str,
    spacing: tuple[float, ...],
) -> list[np.ndarray]:
    """Paint typed lesions into ``img`` (soft edge, halo outside) and return their masks.

    Args:
        img: Anatomy image (float32, HU or a.u.), painted in place.
        p: Anatomy mm coordinates of the grid.
        region: Where lesions lie (organ, or brain without ventricles); halos stay inside it.
        level: Organ level (HU) or white-matter signal (a.u.).
        specs: The lesions from :func:`place_typed_lesions`.
        time_point: Which growth factor to use.
        kind: ``"ct"`` or ``"mri"``.
        spacing: Voxel spacing in mm.

    Returns:
        One crisp boolean mask per lesion, inside the eroded region, one connected component.
    """
    allowed = ndimage.binary_erosion(region, border_value=0)
    return [
        _paint_one(img, region, allowed, p, spec, time_point, level, kind, spacing)
        for spec in specs
    ]
