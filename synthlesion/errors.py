"""Typed errors. Every message names the file, the case and the problem."""

from __future__ import annotations

from pathlib import Path


class SynthlesionError(Exception):
    """Base class of every error synthlesion raises on purpose."""


class ImageReadError(SynthlesionError):
    """A file could not be read as a medical image (empty, truncated, corrupt, wrong format)."""

    def __init__(self, path: str | Path, problem: str, code: str = "unreadable") -> None:
        self.path = Path(path)
        self.problem = problem
        self.code = code
        super().__init__(f"{path}: {problem}")


class DicomSeriesError(ImageReadError):
    """A DICOM folder is not one complete, evenly spaced series."""


class GeometryError(SynthlesionError):
    """Image and mask (or two parts of one header) disagree on voxel grid or world position."""


class LabelError(SynthlesionError):
    """A mask holds values it must not hold (undeclared labels, fractions)."""


class CaseSourceError(SynthlesionError):
    """A dataset.json, manifest or folder could not be turned into cases."""


class SplitError(SynthlesionError):
    """A splits file is missing, edited, or puts a patient on two sides."""


class ConfigError(SynthlesionError):
    """A configuration file or override is invalid (unknown key, wrong type)."""
