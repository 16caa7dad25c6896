"""The ``Case`` record: one scan (one or more channels), its mask, its patient and its origin."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Origin = Literal["real", "synthetic"]
LESION_WORDS = ("lesion", "tumour", "tumor", "metastasis", "nodule", "cancer", "mass")


@dataclass(frozen=True)
class Case:
    """One scan of one patient.

    Attributes:
        case_id: Unique identifier of the scan (unique also when compared case-insensitively).
        patient_id: Identifier of the patient; several scans of one patient share it and always
            land on the same side of a split.
        images: One path per channel or modality (nnU-Net's ``_0000``, ``_0001``, ...), in
            channel order.
        mask: Label map path, or ``None`` for an unlabelled scan.
        modality: ``"CT"``, ``"MRI"``, ``"XR"``... of the first channel (``modalities`` has all).
        labels: Label value -> name, background included (``{0: "background", 2: "lesion"}``).
        origin: ``"real"`` or ``"synthetic"``.
        provenance: Where the case came from (dataset file, manifest row, generator facts).
        has_lesion: Whether the mask holds a lesion voxel, when the source says so.
        modalities: Modality of every channel.
    """

    case_id: str
    patient_id: str
    images: tuple[Path, ...]
    mask: Path | None = None
    modality: str = "unknown"
    labels: Mapping[int, str] = field(default_factory=lambda: {0: "background", 1: "lesion"})
    origin: Origin = "real"
    provenance: Mapping[str, Any] = field(default_factory=dict)
    has_lesion: bool | None = None
    modalities: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "images", tuple(Path(p) for p in self.images))
        if self.mask is not None:
            object.__setattr__(self, "mask", Path(self.mask))
        object.__setattr__(self, "labels", {int(k): str(v) for k, v in self.labels.items()})
        if not self.modalities:
            object.__setattr__(self, "modalities", (self.modality,) * max(1, len(self.images)))
        if self.origin not in ("real", "synthetic"):
            raise ValueError(f"case {self.case_id}: origin must be 'real' or 'synthetic'")

    @property
    def channel_count(self) -> int:
        """Image channels of the case: one per file, or the declared channels of a single 4D
        file (Medical Segmentation Decathlon images hold them on their last axis)."""
        if len(self.images) == 1 and len(self.modalities) > 1:
            return len(self.modalities)
        return len(self.images)

    @property
    def image(self) -> Path:
        """The first channel's path."""
        return self.images[0]

    @property
    def lesion_labels(self) -> tuple[int, ...]:
        """Label values whose names mark a lesion (``lesion``, ``tumour``, ``nodule``...)."""
        return lesion_label_values(self.labels)

    @property
    def is_synthetic(self) -> bool:
        return self.origin == "synthetic"


SAFE_ID_PATTERN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]|\.(?!\.)){0,127}")
"""Case and patient ids: 1 to 128 of ``A-Z a-z 0-9 . _ -``, starting with a letter or digit,
no ``..``. Case ids become file names of synthetic cases and built datasets, so no path
separator, control character or space can reach a path."""


def safe_id_problem(value: object) -> str | None:
    """Why ``value`` is not a safe case or patient id (:data:`SAFE_ID_PATTERN`), or ``None``."""
    if not isinstance(value, str):
        return f"{value!r} is not a string"
    if SAFE_ID_PATTERN.fullmatch(value) is None:
        return (
            f"{value!r} is not a safe id (allowed: 1 to 128 letters, digits, '.', '_', '-', "
            "starting with a letter or digit, no '..'; no path separators, spaces or control "
            "characters)"
        )
    return None


def lesion_label_values(labels: Mapping[int, str]) -> tuple[int, ...]:
    """Values of ``labels`` whose names contain a lesion word; all non-zero values if none do."""
    found = tuple(
        sorted(v for v, name in labels.items() if any(w in name.lower() for w in LESION_WORDS))
    )
    return found or tuple(sorted(v for v in labels if v != 0))


def patient_from_case_id(case_id: str, pattern: str | None) -> str:
    """Derive a patient id from a case id with a regular expression.

    Args:
        case_id: The scan's identifier, e.g. ``"liver_017_t2"``.
        pattern: A regex matched at the start of ``case_id``; the group named ``patient`` (or
            else group 1, or else the whole match) is the patient id. ``None`` means the case id
            itself is the patient id.

    Raises:
        ValueError: The pattern does not match.
    """
    if pattern is None:
        return case_id
    match = re.match(pattern, case_id)
    if match is None:
        raise ValueError(f"case {case_id!r}: patient pattern {pattern!r} does not match")
    if "patient" in match.re.groupindex:
        return match.group("patient")
    if match.re.groups:
        return match.group(1)
    return match.group(0)
