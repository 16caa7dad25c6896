"""Reading and writing images without silent damage.

NIfTI files are read completely into memory and, when gzipped, decompressed in one pass that
checks the gzip CRC and length trailer, so a truncated or bit-flipped file is an error rather
than wrong voxels (nibabel alone reads lazily and stops before the trailer). Writes go to a
temporary file that is renamed into place.
"""

from __future__ import annotations

import gzip
import logging
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np

from synthlesion.data.cases import Case
from synthlesion.data.volume import Volume, align_to_grid, corner_distance_mm, header_with_affine
from synthlesion.errors import GeometryError, ImageReadError
from synthlesion.storage import atomic_write_bytes

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
FormMismatchPolicy = Literal["error", "sform"]


def is_nifti(path: str | Path) -> bool:
    """True for ``.nii`` and ``.nii.gz`` paths."""
    name = str(path).lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def load_image(
    path: str | Path,
    *,
    spatial_dims: int | None = None,
    on_form_mismatch: FormMismatchPolicy = "error",
    form_tolerance_mm: float = 1e-3,
) -> Volume:
    """Read a NIfTI file or a DICOM series folder into a :class:`Volume`.

    Args:
        path: A ``.nii``/``.nii.gz`` file or a folder holding one DICOM series.
        spatial_dims: Expected number of spatial axes (2 or 3). ``None`` accepts either.
        on_form_mismatch: What to do when a NIfTI's qform and sform disagree: ``"error"``
            raises :class:`GeometryError`; ``"sform"`` keeps the sform (nibabel's rule) and
            records the disagreement in ``volume.meta["qform_sform_difference_mm"]``.
        form_tolerance_mm: Largest allowed qform/sform disagreement, in mm.

    Raises:
        ImageReadError: The file is missing, empty, truncated, corrupt or of the wrong shape.
        GeometryError: qform and sform disagree (with ``on_form_mismatch="error"``).
    """
    path = Path(path)
    if path.is_dir():
        from synthlesion.data.dicom import load_dicom_series

        volume = load_dicom_series(path)
        return _check_dims(volume, spatial_dims)
    return load_nifti(
        path,
        spatial_dims=spatial_dims,
        on_form_mismatch=on_form_mismatch,
        form_tolerance_mm=form_tolerance_mm,
    )


