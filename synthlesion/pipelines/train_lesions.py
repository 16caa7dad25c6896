"""What the generators need to know about the train split's real lesions, read once.

Sampling and the hand-crafted generator start by reading every labelled train scan: which
scans hold a lesion, the bank of real lesion shapes to transplant
(:class:`~synthlesion.masks.MaskBank`) and the intensity reference of the quality gates
(:class:`~synthlesion.pipelines.quality.RealLesionReference`). :func:`train_lesions` reads each
scan once for all three, measures each lesion in a box around it, and keeps the answers in a
cache beside the splits file (the data's lock): ``<splits>.train-lesions-<settings>.npz``. A
later run reads the cache and opens only the scans whose files changed (size or modification
time), so its set-up costs the same for a 128^3 or a 512^3 scan. A cache that cannot be
written (a read-only folder) or read back (edited, truncated, another format) is recomputed,
with a warning; it never decides anything the scans would not.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from synthlesion.data.cases import Case
from synthlesion.data.io import image_grid, load_image, load_mask_for
from synthlesion.errors import GeometryError, ImageReadError
from synthlesion.masks.lesions import (
    MIN_LESION_VOXELS,
    connected_lesions,
    warn_if_listed_otherwise,
)
from synthlesion.masks.shapes import BankLesion, MaskBank
from synthlesion.pipelines.quality import LesionStats, RealLesionReference, scan_lesion_statistics
from synthlesion.storage import atomic_write_bytes, canonical_json_hash, sha256_bytes, sha256_file

logger = logging.getLogger(__name__)

CACHE_FORMAT = "synthlesion-train-lesions/1"
_CACHE_NAME = re.compile(r".+\.train-lesions-[0-9a-f]{12}\.npz")


def is_cache_file(path: str | Path) -> bool:
    """Whether ``path`` is a set-up cache written by :func:`train_lesions` (not data)."""
    return _CACHE_NAME.fullmatch(Path(path).name) is not None


@dataclass(frozen=True)
class ScanLesions:
    """One labelled scan's lesions.

    Attributes:
        case_id: The case.
        has_lesion: Whether its label map holds a lesion voxel.
        shapes: Its lesions cut out for the bank (connected, specks skipped).
        stats: Intensity statistics of the same lesions, first channel.
    """

    case_id: str
    has_lesion: bool
    shapes: tuple[BankLesion, ...] = ()
    stats: tuple[LesionStats, ...] = ()


@dataclass(frozen=True)
class TrainLesions:
    """The train split's real lesions, as the generators' set-up needs them.

    Attributes:
        scans: Per labelled scan, by case id.
        n_classes: Lesion classes (label values given).
    """

    scans: dict[str, ScanLesions]
    n_classes: int

    @property
    def presence(self) -> dict[str, bool]:
        """Case id -> whether the scan holds a lesion voxel."""
        return {k: v.has_lesion for k, v in self.scans.items()}

    def bank(self) -> MaskBank | None:
        """The bank of every lesion shape (``None``: no lesion)."""
        shapes = [s for scan in self.scans.values() for s in scan.shapes]
        return MaskBank(shapes, self.n_classes) if shapes else None

    def reference(self) -> RealLesionReference | None:
        """The quality gates' reference (``None``: no lesion)."""
        stats = [s for scan in self.scans.values() for s in scan.stats]
        if not stats:
            return None
        return RealLesionReference(
            tuple(s.mean for s in stats),
            tuple(s.std for s in stats),
            tuple(s.contrast for s in stats),
        )


