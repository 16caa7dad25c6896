"""From a case on disk to cached, training-ready arrays.

Each case is read once, fully, every channel (MRI sequences, CT phases) included; its mask
checked (whole label values, declared labels only); image channels and mask are turned to RAS (axes reordered and flipped, the affine adjusted, as nibabel's
``as_closest_canonical``), resampled to the configured spacing (image linear, mask nearest,
with the label set re-checked after every spatial step) and every channel is normalised on its
own to [-1, 1] (CT: a HU window; MRI and others: percentiles of the foreground) before anything
random happens. The region healthy-tissue blobs may take is the placement rule of
:func:`synthlesion.masks.placement_region` (organ labels, else the scan's foreground). The result, a :class:`PreparedCase`, is kept in memory and optionally on disk as
safetensors, so a training step never pays for reading or resampling a scan.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from synthlesion.data.cases import Case
from synthlesion.data.intensity import IntensityNormaliser
from synthlesion.data.io import load_case_volumes, load_mask_for
from synthlesion.data.volume import Volume
from synthlesion.errors import ImageReadError, LabelError
from synthlesion.masks.lesions import connected_lesions
from synthlesion.masks.placement import PlacementError, placement_region
from synthlesion.storage import atomic_write_bytes, canonical_json_hash

logger = logging.getLogger(__name__)

CACHE_FORMAT = "synthlesion-prepared/2"
MAX_HEALTHY_CENTRES = 4096


@dataclass(frozen=True)
class Preprocessing:
    """How cases are turned into arrays (a plain view of the data config).

    Attributes:
        spatial_dims: 2 or 3.
        spacing: Target voxel size in mm per axis, or ``None`` to keep each case's own.
        intensity: The one normaliser of the run (CT window or MRI percentiles to [-1, 1]),
            applied before anything random happens.
        lesion_labels: Label values that are lesions, in class order.
        organ_labels: Label values of the tissue healthy blobs are placed in; empty means the
            scan's foreground (:func:`synthlesion.masks.placement_region`).
        healthy_margin: Distance in voxels a healthy blob centre keeps from any lesion.
        tolerance_mm: Largest image/mask geometry difference accepted.
        channels: C, the image channels every case must have (MRI sequences, CT phases).
        modality: The cases' modality (``CT`` picks the HU body rule for the foreground).
        slice_axis: For a 2D model trained on 3D scans: the RAS axis (0, 1 or 2) the scans are
            cut along into 2D slices; ``None`` when scans and model have the same dimensions.
        region_masks: Folder of ``{case_id}.nii.gz`` placement regions (e.g. brain masks):
            where healthy-tissue blobs may go, before the organ labels and the foreground.
    """

    spatial_dims: int
    spacing: tuple[float, ...] | None
    intensity: IntensityNormaliser
    lesion_labels: tuple[int, ...]
    organ_labels: tuple[int, ...]
    healthy_margin: int
    tolerance_mm: float = 1e-3
    channels: int = 1
    modality: str = "unknown"
    slice_axis: int | None = None
    region_masks: Path | None = None

    def key(self) -> dict:
        return {
            "format": CACHE_FORMAT,
            "spatial_dims": self.spatial_dims,
            "spacing": list(self.spacing) if self.spacing else None,
            "intensity": intensity_record(self.intensity),
            "lesion_labels": list(self.lesion_labels),
            "organ_labels": list(self.organ_labels),
            "healthy_margin": self.healthy_margin,
            "channels": self.channels,
            "modality": self.modality,
            "slice_axis": self.slice_axis,
            "region_masks": str(Path(self.region_masks).resolve()) if self.region_masks else None,
        }


@dataclass(frozen=True)
class LesionComponent:
    """One connected lesion of a prepared case.

    Attributes:
        centre: Voxel index of its centre of mass (rounded), length ``spatial_dims``.
        extent: Size of its bounding box in voxels.
        voxels: Number of voxels.
        class_index: Index into ``lesion_labels`` of its most frequent label.
    """

    centre: tuple[int, ...]
    extent: tuple[int, ...]
    voxels: int
    class_index: int


@dataclass(frozen=True, eq=False)
class PreparedCase:
    """A case ready for cropping.

    Attributes:
        case_id, patient_id, origin: From the :class:`Case`.
        image: float32, shape ``(C, *S)`` (RAS axis order), each channel in [-1, 1].
        labels: Integer label map, shape ``S``, values within the case's label set.
        spacing: Voxel size in mm.
        components: Connected lesions (tumours with their sub-regions; specks skipped).
        healthy_centres: int64 ``(M, spatial_dims)`` voxel indices in healthy tissue, far from
            any lesion (at most 4096, drawn with a seed fixed by the case id).
        tissue: Boolean map, shape ``S``: where healthy-tissue blobs may go (the placement
            region: organ labels, else the scan's foreground).
    """

    case_id: str
    patient_id: str
    origin: str
    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, ...]
    components: tuple[LesionComponent, ...]
    healthy_centres: np.ndarray
    tissue: np.ndarray

    @property
    def has_lesion(self) -> bool:
        return bool(self.components)


def intensity_record(intensity: IntensityNormaliser) -> dict:
    """The normaliser's settings as recorded in the training record (read back by sampling)."""
    return {
        "mode": intensity.mode,
        "window": [float(v) for v in intensity.window],
        "percentiles": [float(v) for v in intensity.percentiles],
        "clip": intensity.clip,
        "windows": [[float(lo), float(hi)] for lo, hi in intensity.windows],
    }


# --- geometry -------------------------------------------------------------------------------


def to_ras(volume: Volume) -> Volume:
    """Reorder and flip the axes of ``volume`` so they point to R, A, S (in that order).

    The voxel data is only permuted and flipped (no interpolation) and the affine adjusted,
    like nibabel's ``as_closest_canonical``. A 2D volume keeps its two in-plane axes, ordered
    and flipped the same way; its third affine column is left in place.
    """
    dims = volume.spatial_dims
    full = nib.orientations.io_orientation(volume.affine)
    ornt = full[:dims].copy()
    ornt[:, 0] = np.argsort(np.argsort(ornt[:, 0]))  # ranks: 2D axes may point to e.g. (R, S)
    if np.array_equal(ornt, np.column_stack([np.arange(dims), np.ones(dims)])):
        return volume
    padded = np.vstack([ornt, *[[[dims + i, 1.0]] for i in range(3 - dims)]])
    shape3 = tuple(volume.shape) + (1,) * (3 - dims)
    transform = nib.orientations.inv_ornt_aff(padded, shape3)
    array = nib.orientations.apply_orientation(volume.array, ornt)
    return Volume(
        np.ascontiguousarray(array),
        volume.affine @ transform,
        volume.header,
        volume.source,
        dict(volume.meta),
    )


def resample(
    volume: Volume, spacing: Sequence[float], *, is_mask: bool, label_set: Sequence[int] = ()
) -> Volume:
    """Resample ``volume`` to voxel size ``spacing`` (mm) on a grid covering the same extent.

    Images use linear interpolation (float32 out); masks nearest neighbour, keeping their
    integer dtype, and are checked to hold only ``label_set`` values afterwards.

    Raises:
        LabelError: A mask lost its integer dtype or gained values outside ``label_set``.
    """
    old = np.asarray(volume.spacing, dtype=float)
    new = np.asarray(spacing, dtype=float)
    if np.allclose(old, new, rtol=1e-4, atol=1e-6):
        return volume
    shape = np.asarray(volume.shape)
    new_shape = np.maximum(1, np.round(shape * old / new)).astype(int)
    scale = shape / new_shape  # exact ratio of the grids (spacing = old * scale)
    if is_mask:
        array = ndimage.zoom(
            volume.array, new_shape / shape, order=0, grid_mode=True, mode="nearest"
        )
        require_label_map(array, label_set, f"{volume.source} (after resampling)")
    else:
        array = ndimage.zoom(
            volume.array.astype(np.float32, copy=False),
            new_shape / shape,
            order=1,
            grid_mode=True,
            mode="nearest",
        )
    step = np.eye(4)
    dims = volume.spatial_dims
    step[np.arange(dims), np.arange(dims)] = scale
    step[:dims, 3] = 0.5 * scale - 0.5  # voxel 0's centre, in old voxel units
    return Volume(array, volume.affine @ step, volume.header, volume.source, dict(volume.meta))


def require_label_map(array: np.ndarray, label_set: Sequence[int], where: str) -> None:
    """Raise :class:`LabelError` unless ``array`` is integer-typed with values in ``label_set``."""
    if not np.issubdtype(array.dtype, np.integer):
        raise LabelError(
            f"{where}: mask has dtype {array.dtype} where an integer label map is required"
        )
    if label_set:
        values = np.unique(array)
        extra = sorted(set(values.tolist()) - set(int(v) for v in label_set))
        if extra:
            raise LabelError(
                f"{where}: mask holds values {extra} outside the labels {sorted(label_set)}"
            )


def as_label_map(volume: Volume, label_set: Sequence[int]) -> Volume:
    """Check a freshly read mask and convert it to the smallest integer dtype.

    Raises:
        LabelError: fractional values, or values outside ``label_set`` (listed).
    """
    array = volume.array
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            bad = array[~np.isfinite(array) | (array != np.round(array))]
            raise LabelError(
                f"{volume.source}: mask holds {bad.size} fractional or non-finite "
                f"value(s) (e.g. {bad.flat[0]!r}); masks are never rounded silently"
            )
        array = array.astype(np.int64)
    values = np.unique(array)
    extra = sorted(set(values.tolist()) - set(label_set))
    if extra:
        raise LabelError(
            f"{volume.source}: mask values {extra} are not declared labels {sorted(label_set)}"
        )
    low, high = int(values.min()), int(values.max())
    dtype = (
        np.uint8
        if low >= 0 and high < 256
        else np.int16
        if -(2**15) <= low and high < 2**15
        else np.int32
    )
    return volume.with_array(array.astype(dtype))


# --- one case -------------------------------------------------------------------------------


def prepare_case(case: Case, pre: Preprocessing) -> PreparedCase:
    """Read, check, orient, resample and normalise one case (every channel).

    Raises:
        ImageReadError: unreadable image, non-finite voxels, no mask, a missing channel.
        GeometryError: channels or image and mask disagree on the grid.
        LabelError: a bad mask.
    """
    if case.mask is None:
        raise ImageReadError(
            case.image, f"case {case.case_id} has no mask; training needs one", "no_mask"
        )
    read_dims = 3 if pre.slice_axis is not None else pre.spatial_dims
    channels, mask = load_case_volumes(case, spatial_dims=read_dims, tolerance_mm=pre.tolerance_mm)
    if len(channels) != pre.channels:
        raise ImageReadError(
            case.image,
            f"case {case.case_id} has {len(channels)} image channel(s), the run {pre.channels}",
            "channels",
        )
    label_set = sorted(case.labels)
    mask = as_label_map(mask, label_set)
    region = None
    if pre.region_masks is not None:  # the user's placement region for this case
        path = Path(pre.region_masks) / f"{case.case_id}.nii.gz"
        if not path.is_file():
            raise ImageReadError(path, f"no region mask for case {case.case_id}", "missing")
        user = load_mask_for(channels[0], path, pre.tolerance_mm)
        region = to_ras(user.with_array((np.asarray(user.array) != 0).astype(np.uint8)))
    channels, mask = [to_ras(v) for v in channels], to_ras(mask)
    require_label_map(mask.array, label_set, f"{case.mask} (after reorientation)")
    if pre.spacing is not None:
        spacing = pre.spacing
        if pre.slice_axis is not None:  # in-plane spacing only; slices stay as they are
            spacing = list(channels[0].spacing)
            inplane = [a for a in range(3) if a != pre.slice_axis]
            for axis, value in zip(inplane, pre.spacing, strict=True):
                spacing[axis] = value
        channels = [resample(v, spacing, is_mask=False) for v in channels]
        mask = resample(mask, spacing, is_mask=True, label_set=label_set)
        if region is not None:
            region = resample(region, spacing, is_mask=True, label_set=(0, 1))
    array = np.stack(
        [
            pre.intensity.normalise(v.array, channel=c).astype(np.float32, copy=False)
            for c, v in enumerate(channels)
        ]
    )
    labels = np.ascontiguousarray(mask.array)
    try:
        tissue = placement_region(
            labels,
            channels[0].array,
            user_region=region.array if region is not None else None,
            organ_labels=pre.organ_labels,
            lesion_labels=pre.lesion_labels,
            modality=pre.modality,
            where=f"{case.image} (case {case.case_id})",
        ).mask
    except PlacementError:
        tissue = np.zeros(labels.shape, dtype=bool)
    components = find_components(labels, pre.lesion_labels)
    centres = healthy_centres(tissue, labels, pre, case.case_id)
    return PreparedCase(
        case.case_id,
        case.patient_id,
        case.origin,
        np.ascontiguousarray(array),
        labels,
        tuple(float(s) for s in mask.spacing),
        components,
        centres,
        np.ascontiguousarray(tissue),
    )


def find_components(
    labels: np.ndarray, lesion_labels: Sequence[int]
) -> tuple[LesionComponent, ...]:
    """Connected lesions of a label map: each tumour with all its sub-regions, specks skipped
    (:func:`synthlesion.masks.lesions.connected_lesions`)."""
    result = []
    for lesion in connected_lesions(labels, lesion_labels):
        coords = np.argwhere(lesion.mask)
        centre = tuple(
            int(round(c + s.start)) for c, s in zip(coords.mean(axis=0), lesion.box, strict=True)
        )
        result.append(
            LesionComponent(
                centre,
                tuple(int(s.stop - s.start) for s in lesion.box),
                lesion.voxels,
                lesion.main_class - 1,
            )
        )
    return tuple(result)


def healthy_centres(
    tissue: np.ndarray, labels: np.ndarray, pre: Preprocessing, case_id: str
) -> np.ndarray:
    """Voxels of ``tissue`` (the placement region) at least ``healthy_margin`` voxels from any
    lesion.

    The distance to lesions is computed only in boxes around each lesion, so memory stays a
    few bytes per voxel however large the scan.
    """
    tissue = tissue.copy()
    lesion = np.isin(labels, pre.lesion_labels)
    tissue &= ~lesion
    margin = pre.healthy_margin
    if margin > 0 and lesion.any():
        components, _ = ndimage.label(lesion)
        for box in ndimage.find_objects(components):
            if box is None:
                continue
            grown = tuple(
                slice(max(0, s.start - margin), min(n, s.stop + margin))
                for s, n in zip(box, lesion.shape, strict=True)
            )
            near = ndimage.distance_transform_edt(~lesion[grown]) <= margin
            tissue[grown] &= ~near
    index = np.flatnonzero(tissue)
    del tissue
    if len(index) > MAX_HEALTHY_CENTRES:
        seed = int(canonical_json_hash(case_id)[:12], 16)
        pick = np.random.default_rng(seed).choice(len(index), MAX_HEALTHY_CENTRES, replace=False)
        index = index[np.sort(pick)]
    return np.stack(np.unravel_index(index, labels.shape), axis=1).astype(np.int64)


# --- many cases, cached ---------------------------------------------------------------------


def prepare_cases(
    cases: Sequence[Case], pre: Preprocessing, *, cache_dir: Path | None = None, workers: int = 1
) -> list[PreparedCase]:
    """Prepare every case (in threads), reading from / writing to ``cache_dir`` when given.

    The on-disk cache is keyed by the files' path, size and modification time and by the
    preprocessing settings, so an edited scan or a changed setting is prepared afresh.
    """

    def one(case: Case) -> PreparedCase:
        try:
            return cached_or_prepared(case)
        except ImageReadError as exc:  # name the case beside the file
            if f"case {case.case_id}" in str(exc):
                raise
            raise ImageReadError(
                exc.path, f"case {case.case_id}: {exc.problem}", exc.code
            ) from None

    def cached_or_prepared(case: Case) -> PreparedCase:
        if cache_dir is None:
            return prepare_case(case, pre)
        path = Path(cache_dir) / f"{_cache_key(case, pre)}.safetensors"
        if path.is_file():
            try:
                return _load_cached(path, case)
            except Exception as exc:  # a damaged cache file is rebuilt, never trusted
                logger.warning(
                    "cache file %s unreadable (%s); preparing %s again", path, exc, case.case_id
                )
        prepared = prepare_case(case, pre)
        _save_cached(path, prepared)
        return prepared

    if workers <= 1 or len(cases) <= 1:
        return [one(c) for c in cases]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, cases))


