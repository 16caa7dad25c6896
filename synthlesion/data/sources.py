"""Where cases come from: Decathlon / nnU-Net ``dataset.json`` folders, CSV or JSONL manifests,
and folders of paired file names.

Every loader returns a list of :class:`~synthlesion.data.cases.Case`. The patient id comes from
the source when it has one (a ``patient_id`` field or column) and otherwise from a regular
expression over the case id (default: the case id itself), so that several scans of one patient
stay together in a split. Loaders do not read voxels.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from synthlesion.data.cases import Case, patient_from_case_id
from synthlesion.data.io import is_nifti
from synthlesion.errors import CaseSourceError

logger = logging.getLogger(__name__)

MASK_SUFFIXES = ("_mask", "_seg", "_label", "_labels", "_lesion")
MANIFEST_COLUMNS = {
    "case_id",
    "patient_id",
    "image",
    "images",
    "mask",
    "label",
    "modality",
    "origin",
    "labels",
    "has_lesion",
}


def load_cases(
    path: str | Path, *, patient_pattern: str | None = None, modality: str | None = None
) -> list[Case]:
    """Load cases from a ``dataset.json``, a folder holding one, a manifest or a paired folder.

    Args:
        path: ``dataset.json`` file; a folder with ``dataset.json``; a ``.csv``/``.jsonl``
            manifest; or a folder of paired image/mask names.
        patient_pattern: Regex over the case id giving the patient id, used where the source has
            no patient column (see :func:`patient_from_case_id`).
        modality: Modality to record where the source names none.
    """
    path = Path(path)
    if path.is_dir():
        if (path / "dataset.json").is_file():
            return load_decathlon(path / "dataset.json", patient_pattern=patient_pattern)
        return load_paired_folder(path, patient_pattern=patient_pattern, modality=modality)
    if not path.exists():
        raise CaseSourceError(f"{path}: does not exist")
    suffix = path.suffix.lower()
    if path.name.endswith(".json") and suffix == ".json":
        return load_decathlon(path, patient_pattern=patient_pattern)
    if suffix in (".csv", ".jsonl", ".tsv"):
        return load_manifest(path, patient_pattern=patient_pattern, modality=modality)
    raise CaseSourceError(
        f"{path}: not a dataset.json, a .csv/.tsv/.jsonl manifest or a folder of cases"
    )


# --- Decathlon / nnU-Net ------------------------------------------------------------------


def load_decathlon(
    path: str | Path, *, patient_pattern: str | None = None, key: str = "training"
) -> list[Case]:
    """Read an MSD- or nnU-Net-v2-style ``dataset.json``.

    Understands MSD fields (``modality``, ``labels`` as ``{"0": "background"}``, a ``training``
    list of ``{"image", "label"}`` entries whose image may be a list of channels) and nnU-Net v2
    fields (``channel_names``, ``labels`` as ``{"background": 0}``, ``file_ending`` with files
    found as ``imagesTr/{case}_0000{ending}`` and ``labelsTr/{case}{ending}``). Entries may carry
    ``case_id``, ``patient_id`` and ``has_lesion``.
    """
    path = Path(path)
    root = path.parent
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise CaseSourceError(f"{path}: cannot read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise CaseSourceError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(spec, dict):
        raise CaseSourceError(f"{path}: the top level must be an object")
    labels = _parse_labels(spec.get("labels", {"0": "background", "1": "lesion"}), path)
    modalities = _parse_modalities(spec.get("channel_names") or spec.get("modality") or {}, path)
    ending = spec.get("file_ending", ".nii.gz")
    entries = spec.get(key)
    if entries is None and key == "training":
        entries = _scan_nnunet_folder(root, ending, len(modalities) or 1)
    if not isinstance(entries, list):
        raise CaseSourceError(f"{path}: '{key}' must be a list of cases")
    cases = []
    for index, entry in enumerate(entries):
        where = f"{path} entry {index}"
        if not isinstance(entry, Mapping) or "image" not in entry:
            raise CaseSourceError(f"{where}: each entry needs an 'image'")
        images = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
        image_paths = [_resolve(root, p, where) for p in images]
        label = entry.get("label")
        mask = _resolve(root, label, where) if label else None
        case_id = str(entry.get("case_id") or _case_id_from(mask or image_paths[0], ending))
        patient = entry.get("patient_id")
        cases.append(
            Case(
                case_id=case_id,
                patient_id=str(patient)
                if patient is not None
                else _patient(case_id, patient_pattern, where),
                images=tuple(image_paths),
                mask=mask,
                modality=modalities[0] if modalities else "unknown",
                modalities=tuple(modalities[: len(image_paths)])
                if len(modalities) >= len(image_paths)
                else (),
                labels=labels,
                origin="synthetic" if entry.get("origin") == "synthetic" else "real",
                provenance={"source": str(path), "entry": index},
                has_lesion=entry.get("has_lesion"),
            )
        )
    logger.info("%s: %d cases", path, len(cases))
    return cases


def _scan_nnunet_folder(root: Path, ending: str, n_channels: int) -> list[dict[str, Any]]:
    images_dir = root / "imagesTr"
    if not images_dir.is_dir():
        raise CaseSourceError(f"{root}: dataset.json has no 'training' list and no imagesTr/")
    entries = []
    for first in sorted(images_dir.glob(f"*_0000{ending}")):
        case_id = first.name[: -len(f"_0000{ending}")]
        images = [f"imagesTr/{case_id}_{c:04d}{ending}" for c in range(n_channels)]
        label = root / "labelsTr" / f"{case_id}{ending}"
        entries.append(
            {
                "image": images,
                "label": f"labelsTr/{case_id}{ending}" if label.exists() else None,
                "case_id": case_id,
            }
        )
    return entries


def _parse_labels(raw: Any, path: Path) -> dict[int, str]:
    if not isinstance(raw, Mapping) or not raw:
        raise CaseSourceError(f"{path}: 'labels' must be a non-empty mapping")
    labels: dict[int, str] = {}
    for key, value in raw.items():
        try:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                labels[int(value)] = str(key)  # nnU-Net v2: name -> value
            else:
                labels[int(key)] = str(value)  # MSD: "value" -> name
        except (TypeError, ValueError):
            raise CaseSourceError(
                f"{path}: label {key!r}: {value!r} is neither 'value': name nor name: value "
                "(region-based nnU-Net labels are not supported)"
            ) from None
    labels.setdefault(0, "background")
    return labels


def _parse_modalities(raw: Any, path: Path) -> list[str]:
    if not isinstance(raw, Mapping):
        raise CaseSourceError(f"{path}: 'channel_names'/'modality' must be a mapping")
    try:
        return [str(raw[k]) for k in sorted(raw, key=lambda k: int(k))]
    except ValueError:
        raise CaseSourceError(f"{path}: channel keys must be '0', '1', ...") from None


# --- manifests ------------------------------------------------------------------------------


def load_manifest(
    path: str | Path, *, patient_pattern: str | None = None, modality: str | None = None
) -> list[Case]:
    """Read a CSV/TSV (header row) or JSONL manifest of cases.

    Columns: ``case_id`` and ``image`` are required; ``images`` (channels joined by ``;``),
    ``mask`` (or ``label``), ``patient_id``, ``modality``, ``origin``, ``labels`` (JSON
    ``{"0": "background", "1": "lesion"}``) and ``has_lesion`` are optional. Relative paths are
    relative to the manifest's folder. Unknown columns are kept in the case's provenance.
    """
    path = Path(path)
    rows = list(_read_rows(path))
    cases = []
    for line, row in rows:
        where = f"{path} line {line}"
        case_id = str(row.get("case_id") or "").strip()
        if not case_id:
            raise CaseSourceError(f"{where}: 'case_id' is missing")
        image_field = row.get("images") or row.get("image")
        if not image_field:
            raise CaseSourceError(f"{where} (case {case_id}): 'image' is missing")
        images = image_field if isinstance(image_field, list) else str(image_field).split(";")
        mask_field = row.get("mask") or row.get("label")
        labels_field = row.get("labels")
        if isinstance(labels_field, str) and labels_field:
            try:
                labels_field = json.loads(labels_field)
            except json.JSONDecodeError:
                raise CaseSourceError(f"{where} (case {case_id}): 'labels' is not JSON") from None
        labels = (
            _parse_labels(labels_field, path) if labels_field else {0: "background", 1: "lesion"}
        )
        patient = str(row.get("patient_id") or "").strip() or _patient(
            case_id, patient_pattern, where
        )
        origin = str(row.get("origin") or "real").strip()
        if origin not in ("real", "synthetic"):
            raise CaseSourceError(f"{where} (case {case_id}): origin must be real or synthetic")
        extra = {k: v for k, v in row.items() if k not in MANIFEST_COLUMNS}
        cases.append(
            Case(
                case_id=case_id,
                patient_id=patient,
                images=tuple(_resolve(path.parent, p.strip(), where) for p in images),
                mask=_resolve(path.parent, str(mask_field).strip(), where) if mask_field else None,
                modality=str(row.get("modality") or modality or "unknown"),
                labels=labels,
                origin=origin,  # type: ignore[arg-type]
                provenance={"source": str(path), "line": line, **extra},
                has_lesion=_parse_bool(row.get("has_lesion")),
            )
        )
    return cases


def _read_rows(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CaseSourceError(f"{path}: cannot read ({exc})") from None
    if path.suffix.lower() == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CaseSourceError(f"{path} line {number}: invalid JSON ({exc})") from None
            if not isinstance(row, dict):
                raise CaseSourceError(f"{path} line {number}: each line must be an object")
            yield number, row
        return
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    if not reader.fieldnames or "case_id" not in reader.fieldnames:
        raise CaseSourceError(f"{path}: the header row must name a 'case_id' column")
    for number, row in enumerate(reader, start=2):
        yield number, {k: v for k, v in row.items() if k is not None}


def _parse_bool(value: Any) -> bool | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes")


# --- paired folders -----------------------------------------------------------------------


def load_paired_folder(
    folder: str | Path, *, patient_pattern: str | None = None, modality: str | None = None
) -> list[Case]:
    """Pair images and masks in a folder by name.

    Two layouts: ``images/`` + ``masks/`` (or ``labels/``) subfolders with equal file names;
    or one folder where ``X.nii.gz`` pairs with ``X_mask.nii.gz`` (also ``_seg``, ``_label``,
    ``_labels``, ``_lesion``). An image with no mask becomes an unlabelled case.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CaseSourceError(f"{folder}: not a folder")
    image_dir = folder / "images"
    mask_dir = next((folder / n for n in ("masks", "labels") if (folder / n).is_dir()), None)
    pairs: list[tuple[str, Path, Path | None]] = []
    if image_dir.is_dir() and mask_dir is not None:
        for image in sorted(p for p in image_dir.iterdir() if is_nifti(p)):
            mask = mask_dir / image.name
            pairs.append((_strip_nifti(image.name), image, mask if mask.exists() else None))
    else:
        files = sorted(p for p in folder.iterdir() if is_nifti(p) and not p.name.startswith("."))
        names = {_strip_nifti(p.name): p for p in files}
        mask_names = {
            n for n in names for s in MASK_SUFFIXES if n.endswith(s) and n[: -len(s)] in names
        }
        for name, image in names.items():
            if name in mask_names:
                continue
            mask = next((names[name + s] for s in MASK_SUFFIXES if name + s in names), None)
            pairs.append((name, image, mask))
    if not pairs:
        raise CaseSourceError(f"{folder}: no NIfTI images found (and no dataset.json)")
    return [
        Case(
            case_id=case_id,
            patient_id=_patient(case_id, patient_pattern, str(folder)),
            images=(image,),
            mask=mask,
            modality=modality or "unknown",
            provenance={"source": str(folder)},
        )
        for case_id, image, mask in pairs
    ]


