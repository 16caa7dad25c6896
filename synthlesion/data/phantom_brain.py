"""A multi-sequence brain-tumour MRI phantom in the style of the public BraTS datasets.

Each scan has four co-registered, skull-stripped sequences (FLAIR, T1, T1c, T2) on one grid in
LPS orientation, a separate brain mask and a glioma label map with the BraTS 2023/2024 labels

* 1 ``NETC``: non-enhancing tumour core (necrosis, or the whole core of a non-enhancing glioma);
* 2 ``SNFH``: surrounding non-enhancing FLAIR hyperintensity (oedema, post-operative change);
* 3 ``ET``: enhancing tumour (the bright rim in T1c);
* 4 ``RC``: resection cavity (CSF-like fluid where the core was removed).

There is no organ label. Healthy scans have an all-zero label map and say so nowhere else.

The head anatomy and its CSF / grey matter / white matter layout come from
:mod:`synthlesion.data.phantom_anatomy` (:func:`mri_anatomy`, :func:`mri_render`), rendered
with each sequence's tissue contrast (relative to white matter): FLAIR (CSF dark, GM > WM),
T1 (WM > GM > CSF), T1c (T1's tissue), T2 (CSF brightest, GM > WM). The glioma is three
nested, smoothly deformed ellipsoids (:func:`blob` with :class:`Field` deformations): oedema
(bright in FLAIR and T2, dim in T1) around a core that enhances in T1c around a necrotic
centre (dark in T1/T1c, bright in T2); 75 % ring-enhancing, 10 % solid enhancing (no
necrosis), 15 % non-enhancing (the whole core is NETC). Oedema stays in grey and white matter;
the core and cavity efface sulci but not the ventricles; the label map is one connected
component. The whole tumour is drawn as 3-13 % of the intracranial volume (tens of cm^3,
e.g. 50-160 cm^3), in millimetres, so it spans the same share of the brain at every grid
size (its rim is at least 1.2 voxels thick on coarse grids). A follow-up scan
(time point ``001``) is either progression (the tumour grows) or post-operative (the core is
replaced by a resection cavity with patchy residual enhancement, the oedema shrinks); some
single scans are post-operative too. Every sequence gets its own bias field and Rician noise
(:func:`synthlesion.data.phantom._finish`), then is skull-stripped and z-scored.

Stored values:

* images: float32, z-scored per sequence over the brain-mask voxels (mean 0, sd 1 there);
  every voxel outside the brain mask is exactly ``0.0`` (:data:`BACKGROUND`), a constant that
  lies inside the brain's value range rather than below it, as in BraTS-derived data;
* labels: float32 holding the whole numbers 0-4 (as many BraTS derivatives store them);
* brain masks: uint8 0/1, the intracranial volume (parenchyma, ventricles and sulcal CSF);
* affine: ``diag(-s, -s, s)`` (axis codes ``L, P, S``), grid centre at world (0, 0, 0).

:func:`make_brain_multiseq_dataset` writes an nnU-Net v2 / Decathlon folder with
``imagesTr/{case}_000{0..3}.nii.gz``, ``labelsTr/{case}.nii.gz`` and
``brainmasks/{case}.nii.gz``; equal arguments give byte-identical files.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from synthlesion import __version__
from synthlesion.data.io import save_image
from synthlesion.data.phantom import (
    _finish,
    _pose,
    existing_phantom_files,
    phantom_entry_files,
    write_dataset_json,
)
from synthlesion.data.phantom_anatomy import (
    Coords,
    Field,
    bbox,
    blob,
    crop,
    mri_anatomy,
    mri_render,
    random_rotation,
)
from synthlesion.data.volume import Volume
from synthlesion.errors import ConfigError

logger = logging.getLogger(__name__)

KIND = "brain-mri-multi"
CHANNELS: tuple[str, ...] = ("FLAIR", "T1", "T1c", "T2")
NETC, SNFH, ET, RC = 1, 2, 3, 4
LABELS: dict[str, int] = {"background": 0, "NETC": NETC, "SNFH": SNFH, "ET": ET, "RC": RC}
BACKGROUND = 0.0  # stored value of every voxel outside the brain mask, in every sequence
FULL_SHAPE: tuple[int, int, int] = (240, 240, 155)  # BraTS grid at 1 mm
FOV_MM: tuple[float, float, float] = (240.0, 240.0, 155.0)
MIN_SIZE = 24
MAX_SIZE = 512
MAX_PATIENTS = 10000
DEFAULT_FOLLOWUP_FRACTION = 0.4
_KIND_CODE = 3  # keeps the random streams apart from the CT (1) and MRI (2) phantoms
_TUMOUR_SHARE = (0.03, 0.13)  # whole tumour / intracranial volume
_CASE_PREFIX = "BraTS-PH"


# --- geometry -----------------------------------------------------------------------------


def brain_multiseq_geometry(
    size: int = 64, *, full_size: bool = False
) -> tuple[tuple[int, int, int], float]:
    """Array shape ``(X, Y, Z)`` and isotropic voxel spacing (mm) of the phantom's grid.

    The field of view is BraTS's 240 x 240 x 155 mm: ``size`` voxels in-plane at
    ``240 / size`` mm, ``round(size * 155 / 240)`` slices. ``full_size`` gives the BraTS grid
    itself, 240 x 240 x 155 at 1 mm (``size`` is then ignored).

    Raises:
        ConfigError: ``size`` is not an integer in [24, 512].
    """
    if full_size:
        return FULL_SHAPE, 1.0
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ConfigError(
            f"phantom {KIND}: size must be an integer in [{MIN_SIZE}, {MAX_SIZE}], got {size!r}"
        )
    spacing = FOV_MM[0] / size
    return (size, size, max(4, round(size * FOV_MM[2] / FOV_MM[0]))), spacing


def brain_multiseq_affine(shape: tuple[int, int, int], spacing: float) -> np.ndarray:
    """4x4 voxel-to-world (RAS+ mm) matrix in LPS orientation: ``diag(-s, -s, s)``, with the
    centre of the grid at world (0, 0, 0)."""
    affine = np.diag([-spacing, -spacing, spacing, 1.0])
    affine[:3, 3] = [(shape[0] - 1) / 2 * spacing, (shape[1] - 1) / 2 * spacing, 0.0]
    affine[2, 3] = -(shape[2] - 1) / 2 * spacing
    return np.round(affine, 4) + 0.0  # + 0.0 turns -0.0 into 0.0


def _world_grid(shape: tuple[int, int, int], spacing: float) -> Coords:
    """World (RAS mm) coordinates of the voxel centres, each array broadcast along the other
    axes (x falls and y falls with the index, z rises: LPS)."""
    out = []
    for axis, sign in enumerate((-1.0, -1.0, 1.0)):
        n = shape[axis]
        v = sign * (np.arange(n, dtype=np.float32) - np.float32((n - 1) / 2)) * np.float32(spacing)
        out.append(v.reshape([n if a == axis else 1 for a in range(3)]))
    return tuple(out)  # type: ignore[return-value]


# --- tissue and tumour contrasts ----------------------------------------------------------


def _sequence_looks(rng: np.random.Generator) -> dict[str, dict[str, float]]:
    """Signal of each tissue and tumour compartment per sequence, relative to white matter.

    ``gm``, ``csf`` and ``scalp`` feed :func:`mri_render`; ``edema`` (SNFH), ``et``, ``nec``
    (necrosis), ``netc`` (solid non-enhancing core) and ``cavity`` (RC) are painted over it.
    """
    u = rng.uniform
    t1_gm, t1_csf = u(0.72, 0.82), u(0.2, 0.3)
    t1_edema, t1_netc, nec = u(0.72, 0.85), u(0.6, 0.72), u(0.38, 0.5)
    flair_csf, t2_csf = u(0.08, 0.15), u(2.6, 3.2)
    return {
        "FLAIR": {
            "gm": u(1.12, 1.25),
            "csf": flair_csf,
            "scalp": u(1.2, 1.7),
            "edema": u(1.6, 2.0),
            "et": u(1.35, 1.65),
            "nec": u(0.9, 1.4),
            "netc": u(1.3, 1.6),
            "cavity": flair_csf * u(1.0, 2.0),
        },
        "T1": {
            "gm": t1_gm,
            "csf": t1_csf,
            "scalp": u(1.3, 1.6),
            "edema": t1_edema,
            "et": u(0.68, 0.8),
            "nec": nec,
            "netc": t1_netc,
            "cavity": t1_csf * u(1.0, 1.3),
        },
        "T1c": {  # the tissue of T1, plus gadolinium in the enhancing tumour
            "gm": t1_gm,
            "csf": t1_csf,
            "scalp": u(1.3, 1.6),
            "edema": t1_edema * u(1.0, 1.05),
            "et": u(1.45, 1.85),
            "nec": nec * u(0.95, 1.1),
            "netc": t1_netc * u(1.0, 1.08),
            "cavity": t1_csf * u(1.0, 1.3),
        },
        "T2": {
            "gm": u(1.3, 1.5),
            "csf": t2_csf,
            "scalp": u(1.0, 1.4),
            "edema": u(1.9, 2.3),
            "et": u(1.4, 1.7),
            "nec": u(2.0, 2.6),
            "netc": u(1.7, 2.0),
            "cavity": t2_csf * u(0.9, 1.0),
        },
    }


@dataclass(frozen=True)
class _Tumour:
    """One glioma in anatomy millimetres (the coordinates of the first scan)."""

    centre: tuple[float, float, float]
    radii: tuple[float, float, float]  # whole tumour (oedema) semi-axes, mm
    rotation: list[list[float]]
    core_centre: tuple[float, float, float]
    core_ratio: float  # core radii / whole-tumour radii
    nec_centre: tuple[float, float, float]
    nec_ratio: float  # necrosis radii / core radii
    variant: str  # "ring" (necrotic core), "solid" (no necrosis), "non-enhancing"
    edema_shape: Field
    core_shape: Field
    nec_shape: Field
    cavity_shape: Field
    cavity_ratio: float  # cavity radii / core radii (first scan)
    residual: Field  # > 0 where residual enhancement survives around a cavity
    texture: Field
    growth_core: tuple[float, ...]  # radius factor per time point
    growth_edema: tuple[float, ...]
    post_op: tuple[bool, ...]  # per time point
    scale: float = 1.0  # calibrates the whole-tumour volume (set once at the first scan)

    @property
    def extent(self) -> float:
        """Largest distance (mm) of any tumour voxel from ``centre``, growth included."""
        g = max(max(self.growth_core), max(self.growth_edema), 1.0)
        return max(self.radii) * self.scale * g / (1 - 0.3) + 2.0


def _draw_tumour(
    rng: np.random.Generator,
    p: Coords,
    placeable: np.ndarray,
    icv_mm3: float,
    midline_x: float,
    spacing: float,
    n_time_points: int,
    post_op: tuple[bool, ...],
) -> _Tumour | None:
    """Draw a glioma whose core fits into ``placeable`` (intracranial, ventricles excluded)."""
    u = rng.uniform
    share = u(*_TUMOUR_SHARE)
    r_eq = (3 * share * icv_mm3 / (4 * math.pi)) ** (1 / 3)
    axes = rng.uniform(0.75, 1.25, size=3)
    axes /= np.prod(axes) ** (1 / 3)
    radii = r_eq * axes
    core_ratio = u(0.45, 0.7)
    variant = str(rng.choice(["ring", "solid", "non-enhancing"], p=[0.75, 0.1, 0.15]))
    core_r = core_ratio * float(radii.max())
    rim = max(u(3.0, 7.0), 1.2 * spacing)
    nec_ratio = float(np.clip(1 - rim / (core_ratio * float(radii.min())), 0.25, 0.75))
    edt = ndimage.distance_transform_edt(np.pad(placeable, 1), sampling=spacing)
    edt = edt[1:-1, 1:-1, 1:-1]
    x = np.broadcast_to(p[0], placeable.shape)
    edt = np.where(np.abs(x - midline_x) >= 0.4 * core_r, edt, 0.0)  # one hemisphere
    room = float(edt.max())
    if room <= 0:
        logger.debug("no room for a tumour at all")
        return None
    need = min(0.85 * core_r + spacing, 0.7 * room)  # a large core may press on the border
    candidates = np.flatnonzero(edt >= need)
    idx = np.unravel_index(candidates[rng.integers(candidates.size)], placeable.shape)
    centre = np.array([float(np.broadcast_to(c, placeable.shape)[idx]) for c in p])
    core_centre = centre + rng.normal(0, 0.1 * core_r, size=3)
    nec_centre = core_centre + rng.normal(0, 0.08 * core_r, size=3)
    growth_core, growth_edema = [1.0], [1.0]
    for tp in range(1, n_time_points):
        if post_op[tp] and not post_op[tp - 1]:
            growth_core.append(growth_core[-1] * u(0.98, 1.12))
            growth_edema.append(growth_edema[-1] * u(0.65, 0.9))
        else:
            g = float(np.exp(u(-0.05, 0.2)))
            growth_core.append(growth_core[-1] * g)
            growth_edema.append(growth_edema[-1] * g)
    return _Tumour(
        centre=tuple(centre.tolist()),  # type: ignore[arg-type]
        radii=tuple(radii.tolist()),  # type: ignore[arg-type]
        rotation=random_rotation(rng, (60, 60, 60)),
        core_centre=tuple(core_centre.tolist()),  # type: ignore[arg-type]
        core_ratio=core_ratio,
        nec_centre=tuple(nec_centre.tolist()),  # type: ignore[arg-type]
        nec_ratio=nec_ratio,
        variant=variant,
        edema_shape=Field(rng, 9, (0.4 * r_eq, 1.5 * r_eq), 0.3),
        core_shape=Field(rng, 6, (0.5 * core_r, 2.0 * core_r), 0.2),
        nec_shape=Field(rng, 6, (0.4 * core_r, 1.5 * core_r), 0.25),
        cavity_shape=Field(rng, 4, (1.0 * core_r, 3.0 * core_r), 0.12),
        cavity_ratio=u(0.72, 0.9),
        residual=Field(rng, 5, (10, 30), 1.0),
        texture=Field(rng, 6, (4, 15), 1.0),
        growth_core=tuple(growth_core),
        growth_edema=tuple(growth_edema),
        post_op=post_op,
    )


def _scaled(radii: tuple[float, ...], factor: float) -> tuple[float, ...]:
    return tuple(r * factor for r in radii)


def _tumour_labels(
    t: _Tumour,
    tp: int,
    pc: Coords,
    parenchyma: np.ndarray,
    placeable: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Label map (uint8, values 0-4) and oedema strength (float32, 0-1) on a crop.

    ``parenchyma`` (grey + white matter) limits the oedema; ``placeable`` (intracranial
    without ventricles) limits the core and the cavity, which efface sulci.
    """
    shape = parenchyma.shape
    s = t.scale
    g_core, g_edema = t.growth_core[tp], t.growth_edema[tp]
    rho_wt = np.broadcast_to(
        blob(pc, t.centre, _scaled(t.radii, s * g_edema), t.rotation, t.edema_shape), shape
    )
    core_radii = _scaled(t.radii, s * t.core_ratio)
    rho_core = blob(pc, t.core_centre, _scaled(core_radii, g_core), t.rotation, t.core_shape)
    core = (np.broadcast_to(rho_core, shape) < 1) & placeable
    edema = (rho_wt < 1) & parenchyma
    label = np.zeros(shape, np.uint8)
    seeds = core.copy()
    if t.post_op[tp]:
        cav_radii = _scaled(core_radii, t.cavity_ratio)
        rho_cav = blob(pc, t.core_centre, cav_radii, t.rotation, t.cavity_shape)
        cavity = (np.broadcast_to(rho_cav, shape) < 1) & placeable
        rest = core & ~cavity
        residual = rest & (np.broadcast_to(t.residual(pc, t.core_centre), shape) > 0.2)
        label[edema | rest] = SNFH
        label[residual] = ET
        label[cavity] = RC
        seeds |= cavity
    else:
        label[edema] = SNFH
        if t.variant == "non-enhancing":
            label[core] = NETC
        else:
            label[core] = ET
            if t.variant == "ring":
                nec_radii = _scaled(core_radii, t.nec_ratio * g_core)
                rho_nec = blob(pc, t.nec_centre, nec_radii, t.rotation, t.nec_shape)
                nec = (np.broadcast_to(rho_nec, shape) < 1) & ndimage.binary_erosion(core)
                label[nec] = NETC
    # one connected glioma: keep the parts of the whole tumour that touch its core
    parts, n = ndimage.label(label > 0, structure=np.ones((3, 3, 3), bool))
    if n > 1:
        keep = np.unique(parts[seeds])
        label[~np.isin(parts, keep[keep > 0])] = 0
    strength = np.clip(0.55 + 1.5 * (1.0 - rho_wt), 0.55, 1.0).astype(np.float32)
    return label, strength


