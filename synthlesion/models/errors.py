"""Typed errors of the model package (subclasses of :class:`synthlesion.errors.SynthlesionError`)."""

from __future__ import annotations

from pathlib import Path

from synthlesion.errors import SynthlesionError


class ModelFolderError(SynthlesionError):
    """A model folder (or a pretrained diffusers folder) cannot be loaded or written.

    Raised for a missing file, a pickle weight file, a folder that is not a synthlesion model,
    or weights that do not fit the saved config. The message names the folder and the file.
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class BatchError(SynthlesionError):
    """A batch handed to the model lacks a key or has the wrong shape, dtype or value range."""
