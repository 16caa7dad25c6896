"""Anatomy of the procedural phantom: smooth random fields, implicit shapes, the CT abdomen
and the MRI brain.

Everything is evaluated on millimetre coordinate grids ``(x, y, z)`` (a 2D slice is a grid
whose z coordinate is one plane), so one code path makes 3D volumes and 2D slices. Lesions,
cases and the dataset writer live in :mod:`synthlesion.data.phantom`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.spatial.transform import Rotation

Coords = tuple[np.ndarray, np.ndarray, np.ndarray]

MRI_SCALE = 400.0  # white matter signal, arbitrary units


# --- smooth random fields and implicit shapes ---------------------------------------------


class Field:
    """A smooth scalar field over 3D mm coordinates: a sum of random cosines.

    ``amplitude`` bounds ``|value|``; wavelengths are in mm; ``z_scale`` < 1 makes the field
    vary more slowly along z.
    """

    def __init__(
        self,
        rng: np.random.Generator,
        n: int,
        wavelength_mm: tuple[float, float],
        amplitude: float,
        z_scale: float = 1.0,
    ) -> None:
        directions = rng.normal(size=(n, 3))
        directions[:, 2] *= z_scale
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        k = 2 * np.pi / rng.uniform(*wavelength_mm, size=n)
        weights = rng.uniform(0.5, 1.0, size=n)
        self.w = (directions * k[:, None]).tolist()
        self.phase = rng.uniform(0, 2 * np.pi, size=n).tolist()
        self.amp = (amplitude * weights / weights.sum()).tolist()

    def __call__(self, p: Coords, centre: Any = (0.0, 0.0, 0.0)) -> np.ndarray:
        return self.value_and_slope(p, centre, slope=False)[0]

    def value_and_slope(
        self, p: Coords, centre: Any = (0.0, 0.0, 0.0), slope: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Field value and, if asked, the norm of its gradient (per mm)."""
        d = [p[i] - float(centre[i]) for i in range(3)]
        value: Any = 0.0
        grad: list[Any] = [0.0, 0.0, 0.0]
        for (w0, w1, w2), phase, amp in zip(self.w, self.phase, self.amp, strict=True):
            arg = w0 * d[0] + w1 * d[1] + w2 * d[2] + phase
            value = value + amp * np.cos(arg)
            if slope:
                s = amp * np.sin(arg)
                grad = [grad[0] - w0 * s, grad[1] - w1 * s, grad[2] - w2 * s]
        norm = np.sqrt(grad[0] ** 2 + grad[1] ** 2 + grad[2] ** 2) if slope else None
        return value, norm


def blob(
    p: Coords,
    centre: Any,
    radii: Any,
    rotation: Any = None,
    field: Field | None = None,
) -> np.ndarray:
    """Normalised radius of a (rotated, deformed) ellipsoid: < 1 inside.

    ``rotation`` holds the ellipsoid's axes as columns; an infinite radius makes a cylinder.
    The deformation scales the radius by ``1 + field``, so the extent is at most
    ``radius / (1 - field amplitude)``.
    """
    d = [p[i] - float(centre[i]) for i in range(3)]
    if rotation is not None:
        m = rotation
        d = [m[0][j] * d[0] + m[1][j] * d[1] + m[2][j] * d[2] for j in range(3)]
    total: Any = 0.0
    for dj, r in zip(d, radii, strict=True):
        if math.isfinite(r):
            total = total + (dj * (1.0 / float(r))) ** 2
    rho = np.sqrt(total)
    if field is not None:
        rho = rho * (1.0 + field(p, centre))
    return rho


def _tube_sdf(p: Coords, segments: list[tuple[np.ndarray, np.ndarray, float, float]]) -> Any:
    """Signed distance (mm, < 0 inside) to a union of tapered capsules ``(a, b, ra, rb)``."""
    sdf: Any = np.inf
    for a, b, ra, rb in segments:
        d = (b - a).tolist()
        inv = 1.0 / (d[0] ** 2 + d[1] ** 2 + d[2] ** 2)
        rel = [p[i] - float(a[i]) for i in range(3)]
        t = np.clip((rel[0] * d[0] + rel[1] * d[1] + rel[2] * d[2]) * inv, 0.0, 1.0)
        dist = np.sqrt(sum((rel[i] - t * d[i]) ** 2 for i in range(3)))
        sdf = np.minimum(sdf, dist - (ra + t * (rb - ra)))
    return sdf