def _paint(
    img: np.ndarray,
    label: np.ndarray,
    strength: np.ndarray,
    tex: np.ndarray,
    look: dict[str, float],
    wm: float,
    netc: str = "nec",
) -> None:
    """Paint the tumour compartments of ``label`` into ``img`` (a crop, changed in place).

    ``netc`` names the look of label 1: ``"nec"`` (necrosis inside an enhancing rim) or
    ``"netc"`` (the solid core of a non-enhancing glioma).
    """
    edema = label == SNFH
    target = look["edema"] * wm * (1 + 0.05 * tex)
    img[edema] += strength[edema] * (target[edema] - img[edema])
    for value, key, amp in ((ET, "et", 0.08), (NETC, netc, 0.06), (RC, "cavity", 0.02)):
        m = label == value
        img[m] = (look[key] * wm * (1 + amp * tex))[m]


# --- cases --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BrainMultiseqCase:
    """One generated scan.

    Attributes:
        images: Sequence name -> float32 :class:`Volume` of shape ``(X, Y, Z)``, z-scored
            inside the brain mask, exactly :data:`BACKGROUND` outside; keys in
            :data:`CHANNELS` order.
        label: float32 label map (values 0-4, see :data:`LABELS`) on the same grid.
        brain_mask: uint8 0/1 intracranial mask (the skull stripping) on the same grid.
        post_operative: Whether the scan shows a resection cavity.
        label_volumes_mm3: Volume of each tumour label (by name) in mm^3.
    """

    case_id: str
    patient_id: str
    time_point: int
    images: dict[str, Volume]
    label: Volume
    brain_mask: Volume
    post_operative: bool = False
    label_volumes_mm3: dict[str, float] = field(default_factory=dict)


