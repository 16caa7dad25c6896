"""Errors of the reader study."""

from __future__ import annotations

from synthlesion.errors import SynthlesionError


class StudyError(SynthlesionError):
    """A study cannot be made, served or scored as asked (the message says why)."""


class AnswersError(StudyError):
    """An answers file is not what the server wrote (edited, truncated, another study)."""


class ReaderConflict(StudyError):
    """A reader id is already in use by another session."""