def measure_scan(
    case: Case,
    lesion_labels: Sequence[int],
    organ_labels: Sequence[int],
    min_voxels: int = MIN_LESION_VOXELS,
) -> ScanLesions:
    """Read one labelled scan once: lesion presence, shapes and statistics.

    The label map is read onto the image's grid (:func:`~synthlesion.data.io.load_mask_for`:
    geometry checked); the image's voxels are read only when the scan holds a lesion.
    """
    if case.mask is None:
        return ScanLesions(case.case_id, False)
    mask = load_mask_for(image_grid(case.image), case.mask)  # the image's voxels wait
    labels = np.asarray(mask.array)
    if labels.dtype.kind == "f":
        labels = np.rint(labels).astype(np.int64)  # integer-valued float label maps
    found = bool(np.isin(labels, list(lesion_labels)).any())
    warn_if_listed_otherwise(case, found)
    if not found or case.origin != "real":
        return ScanLesions(case.case_id, found)
    lesions = list(connected_lesions(labels, lesion_labels, min_voxels=min_voxels))
    digest = sha256_file(case.mask) if lesions else ""
    voxel = float(np.prod(mask.spacing))
    shapes = tuple(
        BankLesion(
            lesion.classes,
            tuple(mask.spacing),
            case.case_id,
            case.patient_id,
            digest,
            float(lesion.voxels) * voxel,
        )
        for lesion in lesions
    )
    image = load_image(case.image)
    stats = scan_lesion_statistics(
        np.asarray(image.array), labels, lesion_labels, organ_labels, image.spacing, lesions
    )
    finite = [s for s in stats if np.isfinite([s.mean, s.std, s.contrast]).all()]
    if len(finite) < len(stats):
        logger.warning(
            "case %s: %d lesion(s) hold non-finite voxels (NaN or inf in %s); left out of the "
            "quality gates' reference",
            case.case_id,
            len(stats) - len(finite),
            case.image,
        )
    return ScanLesions(case.case_id, True, shapes, tuple(finite))


def train_lesions(
    cases: Sequence[Case],
    lesion_labels: Sequence[int],
    organ_labels: Sequence[int],
    *,
    cache_beside: str | Path | None = None,
) -> TrainLesions:
    """Every labelled case's lesions (:func:`measure_scan`), from the cache where it holds them.

    Args:
        cases: The labelled real train cases.
        lesion_labels: Lesion label values, in class order.
        organ_labels: Label values the statistics' ring is restricted to.
        cache_beside: The splits file; the cache lives beside it (``None``: no cache).
    """
    settings = {
        "format": CACHE_FORMAT,
        "lesion_labels": [int(v) for v in lesion_labels],
        "organ_labels": [int(v) for v in organ_labels],
        "min_voxels": MIN_LESION_VOXELS,
    }
    path = None
    if cache_beside is not None:
        lock = Path(cache_beside)
        path = lock.with_name(f"{lock.name}.train-lesions-{canonical_json_hash(settings)[:12]}.npz")
    cached = _read_cache(path) if path is not None and path.is_file() else {}
    scans: dict[str, ScanLesions] = {}
    fresh = 0
    for case in cases:
        if case.mask is None:
            continue
        key = _fingerprint(case)
        entry = cached.get(case.case_id)
        if key is not None and entry is not None and entry[0] == key:
            scans[case.case_id] = entry[1]
            continue
        fresh += 1
        try:
            scans[case.case_id] = measure_scan(case, lesion_labels, organ_labels)
        except (GeometryError, ImageReadError) as exc:
            # this scan fails alone later (as a source it is listed in the run's report)
            logger.warning("case %s: not read for the set-up (%s)", case.case_id, exc)
            scans[case.case_id] = ScanLesions(case.case_id, False)
            cached.pop(case.case_id, None)
            continue
        if key is not None:
            cached[case.case_id] = (key, scans[case.case_id])
    if fresh:
        logger.info("read %d labelled scan(s) (%d from the cache)", fresh, len(scans) - fresh)
    else:
        logger.info("every labelled scan's lesions read from the cache %s", path)
    if path is not None and fresh:
        _write_cache(path, cached, settings)
    return TrainLesions(scans, max(1, len(lesion_labels)))


