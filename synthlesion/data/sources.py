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

from synthlesion.data.cases import Case, patient_from_case_id, safe_id_problem
from synthlesion.data.io import is_nifti
from synthlesion.errors import CaseSourceError

logger = logging.getLogger(__name__)

SYNTHETIC_MANIFEST_FORMAT = "synthlesion-manifest/1"
"""Header format of a synthlesion manifest (``synthlesion.provenance.manifest``): files its
rows list are synthetic, and a folder scan never reads them as real cases."""
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
    path: str | Path,
    *,
    patient_pattern: str | None = None,
    modality: str | None = None,
    check_ids: bool = True,
) -> list[Case]:
    """Load cases from a ``dataset.json``, a folder holding one, a manifest or a paired folder.

    Args:
        path: ``dataset.json`` file; a folder with ``dataset.json``; a ``.csv``/``.jsonl``
            manifest; or a folder of paired image/mask names.
        patient_pattern: Regex over the case id giving the patient id, used where the source has
            no patient column (see :func:`patient_from_case_id`).
        modality: Modality to record where the source names none.
        check_ids: Refuse unsafe case or patient ids (:func:`require_safe_ids`); ``check``
            reads with ``False`` and reports each one as a row.
    """
    cases = _load_cases(path, patient_pattern=patient_pattern, modality=modality)
    if patient_pattern is not None:
        _require_pattern_matches(patient_pattern, cases, path)
    return require_safe_ids(cases) if check_ids else cases


def _require_pattern_matches(pattern: str, cases: list[Case], path: str | Path) -> None:
    """A patient pattern must compile and match at least one case id (else it is a typo that
    would silently leave every scan its own patient)."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise CaseSourceError(f"invalid patient pattern {pattern!r}: {exc}") from None
    if cases and not any(compiled.match(c.case_id) for c in cases):
        examples = ", ".join(c.case_id for c in cases[:3])
        raise CaseSourceError(
            f"{path}: patient pattern {pattern!r} matches none of the {len(cases)} case ids "
            f"(e.g. {examples})"
        )


def _load_cases(
    path: str | Path, *, patient_pattern: str | None, modality: str | None
) -> list[Case]:
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
    """Read an MSD-, nnU-Net-v1- or nnU-Net-v2-style ``dataset.json``.

    Understands MSD fields (``modality``, ``labels`` as ``{"0": "background"}``, a ``training``
    list of ``{"image", "label"}`` entries whose image may be a list of channels) and nnU-Net v2
    fields (``channel_names``, ``labels`` as ``{"background": 0}``, ``file_ending`` with files
    found as ``imagesTr/{case}_0000{ending}`` and ``labelsTr/{case}{ending}``). Entries may carry
    ``case_id``, ``patient_id`` and ``has_lesion``.

    Image paths of an entry are resolved as follows:

    * a list names the channels, one file each, used as given;
    * one path that exists is one file: a single channel, or an MSD 4D file holding every
      channel along a 4th axis (kept as one path, the reader handles the 4th axis);
    * one path that does not exist while ``{stem}_0000{ending}`` does (nnU-Net v1: the list
      names ``./imagesTr/X.nii.gz``, the disk holds ``imagesTr/X_0000.nii.gz``,
      ``X_0001.nii.gz``...): the channel files ``_0000`` ... ``_{C-1}`` with ``C`` the number of
      entries in ``modality``/``channel_names`` (when neither is given: the run of consecutive
      files found). Every channel file is required.

    Every case records the channel names (``modality`` or ``channel_names``) in
    ``Case.modalities``, all of them also when one 4D file holds them.

    Raises:
        CaseSourceError: Unreadable or malformed JSON, an entry without image, an nnU-Net
            case missing one of its channel files (naming the case and the file).
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
        entries = _scan_nnunet_folder(root, ending, len(modalities) or 1, path)
    if not isinstance(entries, list):
        raise CaseSourceError(f"{path}: '{key}' must be a list of cases")
    cases = []
    for index, entry in enumerate(entries):
        where = f"{path} entry {index}"
        if not isinstance(entry, Mapping) or "image" not in entry:
            raise CaseSourceError(f"{where}: each entry needs an 'image'")
        label = entry.get("label")
        mask = _resolve(root, label, where) if label else None
        if isinstance(entry["image"], list):
            image_paths = [_resolve(root, p, where) for p in entry["image"]]
        else:
            image_paths = [_resolve(root, entry["image"], where)]
        case_id = str(entry.get("case_id") or _case_id_from(mask or image_paths[0], ending))
        if not isinstance(entry["image"], list):
            image_paths = _nnunet_v1_channels(
                image_paths[0], ending, len(modalities), where, case_id
            )
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
                modalities=_entry_modalities(modalities, image_paths),
                labels=labels,
                origin=_origin(entry.get("origin"), where),
                provenance={"source": str(path), "entry": index},
                has_lesion=entry.get("has_lesion"),
            )
        )
    logger.info("%s: %d cases", path, len(cases))
    return cases