def _vessel_tree(
    rng: np.random.Generator,
    root: np.ndarray,
    direction: np.ndarray,
    radius: float,
    inside: Callable[[np.ndarray], bool],
    depth: int,
    out: list[tuple[np.ndarray, np.ndarray, float, float]],
) -> None:
    """Grow a curved, branching tube tree from ``root`` while it stays ``inside``."""
    point, heading = np.asarray(root, float), np.asarray(direction, float)
    for _ in range(3):
        heading = heading + rng.normal(scale=0.3, size=3)
        heading /= np.linalg.norm(heading)
        nxt = point + heading * rng.uniform(8, 15)
        out.append((point, nxt, radius, radius * 0.92))
        point, radius = nxt, radius * 0.92
        if not inside(point):
            return
    if depth > 0 and radius > 1.2:
        perp = np.cross(heading, rng.normal(size=3))
        perp /= np.linalg.norm(perp)
        for sign in (-1.0, 1.0):
            child = heading + sign * perp * rng.uniform(0.5, 1.0)
            _vessel_tree(
                rng, point, child / np.linalg.norm(child), radius * 0.78, inside, depth - 1, out
            )


def crop(p: Coords, sl: tuple[slice, ...]) -> Coords:
    """The coordinates of a sub-block (each array may be broadcast along some axes)."""
    return tuple(  # type: ignore[return-value]
        c[tuple(s if c.shape[i] > 1 else slice(None) for i, s in enumerate(sl))] for c in p
    )


def bbox(mask: np.ndarray, pad: int = 1) -> tuple[slice, ...]:
    """Slices of the box around ``mask``'s true voxels, grown by ``pad`` (empty mask: 0 size)."""
    out = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return tuple(slice(0, 0) for _ in range(mask.ndim))
        out.append(slice(max(0, hit[0] - pad), min(mask.shape[axis], hit[-1] + pad + 1)))
    return tuple(out)


def random_rotation(
    rng: np.random.Generator, degrees: tuple[float, float, float]
) -> list[list[float]]:
    """A random rotation matrix with angles drawn ~N(0, degrees) about x, y, z."""
    vec = np.radians(rng.normal(scale=degrees))
    return Rotation.from_rotvec(vec).as_matrix().tolist()


def _rotation_z(degrees: float) -> list[list[float]]:
    return Rotation.from_euler("z", degrees, degrees=True).as_matrix().tolist()


# --- CT abdomen -------------------------------------------------------------------------------


def ct_anatomy(rng: np.random.Generator) -> dict[str, Any]:
    u = rng.uniform
    a, b = u(125, 152), u(100, 120)
    b_post = b * u(0.86, 0.94)
    yv = -b_post + u(60, 68)  # vertebral body centre (y, mm)
    zl = u(25, 50)  # liver centre (z, mm)
    an: dict[str, Any] = dict(
        a=a,
        b=b,
        b_post=b_post,
        yv=yv,
        zl=zl,
        body_field=Field(rng, 5, (90, 260), 0.05, z_scale=0.2),
        fat=u(10, 30),
        fat_field=Field(rng, 4, (60, 200), 0.6, z_scale=0.3),
        muscle=u(7, 12),
        tex=Field(rng, 6, (15, 60), 1.0),
        dome=zl + u(70, 90),
        disc_phase=u(0, 36),
        liver_hu=u(55, 70),
        vessel_hu=u(150, 195),
        aorta_hu=u(150, 200),
        liver_field=Field(rng, 6, (40, 140), u(4, 8)),
        liver_right=((u(60, 75), u(0, 10), zl), (u(70, 85), u(80, 95), u(80, 95))),
        liver_left=((u(-25, -5), u(35, 50), zl + u(10, 30)), (u(45, 65), u(28, 40), u(35, 50))),
        liver_rot=random_rotation(rng, (4, 4, 6)),
        liver_shape=Field(rng, 5, (60, 180), 0.1),
        spleen=((u(-95, -80), u(-40, -25), zl + u(0, 25)), (u(22, 30), u(45, 60), u(45, 55))),
        spleen_rot=random_rotation(rng, (5, 5, 30)),
        stomach=((u(-65, -45), u(20, 45), zl + u(15, 35)), (u(35, 50), u(30, 42), u(40, 55))),
        stomach_air=u(0, 20),
        stomach_fluid=u(5, 30),
        kidneys=[
            ((s * u(62, 72), yv + u(2, 10), zl + dz), (u(22, 27), u(18, 22), u(45, 55)))
            for s, dz in ((1, u(-110, -90)), (-1, u(-95, -75)))
        ],
        gallbladder=(
            ((u(30, 50), u(25, 45), zl - u(40, 55)), (u(12, 16), u(20, 30), u(14, 20)))
            if rng.random() < 0.75
            else None
        ),
        bowel=[
            (
                (u(-115, 90), u(-45, 85), u(-190, zl + 20)),
                (u(11, 20), u(11, 20), u(15, 45)),
                random_rotation(rng, (40, 40, 40)),
                rng.random() < 0.3,
                u(15, 40),
            )
            for _ in range(30)
        ],
        colon_gas=u(-10, 10),
    )
    return an


