"""Typed lesions of the embedded phantom: appearances a few summary numbers cannot copy.

The first phantom painted every lesion as a smoothly deformed ellipsoid with one added contrast
and a smooth texture, which a hand-made baseline (ellipsoid + mean contrast) reproduces almost
exactly. The types below give each lesion structure that a generator has to learn from the
images: a heterogeneous interior (necrotic core, enhancing rim or capsule, mosaic nodules,
calcification specks), an irregular border (angular lobes, a ragged noise-thresholded edge with
finger-like projections), a halo of changed intensity *outside* the labelled mask, mass effect
on the neighbouring anatomy, and a texture of its own (spatial frequency and intensity
distribution, not only a mean).

CT (liver; contrasts in HU relative to the liver, whose level is 55-70 HU; noise sd 10-14 HU):

================  ====  =========  ==========================================================
type              freq  radius mm  look (what it is for)
================  ====  =========  ==========================================================
``cyst``          0.30  6-24       water density (-62..-45), homogeneous, smooth texture,
                                   round, sharp edge (0.3-0.6 mm); mild mass effect. The easy
                                   type: a mean-contrast ellipsoid is nearly right here.
``metastasis``    0.35  8-28       "target": hypodense body (-70..-48) with granular mottling
                                   (grain 4-7 mm, dark-tailed), a rim brighter than the body
                                   (2.5-4.5 mm but at most 0.2 of the radius; 10-35 % of the
                                   body contrast above the liver),
                                   darker necrotic core (-85..-68) in 60 %, lobulated border,
                                   hypodense halo outside the mask (-20..-12, a 4-8 mm band).
``hcc``           0.20  14-32      mosaic of 5-12 nodules (Voronoi cells, spread 16-26 HU)
                                   with thin septa around a hypodense (-60..-44) or, in 40 %,
                                   hyperdense (+40..+60) body; thin capsule (1.8-3 mm, at most
                                   0.15 of the radius, between body and liver); irregular
                                   necrotic core (-55..-38) in 60 %; in 40 %, 1-4
                                   calcification specks (+150..+400, radius 2-3.5 mm; together
                                   at most ~1 % of the volume); the strongest mass effect.
``infiltrative``  0.15  12-26      subtle (-44..-30) and added to the anatomy, so vessels run
                                   through it; fibrous radial strands with mottling (24-34
                                   HU); ragged border with finger-like projections (noise
                                   thresholded); no mass effect.
================  ====  =========  ==========================================================

MRI (brain, FLAIR-like; contrasts as fractions of the white-matter signal, noise sd 2.5-4.5 %):

================  ====  =========  ==========================================================
type              freq  radius mm  look (what it is for)
================  ====  =========  ==========================================================
``glioma``        0.30  9-24       bright rim of irregular thickness (+0.35..+0.5, 2-5 mm)
                                   around a granular body (+0.18..+0.3) and, in 85 %, a
                                   darker necrotic core (-0.2..0); lobulated, ragged border;
                                   oedema halo outside the mask (+0.12..+0.2, 6-14 mm,
                                   finger-like, mostly in white matter); mass effect (pushes
                                   the ventricles).
``metastasis``    0.30  3.5-11     small, round, ring-like (rim +0.4..+0.55, 2-3.5 mm; centre
                                   -0.1..+0.1 in 70 %), with a large halo (8-18 mm) for its
                                   size; slight mass effect.
``ms_plaque``     0.40  2.5-8      small homogeneous ovoid (+0.25..+0.45, minor axes 0.4-0.65
                                   of the major), long axis pointing away from the brain's
                                   centre (like Dawson's fingers); no halo, no mass effect.
================  ====  =========  ==========================================================

The frequencies are per lesion (:func:`draw_lesion_type`); radii are the largest semi-axis at
the first time point, drawn log-uniformly (more small lesions than large), and never below two
in-plane voxels. The mask covers the lesion (core, rim and body) but never the halo.

Every shape and texture is a function of lesion-local millimetre coordinates (smooth random
fields: sums of cosines, or cubic B-splines through white noise on a lattice), so 2D slices and
3D volumes show the same lesion, a follow-up scan re-samples it after motion, and growth scales
it. All randomness is drawn from the patient's generator when a lesion is placed, so equal
arguments give equal images.

The smooth random fields behind the border, texture, rim, core and halo, the painting of the
placed lesions (:func:`paint_typed_lesions`) and their mass effect on the anatomy
(:func:`mass_effect_coords`) are in :mod:`synthlesion.data.phantom_lesion_render` (both
functions are also importable from here). This module holds the type table, the placed lesion
(:class:`TypedLesion`) with its drawn look, and the placement: lesions are placed before the
mass effect, fully inside the organ less about half its push, so a large lesion near the
surface bulges the organ's contour.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from synthlesion.data.phantom_anatomy import Coords, Field, random_rotation
from synthlesion.data.phantom_lesion_render import _BORDER_CLIP, _HALO_REACH, _Noise

logger = logging.getLogger(__name__)

Range = tuple[float, float]
_NONE: Range = (0.0, 0.0)


@dataclass(frozen=True)
class LesionType:
    """One row of the type table: ranges that each lesion of the type draws from.

    Contrasts are in HU relative to the liver level (CT) or in fractions of the white-matter
    signal (MRI); lengths in mm; amplitudes of shape terms are fractions of the radius.

    Attributes:
        name: Type name, stored as the lesion's ``type``.
        frequency: Share of lesions of this type within its modality.
        radius_mm: Largest semi-axis (drawn log-uniformly).
        elongation: The other semi-axes over the largest.
        deform: Amplitude of the smooth shape deformation.
        lobes: Amplitude of the angular lobes (lobulated border); ``lobe_count`` lobes around.
        ragged: Amplitude of the noise-thresholded border; ``ragged_mm`` its grain, ``fingers``
            its radial stretch (> 1 gives finger-like projections).
        edge_mm: Width of the soft image edge (the mask is crisp).
        body: Contrast of the lesion body; with probability ``hyper_p`` it is drawn from
            ``hyper_body`` instead (e.g. arterial-phase hyperdense HCC).
        texture: ``smooth``, ``granular``, ``mosaic`` or ``fibrous``.
        texture_amp: Texture amplitude (contrast units), ``texture_mm`` its grain.
        rim: Contrast of the enhancing rim or capsule, ``rim_mm`` its width (0: none; at most
            ``rim_fraction`` of the largest radius, so small lesions are mostly body); with
            ``rim_of_body`` a fraction of the body contrast instead (a CT rim brighter than a
            hypodense body yet near the liver, so the lesion's mean stays hypodense).
        core_p: Probability of a necrotic core of contrast ``core`` and relative radius
            ``core_fraction``.
        calc_p: Probability of ``calc_count`` calcification specks of contrast ``calc`` and
            radius ``calc_mm``.
        halo: Intensity change of the perilesional halo (outside the mask), ``halo_mm`` its
            width (a band, then a soft fall-off; 0: none).
        mass: Mass-effect displacement at the rim as a fraction of the radius.
        additive: Add the lesion to the anatomy instead of replacing it (vessels stay).
        radial_axis: Point the largest semi-axis away from the organ's centre.
    """

    name: str
    frequency: float
    radius_mm: Range
    elongation: Range = (0.7, 1.0)
    deform: float = 0.05
    lobes: Range = _NONE
    lobe_count: Range = (2.0, 4.0)
    ragged: Range = _NONE
    ragged_mm: Range = (4.0, 7.0)
    fingers: float = 1.0
    edge_mm: Range = (0.6, 1.2)
    body: Range = _NONE
    hyper_p: float = 0.0
    hyper_body: Range = _NONE
    texture: str = "smooth"
    texture_amp: Range = _NONE
    texture_mm: Range = (8.0, 14.0)
    rim: Range = _NONE
    rim_mm: Range = _NONE
    rim_fraction: float = 0.35
    rim_of_body: bool = False
    core_p: float = 0.0
    core: Range = _NONE
    core_fraction: Range = (0.3, 0.5)
    calc_p: float = 0.0
    calc_count: tuple[int, int] = (1, 4)
    calc: Range = _NONE
    calc_mm: Range = (2.0, 3.5)
    halo: Range = _NONE
    halo_mm: Range = _NONE
    mass: Range = _NONE
    additive: bool = False
    radial_axis: bool = False


LESION_TYPES: dict[str, tuple[LesionType, ...]] = {
    "ct": (
        LesionType(
            "cyst",
            0.30,
            radius_mm=(6.0, 24.0),
            elongation=(0.8, 1.0),
            deform=0.03,
            edge_mm=(0.3, 0.6),
            body=(-62.0, -45.0),
            texture="smooth",
            texture_amp=(1.0, 2.5),
            texture_mm=(12.0, 20.0),
            mass=(0.1, 0.18),
        ),
        LesionType(
            "metastasis",
            0.35,
            radius_mm=(8.0, 28.0),
            elongation=(0.7, 1.0),
            deform=0.05,
            lobes=(0.08, 0.2),
            lobe_count=(2.0, 5.0),
            ragged=(0.02, 0.06),
            edge_mm=(0.8, 1.5),
            body=(-70.0, -48.0),
            texture="granular",
            texture_amp=(8.0, 14.0),
            texture_mm=(4.0, 7.0),
            rim=(-0.35, -0.1),
            rim_mm=(2.5, 4.5),
            rim_fraction=0.2,
            rim_of_body=True,
            core_p=0.6,
            core=(-85.0, -68.0),
            core_fraction=(0.3, 0.55),
            calc_p=0.05,
            calc=(150.0, 300.0),
            halo=(-20.0, -12.0),
            halo_mm=(4.0, 8.0),
            mass=(0.06, 0.12),
        ),
        LesionType(
            "hcc",
            0.20,
            radius_mm=(14.0, 32.0),
            elongation=(0.75, 1.0),
            deform=0.05,
            lobes=(0.03, 0.1),
            lobe_count=(2.0, 4.0),
            edge_mm=(0.8, 1.5),
            body=(-60.0, -44.0),
            hyper_p=0.4,
            hyper_body=(40.0, 60.0),
            texture="mosaic",
            texture_amp=(16.0, 26.0),
            texture_mm=(6.0, 12.0),
            rim=(0.0, 0.4),
            rim_mm=(1.8, 3.0),
            rim_fraction=0.15,
            rim_of_body=True,
            core_p=0.6,
            core=(-55.0, -38.0),
            core_fraction=(0.2, 0.45),
            calc_p=0.4,
            calc_count=(1, 4),
            calc=(150.0, 400.0),
            calc_mm=(2.0, 3.5),
            mass=(0.12, 0.22),
        ),
        LesionType(
            "infiltrative",
            0.15,
            radius_mm=(12.0, 26.0),
            elongation=(0.6, 1.0),
            deform=0.06,
            lobes=(0.05, 0.1),
            lobe_count=(2.0, 5.0),
            ragged=(0.18, 0.28),
            ragged_mm=(4.0, 7.0),
            fingers=3.5,
            edge_mm=(1.0, 2.0),
            body=(-44.0, -30.0),
            texture="fibrous",
            texture_amp=(24.0, 34.0),
            texture_mm=(3.5, 6.0),
            additive=True,
        ),
    ),
    "mri": (
        LesionType(
            "glioma",
            0.30,
            radius_mm=(9.0, 24.0),
            elongation=(0.65, 1.0),
            deform=0.08,
            lobes=(0.06, 0.14),
            lobe_count=(2.0, 4.0),
            ragged=(0.14, 0.24),
            ragged_mm=(3.0, 6.0),
            fingers=2.0,
            edge_mm=(0.8, 1.5),
            body=(0.18, 0.3),
            texture="granular",
            texture_amp=(0.06, 0.1),
            texture_mm=(2.5, 4.5),
            rim=(0.35, 0.5),
            rim_mm=(2.0, 5.0),
            core_p=0.85,
            core=(-0.2, 0.0),
            core_fraction=(0.35, 0.6),
            halo=(0.12, 0.2),
            halo_mm=(6.0, 14.0),
            mass=(0.12, 0.22),
        ),
        LesionType(
            "metastasis",
            0.30,
            radius_mm=(3.5, 11.0),
            elongation=(0.8, 1.0),
            deform=0.04,
            lobes=(0.0, 0.05),
            edge_mm=(0.5, 1.0),
            body=(0.2, 0.3),
            texture="smooth",
            texture_amp=(0.02, 0.04),
            texture_mm=(6.0, 10.0),
            rim=(0.4, 0.55),
            rim_mm=(2.0, 3.5),
            core_p=0.7,
            core=(-0.1, 0.1),
            core_fraction=(0.35, 0.55),
            halo=(0.12, 0.2),
            halo_mm=(8.0, 18.0),
            mass=(0.06, 0.12),
        ),
        LesionType(
            "ms_plaque",
            0.40,
            radius_mm=(2.5, 8.0),
            elongation=(0.4, 0.65),
            deform=0.05,
            edge_mm=(0.6, 1.2),
            body=(0.25, 0.45),
            texture="smooth",
            texture_amp=(0.01, 0.03),
            texture_mm=(6.0, 10.0),
            radial_axis=True,
        ),
    ),
}


def draw_lesion_type(rng: np.random.Generator, kind: str) -> LesionType:
    """One lesion type of modality ``kind`` (``"ct"`` or ``"mri"``), drawn by frequency."""
    types = LESION_TYPES[kind]
    cumulative = np.cumsum([t.frequency for t in types])
    index = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    return types[min(index, len(types) - 1)]


@dataclass(frozen=True)
class TypedLesion:
    """A placed lesion: its geometry, drawn look and the random fields behind its texture.

    Lengths are mm at the first time point (``growth`` scales them); contrasts are in image
    units (HU or a.u.), already multiplied by the white-matter signal for MRI.
    """

    type: LesionType
    kind: str  # "ct" or "mri"
    centre: tuple[float, float, float]  # anatomy mm
    radii: tuple[float, float, float]
    rotation: list[list[float]]
    growth: tuple[float, ...]
    extent: float  # bound of the mask's distance from the centre
    edge_mm: float
    body: float
    deform: Field
    lobes: Field | None
    border: _Noise | None
    border_amp: float
    texture: _Noise
    texture_amp: float
    rim: float = 0.0
    rim_mm: float = 0.0
    rim_noise: _Noise | None = None
    core: float | None = None
    core_fraction: float = 0.0
    core_noise: _Noise | None = None
    seeds: np.ndarray | None = None  # mosaic cell centres (local mm), shape (K, 3)
    seed_values: np.ndarray | None = None  # contrast of each cell
    septum: float = 0.0
    calcs: np.ndarray | None = None  # speck centres (local mm), shape (n, 3)
    calc_mm: np.ndarray | None = None
    calc: float = 0.0
    halo: float = 0.0
    halo_mm: float = 0.0
    halo_noise: _Noise | None = None
    mass: float = 0.0

    @property
    def name(self) -> str:
        return self.type.name

    @property
    def radius(self) -> float:
        """Equivalent (geometric mean) radius in mm at the first time point."""
        return float(np.prod(self.radii)) ** (1 / 3)

    @property
    def appearance(self) -> str:
        """Coarse look in the old vocabulary: hypo-/hyperdense (CT), hyperintense/necrotic."""
        if self.kind == "mri":
            return "necrotic" if self.core is not None else "hyperintense"
        return "hyperdense" if self.body > 0 else "hypodense"


def _axis_frame(rng: np.random.Generator, axis: np.ndarray) -> list[list[float]]:
    """A rotation whose first column is ``axis`` (unit), the others random about it."""
    a = axis / max(float(np.linalg.norm(axis)), 1e-9)
    helper = rng.normal(size=3)
    b = helper - a * float(helper @ a)
    b /= max(float(np.linalg.norm(b)), 1e-9)
    return np.stack([a, b, np.cross(a, b)], axis=1).tolist()


def _extent_factor(t: LesionType, lobe_amp: float, ragged: float) -> float:
    """Largest mask distance from the centre over the largest semi-axis."""
    return (1 + _BORDER_CLIP[1] * ragged) * (1 + lobe_amp) / (1 - t.deform)


def _draw_lesion(
    rng: np.random.Generator,
    t: LesionType,
    kind: str,
    level: float,
    *,
    centre: np.ndarray,
    radii: np.ndarray,
    rotation: list[list[float]],
    growth: tuple[float, ...],
    extent: float,
    lobe_amp: float,
    ragged: float,
    mass: float,
) -> TypedLesion:
    """Draw the look of one placed lesion (contrasts, fields, cells, specks).

    ``lobe_amp``, ``ragged`` and ``mass`` were drawn before placement (they set the room the
    lesion needs); ``extent`` (mm) bounds its mask; ``level`` is the organ level or the
    white-matter signal that MRI contrasts are fractions of.
    """
    u = rng.uniform
    unit = level if kind == "mri" else 1.0
    r_max = float(radii.max())
    reach = extent + (_HALO_REACH * t.halo_mm[1] if t.halo_mm[1] else 0.0) + 4.0
    lobes = None
    if lobe_amp > 0:
        lo, hi = t.lobe_count
        lobes = Field(rng, 3, (2 * np.pi / hi, 2 * np.pi / lo), lobe_amp)
    border = _Noise(rng, extent, u(*t.ragged_mm), t.fingers) if ragged > 0 else None
    grain = u(*t.texture_mm)
    stretch = 4.0 if t.texture == "fibrous" else 1.0
    look: dict[str, Any] = {
        "type": t,
        "kind": kind,
        "centre": tuple(float(v) for v in centre),
        "radii": tuple(float(v) for v in radii),
        "rotation": rotation,
        "growth": growth,
        "extent": extent,
        "edge_mm": u(*t.edge_mm),
        "body": u(*(t.hyper_body if rng.random() < t.hyper_p else t.body)) * unit,
        "deform": Field(rng, 4, (1.5 * r_max, 4 * r_max), t.deform),
        "lobes": lobes,
        "border": border,
        "border_amp": ragged,
        "texture": _Noise(rng, extent, grain, stretch),
        "texture_amp": u(*t.texture_amp) * unit,
        "mass": mass,
    }
    if t.rim_mm[1] > 0:
        look["rim"] = u(*t.rim) * (look["body"] if t.rim_of_body else unit)
        look["rim_mm"] = min(u(*t.rim_mm), t.rim_fraction * r_max)
        look["rim_noise"] = _Noise(rng, extent, max(3.0, 0.4 * r_max))
    if t.core_p > 0 and rng.random() < t.core_p:
        look["core"] = u(*t.core) * unit
        look["core_fraction"] = u(*t.core_fraction)
        look["core_noise"] = _Noise(rng, extent, max(3.0, 0.35 * r_max))
    if t.texture == "mosaic":
        k = int(rng.integers(5, 13))
        direction = rng.normal(size=(k, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        depth = rng.uniform(0, 1, size=(k, 1)) ** (1 / 3)
        look["seeds"] = (direction * depth * radii * 1.1).astype(np.float32)
        cells = rng.uniform(-1, 1, size=k)
        look["seed_values"] = (cells - cells.mean()) * look["texture_amp"]
        look["septum"] = u(-0.5, 0.5) * look["texture_amp"]
    if t.calc_p > 0 and rng.random() < t.calc_p:
        n = int(rng.integers(t.calc_count[0], t.calc_count[1] + 1))
        direction = rng.normal(size=(n, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        depth = rng.uniform(0.1, 0.7, size=(n, 1))
        size = rng.uniform(*t.calc_mm, size=n)
        # specks: together at most ~1 % of the lesion's volume (one at least)
        keep = max(1, int(np.searchsorted(np.cumsum(size**3), 0.012 * float(np.prod(radii)))))
        look["calcs"] = (direction * depth * radii).astype(np.float32)[:keep]
        look["calc_mm"] = size[:keep]
        look["calc"] = u(*t.calc) * unit
    if t.halo_mm[1] > 0:
        look["halo"] = u(*t.halo) * unit
        look["halo_mm"] = u(*t.halo_mm)
        look["halo_noise"] = _Noise(rng, reach, u(5.0, 9.0), 2.0)
    return TypedLesion(**look)


def _apart(a: np.ndarray, b: np.ndarray, reach: float, voxel: np.ndarray) -> bool:
    """Whether two lesions ``reach`` mm in extent together leave a voxel (along the line
    between their centres) and 2 mm between their masks, so the masks never touch."""
    d = a - b
    dist = float(np.linalg.norm(d))
    return dist > reach + 2.0 + float(np.abs(d / max(dist, 1e-9)) @ voxel)


def place_typed_lesions(
    rng: np.random.Generator,
    kind: str,
    count: int,
    region: np.ndarray,
    p: Coords,
    spacing: tuple[float, ...],
    level: float,
    n_time_points: int,
) -> list[TypedLesion]:
    """Place ``count`` typed lesions inside ``region``, fully inside and never touching.

    Args:
        rng: The patient's generator (every draw comes from it).
        kind: ``"ct"`` or ``"mri"``.
        count: Lesions wanted; fewer are placed where the organ has no room.
        region: Boolean mask where lesions may lie (liver; brain without ventricles).
        p: Anatomy mm coordinates of the grid.
        spacing: Voxel spacing in mm (the first ``region.ndim`` values are used).
        level: Organ level (liver HU) or white-matter signal (MRI, a.u.).
        n_time_points: Scans of the patient; each later one grows or shrinks every lesion.

    Returns:
        The placed lesions.
    """
    ndim = region.ndim
    sp = spacing[:ndim]
    edt = ndimage.distance_transform_edt(np.pad(region, 1), sampling=sp)[(slice(1, -1),) * ndim]
    # an in-plane voxel (+1 mm) between lesion and organ border; the thick CT slices would
    # leave no room in coarse volumes, and the mask is kept inside the eroded organ anyway
    clearance = max(sp[:2]) + 1.0
    voxel = np.array([*sp, 0.0, 0.0][:3])  # 2D: no voxel edge along z
    growth = [1.0] + [float(np.exp(rng.uniform(-0.3, 0.3))) for _ in range(n_time_points - 1)]
    g_max = max(growth)
    shape = region.shape
    organ_centre = np.array([float(np.broadcast_to(c, shape)[region].mean()) for c in p])
    specs: list[TypedLesion] = []
    placed: list[tuple[np.ndarray, float]] = []
    for _ in range(count):
        t = draw_lesion_type(rng, kind)
        lo = max(t.radius_mm[0], 2.0 * sp[0])
        hi = max(t.radius_mm[1], 1.5 * lo)
        lobe_amp, ragged, mass = (
            rng.uniform(*t.lobes),
            rng.uniform(*t.ragged),
            rng.uniform(*t.mass),
        )
        factor = _extent_factor(t, lobe_amp, ragged)
        for attempt in range(40):
            r_max = math.exp(rng.uniform(math.log(lo), math.log(hi))) * (0.97**attempt)
            radii = r_max * rng.uniform(*t.elongation, size=3)
            radii = np.maximum(radii, min(r_max, 1.2 * sp[0]))
            radii[0 if t.radial_axis else int(rng.integers(3))] = r_max
            extent = r_max * factor
            # mass effect pushes the organ border outward by about half the rim displacement
            push = 0.5 * mass * float(np.prod(radii)) ** (1 / 3)
            candidates = np.flatnonzero(edt >= (extent - push) * g_max + clearance)
            if candidates.size == 0:
                continue
            idx = np.unravel_index(candidates[rng.integers(candidates.size)], shape)
            centre = np.array([float(np.broadcast_to(c, shape)[idx]) for c in p])
            centre[2] += (3 - ndim) * rng.uniform(-0.2, 0.2) * radii.min()  # 2D: near the plane
            if all(_apart(centre, c, (extent + e) * g_max, voxel) for c, e in placed):
                break
        else:
            logger.debug("no room for another %s lesion after %d placed", t.name, len(specs))
            break
        if t.radial_axis:
            axis = centre - organ_centre
            axis[2] *= 0.5
            rotation = _axis_frame(rng, axis if np.linalg.norm(axis) > 1 else rng.normal(size=3))
        else:
            rotation = random_rotation(rng, (60, 60, 60))
        placed.append((centre, extent))
        specs.append(
            _draw_lesion(
                rng,
                t,
                kind,
                level,
                centre=centre,
                radii=radii,
                rotation=rotation,
                growth=tuple(growth),
                extent=extent,
                lobe_amp=lobe_amp,
                ragged=ragged,
                mass=mass,
            )
        )
    return specs