def _nnunet_v1_channels(
    image: Path, ending: str, n_modalities: int, where: str, case_id: str
) -> list[Path]:
    """The files of one entry's single image path (see :func:`load_decathlon`)."""
    if image.exists():
        return [image]
    stem = _strip_ending(image.name, ending)
    suffix = image.name[len(stem) :]
    first = image.with_name(f"{stem}_0000{suffix}")
    if not first.exists():
        return [image]  # missing either way: `synthlesion check` reports the named file
    if n_modalities:
        channels = [image.with_name(f"{stem}_{c:04d}{suffix}") for c in range(n_modalities)]
        missing = [p for p in channels if not p.exists()]
        if missing:
            raise CaseSourceError(
                f"{where} (case {case_id}): {image.name} is stored per channel as "
                f"{stem}_0000{suffix}...; channel file(s) missing: "
                + ", ".join(str(p) for p in missing)
                + f" (dataset.json declares {n_modalities} channel(s))"
            )
        return channels
    channels = []
    while image.with_name(f"{stem}_{len(channels):04d}{suffix}").exists():
        channels.append(image.with_name(f"{stem}_{len(channels):04d}{suffix}"))
    return channels


def _entry_modalities(modalities: list[str], images: list[Path]) -> tuple[str, ...]:
    if len(images) == 1 and len(modalities) > 1:
        return tuple(modalities)  # one MSD 4D file holding every channel
    if len(modalities) >= len(images):
        return tuple(modalities[: len(images)])
    return ()


