"""Reading one DICOM series folder into a :class:`Volume`, refusing anything but a complete one.

Common readers sort slices by file name or InstanceNumber and take the slice spacing from one
pair of slices or from a tag, so a series with a missing slice silently becomes a volume whose
spacing is wrong for part of its extent. Here slices are placed by their position along the
slice normal, and a missing slice, uneven spacing, a duplicate position, a second series, a
localizer or a slice in another orientation is an error naming the folder or file.

Geometry follows the DICOM patient coordinate system (LPS) and is converted to the NIfTI
convention used everywhere in synthlesion (RAS+, array axis 0 along a row, axis 1 down the
columns, axis 2 along the slice normal).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pydicom.uid
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from synthlesion.data.volume import Volume
from synthlesion.errors import DicomSeriesError

logger = logging.getLogger(__name__)

#: Largest difference between two slices' direction cosines still read as the same orientation.
ORIENTATION_TOLERANCE = 1e-3
#: Largest difference (mm) between two slices' PixelSpacing values still read as equal.
PIXEL_SPACING_TOLERANCE_MM = 1e-4
#: Allowed in-plane drift of slice positions, in mm per mm along the normal, on top of the
#: spacing tolerance (covers direction cosines written with 4 to 6 decimals).
IN_PLANE_DRIFT_PER_MM = 1e-4
_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR
_LISTED = 5  # how many file names an error message lists before "and N more"


@dataclass(frozen=True)
class _Slice:
    """One image file of the folder, header only (pixels are read after all checks pass)."""

    path: Path
    header: Dataset

    @property
    def series_uid(self) -> str:
        return str(self.header.get("SeriesInstanceUID", "") or "")


def load_dicom_series(folder: str | Path, *, spacing_tolerance_mm: float = 1e-2) -> Volume:
    """Read the single DICOM series in ``folder`` into a volume, checking it is complete.

    Every file directly in ``folder`` is read (no recursion; hidden files are skipped, and so
    are non-DICOM files and DICOM objects without an image, such as a README or a DICOMDIR,
    with a debug log). Slices are sorted by their position along the slice normal (the cross
    product of ImageOrientationPatient's row and column direction cosines), never by file name
    or InstanceNumber, and must be evenly spaced.

    Voxel values have RescaleSlope/RescaleIntercept applied. When every slope is 1, every
    intercept is a whole number and the values fit, the array is ``int16`` (CT in HU stays
    ``int16``); otherwise it is ``float32``.

    Args:
        folder: The folder holding one series.
        spacing_tolerance_mm: Largest allowed difference (mm) between any slice step and the
            median step; positions closer than this are duplicates.

    Returns:
        A volume with ``array`` of shape ``(columns, rows, slices)`` (axis 0 along a row,
        i.e. ImageOrientationPatient's first triplet, axis 1 down the columns, axis 2 along
        the slice normal), ``affine`` mapping voxel indices to RAS+ mm, ``source`` the folder,
        and ``meta`` holding Modality, SeriesInstanceUID, SeriesDescription, PatientID, the
        sorted file list (``files``), slice positions along the normal and rescale values.

    Raises:
        DicomSeriesError: no image in the folder; several series; a localizer or a slice of
            another size, pixel spacing or orientation; missing geometry tags; duplicate
            positions; a gap or uneven spacing; a gantry tilt; pixel data that cannot be
            decoded here (compressed transfer syntaxes without a decoder).
    """
    folder = Path(folder)
    if not spacing_tolerance_mm > 0:
        raise ValueError(f"spacing_tolerance_mm must be positive, got {spacing_tolerance_mm}")
    if not folder.is_dir():
        raise DicomSeriesError(folder, "not a folder (a DICOM series is read from a folder)")
    slices, skipped = _read_headers(folder)
    if not slices:
        detail = f"{len(skipped)} file(s) skipped as non-DICOM or non-image" if skipped else "empty"
        raise DicomSeriesError(folder, f"no DICOM image in this folder ({detail})")
    _require_one_series(folder, slices)
    _require_plain_images(slices)
    _require_same_grid(slices)
    row, col, normal = _require_same_orientation(slices)
    ordered, along = _sort_along_normal(slices, normal)
    _require_unique_positions(folder, ordered, along, spacing_tolerance_mm)
    _require_no_tilt(ordered, along, normal, spacing_tolerance_mm)
    step = _slice_step(folder, ordered, along, spacing_tolerance_mm)

    first = ordered[0].header
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0] = row * col_spacing  # axis 0 moves along a row: one column further
    lps[:3, 1] = col * row_spacing  # axis 1 moves down a column: one row further
    lps[:3, 2] = normal * step
    lps[:3, 3] = _position(ordered[0])
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS: negate the first two rows

    array, slopes, intercepts = _read_pixels(ordered)
    meta = _meta(ordered, along, slopes, intercepts, skipped)
    logger.debug(
        "%s: %d slices of %dx%d, spacing (%.4g, %.4g, %.4g) mm, %s",
        folder,
        len(ordered),
        array.shape[0],
        array.shape[1],
        col_spacing,
        row_spacing,
        step,
        array.dtype,
    )
    return Volume(array, affine, None, folder, meta)


def _read_headers(folder: Path) -> tuple[list[_Slice], list[str]]:
    """Headers of every image file directly in ``folder``, and the names of skipped files."""
    slices: list[_Slice] = []
    skipped: list[str] = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            logger.debug("%s: skipped, hidden file", path)
            continue
        if not path.is_file():
            logger.debug("%s: skipped, not a regular file (folders are not searched)", path)
            continue
        header = _read_header(path)
        if header is None:
            skipped.append(path.name)
            continue
        sop_class = str(header.get("SOPClassUID", "") or "")
        if sop_class == _MEDIA_STORAGE_DIRECTORY or "Rows" not in header or "Columns" not in header:
            kind = getattr(header.get("SOPClassUID"), "name", None) or sop_class or "unknown"
            logger.debug("%s: skipped, DICOM object without an image (%s)", path, kind)
            skipped.append(path.name)
            continue
        slices.append(_Slice(path, header))
    return slices, skipped


def _read_header(path: Path) -> Dataset | None:
    """The header of a DICOM file, or ``None`` (with a debug log) for a non-DICOM file."""
    try:
        with path.open("rb") as handle:
            head = handle.read(132)
    except OSError as exc:
        raise DicomSeriesError(path, f"cannot read file: {exc.strerror or exc}") from exc
    has_preamble = head[128:132] == b"DICM"
    # Files without the 128-byte preamble are accepted only when they start like a dataset
    # (group 0x0002 file meta or group 0x0008 identification), so a README is never parsed.
    if not has_preamble and (len(head) < 8 or int.from_bytes(head[:2], "little") not in (2, 8)):
        logger.debug("%s: skipped, not a DICOM file", path)
        return None
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, force=not has_preamble)
    except InvalidDicomError:
        logger.debug("%s: skipped, not a DICOM file", path)
        return None
    except Exception as exc:  # pydicom raises many unrelated types on corrupt headers
        if not has_preamble:
            logger.debug("%s: skipped, not a DICOM file (%s)", path, exc)
            return None
        raise DicomSeriesError(path, f"unreadable DICOM header ({exc})") from None


def _require_one_series(folder: Path, slices: list[_Slice]) -> None:
    by_series: dict[str, list[_Slice]] = {}
    for item in slices:
        by_series.setdefault(item.series_uid, []).append(item)
    if len(by_series) == 1:
        return
    parts = []
    for uid, members in sorted(by_series.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        header = members[0].header
        description = str(header.get("SeriesDescription", "") or "")
        number = header.get("SeriesNumber")
        note = ", localizer" if all(_is_localizer(m.header) for m in members) else ""
        parts.append(
            f"{uid or '<no SeriesInstanceUID>'} (#{number if number is not None else '?'} "
            f"'{description}', {len(members)} slice(s){note})"
        )
    raise DicomSeriesError(
        folder,
        f"holds {len(by_series)} DICOM series where one is expected: {'; '.join(parts)}. "
        "Put each series in its own folder.",
    )


def _image_type(header: Dataset) -> list[str]:
    value = header.get("ImageType")
    if value is None:
        return []
    if isinstance(value, str):
        return [value.upper()]
    return [str(v).upper() for v in value]


def _is_localizer(header: Dataset) -> bool:
    return "LOCALIZER" in _image_type(header)


def _require_plain_images(slices: list[_Slice]) -> None:
    """Refuse localizers, multi-frame and colour images, and slices without geometry tags."""
    for item in slices:
        header, path = item.header, item.path
        if _is_localizer(header):
            image_type = "\\".join(_image_type(header))
            raise DicomSeriesError(
                path,
                f"localizer/scout image (ImageType {image_type}) inside "
                "the series; remove it from the folder",
            )
        frames = int(header.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            raise DicomSeriesError(
                path, f"multi-frame image ({frames} frames); only single-frame slices are read"
            )
        samples = int(header.get("SamplesPerPixel", 1) or 1)
        if samples != 1:
            raise DicomSeriesError(
                path, f"colour image (SamplesPerPixel={samples}); only greyscale is read"
            )
        missing = [
            tag
            for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
            if header.get(tag) is None
        ]
        if missing:
            raise DicomSeriesError(
                path, f"missing {', '.join(missing)}: the slice cannot be placed in space"
            )
        for tag, count in (
            ("ImagePositionPatient", 3),
            ("ImageOrientationPatient", 6),
            ("PixelSpacing", 2),
        ):
            values = _floats(item, tag)
            if len(values) != count or not np.all(np.isfinite(values)):
                raise DicomSeriesError(path, f"{tag} must hold {count} numbers, got {values}")
        if min(_floats(item, "PixelSpacing")) <= 0:
            raise DicomSeriesError(
                path, f"PixelSpacing {_floats(item, 'PixelSpacing')} must be positive"
            )
        if "ModalityLUTSequence" in header and "RescaleSlope" not in header:
            raise DicomSeriesError(
                path, "voxel values are defined by a Modality LUT Sequence, which is not supported"
            )


def _floats(item: _Slice, tag: str) -> list[float]:
    value = item.header.get(tag)
    if value is None or value == "":
        return []
    if isinstance(value, (str, bytes, int, float)):
        value = [value]
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError):
        raise DicomSeriesError(item.path, f"{tag} is not numeric: {value!r}") from None


def _majority(slices: list[_Slice], key: Any, same: Any) -> tuple[_Slice, list[_Slice]]:
    """The first slice of the most common ``key`` (ties: first file) and the slices not ``same``."""
    keys = [key(item) for item in slices]
    common = Counter(keys).most_common(1)[0][0]
    reference = slices[keys.index(common)]
    return reference, [item for item in slices if not same(reference, item)]


def _list_names(items: list[_Slice]) -> str:
    names = ", ".join(item.path.name for item in items[:_LISTED])
    return names + (f" and {len(items) - _LISTED} more" if len(items) > _LISTED else "")


def _require_same_grid(slices: list[_Slice]) -> None:
    def same(a: _Slice, b: _Slice) -> bool:
        if (int(a.header.Rows), int(a.header.Columns)) != (
            int(b.header.Rows),
            int(b.header.Columns),
        ):
            return False
        diff = np.subtract(_floats(a, "PixelSpacing"), _floats(b, "PixelSpacing"))
        return bool(np.abs(diff).max() <= PIXEL_SPACING_TOLERANCE_MM)

    def key(item: _Slice) -> tuple[Any, ...]:
        spacing = tuple(round(v, 4) for v in _floats(item, "PixelSpacing"))
        return (int(item.header.Rows), int(item.header.Columns), *spacing)

    reference, odd = _majority(slices, key, same)
    if odd:
        first = odd[0]
        raise DicomSeriesError(
            first.path,
            f"{int(first.header.Rows)}x{int(first.header.Columns)} pixels of "
            f"{_floats(first, 'PixelSpacing')} mm where the rest of the series has "
            f"{int(reference.header.Rows)}x{int(reference.header.Columns)} pixels of "
            f"{_floats(reference, 'PixelSpacing')} mm (Rows x Columns, PixelSpacing); a "
            f"localizer or another series? Odd slice(s): {_list_names(odd)}",
        )


def _require_same_orientation(slices: list[_Slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check every slice shares one orientation; return its row, column and normal (LPS)."""

    def same(a: _Slice, b: _Slice) -> bool:
        diff = np.subtract(
            _floats(a, "ImageOrientationPatient"), _floats(b, "ImageOrientationPatient")
        )
        return bool(np.abs(diff).max() <= ORIENTATION_TOLERANCE)

    def key(item: _Slice) -> tuple[float, ...]:
        return tuple(round(v, 3) for v in _floats(item, "ImageOrientationPatient"))

    reference, odd = _majority(slices, key, same)
    iop = np.array(_floats(reference, "ImageOrientationPatient"))
    if odd:
        first = odd[0]
        raise DicomSeriesError(
            first.path,
            f"ImageOrientationPatient {_fmt(_floats(first, 'ImageOrientationPatient'))} differs "
            f"from the rest of the series ({_fmt(iop)}); a localizer or a reformat? Odd "
            f"slice(s): {_list_names(odd)}",
        )
    row, col = iop[:3], iop[3:]
    off = max(abs(np.linalg.norm(row) - 1), abs(np.linalg.norm(col) - 1), abs(row @ col))
    if off > ORIENTATION_TOLERANCE:
        raise DicomSeriesError(
            reference.path,
            f"ImageOrientationPatient {_fmt(iop)} is not two orthogonal unit vectors "
            f"(off by {off:.3g})",
        )
    # Direction cosines are written with few decimals; use the nearest rotation so the affine
    # is exactly orthogonal (a NIfTI qform cannot hold anything else).
    frame = np.stack([row, col, np.cross(row, col)], axis=1)
    u, _, vt = np.linalg.svd(frame)
    rotation = u @ vt
    return rotation[:, 0], rotation[:, 1], rotation[:, 2]


def _position(item: _Slice) -> np.ndarray:
    return np.array(_floats(item, "ImagePositionPatient"))


def _sort_along_normal(slices: list[_Slice], normal: np.ndarray) -> tuple[list[_Slice], np.ndarray]:
    along = np.array([_position(item) @ normal for item in slices])
    order = np.argsort(along, kind="stable")
    return [slices[i] for i in order], along[order]


def _describe(item: _Slice, along: float) -> str:
    return f"{item.path.name} at {_fmt(_position(item))} mm ({along:.4f} mm along the normal)"


def _require_unique_positions(
    folder: Path, ordered: list[_Slice], along: np.ndarray, tolerance: float
) -> None:
    steps = np.diff(along)
    duplicates = np.flatnonzero(steps <= tolerance)
    if duplicates.size:
        i = int(duplicates[0])
        raise DicomSeriesError(
            folder,
            f"{duplicates.size} duplicate slice position(s), first {_describe(ordered[i], along[i])} "
            f"and {_describe(ordered[i + 1], along[i + 1])} (within {tolerance:g} mm); "
            "several echoes, phases or repeated acquisitions in one series are not supported",
        )


def _require_no_tilt(
    ordered: list[_Slice], along: np.ndarray, normal: np.ndarray, tolerance: float
) -> None:
    """Refuse stacks whose positions do not lie on one line along the normal (gantry tilt)."""
    positions = np.array([_position(item) for item in ordered])
    distance = along - along[0]
    offsets = positions - positions[0] - np.outer(distance, normal)
    drift = np.linalg.norm(offsets, axis=1)
    allowed = tolerance + IN_PLANE_DRIFT_PER_MM * np.abs(distance)
    bad = np.flatnonzero(drift > allowed)
    if bad.size:
        i = int(bad[0])
        raise DicomSeriesError(
            ordered[i].path,
            f"slice position {_fmt(positions[i])} mm is {drift[i]:.3g} mm off the line through "
            f"the first slice ({ordered[0].path.name}) along the slice normal; gantry tilt or a "
            "sheared stack is not supported (resample it first)",
        )


def _slice_step(folder: Path, ordered: list[_Slice], along: np.ndarray, tolerance: float) -> float:
    """The uniform slice step (mm); a gap or an uneven step is an error."""
    if len(ordered) == 1:
        return _single_slice_thickness(ordered[0])
    steps = np.diff(along)
    expected = float(np.median(steps))
    bad = np.flatnonzero(np.abs(steps - expected) > tolerance)
    if not bad.size:
        return float((along[-1] - along[0]) / (len(ordered) - 1))
    i = int(bad[0])
    step = float(steps[i])
    ratio = step / expected
    whole = round(ratio)
    if whole >= 2 and abs(step - whole * expected) <= tolerance * whole:
        missing = f"{whole - 1} slice(s) seem missing"
    elif step < expected:
        missing = "uneven spacing, a step shorter than the median (0 slices missing)"
    else:
        missing = (
            f"uneven spacing, not a whole number of steps ({ratio - 1:.2f} slices' worth missing)"
        )
    more = f"; {bad.size - 1} more irregular step(s)" if bad.size > 1 else ""
    raise DicomSeriesError(
        folder,
        f"slice gap between {_describe(ordered[i], along[i])} and "
        f"{_describe(ordered[i + 1], along[i + 1])}: step {step:.4f} mm where the series' "
        f"median step is {expected:.4f} mm (tolerance {tolerance:g} mm); {missing}{more}. "
        f"Refusing an incomplete or unevenly spaced series of {len(ordered)} slices",
    )


def _single_slice_thickness(item: _Slice) -> float:
    for tag in ("SpacingBetweenSlices", "SliceThickness"):
        values = _floats(item, tag)
        if values and np.isfinite(values[0]) and abs(values[0]) > 0:
            return abs(values[0])
    logger.warning(
        "%s: single slice without SpacingBetweenSlices or SliceThickness; using 1 mm", item.path
    )
    return 1.0


def _read_pixels(ordered: list[_Slice]) -> tuple[np.ndarray, list[float], list[float]]:
    """Voxel values of shape (columns, rows, slices) with the rescale applied, and the rescales."""
    first = ordered[0].header
    rows, columns = int(first.Rows), int(first.Columns)
    slopes = [_rescale(item, "RescaleSlope", 1.0) for item in ordered]
    intercepts = [_rescale(item, "RescaleIntercept", 0.0) for item in ordered]
    whole = all(s == 1.0 for s in slopes) and all(float(b).is_integer() for b in intercepts)
    int16 = np.iinfo(np.int16)
    array = np.empty((columns, rows, len(ordered)), dtype=np.int16 if whole else np.float32)
    for k, item in enumerate(ordered):
        pixels = _decode(item)
        if pixels.shape != (rows, columns):
            raise DicomSeriesError(
                item.path,
                f"pixel data of shape {pixels.shape} where Rows x Columns is {rows}x{columns}",
            )
        if array.dtype == np.int16:
            values = pixels.astype(np.int64) + int(intercepts[k])
            if values.size and (values.min() < int16.min or values.max() > int16.max):
                logger.debug("%s: values leave the int16 range; using float32", item.path)
                array = array.astype(np.float32)
        else:
            values = pixels.astype(np.float64) * slopes[k] + intercepts[k]
        array[:, :, k] = values.T  # DICOM pixels are (row, column); axis 0 runs along a row
    return array, slopes, intercepts


def _rescale(item: _Slice, tag: str, default: float) -> float:
    values = _floats(item, tag)
    if not values:
        return default
    if len(values) != 1 or not np.isfinite(values[0]) or (tag == "RescaleSlope" and not values[0]):
        raise DicomSeriesError(item.path, f"invalid {tag} {values}")
    return values[0]


def _decode(item: _Slice) -> np.ndarray:
    try:
        dataset = pydicom.dcmread(item.path, force=True)
    except Exception as exc:
        raise DicomSeriesError(item.path, f"unreadable DICOM file ({exc})") from None
    if "PixelData" not in dataset:
        raise DicomSeriesError(item.path, "image header without PixelData")
    syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    try:
        return np.asarray(dataset.pixel_array)
    except Exception as exc:  # missing decoder plugins raise several types
        name = getattr(syntax, "name", None) or "unknown transfer syntax"
        hint = ""
        if getattr(syntax, "is_compressed", False):
            hint = (
                ". Decompress the series first (e.g. gdcmconv --raw or dcmdjpeg) or install "
                "a pydicom decoder plugin for it"
            )
        raise DicomSeriesError(
            item.path, f"cannot decode pixel data stored as {name} ({syntax}): {exc}{hint}"
        ) from None


def _meta(
    ordered: list[_Slice],
    along: np.ndarray,
    slopes: list[float],
    intercepts: list[float],
    skipped: list[str],
) -> dict[str, Any]:
    first = ordered[0].header

    def text(tag: str) -> str | None:
        value = first.get(tag)
        return None if value is None else str(value)

    meta: dict[str, Any] = {
        tag: text(tag)
        for tag in (
            "Modality",
            "SeriesInstanceUID",
            "SeriesDescription",
            "SeriesNumber",
            "StudyInstanceUID",
            "PatientID",
            "Manufacturer",
            "SliceThickness",
        )
    }
    meta["ImageType"] = _image_type(first)
    syntax = getattr(getattr(first, "file_meta", None), "TransferSyntaxUID", None)
    meta["TransferSyntaxUID"] = None if syntax is None else str(syntax)
    meta["files"] = [str(item.path) for item in ordered]
    meta["slice_positions_mm"] = [float(v) for v in along]
    meta["rescale_slope"] = slopes[0] if len(set(slopes)) == 1 else slopes
    meta["rescale_intercept"] = intercepts[0] if len(set(intercepts)) == 1 else intercepts
    meta["skipped_files"] = list(skipped)
    return meta


def _fmt(values: Any) -> str:
    return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")"


# --- writing ---------------------------------------------------------------------------

_SOP_CLASS = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}