def _patient_ids(seed: int, n_patients: int) -> list[str]:
    """BraTS-like patient ids with gaps between the numbers (``BraTS-PH-00012``)."""
    rng = np.random.default_rng([seed, _KIND_CODE, 2])
    numbers = np.cumsum(rng.integers(1, 4, size=n_patients))
    return [f"{_CASE_PREFIX}-{int(n):05d}" for n in numbers]


def make_brain_multiseq_patient(
    patient_index: int = 0,
    *,
    n_time_points: int = 1,
    tumour: bool = True,
    size: int = 64,
    seed: int = 0,
    full_size: bool = False,
    patient_id: str | None = None,
) -> list[BrainMultiseqCase]:
    """Generate every scan of one patient in memory.

    Args:
        patient_index: Which patient; with ``seed`` it fixes anatomy, contrasts and tumour.
        n_time_points: Scans of this patient (ids ``{patient_id}-000``, ``-001``...).
        tumour: Whether the patient has a glioma; ``False`` gives all-zero label maps.
        size: In-plane voxels; see :func:`brain_multiseq_geometry`.
        seed: Dataset seed.
        full_size: The BraTS grid, 240 x 240 x 155 at 1 mm.
        patient_id: Id to use (default ``BraTS-PH-{patient_index + 1:05d}``).

    Returns:
        One :class:`BrainMultiseqCase` per time point.

    Raises:
        ConfigError: An argument is out of range.
    """
    shape, spacing = brain_multiseq_geometry(size, full_size=full_size)
    if isinstance(n_time_points, bool) or not isinstance(n_time_points, int) or n_time_points < 1:
        raise ConfigError(f"phantom {KIND}: n_time_points must be >= 1, got {n_time_points!r}")
    if isinstance(patient_index, bool) or not isinstance(patient_index, int) or patient_index < 0:
        raise ConfigError(f"phantom {KIND}: patient_index must be >= 0, got {patient_index!r}")
    patient_id = patient_id or f"{_CASE_PREFIX}-{patient_index + 1:05d}"
    root = np.random.SeedSequence([seed, _KIND_CODE, 0, patient_index])
    patient_seq, *scan_seqs = root.spawn(1 + n_time_points)
    rng = np.random.default_rng(patient_seq)
    an = mri_anatomy(rng)
    looks = _sequence_looks(rng)
    scale = {name: float(rng.uniform(0.6, 1.6)) for name in CHANNELS}
    shift = rng.normal(0, 3, size=3)
    if n_time_points > 1:
        post_op = (False,) + tuple([bool(rng.random() < 0.6)] * (n_time_points - 1))
    else:
        post_op = (bool(rng.random() < 0.25),)
    world = _world_grid(shape, spacing)
    affine = brain_multiseq_affine(shape, spacing)
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm")
    header.set_qform(affine, code=1)  # scanner coordinates, both forms
    header.set_sform(affine, code=1)
    voxel_mm3 = spacing**3
    spec: _Tumour | None = None
    cases = []
    for tp, seq in enumerate(scan_seqs):
        srng = np.random.default_rng(seq)
        if tp == 0:
            p = _pose(world, None, shift, None)
        else:
            moved = shift + srng.normal(0, 1.0, size=3)
            fields = [Field(srng, 3, (80, 220), 0.6) for _ in range(3)]
            p = _pose(world, random_rotation(srng, (1.0, 1.0, 2.0)), moved, fields)
        intracranial = np.broadcast_to(blob(p, an["c"], an["r"], field=an["shape"]) < 1, shape)
        base: dict[str, np.ndarray] = {}
        brain = region = np.zeros(shape, bool)
        for name in ("FLAIR", "T1", "T2"):
            look = looks[name]
            an_s = {**an, "gm_ratio": look["gm"], "csf": look["csf"], "scalp_ratio": look["scalp"]}
            base[name], brain, region, _ = mri_render(p, an_s)
        base["T1c"] = base["T1"].copy()
        ventricles = brain & ~region
        placeable = intracranial & ~ndimage.binary_dilation(ventricles)
        if tp == 0 and tumour:
            icv = float(intracranial.sum()) * voxel_mm3
            spec = _draw_tumour(rng, p, placeable, icv, an["c"][0], spacing, n_time_points, post_op)
        label = np.zeros(shape, np.uint8)
        if spec is not None:
            sl = bbox(_near(p, spec.centre, spec.extent, shape), pad=1)
            pc = crop(p, sl)
            lab, strength = _tumour_labels(spec, tp, pc, region[sl], placeable[sl])
            if tp == 0:  # calibrate the whole-tumour volume to the drawn share once
                wanted = 4 / 3 * math.pi * float(np.prod(spec.radii))
                got = max(float(np.count_nonzero(lab)) * voxel_mm3, 1.0)
                factor = float(np.clip((wanted / got) ** (1 / 3), 0.75, 1.4))
                spec = _replace_scale(spec, factor)
                sl = bbox(_near(p, spec.centre, spec.extent, shape), pad=1)
                pc = crop(p, sl)
                lab, strength = _tumour_labels(spec, tp, pc, region[sl], placeable[sl])
            label[sl] = lab
            tex = np.broadcast_to(spec.texture(pc, spec.centre), lab.shape).astype(np.float32)
            for name in CHANNELS:
                netc = "netc" if spec.variant == "non-enhancing" else "nec"
                _paint(base[name][sl], lab, strength, tex, looks[name], float(an["wm"]), netc)
        images = {}
        for name in CHANNELS:
            bias = Field(srng, 3, (200, 400), float(srng.uniform(0.1, 0.3)))
            an_s = {**an, "bias": bias, "wm": float(an["wm"]) * scale[name]}
            raw, _ = _finish(
                "mri", base[name] * np.float32(scale[name]), (spacing,) * 3, srng, an_s, p
            )
            images[name] = Volume(_zscore(raw, intracranial), affine.copy(), header.copy())
        volumes = {
            name: float(np.count_nonzero(label == value)) * voxel_mm3
            for name, value in LABELS.items()
            if value
        }
        cases.append(
            BrainMultiseqCase(
                case_id=f"{patient_id}-{tp:03d}",
                patient_id=patient_id,
                time_point=tp,
                images=images,
                label=Volume(label.astype(np.float32), affine.copy(), header.copy()),
                brain_mask=Volume(intracranial.astype(np.uint8), affine.copy(), header.copy()),
                post_operative=spec is not None and spec.post_op[tp],
                label_volumes_mm3=volumes,
            )
        )
    return cases


