"""Data foundation: image I/O, cases and their sources, integrity checks, patient-level splits
and the embedded phantom."""

from __future__ import annotations

from synthlesion.data.cases import Case, lesion_label_values, patient_from_case_id
from synthlesion.data.io import load_image, load_nifti, save_image
from synthlesion.data.sources import (
    load_cases,
    load_decathlon,
    load_manifest,
    load_paired_folder,
    require_unique_case_ids,
)
from synthlesion.data.splits import Splits, load_splits, save_splits, split_patients
from synthlesion.data.validation import CheckOptions, CheckReport, check_cases, check_dataset
from synthlesion.data.volume import Volume, geometry_differences, require_same_geometry

__all__ = [
    "Case",
    "CheckOptions",
    "CheckReport",
    "Splits",
    "Volume",
    "check_cases",
    "check_dataset",
    "geometry_differences",
    "lesion_label_values",
    "load_cases",
    "load_decathlon",
    "load_image",
    "load_manifest",
    "load_nifti",
    "load_paired_folder",
    "load_splits",
    "patient_from_case_id",
    "require_same_geometry",
    "require_unique_case_ids",
    "save_image",
    "save_splits",
    "split_patients",
]