def read_nifti_bytes(path: str | Path) -> bytes:
    """Return the uncompressed bytes of a NIfTI file, verifying a gzip stream completely.

    Raises:
        ImageReadError: missing, empty, not gzip despite ``.gz``, truncated, or CRC failure.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageReadError(path, "file does not exist", "missing") from None
    except OSError as exc:
        raise ImageReadError(path, f"cannot read file: {exc.strerror or exc}") from exc
    if not data:
        raise ImageReadError(path, "empty file (0 bytes)", "empty")
    if str(path).lower().endswith(".gz"):
        if data[:2] != b"\x1f\x8b":
            raise ImageReadError(path, "not a gzip file although the name ends in .gz", "corrupt")
        data = _gunzip_capped(path, data)
    return data


GZIP_HEADER_SLACK = 1 << 20  # header extensions may add this much beyond the voxel data


def _gunzip_capped(path: Path, data: bytes) -> bytes:
    """Decompress a gzip NIfTI, never past the size its own header declares.

    The NIfTI header (the first 348 or 540 decompressed bytes) gives the data's offset, shape
    and type, so the whole file may be at most ``vox_offset + voxels * bytes per voxel`` (plus
    a little slack); a stream that expands beyond that (a decompression bomb, or a header that
    lies) is refused before it fills memory. Every member's CRC and length are verified.
    """
    out = bytearray()
    cap: int | None = None
    rest = data
    while rest:
        stream = zlib.decompressobj(16 + zlib.MAX_WBITS)  # one gzip member, CRC checked
        chunk = rest
        while True:
            limit = (cap - len(out) + 1) if cap is not None else 65_536
            try:
                piece = stream.decompress(chunk, max(1, limit))
            except zlib.error as exc:
                raise ImageReadError(path, f"corrupt gzip stream ({exc})", "corrupt") from None
            out += piece
            chunk = stream.unconsumed_tail
            if cap is None and len(out) >= 348:
                header_class = _image_class(path, bytes(out[:4])).header_class
                if len(out) >= header_class.template_dtype.itemsize:  # the whole header is in
                    cap = _declared_size(path, bytes(out[:540])) + GZIP_HEADER_SLACK
            if cap is not None and len(out) > cap:
                raise ImageReadError(
                    path,
                    f"the gzip stream expands beyond the {cap - GZIP_HEADER_SLACK} bytes its "
                    "NIfTI header declares (a decompression bomb or a corrupt header); not read",
                    "corrupt",
                )
            if stream.eof or (not chunk and not piece):
                break
        if not stream.eof:
            raise ImageReadError(
                path,
                "truncated gzip stream (the file ends before its end-of-stream marker)",
                "truncated",
            )
        rest = stream.unused_data.lstrip(b"\x00")  # further members; padding zeros ignored
        if rest and rest[:2] != b"\x1f\x8b":
            raise ImageReadError(path, "trailing garbage after the gzip stream", "corrupt")
    return bytes(out)


def _declared_size(path: Path, head: bytes) -> int:
    """Bytes a NIfTI file holds by its header (NIfTI-1 or -2), read from its first bytes."""
    klass = _image_class(path, head).header_class
    block = head[: klass.template_dtype.itemsize]
    try:
        little = int.from_bytes(block[:4], "little") == klass.template_dtype.itemsize
        header = klass(block, endianness="<" if little else ">", check=False)
        return declared_bytes(header)
    except Exception as exc:  # nibabel raises several unrelated types here
        raise ImageReadError(path, f"unreadable NIfTI header ({exc})", "header") from None


def declared_bytes(header: nib.Nifti1Header) -> int:
    """``vox_offset`` + the voxel data the header describes: the size of the whole file."""
    shape = tuple(int(s) for s in header.get_data_shape())
    if any(n < 0 for n in shape):
        raise ValueError(f"negative dimension in {shape}")
    offset = max(int(header["vox_offset"]), int(header["sizeof_hdr"]))
    return offset + int(np.prod(shape, dtype=np.int64)) * header.get_data_dtype().itemsize


def load_nifti(
    path: str | Path,
    *,
    spatial_dims: int | None = None,
    on_form_mismatch: FormMismatchPolicy = "error",
    form_tolerance_mm: float = 1e-3,
    channels_last: bool = False,
) -> Volume:
    """Read a ``.nii`` or ``.nii.gz`` file fully; see :func:`load_image` for the arguments.

    ``channels_last`` returns a 4D file as it is (shape ``(X, Y, Z, C)``), for
    :func:`load_channels`; otherwise 4D data is refused.
    """
    path = Path(path)
    raw = read_nifti_bytes(path)
    image = _parse_nifti(path, raw)
    header = image.header
    shape = tuple(int(s) for s in header.get_data_shape())
    dtype = header.get_data_dtype()
    needed = declared_bytes(header)
    if len(raw) < needed:
        raise ImageReadError(
            path,
            f"truncated: the header declares {needed} bytes (shape {shape}, {dtype}), "
            f"the file holds {len(raw)}",
            "truncated",
        )
    array = _read_array(path, image)
    meta: dict[str, object] = {}
    difference = qform_sform_difference_mm(header, shape)
    if difference is not None:
        meta["qform_sform_difference_mm"] = difference
        if difference > form_tolerance_mm:
            if on_form_mismatch == "error":
                raise GeometryError(
                    f"{path}: qform and sform disagree by up to {difference:.3g} mm at the "
                    "corners of the grid; fix the header or load with on_form_mismatch='sform'"
                )
            logger.warning("%s: qform and sform disagree by %.3g mm; using sform", path, difference)
    _require_usable_affine(path, image.affine, shape)
    volume = Volume(array, image.affine, header, path, meta)
    if channels_last and array.ndim == 4:
        return volume
    return _check_dims(volume, spatial_dims)


def load_case_volumes(
    case: Case, *, spatial_dims: int | None = None, tolerance_mm: float = 1e-3
) -> tuple[list[Volume], Volume | None]:
    """A case's image channels (on the first channel's grid) and its mask read onto that grid.

    The one reading of a source case for training and for the generators: every channel
    (:func:`load_channels`), no NaN/Inf voxel, the mask aligned exactly (:func:`load_mask_for`).

    Raises:
        ImageReadError: unreadable files or NaN/Inf voxels (naming the file and the case).
        GeometryError: channels or mask on another grid (naming the case).
    """
    try:
        channels = load_channels(case.images, spatial_dims=spatial_dims)
    except GeometryError as exc:
        raise GeometryError(f"case {case.case_id}: channels differ: {exc}") from None
    for volume in channels:
        if volume.array.dtype.kind == "f":
            bad = int(np.count_nonzero(~np.isfinite(volume.array)))
            if bad:
                raise ImageReadError(
                    volume.source or case.image,
                    f"case {case.case_id}: {bad} NaN/Inf voxel(s)",
                    "nonfinite",
                )
    if case.mask is None:
        return channels, None
    try:
        mask = load_mask_for(channels[0], case.mask, tolerance_mm)
    except GeometryError as exc:
        raise GeometryError(f"case {case.case_id}: {exc}") from None
    return channels, mask


def image_grid(path: str | Path) -> Volume:
    """The voxel grid of an image file without reading its voxels: a :class:`Volume` whose
    array is a zero-strided placeholder of the image's spatial shape (the affine is the file's).

    For reading a mask onto the grid of an image (:func:`load_mask_for`) where the image's
    voxels are not needed. A 4D file (channels last) gives its 3D grid; a DICOM folder is read.
    """
    path = Path(path)
    if path.is_dir() or not is_nifti(path):
        return load_image(path)
    try:
        header_image = nib.load(str(path))
    except FileNotFoundError:
        raise ImageReadError(path, "file does not exist", "missing") from None
    except Exception as exc:  # nibabel raises several unrelated types here
        raise ImageReadError(path, f"unreadable NIfTI header ({exc})", "header") from None
    shape = tuple(int(s) for s in header_image.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    shape = shape[:3]  # a one-slice 3D image stays 3D, as load_image keeps it
    array = np.broadcast_to(np.zeros((), dtype=np.uint8), shape)
    return Volume(array, header_image.affine, None, path, {"grid_only": True})


def load_channels(paths: Sequence[str | Path], *, spatial_dims: int | None = None) -> list[Volume]:
    """Every image channel of one case, one :class:`Volume` each, all on one grid.

    A case stores its channels as one file per channel (nnU-Net ``_0000``, ``_0001``...), or as
    one 4D NIfTI whose last axis holds the channels (Medical Segmentation Decathlon); both give
    the same list. Channels stored in another axis order than the first are read onto its grid
    exactly (:func:`~synthlesion.data.volume.align_to_grid`).

    Raises:
        ImageReadError: a missing or unreadable channel file (named).
        GeometryError: channels that do not share one physical grid.
    """
    volumes: list[Volume] = []
    for path in paths:
        path = Path(path)
        if path.is_dir() or not is_nifti(path):
            volumes.append(load_image(path, spatial_dims=spatial_dims))
            continue
        volume = load_nifti(path, spatial_dims=spatial_dims, channels_last=True)
        if volume.array.ndim == 4 and spatial_dims in (None, 3):
            for c in range(volume.array.shape[3]):
                volumes.append(
                    Volume(
                        np.ascontiguousarray(volume.array[..., c]),
                        volume.affine,
                        volume.header,
                        volume.source,
                        {**volume.meta, "channel_index": c},
                    )
                )
        else:
            volumes.append(_check_dims(volume, spatial_dims))
    if not volumes:
        raise ImageReadError(Path("<case>"), "no image channel given", "channels")
    first = volumes[0]
    return [first, *(align_to_grid(first, v) for v in volumes[1:])]


def save_image(volume: Volume, path: str | Path, *, compresslevel: int = 6) -> Path:
    """Write ``volume`` as NIfTI atomically, keeping affine, header fields and dtype.

    The header is the volume's own, as it was read: the qform and sform codes are kept (a
    qform code 0 stays 0, a sform code 2 or 4 stays 2 or 4) and both forms are rewritten with
    ``volume.affine`` (see :func:`~synthlesion.data.volume.header_with_affine`, which also says
    when a code has to change: no header at all gives codes 1/1). Scale factors are cleared,
    since the array holds true values. The gzip stream is written with a zero timestamp, so
    equal volumes give equal bytes (and equal sha256 hashes in manifests).

    Args:
        volume: What to write; its array dtype is kept (int16 stays int16).
        path: Destination ending in ``.nii`` or ``.nii.gz``.
        compresslevel: zlib level for ``.nii.gz`` (1 fastest, 9 smallest).

    Returns:
        The path written.
    """
    path = Path(path)
    if not is_nifti(path):
        raise ImageReadError(path, "can only write .nii or .nii.gz files")
    header = header_with_affine(volume.header, volume.affine, volume.shape)
    header.set_data_dtype(volume.array.dtype)
    # Our array holds true values; never let a stale scale factor rescale them on write.
    header.set_slope_inter(None, None)
    # No affine argument: the header already holds it under its own codes, and nibabel would
    # otherwise rewrite them (sform 'aligned', qform 'unknown') on any float32 rounding.
    image = nib.Nifti1Image(volume.array, None, header)
    raw = image.to_bytes()
    if str(path).lower().endswith(".gz"):
        raw = gzip.compress(raw, compresslevel=compresslevel, mtime=0)
    atomic_write_bytes(path, raw)
    return path


def load_mask_for(
    image: Volume,
    mask_path: str | Path,
    tolerance_mm: float = 1e-3,
    *,
    on_form_mismatch: FormMismatchPolicy = "error",
) -> Volume:
    """Read a case's mask onto its image's voxel grid: the one way to read a mask.

    The mask may be stored in another axis order or with flipped axes (image LPS, mask RAS)
    and, for a 2D image ``(X, Y)``, as ``(X, Y, 1)`` (or the reverse): its voxels are then
    rearranged exactly onto the image grid (see
    :func:`~synthlesion.data.volume.align_to_grid`; no interpolation, values never change).

    Args:
        image: The case's image (its first channel), shape ``(X, Y)`` or ``(X, Y, Z)``.
        mask_path: The label map file (NIfTI or DICOM folder).
        tolerance_mm: Largest spacing/origin difference (mm) and direction difference (mm per
            voxel) between the two grids; also the qform/sform tolerance of the mask file.
        on_form_mismatch: See :func:`load_image`.

    Returns:
        The mask with ``image.shape`` and ``image.affine``; the very volume read when it is
        already on the image grid. ``meta["stored_axis_order"]`` says how it was stored when
        axes were permuted or flipped.

    Raises:
        ImageReadError: The mask file cannot be read or has more than 3 dimensions.
        GeometryError: The mask's grid is not the image's grid in any axis order; the message
            names both files and each difference.
    """
    mask = load_image(mask_path, on_form_mismatch=on_form_mismatch, form_tolerance_mm=tolerance_mm)
    return align_to_grid(image, mask, tolerance_mm)


def qform_sform_difference_mm(header: nib.Nifti1Header, shape: tuple[int, ...]) -> float | None:
    """Largest distance (mm) between the world positions qform and sform give the grid's corners.

    Returns ``None`` unless both forms are set (code > 0).
    """
    qform, qcode = header.get_qform(coded=True)
    sform, scode = header.get_sform(coded=True)
    if not qcode or not scode or qform is None or sform is None:
        return None
    return corner_distance_mm(qform, sform, shape)


def _image_class(path: Path, head: bytes) -> type[nib.Nifti1Image]:
    """NIfTI-1 or NIfTI-2, by the header size its first four bytes give (either byte order)."""
    sizes = (int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big"))
    if 540 in sizes:
        return nib.Nifti2Image
    if 348 in sizes:
        return nib.Nifti1Image
    raise ImageReadError(path, "unreadable header: not a NIfTI-1 or NIfTI-2 file", "header")


def _parse_nifti(path: Path, raw: bytes) -> nib.Nifti1Image:
    if len(raw) < 348:
        raise ImageReadError(
            path, f"file too short for a NIfTI header ({len(raw)} bytes)", "truncated"
        )
    klass = _image_class(path, raw)
    try:
        return klass.from_bytes(raw)
    except Exception as exc:  # nibabel raises several unrelated types here
        raise ImageReadError(path, f"unreadable NIfTI header ({exc})", "header") from None


def _read_array(path: Path, image: nib.Nifti1Image) -> np.ndarray:
    # nibabel moves the scale factors from the header to the array proxy on load.
    slope = float(getattr(image.dataobj, "slope", 1.0))
    inter = float(getattr(image.dataobj, "inter", 0.0))
    try:
        if slope == 1.0 and inter == 0.0:
            array = np.asarray(image.dataobj.get_unscaled())
        else:
            array = np.asarray(image.dataobj)
    except Exception as exc:
        raise ImageReadError(path, f"cannot read voxel data ({exc})", "corrupt") from None
    if not array.flags.writeable or not array.flags.owndata:
        array = np.array(array)
    return array


def _require_usable_affine(path: Path, affine: np.ndarray, shape: tuple[int, ...]) -> None:
    """Refuse a header whose voxel-to-world matrix cannot place the voxels: non-finite values,
    or a voxel size of 0 on a spatial axis (the grid collapses)."""
    if not np.all(np.isfinite(affine)):
        raise ImageReadError(
            path,
            "the header's affine (qform/sform) holds NaN or Inf; voxels cannot be placed",
            "affine",
        )
    sizes = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    axes = min(3, max(2, len([n for n in shape if n > 1]) or 2))
    zero = [i for i in range(axes) if sizes[i] <= 0]
    if zero:
        raise ImageReadError(
            path,
            f"the header gives a voxel size of 0 mm on axis {zero[0]}; voxels cannot be "
            "placed (fix pixdim / the sform)",
            "affine",
        )


def _check_dims(volume: Volume, spatial_dims: int | None) -> Volume:
    array = volume.array
    path = volume.source
    # Only trailing axes of size 1 are squeezed, never below the expected dimensions (3 when
    # none is asked for, so a one-slice 3D image stays 3D).
    target = spatial_dims if spatial_dims is not None else 3
    while array.ndim > target and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim > 3 or (spatial_dims is not None and array.ndim != spatial_dims):
        expected = f"{spatial_dims}D" if spatial_dims is not None else "2D or 3D"
        raise ImageReadError(
            path or Path("<memory>"),
            f"{array.ndim}D image of shape {tuple(array.shape)} where a {expected} image is "
            "expected (only a trailing axis of size 1 is squeezed)",
            "dimensions",
        )
    if array.ndim < 2:
        raise ImageReadError(
            path or Path("<memory>"), f"{array.ndim}D data is not an image", "dimensions"
        )
    if array is volume.array:
        return volume
    return Volume(
        np.ascontiguousarray(array), volume.affine, volume.header, volume.source, volume.meta
    )