def _scan_nnunet_folder(
    root: Path, ending: str, n_channels: int, path: Path
) -> list[dict[str, Any]]:
    images_dir = root / "imagesTr"
    if not images_dir.is_dir():
        raise CaseSourceError(f"{root}: dataset.json has no 'training' list and no imagesTr/")
    entries = []
    synthetic = synthetic_files_listed_in(root)  # never read as real cases
    for first in sorted(images_dir.glob(f"*_0000{ending}")):
        if first.resolve() in synthetic:
            continue
        case_id = first.name[: -len(f"_0000{ending}")]
        images = [f"imagesTr/{case_id}_{c:04d}{ending}" for c in range(n_channels)]
        missing = [i for i in images if not (root / i).exists()]
        if missing:
            raise CaseSourceError(
                f"{path} (case {case_id}): channel file(s) missing: "
                + ", ".join(str(root / i) for i in missing)
                + f" (dataset.json declares {n_channels} channel(s))"
            )
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

    Columns: ``case_id`` and ``image`` are required; several channels come as ``images``
    (paths joined by ``;``) or as one column per channel named ``image_<channel>`` (e.g.
    ``image_flair``, ``image_t1``: the channels in column order, named after the suffix);
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
        channel_columns = [k for k in row if k.startswith("image_")]
        channel_names: tuple[str, ...] = ()
        if not image_field and channel_columns:
            empty = [k for k in channel_columns if not str(row.get(k) or "").strip()]
            if empty:
                raise CaseSourceError(
                    f"{where} (case {case_id}): channel column(s) {empty} are empty"
                )
            image_field = [str(row[k]) for k in channel_columns]
            channel_names = tuple(k[len("image_") :] for k in channel_columns)
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
        origin = _origin(row.get("origin") or None, f"{where} (case {case_id})")
        extra = {
            k: v
            for k, v in row.items()
            if k not in MANIFEST_COLUMNS and not (channel_names and k.startswith("image_"))
        }
        cases.append(
            Case(
                case_id=case_id,
                patient_id=patient,
                images=tuple(_resolve(path.parent, p.strip(), where) for p in images),
                mask=_resolve(path.parent, str(mask_field).strip(), where) if mask_field else None,
                modality=str(row.get("modality") or modality or "unknown"),
                modalities=channel_names,
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
    width = len(reader.fieldnames)
    for number, row in enumerate(reader, start=2):
        if None in row:  # more fields than the header names
            raise CaseSourceError(
                f"{path} line {number}: {width + len(row[None])} fields where the header names "
                f"{width}; a field holding the delimiter must be quoted"
            )
        if any(value is None for value in row.values()):  # fewer fields than the header
            found = sum(value is not None for value in row.values())
            raise CaseSourceError(
                f"{path} line {number}: {found} field(s) where the header names {width}"
            )
        yield number, dict(row)


def _origin(value: Any, where: str) -> str:
    """``real`` (the default) or ``synthetic``, in any letter case; anything else is refused."""
    origin = str(value if value is not None else "real").strip().lower()
    if origin not in ("real", "synthetic"):
        raise CaseSourceError(f"{where}: origin must be 'real' or 'synthetic', got {value!r}")
    return origin


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
    """Pair images and masks in a folder by name (files a synthlesion manifest in the folder
    lists are synthetic and skipped).

    Two layouts:

    * ``images/`` + ``masks/`` (or ``labels/``) subfolders with equal file names, one channel
      per case.
    * One folder of ``.nii``/``.nii.gz`` files, paired by this rule:

      1. A file whose stem (name without ``.nii``/``.nii.gz``) ends in a mask suffix
         (``_mask``, ``_seg``, ``_label``, ``_labels``, ``_lesion``, any letter case) is the
         mask of case ``stem`` minus that suffix. It is never a case of its own, and a mask
         with no image of its case is an error.
      2. An image belongs to a case when its stem is the case id (a single-channel case:
         ``X.nii.gz`` + ``X_mask.nii.gz``) or the case id, ``_`` and a channel name without
         ``_`` (``X_t1.nii.gz``, ``X_flair.nii.gz`` + ``X_seg.nii.gz``): the case id is the
         stem up to its last ``_``, the suffix after it names the channel. A stem equal to a
         case id always means that case.
      3. Every labelled case has the same channel names (a case's channels are sorted by
         name: ``Case.images`` and ``Case.modalities`` follow that order), or none at all.
      4. An image that belongs to no mask is an unlabelled case: its own case (stem = case id)
         in a single-channel folder; grouped by the stem up to the last ``_`` in a
         multi-channel folder, where its suffix must be one of the channel names and every
         group must hold all of them.

      Anything the rule cannot settle is refused rather than guessed: a case mixing a file
      without channel suffix and files with one, cases with different channel sets, a folder
      where some cases have channel suffixes and others do not, two masks for one case, a
      stem saved as both ``.nii`` and ``.nii.gz``, and unlabelled images whose names look
      multi-channel (two or more groups with the same two or more suffixes) where no labelled
      case gives the channel names: case ids and channel names cannot be told apart there
      (write a manifest instead).

    Args:
        folder: The folder.
        patient_pattern: See :func:`load_cases`.
        modality: Modality recorded on every case (``Case.modality``); ``Case.modalities``
            gets the channel names where the names carry them.

    Raises:
        CaseSourceError: No image found, or the names break the rule above (the message names
            the case and the files).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CaseSourceError(f"{folder}: not a folder")
    image_dir = folder / "images"
    mask_dir = next((folder / n for n in ("masks", "labels") if (folder / n).is_dir()), None)
    grouped: list[tuple[str, tuple[Path, ...], Path | None, tuple[str, ...]]] = []
    synthetic = synthetic_files_listed_in(folder)  # never read as real cases
    if image_dir.is_dir() and mask_dir is not None:
        for image in sorted(
            p for p in image_dir.iterdir() if is_nifti(p) and p.resolve() not in synthetic
        ):
            mask = mask_dir / image.name
            grouped.append(
                (_strip_nifti(image.name), (image,), mask if mask.exists() else None, ())
            )
    else:
        grouped = _pair_by_suffix(folder, synthetic)
    if not grouped:
        raise CaseSourceError(f"{folder}: no NIfTI images found (and no dataset.json)")
    cases = [
        Case(
            case_id=case_id,
            patient_id=_patient(case_id, patient_pattern, str(folder)),
            images=images,
            mask=mask,
            modality=modality or "unknown",
            modalities=channels,
            provenance={
                "source": str(folder),
                **({"channels": list(channels)} if channels else {}),
            },
        )
        for case_id, images, mask, channels in grouped
    ]
    return cases


def _pair_by_suffix(
    folder: Path, synthetic: set[Path]
) -> list[tuple[str, tuple[Path, ...], Path | None, tuple[str, ...]]]:
    """Apply the one-folder rule of :func:`load_paired_folder` to the folder's files that no
    synthlesion manifest lists; cases sorted by id."""
    files = sorted(
        p
        for p in folder.iterdir()
        if is_nifti(p) and not p.name.startswith(".") and p.resolve() not in synthetic
    )
    stems: dict[str, Path] = {}
    for path in files:
        stem = _strip_nifti(path.name)
        if stem in stems:
            raise CaseSourceError(
                f"{folder}: {stems[stem].name} and {path.name} share the name {stem!r}; "
                "keep one of them"
            )
        stems[stem] = path
    masks: dict[str, Path] = {}
    images: dict[str, Path] = {}
    for stem, path in stems.items():
        suffix = next((s for s in MASK_SUFFIXES if stem.lower().endswith(s)), None)
        if suffix is None or len(stem) == len(suffix):
            images[stem] = path
            continue
        case_id = stem[: -len(suffix)]
        if case_id in masks:
            raise CaseSourceError(
                f"{folder} (case {case_id}): two masks, {masks[case_id].name} and {path.name}"
            )
        masks[case_id] = path

    # 2. images of labelled cases: the stem is the case id, or the case id + "_" + channel
    members: dict[str, dict[str | None, Path]] = {case_id: {} for case_id in masks}
    unassigned: dict[str, Path] = {}
    for stem, path in images.items():
        if stem in masks:
            members[stem][None] = path
            continue
        case_id, _, channel = stem.rpartition("_")
        if case_id and channel and case_id in masks:
            members[case_id][channel] = path
        else:
            unassigned[stem] = path
    for case_id, mask in masks.items():
        found = members[case_id]
        if not found:
            raise CaseSourceError(
                f"{folder} (case {case_id}): mask {mask.name} has no image (expected "
                f"{case_id}.nii.gz or {case_id}_<channel>.nii.gz)"
            )
        if None in found and len(found) > 1:
            listed = ", ".join(sorted(p.name for p in found.values()))
            raise CaseSourceError(
                f"{folder} (case {case_id}): both a file without channel suffix and files with "
                f"one ({listed}); cannot tell which are its channels"
            )

    # 3. one channel set for every labelled case
    channel_sets = {
        case_id: tuple(sorted((k for k in found if k is not None), key=_channel_order))
        for case_id, found in members.items()
    }
    reference_id = next(iter(sorted(channel_sets)), None)
    channels: tuple[str, ...] = channel_sets[reference_id] if reference_id is not None else ()
    for case_id, names in sorted(channel_sets.items()):
        if names != channels and set(names) < set(channels):
            missing = [f"{case_id}_{c}" for c in channels if c not in names]
            raise CaseSourceError(
                f"{folder} (case {case_id}): channel file(s) missing: {', '.join(missing)} "
                f"(case {reference_id} has channels {_describe(channels)})"
            )
        if names != channels:
            raise CaseSourceError(
                f"{folder} (case {case_id}): channels {_describe(names)} differ from case "
                f"{reference_id}'s {_describe(channels)}; every case needs the same channel "
                "suffixes (or none at all)"
            )

    # 4. unlabelled images
    unlabelled: dict[str, dict[str | None, Path]] = {}
    if channels:
        for stem, path in unassigned.items():
            case_id, _, channel = stem.rpartition("_")
            if not case_id or channel not in channels:
                raise CaseSourceError(
                    f"{folder}: {path.name} has no mask and no channel suffix of "
                    f"{_describe(channels)} (the labelled cases'); cannot tell its case"
                )
            unlabelled.setdefault(case_id, {})[channel] = path
        for case_id, found in unlabelled.items():
            if tuple(sorted(found, key=_channel_order)) != channels:  # type: ignore[arg-type]
                missing = [f"{case_id}_{c}" for c in channels if c not in found]
                raise CaseSourceError(
                    f"{folder} (case {case_id}): channel file(s) missing: "
                    + ", ".join(missing)
                    + f" (every case has channels {_describe(channels)})"
                )
    else:
        _refuse_unlabelled_multichannel(folder, unassigned)
        unlabelled = {stem: {None: path} for stem, path in unassigned.items()}

    result = []
    for case_id, found in sorted({**members, **unlabelled}.items()):
        ordered = tuple(found[c] for c in channels) if channels else (found[None],)
        result.append((case_id, ordered, masks.get(case_id), channels))
    return result


def _refuse_unlabelled_multichannel(folder: Path, images: Mapping[str, Path]) -> None:
    groups: dict[str, set[str]] = {}
    for stem in images:
        prefix, _, suffix = stem.rpartition("_")
        if prefix:
            groups.setdefault(prefix, set()).add(suffix)
    sets = {frozenset(v) for v in groups.values()}
    if len(groups) >= 2 and len(sets) == 1 and len(next(iter(sets))) >= 2:
        names = sorted(next(iter(sets)))
        raise CaseSourceError(
            f"{folder}: images without masks whose names look like multi-channel cases "
            f"({', '.join(sorted(groups)[:3])}... with suffixes {names}); without masks the "
            "case ids cannot be told from channel names, so give a manifest instead"
        )


def _describe(channels: tuple[str, ...]) -> str:
    return "(" + ", ".join(f"_{c}" for c in channels) + ")" if channels else "(none)"


# --- shared helpers -----------------------------------------------------------------------


def require_safe_ids(cases: list[Case]) -> list[Case]:
    """Return ``cases`` when every case and patient id is safe
    (:data:`synthlesion.data.cases.SAFE_ID_PATTERN`) and no two case ids are equal ignoring
    letter case, else raise :class:`CaseSourceError` naming the source, the entry and the id."""
    for case in cases:
        where = case.provenance.get("source", "dataset")
        entry = case.provenance.get("entry", case.provenance.get("line"))
        at = f"{where}" + (f" entry {entry}" if entry is not None else "")
        for what, value in (("case id", case.case_id), ("patient id", case.patient_id)):
            problem = safe_id_problem(value)
            if problem is not None:
                raise CaseSourceError(f"{at}: {what} {problem}")
    require_unique_case_ids(
        cases, str(cases[0].provenance.get("source", "dataset")) if cases else ""
    )
    clashes = patient_ids_differing_in_case(cases)
    if clashes:
        listed = "; ".join(" vs ".join(group) for group in clashes[:3])
        raise CaseSourceError(
            f"{cases[0].provenance.get('source', 'dataset')}: patient ids that differ only in "
            f"letter case ({listed}): the same patient for the guards, two for a split; write "
            "them alike, or make them really different"
        )
    return cases


def patient_ids_differing_in_case(cases: Iterable[Case]) -> list[list[str]]:
    """Groups of distinct patient ids that are equal ignoring letter case (``P01``/``p01``)."""
    groups: dict[str, set[str]] = {}
    for case in cases:
        groups.setdefault(case.patient_id.casefold(), set()).add(case.patient_id)
    return [sorted(ids) for ids in groups.values() if len(ids) > 1]


def synthetic_files_listed_in(folder: str | Path, *, exclude: Path | None = None) -> set[Path]:
    """Files listed by synthlesion manifests in ``folder`` (``*.jsonl`` with the manifest
    header and its ``.lock.json`` beside it): synthetic content that a folder scan must never
    read as real cases. ``exclude`` leaves one manifest out."""
    listed: set[Path] = set()
    folder = Path(folder)
    for manifest in sorted(folder.glob("*.jsonl")):
        if exclude is not None and manifest.resolve() == Path(exclude).resolve():
            continue
        if not manifest.with_name(manifest.name[: -len(".jsonl")] + ".lock.json").is_file():
            continue  # a manifest is only trusted with its lock
        try:
            lines = manifest.read_text(encoding="utf-8").splitlines()
            header = json.loads(lines[0]) if lines else None
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        if not isinstance(header, dict) or header.get("format") != SYNTHETIC_MANIFEST_FORMAT:
            continue
        for line in lines[1:]:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if not isinstance(row, dict):
                continue
            for value in [*(row.get("images") or []), row.get("mask")]:
                if isinstance(value, str) and value:
                    listed.add((folder / value).resolve())
    if listed:
        logger.info("%s: %d file(s) listed by synthlesion manifests are not real cases", folder,
                    len(listed))  # fmt: skip
    return listed


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


def _strip_ending(name: str, ending: str) -> str:
    for suffix in (ending, ".nii.gz", ".nii"):
        if suffix and name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _channel_order(name: str) -> tuple[str, str]:
    """Channel suffixes sort by name ignoring letter case (``flair`` before ``T1``)."""
    return (name.casefold(), name)


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