def ct_render(p: Coords, an: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, float]:
    """CT abdomen in HU (float32, before blur and noise), the liver mask and the liver HU."""
    x, y, z = p
    shape = np.broadcast_shapes(*(c.shape for c in p))
    b_y = np.where(y < 0, an["b_post"], an["b"])
    rho_body = np.sqrt((x / an["a"]) ** 2 + (y / b_y) ** 2) * (1 + an["body_field"](p))
    depth = (1 - rho_body) * math.sqrt(an["a"] * an["b"])  # mm under the skin (approximate)
    wall_out = 2.5 + an["fat"] * (1 + an["fat_field"](p))
    wall_in = wall_out + an["muscle"]
    tex = an["tex"](p)
    img = np.full(shape, -1000.0, np.float32)
    img[depth > 0] = 35.0
    img = np.where(depth > 2.5, -100.0 + 8 * tex, img)
    img = np.where(depth > wall_out, 45.0 + 4 * tex, img)
    cavity = depth > wall_in
    img = np.where(cavity, -95.0 + 10 * tex, img)
    yv = an["yv"]
    dome = an["dome"] - 0.005 * (np.abs(x) - 70) ** 2 - 0.004 * (y - yv - 75) ** 2
    heart = blob(p, (-15, yv + 80, an["dome"] + 15), (65, 50, 60)) < 1
    img = np.where(cavity & (z > dome), np.where(heart, 40.0, -850.0 + 40 * tex), img)
    below = cavity & (z < dome - 5)

    def paint(mask: np.ndarray, value: Any) -> None:
        np.copyto(img, np.asarray(value, np.float32), where=mask)

    for centre, radii, rot, gas, hu in an["bowel"]:  # bowel loops: wall, then content
        rho = blob(p, centre, radii, rot)
        paint(below & (rho < 1), 40.0)
        paint(below & (rho < 0.75), -950.0 if gas else hu)
    for side, cy, top in ((1, 0.0, an["zl"] - 55), (-1, -10.0, an["zl"] - 15)):  # colon
        rho = blob(p, (side * 88, cy, 0), (20, 20, np.inf))
        col = below & (z < top) & (rho < 1)
        paint(col, 40.0)
        paint(col & (rho < 0.8), np.where(y > cy + an["colon_gas"], -950.0, 20.0 + 15 * tex))
    sc, sr = an["stomach"]
    rho = blob(p, sc, sr)
    paint(below & (rho < 1), 40.0)
    paint(
        below & (rho < 0.88),
        np.where(y > sc[1] + an["stomach_air"], -980.0, an["stomach_fluid"] + 8 * tex),
    )
    paint(below & (blob(p, *an["spleen"], an["spleen_rot"]) < 1), 48.0 + 3 * tex)
    reserved = np.zeros(shape, bool)
    for i, (kc, kr) in enumerate(an["kidneys"]):
        rho = blob(p, kc, kr)
        kidney = cavity & (rho < 1)
        paint(kidney, 155.0 + 6 * tex)
        hilum = (kc[0] - np.sign(kc[0]) * 12, kc[1] + 6, kc[2])
        paint(kidney & (blob(p, hilum, (9, 9, kr[2] * 0.5)) < 1), -60.0)
        if i == 0:
            reserved |= kidney
    for sx in (1, -1):  # psoas (below the kidneys' top) and paraspinal muscles
        psoas = cavity & (z < an["zl"] - 50) & (blob(p, (sx * 38, yv + 4, 0), (14, 14, np.inf)) < 1)
        para = (depth > wall_out) & (blob(p, (sx * 32, yv - 38, 0), (22, 19, np.inf)) < 1)
        paint(psoas | para, 50.0 + 4 * tex)
        reserved |= psoas | para
    aorta = blob(p, (-15, yv + 30, 0), (11, 11, np.inf)) < 1
    ivc = blob(p, (22, yv + 34, 0), (13, 10, np.inf)) < 1
    paint(aorta, an["aorta_hu"])
    paint(ivc, an["vessel_hu"] - 20)
    # spine: vertebral body (cortex + cancellous, discs every 36 mm), canal, arch, processes
    rho_vb = blob(p, (0, yv, 0), (20, 16, np.inf))
    disc = np.mod(z - an["disc_phase"], 36.0) < 8.0
    paint(rho_vb < 1, np.where(disc, 90.0, np.where(rho_vb > 0.82, 750.0, 230.0 + 30 * tex)))
    rho_canal = blob(p, (0, yv - 27, 0), (9, 9, np.inf))
    flat = (x, y, np.zeros((1,) * x.ndim, np.float32))
    processes = [(np.array([0, yv - 34, 0]), np.array([0, yv - 58, 0]), 3.5, 2.5)] + [
        (np.array([s * 9, yv - 20, 0]), np.array([s * 36, yv - 28, 0]), 4.0, 3.0) for s in (1, -1)
    ]
    arch = (rho_canal < 1.6) | ((_tube_sdf(flat, processes) < 0) & ~disc)
    paint(arch & (depth > wall_out), 600.0)
    rib_band = (depth > wall_out + 1) & (depth < wall_in + 3) & (z > an["zl"] - 70)
    angle = np.abs(np.arctan2(x, yv - y))  # 0 behind the spine, pi in front
    ribs = np.cos(2 * np.pi * (z + 45 * angle + 8 * tex) / 32) > 0.6
    rib_band &= (angle > 0.5) & (angle < 2.6)
    paint(rib_band & ribs, 550.0 + 60 * tex)
    paint(rho_canal < 1, 20.0)
    reserved |= aorta | ivc | (rho_vb < 1.1) | arch | (rho_canal < 1.6)
    if an["gallbladder"] is not None:
        gb = blob(p, *an["gallbladder"], an["liver_rot"]) < 1
        paint(gb & below, 8.0)
        reserved |= gb
    rho_r = blob(p, *an["liver_right"], an["liver_rot"], an["liver_shape"])
    rho_l = blob(p, *an["liver_left"], an["liver_rot"], an["liver_shape"])
    liver = (np.minimum(rho_r, rho_l) < 1) & cavity & (z < dome - 6) & ~reserved
    paint(liver, an["liver_hu"] + an["liver_field"](p))
    if liver.any():  # intrahepatic vessels, painted softly inside the liver only
        sl = bbox(liver, pad=1)
        sdf = _tube_sdf(crop(p, sl), an["vessels"])
        w = np.clip(0.5 - sdf / 2.0, 0.0, 1.0) * liver[sl]
        img[sl] += w * (an["vessel_hu"] - img[sl])
    return img, liver, an["liver_hu"]