def _fingerprint(case: Case) -> list[Any] | None:
    """What a cached entry must still match: every file's path, size, modification time and
    status-change time (a file rewritten or extracted anew changes the last even when it
    keeps its size and modification time); a DICOM series folder counts file by file.
    ``None`` when a file cannot be stat-ed (such a scan is never served from the cache)."""
    out: list[Any] = [case.origin, case.patient_id, case.has_lesion]
    for file in (case.image, case.mask):
        path = Path(file)  # type: ignore[arg-type]
        try:
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            for item in files:
                stat = item.stat()
                out.append([str(item.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns])
        except OSError:
            return None
    return out


def _write_cache(
    path: Path, entries: dict[str, tuple[list[Any], ScanLesions]], settings: dict[str, Any]
) -> None:
    arrays: dict[str, np.ndarray] = {}
    index = []
    for case_id, (key, scan) in sorted(entries.items()):
        shapes = []
        for shape in scan.shapes:
            name = f"p{len(arrays)}"
            arrays[name] = np.ascontiguousarray(shape.patch, dtype=np.uint8)
            shapes.append(
                {
                    "patch": name,
                    "spacing": list(shape.spacing),
                    "source_case": shape.source_case,
                    "source_patient": shape.source_patient,
                    "mask_sha256": shape.mask_sha256,
                    "volume_mm3": shape.volume_mm3,
                }
            )
        index.append(
            {
                "case_id": case_id,
                "key": key,
                "has_lesion": scan.has_lesion,
                "shapes": shapes,
                "stats": [[s.mean, s.std, s.ring_mean, s.contrast, s.voxels] for s in scan.stats],
            }
        )
    text = json.dumps({**settings, "scans": index}, allow_nan=True)
    digest = _content_hash(text, arrays)
    buffer = io.BytesIO()
    np.savez(buffer, index=np.array(text), sha256=np.array(digest), **arrays)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as exc:
        logger.warning("could not write the set-up cache %s (%s); the next run reads the "
                       "scans again", path, exc)  # fmt: skip


def _content_hash(text: str, arrays: dict[str, np.ndarray]) -> str:
    parts = [text.encode()]
    for name in sorted(arrays):
        a = arrays[name]
        parts += [name.encode(), str(a.shape).encode(), a.tobytes()]
    return sha256_bytes(b"\0".join(parts))


def _read_cache(path: Path) -> dict[str, tuple[list[Any], ScanLesions]]:
    try:
        with np.load(path, allow_pickle=False) as data:
            text = str(data["index"])
            arrays = {k: data[k] for k in data.files if k not in ("index", "sha256")}
            recorded = str(data["sha256"])
        if recorded != _content_hash(text, arrays):
            raise ValueError("its content does not match its sha256 (edited?)")
        record = json.loads(text)
        if record.get("format") != CACHE_FORMAT:
            raise ValueError(f"format {record.get('format')!r}, expected {CACHE_FORMAT}")
        out = {}
        for row in record["scans"]:
            shapes = tuple(
                BankLesion(
                    arrays[s["patch"]],
                    tuple(float(v) for v in s["spacing"]),
                    s["source_case"],
                    s["source_patient"],
                    s["mask_sha256"],
                    float(s["volume_mm3"]),
                )
                for s in row["shapes"]
            )
            stats = tuple(
                LesionStats(float(m), float(sd), float(r), float(c), int(v))
                for m, sd, r, c, v in row["stats"]
            )
            scan = ScanLesions(row["case_id"], bool(row["has_lesion"]), shapes, stats)
            out[row["case_id"]] = (row["key"], scan)
        return out
    except Exception as exc:  # noqa: BLE001 - any damage to a cache only costs a re-read
        reason = (
            f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            if str(exc)
            else type(exc).__name__
        )
        logger.warning("set-up cache %s unreadable (%s); reading the scans again", path, reason)
        return {}


__all__ = ["ScanLesions", "TrainLesions", "is_cache_file", "measure_scan", "train_lesions"]