# --- shared helpers -----------------------------------------------------------------------


def duplicate_case_ids(cases: Iterable[Case]) -> list[list[str]]:
    """Groups of case ids that collide, compared case-insensitively (exact repeats included)."""
    groups: dict[str, list[str]] = {}
    for case in cases:
        groups.setdefault(case.case_id.casefold(), []).append(case.case_id)
    return [ids for ids in groups.values() if len(ids) > 1]


def require_unique_case_ids(cases: Iterable[Case], where: str = "dataset") -> None:
    """Raise :class:`CaseSourceError` if two cases share an id (also ignoring case)."""
    dupes = duplicate_case_ids(cases)
    if dupes:
        listed = "; ".join(", ".join(ids) for ids in dupes)
        raise CaseSourceError(f"{where}: duplicate case ids (compared ignoring case): {listed}")


def patients_of(cases: Iterable[Case]) -> dict[str, list[str]]:
    """Patient id -> case ids, in first-seen order."""
    result: dict[str, list[str]] = {}
    for case in cases:
        result.setdefault(case.patient_id, []).append(case.case_id)
    return result


def _patient(case_id: str, pattern: str | None, where: str) -> str:
    try:
        return patient_from_case_id(case_id, pattern)
    except ValueError as exc:
        raise CaseSourceError(f"{where}: {exc}") from None
    except re.error as exc:
        raise CaseSourceError(f"invalid patient pattern {pattern!r}: {exc}") from None


def _resolve(root: Path, value: Any, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise CaseSourceError(f"{where}: path {value!r} is not a string")
    candidate = Path(value)
    return candidate if candidate.is_absolute() else (root / candidate)


def _case_id_from(path: Path, ending: str) -> str:
    name = path.name
    for suffix in (ending, ".nii.gz", ".nii"):
        if suffix and name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"_\d{4}$", "", name)


def _strip_nifti(name: str) -> str:
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


__all__ = [
    "duplicate_case_ids",
    "load_cases",
    "load_decathlon",
    "load_manifest",
    "load_paired_folder",
    "patients_of",
    "require_unique_case_ids",
]
