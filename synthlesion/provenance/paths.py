"""Paths read from manifests, checked before any file is opened.

A manifest path must be relative, use ``/`` separators, hold no ``..`` component, and resolve
(after following every symbolic link on the way) inside the dataset root. Case ids become file
names in a built dataset, so they are restricted to a safe alphabet too.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from synthlesion.data.cases import safe_id_problem
from synthlesion.provenance.errors import UnsafePath

_DRIVE = re.compile(r"[A-Za-z]:")  # C:, C:/x or C:x (a Windows drive)


def check_case_id(case_id: object, where: str) -> str:
    """Return ``case_id`` if it is a safe file name stem, else raise :class:`UnsafePath`.

    Allowed: :data:`synthlesion.data.cases.SAFE_ID_PATTERN`.
    """
    problem = safe_id_problem(case_id)
    if problem is not None:
        raise UnsafePath(
            f"{where}: case id {problem}; it cannot be used as a file name",
            case_id=case_id if isinstance(case_id, str) else None,
        )
    return case_id


class RootGuard:
    """Resolves manifest paths under one dataset root, refusing any that escape it.

    Args:
        root: The dataset root; its own real path (symbolic links resolved) is the boundary.

    The real path of each parent folder is cached, so checking many files in a few folders
    costs about one ``lstat`` per file.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.real_root = os.path.realpath(self.root)
        self._prefix = self.real_root.rstrip(os.sep) + os.sep
        self._parents: dict[str, str] = {}

    def resolve(self, value: object, where: str, *, case_id: str | None = None) -> str:
        """The real absolute path of ``value`` (relative to the root).

        Args:
            value: The path as written in the manifest.
            where: Context for the error message (manifest and row).
            case_id: The row's case, named in the error.

        Raises:
            UnsafePath: not a string, absolute, with ``..``, with ``\\``, or resolving outside
                the root.
        """
        if not isinstance(value, str) or not value or "\x00" in value:
            raise UnsafePath(f"{where}: path {value!r} is not a non-empty string", case_id=case_id)
        if "\\" in value:
            raise UnsafePath(
                f"{where}: path {value!r} uses '\\'; manifest paths use '/'",
                case_id=case_id,
                path=value,
            )
        if value.startswith(("/", "~")) or _DRIVE.match(value):
            raise UnsafePath(
                f"{where}: path {value!r} is absolute; manifest paths must be relative to the "
                f"dataset root {self.root}",
                case_id=case_id,
                path=value,
            )
        parts = value.split("/")
        if ".." in parts:
            raise UnsafePath(f"{where}: path {value!r} contains '..'", case_id=case_id, path=value)
        parent, _, name = value.rpartition("/")
        real_parent = self._parents.get(parent)
        if real_parent is None:
            real_parent = os.path.realpath(os.path.join(self.real_root, parent))
            self._parents[parent] = real_parent
        if not name or name in (".",):
            raise UnsafePath(
                f"{where}: path {value!r} names a folder, not a file", case_id=case_id, path=value
            )
        candidate = os.path.join(real_parent, name)
        if os.path.islink(candidate):
            candidate = os.path.realpath(candidate)
        if not candidate.startswith(self._prefix):
            raise UnsafePath(
                f"{where}: path {value!r} resolves to {candidate}, outside the dataset root "
                f"{self.real_root} (through a symbolic link)",
                case_id=case_id,
                path=value,
            )
        return candidate


__all__ = ["RootGuard", "check_case_id"]