def _near(
    p: Coords, centre: tuple[float, ...], radius: float, shape: tuple[int, ...]
) -> np.ndarray:
    d2 = sum((p[i] - np.float32(centre[i])) ** 2 for i in range(3))
    return np.broadcast_to(d2 < np.float32(radius**2), shape)


def _replace_scale(t: _Tumour, factor: float) -> _Tumour:
    return replace(t, scale=t.scale * factor)


def _zscore(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """float32 image z-scored over ``mask`` (mean 0, sd 1 there), :data:`BACKGROUND` elsewhere."""
    values = image[mask].astype(np.float64)
    out = np.full(image.shape, BACKGROUND, np.float32)
    sd = float(values.std())
    out[mask] = ((values - values.mean()) / (sd if sd > 0 else 1.0)).astype(np.float32)
    return out


# --- dataset ------------------------------------------------------------------------------


def _plan(
    seed: int, n_patients: int, lesion_fraction: float, followup_fraction: float
) -> list[tuple[int, bool]]:
    """``(time points, has tumour)`` per patient: whole shares, drawn without global state."""
    rng = np.random.default_rng([seed, _KIND_CODE, 1])
    n_lesion = round(lesion_fraction * n_patients)
    if 0 < lesion_fraction < 1 and n_patients >= 2:
        n_lesion = min(max(n_lesion, 1), n_patients - 1)
    n_follow = round(followup_fraction * n_patients)
    if followup_fraction > 0:
        n_follow = max(n_follow, 1)
    with_lesion = set(rng.permutation(n_patients)[:n_lesion].tolist())
    with_followup = set(rng.permutation(n_patients)[:n_follow].tolist())
    return [(2 if i in with_followup else 1, i in with_lesion) for i in range(n_patients)]


def make_brain_multiseq_dataset(
    out_dir: str | Path,
    *,
    n_patients: int = 8,
    size: int = 64,
    seed: int = 0,
    lesion_fraction: float = 0.75,
    full_size: bool = False,
    overwrite: bool = False,
    followup_fraction: float = DEFAULT_FOLLOWUP_FRACTION,
) -> Path:
    """Write the multi-sequence brain-tumour phantom (nnU-Net v2 / Decathlon layout).

    Args:
        out_dir: Destination folder; gets ``dataset.json``, ``imagesTr/`` (four channels per
            case: 0 FLAIR, 1 T1, 2 T1c, 3 T2), ``labelsTr/`` and ``brainmasks/``.
        n_patients: Patients (1 to 10000).
        size: In-plane voxels at ``240 / size`` mm; see :func:`brain_multiseq_geometry`.
        seed: Equal arguments give byte-identical files.
        lesion_fraction: Share of patients with a glioma; the rest have all-zero label maps.
        full_size: The BraTS grid, 240 x 240 x 155 at 1 mm (``size`` is then ignored).
        overwrite: Replace a different dataset already in ``out_dir``.
        followup_fraction: Share of patients with a second time point (``-001``).

    Returns:
        The path of the written ``dataset.json``.

    Raises:
        PhantomOutputError: ``out_dir`` holds a different dataset.json and ``overwrite`` is off.
        ConfigError: An argument is out of range.
    """
    shape, spacing = brain_multiseq_geometry(size, full_size=full_size)
    if isinstance(n_patients, bool) or not isinstance(n_patients, int):
        raise ConfigError(f"phantom {KIND}: n_patients must be an integer, got {n_patients!r}")
    if not 1 <= n_patients <= MAX_PATIENTS:
        raise ConfigError(
            f"phantom {KIND}: n_patients must lie in [1, {MAX_PATIENTS}], got {n_patients}"
        )
    for name, value in (
        ("lesion_fraction", lesion_fraction),
        ("followup_fraction", followup_fraction),
    ):
        if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ConfigError(f"phantom {KIND}: {name} must lie in [0, 1], got {value!r}")
    out_dir = Path(out_dir)
    json_path = out_dir / "dataset.json"
    block: dict[str, Any] = {
        "generator": __name__,
        "version": __version__,
        "kind": KIND,
        "spatial_dims": 3,
        "seed": seed,
        "n_patients": n_patients,
        "size": shape[0],
        "full_size": bool(full_size),
        "shape": list(shape),
        "spacing_mm": [round(spacing, 4)] * 3,
        "orientation": "LPS",
        "lesion_fraction": lesion_fraction,
        "followup_fraction": followup_fraction,
        "intensity_unit": "z-score per sequence over the brain mask",
        "background_value": BACKGROUND,
        "image_dtype": "float32",
        "label_dtype": "float32",
        "brain_mask_dtype": "uint8",
        "lesion_labels": [NETC, SNFH, ET, RC],
        "organ_label": None,
        "tumour_share_of_intracranial_volume": list(_TUMOUR_SHARE),
    }
    old_files = existing_phantom_files(json_path, block, overwrite)
    plan = _plan(seed, n_patients, lesion_fraction, followup_fraction)
    ids = _patient_ids(seed, n_patients)
    training = []
    for index, (n_time_points, tumour) in enumerate(plan):
        for case in make_brain_multiseq_patient(
            index,
            n_time_points=n_time_points,
            tumour=tumour,
            size=shape[0],
            seed=seed,
            full_size=full_size,
            patient_id=ids[index],
        ):
            images = [f"./imagesTr/{case.case_id}_{c:04d}.nii.gz" for c in range(len(CHANNELS))]
            label = f"./labelsTr/{case.case_id}.nii.gz"
            mask = f"./brainmasks/{case.case_id}.nii.gz"
            for name, rel in zip(CHANNELS, images, strict=True):
                save_image(case.images[name], out_dir / rel)
            save_image(case.label, out_dir / label)
            save_image(case.brain_mask, out_dir / mask)
            training.append(
                {
                    "image": images,
                    "label": label,
                    "brain_mask": mask,
                    "case_id": case.case_id,
                    "patient_id": case.patient_id,
                }
            )
    written = {rel for entry in training for rel in phantom_entry_files(entry)}
    for stale in sorted(old_files - written):
        path = out_dir / stale
        if stale.startswith(_FOLDERS) and ".." not in stale and path.is_file():
            path.unlink()
    channels = {str(i): name for i, name in enumerate(CHANNELS)}
    dataset = {
        "name": "synthlesion-phantom-brain-mri-multi",
        "description": "Procedural multi-sequence brain-tumour MRI phantom (BraTS-like: FLAIR, "
        "T1, T1c, T2; skull-stripped, z-scored inside the brain mask, background 0.0; LPS; "
        "labels NETC/SNFH/ET/RC, no organ label) made by synthlesion; synthetic, no patient "
        "data.",
        "reference": "synthlesion.data.phantom_brain",
        "licence": "CC0-1.0",
        "tensorImageSize": "4D",
        "modality": channels,
        "channel_names": dict(channels),
        "labels": dict(LABELS),
        "numTraining": len(training),
        "file_ending": ".nii.gz",
        "training": training,
        "synthlesion": block,
    }
    write_dataset_json(json_path, dataset)
    logger.info("phantom %s: wrote %d cases to %s", KIND, len(training), out_dir)
    return json_path


_FOLDERS = ("./imagesTr/", "./labelsTr/", "./brainmasks/")


__all__ = [
    "BACKGROUND",
    "CHANNELS",
    "FULL_SHAPE",
    "KIND",
    "LABELS",
    "BrainMultiseqCase",
    "brain_multiseq_affine",
    "brain_multiseq_geometry",
    "make_brain_multiseq_dataset",
    "make_brain_multiseq_patient",
]
