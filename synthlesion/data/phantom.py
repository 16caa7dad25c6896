"""The embedded procedural phantom: deterministic CT-like abdomens and MRI-like brains.

Anatomy is a set of implicit shapes (deformed ellipsoids, cylinders, tubes) evaluated on
millimetre coordinate grids, so one code path makes a 3D volume or a 2D axial slice (a grid
whose z coordinate is a single plane through the same 3D anatomy). Each patient's anatomy is
drawn once; a follow-up scan re-samples it under a small rigid motion and smooth deformation,
with every lesion grown or shrunk. Lesions lie inside the organ (liver, brain parenchyma) at a
safe distance from its border; the image edge is soft, the mask crisp. Two lesion models:

* ``"types"`` (default): typed lesions (CT cyst, metastasis, HCC-like, infiltrative; MRI
  glioma-like, metastasis, MS-like plaque) with heterogeneous interiors, irregular borders,
  perilesional halos outside the mask, textures of their own and mass effect (the anatomy is
  re-rendered pushed away from the lesions); see :mod:`synthlesion.data.phantom_lesion_types`.
* ``"ellipsoid"``: the first phantom's smoothly deformed ellipsoids with one added contrast and a
  smooth texture, kept byte for byte to reproduce older datasets and figures.

The shapes and the two anatomies live in :mod:`synthlesion.data.phantom_anatomy`; the typed
lesions in :mod:`synthlesion.data.phantom_lesion_types`; the ellipsoid lesions, cases and the
dataset writer here.

:func:`make_phantom_dataset` writes a Decathlon / nnU-Net v2 folder: ``dataset.json``,
``imagesTr/{case_id}_0000.nii.gz`` and ``labelsTr/{case_id}.nii.gz`` with labels
0 background, 1 organ, 2 lesion. Equal arguments give byte-identical files.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
from scipy import ndimage

from synthlesion import __version__
from synthlesion.data.io import save_image
from synthlesion.data.phantom_anatomy import (
    Coords,
    Field,
    bbox,
    blob,
    crop,
    ct_anatomy,
    ct_render,
    ct_vessels,
    mri_anatomy,
    mri_render,
    random_rotation,
)
from synthlesion.data.phantom_lesion_render import mass_effect_coords, paint_typed_lesions
from synthlesion.data.phantom_lesion_types import TypedLesion, place_typed_lesions
from synthlesion.data.volume import Volume
from synthlesion.errors import ConfigError, SynthlesionError
from synthlesion.storage import atomic_write_text

logger = logging.getLogger(__name__)

Kind = Literal["ct", "mri"]
LesionModel = Literal["types", "ellipsoid"]
LESION_MODELS = ("types", "ellipsoid")
ORGAN_LABEL = 1
LESION_LABEL = 2
ORGAN_NAME = {"ct": "liver", "mri": "brain"}
MODALITY = {"ct": "CT", "mri": "MRI"}
_KIND_CODE = {"ct": 1, "mri": 2}
_FOV_MM = {"ct": 360.0, "mri": 220.0}  # in-plane field of view; spacing = FOV / size
_SLICE_RATIO = {"ct": 2.5, "mri": 1.0}  # slice spacing / in-plane spacing
_Z_FRACTION = {"ct": 1.0, "mri": 0.8}  # z extent / in-plane extent (3D)
_DEFAULT_SIZE = {2: 128, 3: 96}
_DEFAULT_PATIENTS = {2: 100, 3: 8}


class PhantomOutputError(SynthlesionError):
    """The output folder already holds a different dataset."""


@dataclass(frozen=True)
class PhantomLesion:
    """Known truth of one lesion in one scan.

    Attributes:
        centre_voxel: Centroid of the lesion's voxels in array index coordinates (2 or 3 values).
        centre_mm: The same point in world RAS millimetres (3 values).
        radii_mm: Semi-axes of the generating ellipsoid in mm, growth included (3 values).
        volume_voxels: Number of voxels (pixels in 2D) labelled as this lesion.
        mean_intensity: Mean image value over them (HU for CT, arbitrary units for MRI).
        appearance: ``hypodense``/``hyperdense`` (CT) or ``hyperintense``/``necrotic`` (MRI).
        lesion_type: The typed model's type (e.g. ``cyst``, ``glioma``); for the ellipsoid
            model the appearance.
    """

    centre_voxel: tuple[float, ...]
    centre_mm: tuple[float, float, float]
    radii_mm: tuple[float, float, float]
    volume_voxels: int
    mean_intensity: float
    appearance: str
    lesion_type: str

    def to_json(self) -> dict[str, Any]:
        return {
            "centre_voxel": [round(v, 2) for v in self.centre_voxel],
            "centre_mm": [round(v, 2) for v in self.centre_mm],
            "radii_mm": [round(v, 2) for v in self.radii_mm],
            "volume_voxels": self.volume_voxels,
            "mean_intensity": round(self.mean_intensity, 2),
            "appearance": self.appearance,
            "type": self.lesion_type,
        }


@dataclass(frozen=True)
class PhantomCase:
    """One generated scan: image (CT int16 HU or MRI float32), uint8 label map and truth."""

    case_id: str
    patient_id: str
    time_point: int
    image: Volume
    label: Volume
    lesions: tuple[PhantomLesion, ...]
    noise_sd: float  # sd of the added noise (HU for CT, Rician sigma for MRI)

    @property
    def has_lesion(self) -> bool:
        return bool(self.lesions)


# --- lesions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LesionSpec:
    centre: tuple[float, float, float]  # anatomy mm
    radii: tuple[float, float, float]  # mm
    rotation: list[list[float]]
    shape: Field
    texture: Field
    appearance: str
    contrast: float  # added to the organ level (HU or a.u.)
    core: float  # added inside the core (necrosis), 0 for none
    edge_mm: float  # width of the soft image edge
    growth: tuple[float, ...]  # radius factor per time point


def _lesion_look(
    rng: np.random.Generator, kind: str, level: float
) -> tuple[str, float, float, float]:
    """(appearance, contrast, core shift, texture amplitude) in image units."""
    u = rng.uniform
    if kind == "ct":
        if rng.random() < 0.75:
            return "hypodense", -u(35, 50), -u(0, 12) if rng.random() < 0.4 else 0.0, u(4, 8)
        return "hyperdense", u(40, 60), 0.0, u(4, 8)
    if rng.random() < 0.8:
        return "hyperintense", level * u(0.35, 0.75), 0.0, level * u(0.04, 0.08)
    return "necrotic", level * u(0.5, 0.9), -level * u(0.8, 1.2), level * u(0.04, 0.08)


def _place_lesions(
    rng: np.random.Generator,
    kind: str,
    count: int,
    region: np.ndarray,
    p: Coords,
    spacing: tuple[float, ...],
    level: float,
    n_time_points: int,
) -> list[_LesionSpec]:
    """Place ``count`` lesions where ``region`` leaves room, never touching each other."""
    ndim = region.ndim
    sp = spacing[:ndim]
    edt = ndimage.distance_transform_edt(np.pad(region, 1), sampling=sp)[(slice(1, -1),) * ndim]
    clearance = max(sp) + 1.0
    lo = max(7.0 if kind == "ct" else 4.0, 2.0 * sp[0])
    hi = max(22.0 if kind == "ct" else 13.0, 1.5 * lo)
    growth = [1.0] + [float(np.exp(rng.uniform(-0.3, 0.3))) for _ in range(n_time_points - 1)]
    g_max = max(growth)
    specs: list[_LesionSpec] = []
    placed: list[tuple[np.ndarray, float]] = []
    shape = region.shape
    for _ in range(count):
        for attempt in range(40):
            r_max = rng.uniform(lo, hi) * (0.97**attempt)
            radii = r_max * rng.uniform(0.6, 1.0, size=3)
            radii[rng.integers(3)] = r_max
            extent = r_max / (1 - 0.15) * g_max
            candidates = np.flatnonzero(edt >= extent + clearance)
            if candidates.size == 0:
                continue
            idx = np.unravel_index(candidates[rng.integers(candidates.size)], shape)
            centre = np.array([float(np.broadcast_to(c, shape)[idx]) for c in p])
            centre[2] += (3 - ndim) * rng.uniform(-0.2, 0.2) * radii.min()  # 2D: near the plane
            if all(np.linalg.norm(centre - c) > extent + e + 2 for c, e in placed):
                break
        else:
            logger.debug("no room for another lesion after %d placed", len(specs))
            break
        appearance, contrast, core, tex_amp = _lesion_look(rng, kind, level)
        placed.append((centre, extent))
        specs.append(
            _LesionSpec(
                centre=tuple(centre.tolist()),  # type: ignore[arg-type]
                radii=tuple(radii.tolist()),  # type: ignore[arg-type]
                rotation=random_rotation(rng, (60, 60, 60)),
                shape=Field(rng, 4, (1.5 * r_max, 4 * r_max), 0.15),
                texture=Field(rng, 5, (4, 15), tex_amp),
                appearance=appearance,
                contrast=contrast,
                core=core,
                edge_mm=rng.uniform(0.5, 1.5),
                growth=tuple(growth),
            )
        )
    return specs


def _paint_lesions(
    img: np.ndarray,
    p: Coords,
    organ: np.ndarray,
    level: float,
    specs: list[_LesionSpec],
    time_point: int,
) -> list[np.ndarray]:
    """Paint lesions into ``img`` (soft edge) and return one crisp boolean mask per lesion."""
    allowed = ndimage.binary_erosion(organ, border_value=0)
    masks = []
    sl = bbox(organ, pad=1)
    pc = crop(p, sl)
    for spec in specs:
        g = spec.growth[time_point]
        radii = tuple(r * g for r in spec.radii)
        rho = np.broadcast_to(
            blob(pc, spec.centre, radii, spec.rotation, spec.shape), img[sl].shape
        )
        mask = np.zeros(img.shape, bool)
        mask[sl] = (rho < 1) & allowed[sl]
        if (rho < 1).sum() != mask[sl].sum():
            logger.debug("lesion clipped to the organ interior")
        scale = min(radii) / spec.edge_mm
        w = np.clip((1 - rho) * scale + 0.5, 0.0, 1.0) * organ[sl]
        core = np.clip((0.55 - rho) * scale, 0.0, 1.0)
        value = level + spec.contrast + spec.texture(pc, spec.centre) + spec.core * core
        img[sl] += w * (value - img[sl])
        masks.append(mask)
    return masks


def _push_anatomy(
    kind: str,
    an: dict[str, Any],
    p: Coords,
    typed: list[TypedLesion],
    time_point: int,
    img: np.ndarray,
    organ: np.ndarray,
    region: np.ndarray,
) -> None:
    """Mass effect: re-render, in place, the anatomy near the lesions pushed away from them
    (image, organ and lesion region from the same displaced coordinates)."""
    pushed = mass_effect_coords(p, typed, time_point, img.shape)
    if pushed is None:
        return
    box, q = pushed
    if kind == "ct":
        img[box], organ[box], _ = ct_render(q, an)
        region[box] = organ[box]  # the same array for CT; kept explicit
    else:
        img[box], organ[box], region[box], _ = mri_render(q, an)


# --- cases --------------------------------------------------------------------------------


def phantom_geometry(
    kind: Kind, spatial_dims: int, size: int
) -> tuple[tuple[int, ...], tuple[float, float, float]]:
    """Array shape and voxel spacing (mm; the third value is the slice spacing, also in 2D).

    In-plane spacing is the field of view (CT 360 mm, MRI 220 mm) over ``size``; CT slices are
    2.5 times thicker than the in-plane spacing (so a 3D CT has ``size / 2.5`` slices), MRI
    voxels are isotropic.
    """
    _check_args(kind, spatial_dims, size)
    s = _FOV_MM[kind] / size
    sz = s * _SLICE_RATIO[kind]
    if spatial_dims == 2:
        return (size, size), (s, s, sz)
    n_z = max(4, round(size * _Z_FRACTION[kind] / _SLICE_RATIO[kind]))
    return (size, size, n_z), (s, s, sz)


def _grid(shape: tuple[int, ...], spacing: tuple[float, ...]) -> Coords:
    """Centred mm coordinates of the voxel grid, each array broadcast along the other axes."""
    ndim, out = len(shape), []
    for axis in range(3):
        n = shape[axis] if axis < ndim else 1
        v = (np.arange(n, dtype=np.float32) - (n - 1) / 2) * np.float32(spacing[axis])
        out.append(v.reshape([n if a == axis else 1 for a in range(ndim)]))
    return tuple(out)  # type: ignore[return-value]


def _pose(g: Coords, rotation: Any, shift: Any, fields: list[Field] | None) -> Coords:
    """Anatomy coordinates of the grid: ``rotation @ g + shift + displacement(g)``."""
    if rotation is None:
        return tuple(g[i] + np.float32(shift[i]) for i in range(3))  # type: ignore[return-value]
    out = []
    for i in range(3):
        v = rotation[i][0] * g[0] + rotation[i][1] * g[1] + rotation[i][2] * g[2] + float(shift[i])
        if fields is not None:
            v = v + fields[i](g)
        out.append(v.astype(np.float32, copy=False))
    return tuple(out)  # type: ignore[return-value]


def _finish(
    kind: str,
    img: np.ndarray,
    spacing: tuple[float, ...],
    rng: np.random.Generator,
    an: dict[str, Any],
    p: Coords,
) -> tuple[np.ndarray, float]:
    """Blur (scanner point spread), then CT correlated noise or MRI bias field + Rician noise."""
    sp = spacing[: img.ndim]
    img = ndimage.gaussian_filter(img, [0.5 * sp[0] / s for s in sp])
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    if kind == "ct":
        noise = ndimage.gaussian_filter(noise, [0.8 * sp[0] / s for s in sp])
        sd = float(rng.uniform(10, 14))
        noise *= np.float32(sd / float(noise.std()))
        return np.clip(np.rint(img + noise), -1024, 3071).astype(np.int16), sd
    img = img * np.exp(an["bias"](p)).astype(np.float32)
    sd = float(an["wm"] * rng.uniform(0.025, 0.045))
    imag = rng.standard_normal(img.shape, dtype=np.float32)
    out = np.sqrt((img + np.float32(sd) * noise) ** 2 + (np.float32(sd) * imag) ** 2)
    return out.astype(np.float32), sd


def make_phantom_patient(
    kind: Kind = "ct",
    spatial_dims: int = 3,
    *,
    patient_index: int = 0,
    n_time_points: int = 1,
    n_lesions: int = 0,
    size: int | None = None,
    seed: int = 0,
    lesion_model: LesionModel = "types",
    mass_effect: bool = True,
) -> list[PhantomCase]:
    """Generate every scan of one phantom patient in memory.

    Args:
        kind: ``"ct"`` (abdomen, int16 HU, organ = liver) or ``"mri"`` (head, float32
            FLAIR-like arbitrary units, organ = brain).
        spatial_dims: 3 for volumes of shape ``(X, Y, Z)``, 2 for axial slices ``(X, Y)``.
        patient_index: Which patient; with ``seed`` it fixes the anatomy and the lesions.
        n_time_points: Scans of this patient; later ones are moved, slightly deformed and
            have every lesion grown or shrunk (radius factor 0.74-1.35).
        n_lesions: Lesions wanted (fewer are placed if the organ has no room); 0 = healthy.
        size: In-plane voxels (default 96 in 3D, 128 in 2D); see :func:`phantom_geometry`.
        seed: Dataset seed.
        lesion_model: ``"types"`` (typed lesions, see
            :mod:`synthlesion.data.phantom_lesion_types`) or ``"ellipsoid"`` (the first
            phantom's lesions, byte-identical to it). The anatomy is the same for both.
        mass_effect: Typed model only: re-render the anatomy pushed away from the lesions;
            False leaves it where it is (to compare, or for figures; the lesions are the same,
            though one placed near the organ's surface may then be trimmed to it).

    Returns:
        One :class:`PhantomCase` per time point, ids ``{kind}{dims}d_p{index:03d}_t{tp}``.
    """
    size = _DEFAULT_SIZE.get(spatial_dims, 0) if size is None else size
    shape, spacing = phantom_geometry(kind, spatial_dims, size)
    _check_model(lesion_model)
    if n_time_points < 1 or n_lesions < 0:
        raise ConfigError(
            f"phantom: n_time_points must be >= 1 and n_lesions >= 0, got "
            f"{n_time_points} and {n_lesions}"
        )
    root = np.random.SeedSequence([seed, _KIND_CODE[kind], spatial_dims, 0, patient_index])
    patient_seq, *scan_seqs = root.spawn(1 + n_time_points)
    rng = np.random.default_rng(patient_seq)
    u = rng.uniform
    if kind == "ct":
        an = ct_anatomy(rng)
        ct_vessels(rng, an)
        level_z, origin = an["zl"] + u(-20, 15), [u(-10, 10), u(-40, 0), u(-600, -300)]
    else:
        an = mri_anatomy(rng)
        level_z, origin = an["vent"][0][0][2] + u(-8, 20), [u(-5, 5), u(-25, 5), u(-20, 30)]
    shift = [rng.normal(0, 6), rng.normal(0, 6), level_z if spatial_dims == 2 else rng.normal(0, 4)]
    g = _grid(shape, spacing)
    corner = [float(c.flat[0]) for c in g]
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm")
    patient_id = f"{kind}{spatial_dims}d_p{patient_index:03d}"
    specs: list[_LesionSpec] = []
    typed: list[TypedLesion] = []
    cases = []
    for tp, seq in enumerate(scan_seqs):
        srng = np.random.default_rng(seq)
        if tp == 0:
            p = _pose(g, None, shift, None)
            table = np.zeros(3)
        else:
            degrees = (1.0, 1.0, 3.0) if kind == "ct" else (1.5, 1.5, 4.0)
            moved = np.asarray(shift) + srng.normal(0, (4, 4, 2))
            amp = 3.0 if kind == "ct" else 0.8
            fields = [Field(srng, 3, (80, 220), amp) for _ in range(3)]
            p = _pose(g, random_rotation(srng, degrees), moved, fields)
            table = srng.normal(0, (2, 2, 10))
        if kind == "ct":
            img, organ, level = ct_render(p, an)
            region = organ
        else:
            img, organ, region, level = mri_render(p, an)
        if lesion_model == "ellipsoid":
            if tp == 0 and n_lesions:
                specs = _place_lesions(
                    rng, kind, n_lesions, region, p, spacing, level, n_time_points
                )
            masks = _paint_lesions(img, p, region, level, specs, tp)
            truths = [(s.radii, s.growth, s.appearance, s.appearance) for s in specs]
        else:
            if tp == 0 and n_lesions:
                typed = place_typed_lesions(
                    rng, kind, n_lesions, region, p, spacing, level, n_time_points
                )
            if mass_effect:
                _push_anatomy(kind, an, p, typed, tp, img, organ, region)
            masks = paint_typed_lesions(img, p, region, level, typed, tp, kind, spacing)
            truths = [(s.radii, s.growth, s.appearance, s.name) for s in typed]
        image, noise_sd = _finish(kind, img, spacing, srng, an, p)
        label = organ.astype(np.uint8)
        for m in masks:
            label[m] = LESION_LABEL
        affine = np.diag([*spacing, 1.0])
        affine[:3, 3] = np.asarray(origin) + table + corner
        affine = np.round(affine, 4)
        truth = []
        for (radii, growth, appearance, lesion_type), m in zip(truths, masks, strict=True):
            n = int(m.sum())
            if n == 0:
                continue
            centroid = np.argwhere(m).mean(axis=0)
            world = affine @ np.r_[centroid, np.zeros(3 - spatial_dims), 1.0]
            truth.append(
                PhantomLesion(
                    centre_voxel=tuple(float(v) for v in centroid),
                    centre_mm=tuple(float(v) for v in world[:3]),  # type: ignore[arg-type]
                    radii_mm=tuple(r * growth[tp] for r in radii),  # type: ignore[arg-type]
                    volume_voxels=n,
                    mean_intensity=float(image[m].mean()),
                    appearance=appearance,
                    lesion_type=lesion_type,
                )
            )
        cases.append(
            PhantomCase(
                case_id=f"{patient_id}_t{tp}",
                patient_id=patient_id,
                time_point=tp,
                image=Volume(image, affine, header.copy()),
                label=Volume(label, affine.copy(), header.copy()),
                lesions=tuple(truth),
                noise_sd=noise_sd,
            )
        )
    return cases


# --- dataset ------------------------------------------------------------------------------


def _check_model(lesion_model: str) -> None:
    if lesion_model not in LESION_MODELS:
        raise ConfigError(
            f"phantom: lesion_model must be 'types' or 'ellipsoid', got {lesion_model!r}"
        )


def _check_args(kind: str, spatial_dims: int, size: int) -> None:
    if kind not in _FOV_MM:
        raise ConfigError(f"phantom: kind must be 'ct' or 'mri', got {kind!r}")
    if spatial_dims not in (2, 3):
        raise ConfigError(f"phantom: spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if not isinstance(size, int) or size < 24:
        raise ConfigError(f"phantom: size must be an integer >= 24, got {size!r}")


def _plan(
    seed: int,
    kind: str,
    spatial_dims: int,
    n_patients: int,
    lesion_fraction: float,
    followup_fraction: float,
    max_lesions: int,
) -> list[tuple[int, int]]:
    """``(time points, lesions)`` per patient: whole shares, drawn without global state."""
    rng = np.random.default_rng([seed, _KIND_CODE[kind], spatial_dims, 1])
    n_lesion = round(lesion_fraction * n_patients)
    if 0 < lesion_fraction < 1 and n_patients >= 2:
        n_lesion = min(max(n_lesion, 1), n_patients - 1)
    n_follow = max(round(followup_fraction * n_patients), 1 if followup_fraction > 0 else 0)
    with_lesion = set(rng.permutation(n_patients)[:n_lesion].tolist())
    with_followup = set(rng.permutation(n_patients)[:n_follow].tolist())
    counts = rng.integers(1, max_lesions + 1, size=n_patients)
    return [
        (2 if i in with_followup else 1, int(counts[i]) if i in with_lesion else 0)
        for i in range(n_patients)
    ]


def phantom_entry_files(entry: Any) -> list[str]:
    """Relative file paths named by one training entry of a dataset.json."""
    if not isinstance(entry, dict):
        return []
    out = []
    for key in ("image", "label", "brain_mask"):
        value = entry.get(key)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str):
                out.append(v)
    return out


def existing_phantom_files(json_path: Path, block: dict[str, Any], overwrite: bool) -> set[str]:
    """Refuse a different dataset.json unless ``overwrite``; the files of an earlier phantom."""
    if not json_path.exists():
        return set()
    try:
        old = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = None
    same = isinstance(old, dict) and old.get("synthlesion") == json.loads(json.dumps(block))
    if not same and not overwrite:
        raise PhantomOutputError(
            f"{json_path}: the folder already holds a different dataset.json; choose another "
            "folder or pass overwrite (--overwrite) to replace it"
        )
    files: set[str] = set()
    if isinstance(old, dict) and isinstance(old.get("synthlesion"), dict):
        training = old.get("training")
        for entry in training if isinstance(training, list) else []:
            files.update(phantom_entry_files(entry))
    return files


def make_phantom_dataset(
    out_dir: str | Path,
    *,
    kind: Kind = "ct",
    spatial_dims: int = 3,
    n_patients: int | None = None,
    size: int | None = None,
    seed: int = 0,
    lesion_fraction: float = 0.6,
    followup_fraction: float = 0.5,
    max_lesions: int = 3,
    overwrite: bool = False,
    lesion_model: LesionModel = "types",
) -> Path:
    """Write a phantom dataset (Decathlon / nnU-Net v2 layout) and return its dataset.json.

    Args:
        out_dir: Destination folder; gets ``dataset.json``, ``imagesTr/`` and ``labelsTr/``.
        kind: ``"ct"`` (abdomen, labels background/liver/lesion) or ``"mri"`` (head,
            background/brain/lesion).
        spatial_dims: 3 (volumes) or 2 (single axial slices saved as 2D NIfTI).
        n_patients: Patients (default 8 in 3D, 100 in 2D).
        size: In-plane voxels (default 96 in 3D, 128 in 2D).
        seed: Equal arguments give byte-identical files.
        lesion_fraction: Share of patients with 1..``max_lesions`` lesions (the rest healthy).
        followup_fraction: Share of patients with a second time point.
        max_lesions: Most lesions per patient.
        overwrite: Replace a different dataset already in ``out_dir``.
        lesion_model: ``"types"`` (typed lesions) or ``"ellipsoid"`` (the first phantom's
            lesions, to reproduce older datasets); recorded in the ``synthlesion`` block, so a
            folder written with the other model is not reused.

    Raises:
        PhantomOutputError: ``out_dir`` holds a different dataset.json and ``overwrite`` is off.
        ConfigError: An argument is out of range.
    """
    size = _DEFAULT_SIZE.get(spatial_dims, 0) if size is None else size
    n_patients = _DEFAULT_PATIENTS.get(spatial_dims, 0) if n_patients is None else n_patients
    shape, spacing = phantom_geometry(kind, spatial_dims, size)
    _check_model(lesion_model)
    if n_patients < 1 or max_lesions < 1:
        raise ConfigError(
            f"phantom: n_patients and max_lesions must be >= 1, got {n_patients} and {max_lesions}"
        )
    for name, value in (
        ("lesion_fraction", lesion_fraction),
        ("followup_fraction", followup_fraction),
    ):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"phantom: {name} must lie in [0, 1], got {value}")
    out_dir = Path(out_dir)
    json_path = out_dir / "dataset.json"
    block = {
        "generator": __name__,
        "version": __version__,
        "kind": kind,
        "spatial_dims": spatial_dims,
        "seed": seed,
        "n_patients": n_patients,
        "size": size,
        "shape": list(shape),
        "spacing_mm": [round(s, 4) for s in spacing[:spatial_dims]],
        "lesion_fraction": lesion_fraction,
        "followup_fraction": followup_fraction,
        "max_lesions": max_lesions,
        "lesion_model": lesion_model,
        "intensity_unit": "HU" if kind == "ct" else "a.u.",
        "lesion_labels": [LESION_LABEL],
        "organ_label": ORGAN_LABEL,
    }
    old_files = existing_phantom_files(json_path, block, overwrite)
    plan = _plan(
        seed, kind, spatial_dims, n_patients, lesion_fraction, followup_fraction, max_lesions
    )
    training = []
    for index, (n_time_points, n_lesions) in enumerate(plan):
        for case in make_phantom_patient(
            kind,
            spatial_dims,
            patient_index=index,
            n_time_points=n_time_points,
            n_lesions=n_lesions,
            size=size,
            seed=seed,
            lesion_model=lesion_model,
        ):
            image = f"./imagesTr/{case.case_id}_0000.nii.gz"
            label = f"./labelsTr/{case.case_id}.nii.gz"
            save_image(case.image, out_dir / image)
            save_image(case.label, out_dir / label)
            training.append(
                {
                    "image": image,
                    "label": label,
                    "case_id": case.case_id,
                    "patient_id": case.patient_id,
                    "time_point": case.time_point,
                    "has_lesion": case.has_lesion,
                    "lesion_count": len(case.lesions),
                    "lesions": [lesion.to_json() for lesion in case.lesions],
                }
            )
    for stale in sorted(old_files - {t[k] for t in training for k in ("image", "label")}):
        path = out_dir / stale
        if (
            stale.startswith(("./imagesTr/", "./labelsTr/"))
            and ".." not in stale
            and path.is_file()
        ):
            path.unlink()
    organ = ORGAN_NAME[kind]
    dataset = {
        "name": f"synthlesion-phantom-{kind}-{spatial_dims}d",
        "description": f"Procedural {MODALITY[kind]} phantom ({'abdomen' if kind == 'ct' else 'head'}"
        f", {spatial_dims}D) with {organ} and lesion labels, made by synthlesion; synthetic, "
        "no patient data.",
        "reference": "synthlesion.data.phantom",
        "licence": "CC0-1.0",
        "tensorImageSize": f"{spatial_dims}D",
        "modality": {"0": MODALITY[kind]},
        "channel_names": {"0": MODALITY[kind]},
        "labels": {"background": 0, organ: ORGAN_LABEL, "lesion": LESION_LABEL},
        "numTraining": len(training),
        "file_ending": ".nii.gz",
        "training": training,
        "synthlesion": block,
    }
    write_dataset_json(json_path, dataset)
    logger.info("phantom: wrote %d cases to %s", len(training), out_dir)
    return json_path


def write_dataset_json(json_path: Path, dataset: dict[str, Any]) -> None:
    """Write a dataset.json atomically with one line per training case (small, readable)."""
    training = dataset["training"]
    head = json.dumps({**dataset, "training": "@training@"}, indent=2)
    rows = ",\n".join("    " + json.dumps(entry) for entry in training)
    atomic_write_text(json_path, head.replace('"@training@"', f"[\n{rows}\n  ]") + "\n")