def save_dicom_series(
    volume: Volume,
    folder: str | Path,
    *,
    modality: str = "CT",
    patient_id: str,
    series_description: str = "synthlesion synthetic",
    derivation: str = "synthetic lesions painted by synthlesion; provenance in its manifest",
    overwrite: bool = False,
) -> Path:
    """Write a 3D volume as one DICOM series (one file per slice), marked as synthetic.

    The inverse of :func:`load_dicom_series`: array axis 0 runs along a row, axis 1 down a
    column, axis 2 across slices (RAS affine, converted to DICOM's LPS). Integer volumes are
    stored as signed 16-bit pixels (CT stays HU); float volumes with a rescale slope chosen
    so the largest magnitude fits. The series says what it is: ``ImageType`` DERIVED /
    SECONDARY, the series description and a derivation description. UIDs are derived from
    the patient id and the voxel content, so equal inputs give equal files. The folder is
    written under a temporary name and renamed when complete.

    Args:
        volume: 3D image with its affine (mm, RAS).
        folder: The series folder to create.
        modality: ``"CT"`` or ``"MR"``.
        patient_id: Patient ID written into every file (use the synthetic case's pseudonym,
            never a real identifier).
        series_description: ``SeriesDescription``.
        derivation: ``DerivationDescription``.
        overwrite: Replace an existing folder.

    Returns:
        The series folder.

    Raises:
        ValueError: not 3D, an unknown modality, a sheared or tilted grid that DICOM cannot
            express, values that do not fit 16 bits, an existing folder.
    """
    folder = Path(folder)
    if volume.array.ndim != 3:
        raise ValueError(f"{volume.source}: a DICOM series needs a 3D volume, got {volume.shape}")
    if modality not in _SOP_CLASS:
        raise ValueError(f"modality={modality!r} not in {sorted(_SOP_CLASS)}")
    if folder.exists() and not overwrite:
        raise ValueError(f"{folder}: exists; choose a new folder or overwrite=True")
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(volume.affine, dtype=float)
    axes = lps[:3, :3]
    sizes = np.linalg.norm(axes, axis=0)
    row, col, along = (axes[:, a] / sizes[a] for a in range(3))
    normal = np.cross(row, col)
    if abs(float(row @ col)) > 1e-4 or float(along @ normal) < 1 - 1e-4:
        raise ValueError(
            f"{volume.source}: the voxel grid is sheared or its slices are not stacked along "
            "the in-plane normal (row x column); DICOM slices cannot express that: reorient first"
        )
    pixels, slope = _to_int16(volume)
    study = pydicom.uid.generate_uid(entropy_srcs=[patient_id, "study"])
    content = hashlib.sha256(pixels.tobytes()).hexdigest()
    series = pydicom.uid.generate_uid(entropy_srcs=[patient_id, series_description, content])
    frame = pydicom.uid.generate_uid(entropy_srcs=[series, "frame"])
    staging = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        for k in range(pixels.shape[2]):
            uid = pydicom.uid.generate_uid(entropy_srcs=[series, str(k)])
            ds = _slice_dataset(modality, uid)
            ds.PatientID = patient_id
            ds.PatientName = patient_id
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
            ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
            ds.ImageType = ["DERIVED", "SECONDARY"]
            ds.SeriesDescription = series_description
            ds.DerivationDescription = derivation
            ds.ImagePositionPatient = [f"{v:.6f}" for v in lps[:3, 3] + k * axes[:, 2]]
            ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row, *col)]
            ds.PixelSpacing = [f"{sizes[1]:.6f}", f"{sizes[0]:.6f}"]  # row, column spacing
            ds.SliceThickness = f"{sizes[2]:.6f}"
            ds.SpacingBetweenSlices = f"{sizes[2]:.6f}"
            ds.Rows, ds.Columns = pixels.shape[1], pixels.shape[0]
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.RescaleIntercept, ds.RescaleSlope = "0", f"{slope:.10g}"
            ds.PixelData = np.ascontiguousarray(pixels[:, :, k].T).astype("<i2").tobytes()
            ds.save_as(staging / f"{k + 1:04d}.dcm", enforce_file_format=True)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _to_int16(volume: Volume) -> tuple[np.ndarray, float]:
    """Pixels as int16 and the rescale slope that gives the volume's values back."""
    array = np.asarray(volume.array)
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(np.int16)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise ValueError(f"{volume.source}: values outside the int16 range")
        return array.astype(np.int16), 1.0
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{volume.source}: NaN or Inf voxels cannot be stored")
    peak = float(np.abs(array).max()) if array.size else 0.0
    slope = peak / 32767 if peak > 0 else 1.0
    return np.rint(array / slope).astype(np.int16), slope


def _slice_dataset(modality: str, sop_uid: str) -> Dataset:
    """An empty slice dataset with its file meta (explicit VR little endian)."""
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = _SOP_CLASS[modality]
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = _SOP_CLASS[modality], sop_uid, modality
    return ds
