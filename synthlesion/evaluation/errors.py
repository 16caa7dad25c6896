"""Typed errors of the downstream evaluation; each message names the file and the problem."""

from __future__ import annotations

from synthlesion.errors import ConfigError, SynthlesionError


class EvaluationError(SynthlesionError):
    """Base class of the evaluation harness's errors."""


class EvaluationConfigError(EvaluationError, ConfigError):
    """An evaluation config value is out of range or inconsistent (e.g. a synthetic share
    outside [0, 1], an arm that needs synthetic data without a source for it)."""


class SyntheticTestDataError(EvaluationError):
    """The test split would contain synthetic data (a synthetic set given as the real data, a
    dataset listing synthetic cases, or a test file whose content is synthetic)."""


class RunFolderError(EvaluationError):
    """The run folder holds another run's results (or files that are not a run); nothing is
    overwritten."""


__all__ = [
    "EvaluationConfigError",
    "EvaluationError",
    "RunFolderError",
    "SyntheticTestDataError",
]
