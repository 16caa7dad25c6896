"""Typed errors of the training package (subclasses of :class:`synthlesion.errors.SynthlesionError`)."""

from __future__ import annotations

from synthlesion.errors import SynthlesionError


class TrainingDataError(SynthlesionError):
    """The training data cannot be used (no lesion in the train split, no usable case)."""


class CheckpointError(SynthlesionError):
    """A checkpoint is half-written, incomplete, a pickle, damaged or does not fit the run."""


class TrainingAbortedError(SynthlesionError):
    """Training stopped on purpose (e.g. too many non-finite losses in a row); the last good
    state was saved as a checkpoint first (its path is in the message)."""
