"""Errors of the dataset builder and loaders (the guards' refusals live with provenance:
:mod:`synthlesion.provenance.errors`)."""

from __future__ import annotations

from synthlesion.errors import SynthlesionError


class DatasetError(SynthlesionError):
    """A dataset build or loader request that cannot be carried out."""


class BuildExistsError(DatasetError):
    """The output folder already holds a build (or other files) and replacing was not asked."""


__all__ = ["BuildExistsError", "DatasetError"]
