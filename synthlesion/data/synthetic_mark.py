"""The synthetic mark: every NIfTI file synthlesion writes as synthetic says so in its header.

A synthetic image or label map carries, in its NIfTI header,

* a header extension (code 6, "comment") holding JSON ``{"synthlesion": {"synthetic": true,
  "case": ..., "run": ..., "source_case": ..., "generator": ...}}``, and
* ``descrip`` = ``"synthlesion synthetic <case>"`` (cut to the field's 80 bytes).

So a synthetic file copied, renamed or moved into a folder of real scans, with no manifest
beside it, is still recognised by anything that reads its header (:func:`read_mark`): ``check``,
``split``, the dataset builder and the evaluation loaders. The mark lives on the data floor
because ``check`` and ``split`` read it; :mod:`synthlesion.provenance` writes it into every
synthetic file. DICOM output says DERIVED/SECONDARY instead
(:func:`synthlesion.data.dicom.save_dicom_series`). A mark can be stripped by someone who means
to; the content hashes of the registry (:mod:`synthlesion.provenance.registry`) still catch
such a file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import nibabel as nib

from synthlesion.data.cases import Case
from synthlesion.data.io import is_nifti
from synthlesion.data.volume import Volume

MARK_EXTENSION_CODE = 6  # NIfTI "comment" extension
MARK_KEY = "synthlesion"
DESCRIP_PREFIX = "synthlesion synthetic"


def mark_volume(volume: Volume, facts: Mapping[str, Any]) -> Volume:
    """The volume with the synthetic mark in (a copy of) its header.

    Args:
        volume: What will be written as a synthetic file.
        facts: JSON-ready facts to record: ``case`` (the synthetic case id), ``run``,
            ``source_case``, ``generator`` (model folder hash)...

    Returns:
        A volume with the same voxels and affine whose header holds the mark (an earlier mark
        is replaced).
    """
    header = volume.header.copy() if volume.header is not None else nib.Nifti1Header()
    if not isinstance(header, nib.Nifti1Header):
        header = nib.Nifti1Header.from_header(header)
    kept = [e for e in header.extensions if _mark_of(e) is None]
    header.extensions.clear()
    header.extensions.extend(kept)
    payload = {MARK_KEY: {"synthetic": True, **{k: v for k, v in facts.items()}}}
    content = json.dumps(payload, sort_keys=True, allow_nan=False).encode("utf-8")
    header.extensions.append(nib.nifti1.Nifti1Extension(MARK_EXTENSION_CODE, content))
    case = str(facts.get("case", ""))
    header["descrip"] = f"{DESCRIP_PREFIX} {case}".strip().encode("ascii", "replace")[:79]
    return Volume(volume.array, volume.affine, header, volume.source, dict(volume.meta))


def read_mark(path: str | Path) -> dict[str, Any] | None:
    """The synthetic mark of a NIfTI file (its recorded facts), or ``None`` when it has none.

    Only the header is read (not the voxels). A file that is not NIfTI, or cannot be read,
    has no mark here (other checks report unreadable files).
    """
    path = Path(path)
    if not is_nifti(path) or not path.is_file():
        return None
    try:
        header = nib.load(str(path)).header
    except Exception:  # noqa: BLE001 - unreadable files are reported by the readers that need them
        return None
    return header_mark(header)


def marked_files(cases: Iterable[Case]) -> list[tuple[str, Path, dict[str, Any]]]:
    """``(case id, file, mark)`` for every image or mask of the given cases that carries the
    synthetic mark (only headers are read)."""
    found = []
    for case in cases:
        for path in (*case.images, *([case.mask] if case.mask is not None else [])):
            mark = read_mark(path)
            if mark is not None:
                found.append((case.case_id, Path(path), mark))
    return found


def header_mark(header: Any) -> dict[str, Any] | None:
    """The synthetic mark of a header (extension first, then ``descrip``), or ``None``."""
    for extension in getattr(header, "extensions", []) or []:
        facts = _mark_of(extension)
        if facts is not None:
            return facts
    try:
        descrip = bytes(header["descrip"]).split(b"\x00")[0].decode("ascii", "replace")
    except (KeyError, TypeError, ValueError):
        return None
    if descrip.startswith(DESCRIP_PREFIX):
        return {"synthetic": True, "case": descrip[len(DESCRIP_PREFIX) :].strip() or None}
    return None


def _mark_of(extension: Any) -> dict[str, Any] | None:
    if getattr(extension, "get_code", lambda: None)() != MARK_EXTENSION_CODE:
        return None
    try:
        payload = json.loads(extension.get_content())
    except (TypeError, ValueError, UnicodeDecodeError):
        return None
    facts = payload.get(MARK_KEY) if isinstance(payload, dict) else None
    if isinstance(facts, dict) and facts.get("synthetic") is True:
        return facts
    return None


__all__ = [
    "DESCRIP_PREFIX",
    "MARK_EXTENSION_CODE",
    "header_mark",
    "mark_volume",
    "marked_files",
    "read_mark",
]