def ct_vessels(rng: np.random.Generator, an: dict[str, Any]) -> None:
    """Draw the portal and hepatic vein trees inside the liver (adds ``an["vessels"]``)."""

    def inside(q: np.ndarray) -> bool:
        pts = tuple(np.float32(v) for v in q)
        r = min(
            float(blob(pts, *an["liver_right"], an["liver_rot"])),
            float(blob(pts, *an["liver_left"], an["liver_rot"])),
        )
        return r < 0.85 and q[2] < an["dome"] - 15

    segs: list[tuple[np.ndarray, np.ndarray, float, float]] = []
    (rx, ry, rz), _ = an["liver_right"]
    hilum = np.array([rx - 35, ry - 5, rz - 15])
    for d in ((1, 0.1, 0.3), (-1, 0.6, 0.2), (0.3, 0.2, -0.6)):
        _vessel_tree(
            rng, hilum, np.array(d) / np.linalg.norm(d), rng.uniform(4.5, 6.0), inside, 3, segs
        )
    top = np.array([22.0, an["yv"] + 34, an["dome"] - 25])
    for d in ((1, 0.3, -0.3), (0.1, 1, -0.3), (-1, 0.7, -0.2)):
        _vessel_tree(
            rng, top, np.array(d) / np.linalg.norm(d), rng.uniform(3.5, 5.0), inside, 2, segs
        )
    an["vessels"] = segs