def _cache_key(case: Case, pre: Preprocessing) -> str:
    files = []
    region = Path(pre.region_masks) / f"{case.case_id}.nii.gz" if pre.region_masks else None
    for path in (*case.images, case.mask, region):
        stat = os.stat(path) if path is not None else None
        files.append(
            [
                str(Path(path).resolve()) if path else None,
                stat.st_size if stat else None,
                stat.st_mtime_ns if stat else None,
            ]
        )
    return canonical_json_hash({"case": case.case_id, "files": files, **pre.key()})[:32]


def _save_cached(path: Path, prepared: PreparedCase) -> None:
    from safetensors.numpy import save

    meta = {
        "format": CACHE_FORMAT,
        "case_id": prepared.case_id,
        "spacing": json.dumps(list(prepared.spacing)),
        "components": json.dumps(
            [[list(c.centre), list(c.extent), c.voxels, c.class_index] for c in prepared.components]
        ),
    }
    blob = save(
        {
            "image": prepared.image,
            "labels": prepared.labels,
            "healthy_centres": prepared.healthy_centres,
            "tissue": prepared.tissue.astype(np.uint8),
        },
        metadata=meta,
    )
    atomic_write_bytes(path, blob)


def _load_cached(path: Path, case: Case) -> PreparedCase:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        meta: Mapping[str, str] = handle.metadata() or {}
        if meta.get("format") != CACHE_FORMAT or meta.get("case_id") != case.case_id:
            raise ValueError("not a cache file of this case")
        arrays = {k: handle.get_tensor(k) for k in ("image", "labels", "healthy_centres", "tissue")}
    components = tuple(
        LesionComponent(tuple(c), tuple(e), int(v), int(k))
        for c, e, v, k in json.loads(meta["components"])
    )
    return PreparedCase(
        case.case_id,
        case.patient_id,
        case.origin,
        arrays["image"],
        arrays["labels"],
        tuple(json.loads(meta["spacing"])),
        components,
        arrays["healthy_centres"],
        arrays["tissue"].astype(bool),
    )