# --- MRI brain (FLAIR-like contrast) ------------------------------------------------------


def mri_anatomy(rng: np.random.Generator) -> dict[str, Any]:
    u = rng.uniform
    c = (u(-2, 2), u(-6, 2), u(-4, 4))
    zv = c[2] + u(6, 12)
    return dict(
        c=c,
        r=(u(62, 69), u(77, 84), u(56, 63)),
        shape=Field(rng, 5, (70, 180), 0.04),
        skull=u(5, 7.5),
        scalp=u(4, 7),
        rim=u(1.5, 2.5),
        gm=u(2.5, 3.5),
        sulci=Field(rng, 14, (14, 30), 1.0),
        sulcus_w=u(0.7, 1.0),
        sulcus_depth=u(10, 15),
        fissure_depth=u(28, 38),
        vent=[
            (
                (s * u(8, 11), c[1] + u(-4, 4), zv),
                (u(6, 9), u(24, 30), u(8, 11)),
                _rotation_z(s * u(8, 16)),
            )
            for s in (1, -1)
        ],
        vent_bend=u(0.004, 0.008),
        vent_shape=Field(rng, 4, (25, 60), 0.15),
        deep=[
            ((s * u(10, 14), c[1] - u(8, 14), zv - u(12, 16)), (u(8, 11), u(12, 16), u(8, 10)))
            for s in (1, -1)
        ]
        + [
            ((s * u(18, 24), c[1] + u(6, 12), zv - u(8, 12)), (u(6, 8), u(12, 16), u(9, 12)))
            for s in (1, -1)
        ],
        wm=MRI_SCALE * u(0.9, 1.1),
        gm_ratio=u(1.12, 1.25),
        csf=u(0.08, 0.15),
        scalp_ratio=u(1.2, 1.7),
        tex=Field(rng, 6, (12, 50), 1.0),
        bias=Field(rng, 3, (200, 400), u(0.15, 0.3)),
    )


def mri_render(p: Coords, an: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """FLAIR-like head (float32, before bias and noise), brain mask, lesion region, WM value."""
    x, y, z = p
    shape = np.broadcast_shapes(*(c.shape for c in p))
    wm = an["wm"]
    depth = (1 - blob(p, an["c"], an["r"], field=an["shape"])) * float(np.prod(an["r"])) ** (1 / 3)
    tex = np.broadcast_to(an["tex"](p), shape)
    img = np.zeros(shape, np.float32)
    outer = -(an["skull"] + an["scalp"])
    img[depth > outer] = an["scalp_ratio"] * wm
    skull = depth > -an["skull"]
    img[skull] = 0.06 * wm
    img[skull & (np.abs(depth + an["skull"] / 2) < an["skull"] / 5)] = 0.35 * wm  # diploe
    img[depth > 0] = an["csf"] * wm
    g, slope = an["sulci"].value_and_slope(p)
    d_sulcus = np.abs(g) / np.maximum(slope, 1e-3)
    d_fissure = np.abs(x - an["c"][0])
    w, t = an["sulcus_w"], an["gm"]
    csf = (depth < an["rim"]) | ((d_sulcus < w) & (depth < an["sulcus_depth"]))
    csf |= (d_fissure < w) & (depth < an["fissure_depth"])
    brain = (depth > 0) & ~csf
    gm = (depth < an["rim"] + t) | ((d_sulcus < w + t) & (depth < an["sulcus_depth"] + t))
    gm |= (d_fissure < w + t) & (depth < an["fissure_depth"] + t)
    img[brain] = wm * (1 + 0.03 * tex[brain])
    img[brain & gm] = an["gm_ratio"] * wm
    for centre, radii in an["deep"]:
        img[brain & (blob(p, centre, radii) < 1)] = (an["gm_ratio"] - 0.06) * wm
    vent = np.zeros(shape, bool)
    for centre, radii, rot in an["vent"]:  # lateral ventricles, bent down at both ends
        bent = (x, y, z + an["vent_bend"] * (y - centre[1]) ** 2)
        vent |= blob(bent, centre, radii, rot, an["vent_shape"]) < 1
    vent &= brain
    img[vent] = an["csf"] * wm
    lesion_region = brain & ~vent
    return img, brain, lesion_region, wm
