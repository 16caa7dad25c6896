"""The registry of synthetic content: what every synthetic file and voxel array hashes to.

Evaluation data is checked against it by content, not by name: a synthetic image copied,
renamed or moved into a real folder still hashes to a registered sha256, and a re-compressed or
re-saved copy still decodes to registered voxels (:func:`voxel_sha256`).

Kept compact so that 100,000 rows cost a few megabytes: each entry is the first 16 bytes of a
sha256 (128 bits; a chance match is below 1e-30 per lookup), a kind and a row index; case ids
are one byte string with offsets. An output file equal to its source file (an unchanged mask)
is not registered: it is real content.
"""

from __future__ import annotations

import io
import logging
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from synthlesion.data.io import load_image
from synthlesion.data.synthetic_mark import read_mark
from synthlesion.provenance.errors import ProvenanceError
from synthlesion.provenance.identity import voxel_sha256
from synthlesion.provenance.manifest import ManifestRow, read_manifest
from synthlesion.storage import atomic_write_bytes, sha256_file

logger = logging.getLogger(__name__)

KINDS = ("image file", "mask file", "image voxels", "mask voxels")
IMAGE_FILE, MASK_FILE, IMAGE_VOXELS, MASK_VOXELS = range(4)
FORMAT = "synthlesion-registry/1"


def digest_key(sha256_hex: str) -> bytes:
    """The 16-byte registry key of a sha256 hex digest."""
    return bytes.fromhex(sha256_hex[:32])


class RegistryBuilder:
    """Collects registry entries row by row (a few dozen bytes per row)."""

    def __init__(self) -> None:
        self._digests = bytearray()
        self._kinds = bytearray()
        self._rows = array("I")
        self._ids = bytearray()
        self._offsets = array("Q", [0])

    def add_row(self, row: ManifestRow) -> None:
        """Register a manifest row's output files and voxel arrays."""
        index = len(self._offsets) - 1
        self._ids += row.case_id.encode("utf-8")
        self._offsets.append(len(self._ids))
        sources = set(row.source_image_sha256)
        for digest in row.image_sha256:
            if digest not in sources:
                self._add(digest, IMAGE_FILE, index)
        if row.mask_sha256 != row.source_mask_sha256:
            self._add(row.mask_sha256, MASK_FILE, index)
            if row.mask_voxel_sha256 is not None:
                self._add(row.mask_voxel_sha256, MASK_VOXELS, index)
        for digest in row.image_voxel_sha256 or ():
            self._add(digest, IMAGE_VOXELS, index)

    def _add(self, digest: str, kind: int, index: int) -> None:
        self._digests += digest_key(digest)
        self._kinds.append(kind)
        self._rows.append(index)

    def finish(self) -> SyntheticRegistry:
        """Sort the entries into a :class:`SyntheticRegistry`."""
        digests = np.frombuffer(bytes(self._digests), dtype="S16")
        order = np.argsort(digests, kind="stable")
        return SyntheticRegistry(
            digests[order],
            np.frombuffer(bytes(self._kinds), dtype=np.uint8)[order],
            np.frombuffer(self._rows.tobytes(), dtype=np.uint32)[order],
            np.frombuffer(bytes(self._ids), dtype=np.uint8),
            np.frombuffer(self._offsets.tobytes(), dtype=np.uint64),
        )


@dataclass(frozen=True)
class SyntheticMatch:
    """Why a file or array is synthetic (:meth:`SyntheticRegistry.identify`).

    Attributes:
        how: ``"mark"`` (its header says so), ``"file"`` (a registered synthetic file's
            sha256) or ``"voxels"`` (a registered synthetic case's decoded voxels).
        kind: What matched (``"image file"``, ``"mask voxels"``, ``"synthetic mark"``...).
        case_id: The synthetic case it is, when known.
        digest: The matching sha256, for file matches.
    """

    how: str
    kind: str
    case_id: str | None
    digest: str | None

    def describe(self) -> str:
        """How it was recognised, in words (to follow "<file> ...")."""
        if self.how == "mark":
            return f"carries the synthlesion synthetic mark (synthetic case {self.case_id})"
        if self.how == "file":
            return (
                f"is synthetic case {self.case_id} ({self.kind} sha256 "
                f"{(self.digest or '')[:12]}), copied or renamed into real data"
            )
        return (
            f"decodes to the voxels of synthetic case {self.case_id}: a re-saved copy of a "
            "synthetic file (re-compressed or re-encoded)"
        )


class SyntheticRegistry:
    """Sorted content keys of every known synthetic case.

    Build one with :meth:`from_manifests`, or load the one a dataset build wrote
    (``synthetic_registry.npz``) with :meth:`load`.
    """

    def __init__(
        self,
        digests: np.ndarray,
        kinds: np.ndarray,
        rows: np.ndarray,
        ids: np.ndarray,
        offsets: np.ndarray,
    ) -> None:
        self.digests = digests
        self.kinds = kinds
        self.rows = rows
        self._ids = ids
        self._offsets = offsets

    @classmethod
    def empty(cls) -> SyntheticRegistry:
        """A registry that knows no synthetic case (say so explicitly when there is none)."""
        return RegistryBuilder().finish()

    @classmethod
    def from_manifests(
        cls, manifests: Iterable[tuple[str | Path, str | Path | None]], *, verify_files: bool = True
    ) -> SyntheticRegistry:
        """Read ``(manifest, root)`` pairs (root ``None``: the manifest's folder).

        Rows that fail a check are registered too before the error is raised.

        Raises:
            ManifestTampered, UnsafePath, ManifestError: as :func:`read_manifest`.
        """
        builder = RegistryBuilder()
        for path, root in manifests:
            for row in read_manifest(
                path, root, verify_files=verify_files, on_rejected=builder.add_row
            ):
                builder.add_row(row)
        return builder.finish()

    def __len__(self) -> int:
        return int(self.digests.shape[0])

    @property
    def n_cases(self) -> int:
        return int(self._offsets.shape[0]) - 1

    @property
    def has_voxels(self) -> bool:
        """Whether any row recorded voxel hashes (else only file copies can be caught)."""
        return bool(np.any(self.kinds >= IMAGE_VOXELS))

    def case_id(self, index: int) -> str:
        start, stop = int(self._offsets[index]), int(self._offsets[index + 1])
        return self._ids[start:stop].tobytes().decode("utf-8")

    def lookup(self, sha256_hex: str) -> list[tuple[str, str]]:
        """``[(kind, synthetic case id)]`` registered under this digest (empty: not synthetic)."""
        key = np.array([digest_key(sha256_hex)], dtype="S16")
        lo = int(np.searchsorted(self.digests, key, side="left")[0])
        hi = int(np.searchsorted(self.digests, key, side="right")[0])
        return [(KINDS[int(self.kinds[i])], self.case_id(int(self.rows[i]))) for i in range(lo, hi)]

    def identify(
        self,
        target: str | Path | np.ndarray,
        *,
        file_sha256: str | None = None,
        voxels: bool = True,
        mark: bool = True,
    ) -> SyntheticMatch | None:
        """Is this file or voxel array synthetic? The one answer for every guard and loader.

        A file is synthetic when, in this order, its header carries the synthlesion synthetic
        mark (known even with an empty registry), its sha256 is a registered synthetic file's
        (a copy or a renamed file), or its decoded voxels hash to a registered synthetic
        case's (a re-saved or re-compressed copy). A voxel array is checked by its voxels.

        Args:
            target: A NIfTI file (or DICOM folder), or a voxel array.
            file_sha256: The file's sha256 when already known (saves a read).
            voxels: Also decode the file and compare its voxels (costs a full read).
            mark: Read the file's header for the synthetic mark.

        Returns:
            How it matched, or ``None`` when nothing says it is synthetic.
        """
        if isinstance(target, np.ndarray):
            hits = self.lookup(voxel_sha256(target)) if self.has_voxels else []
            return SyntheticMatch("voxels", hits[0][0], hits[0][1], None) if hits else None
        path = Path(target)
        if mark:
            facts = read_mark(path)
            if facts is not None:
                return SyntheticMatch("mark", "synthetic mark", facts.get("case"), None)
        digest = file_sha256 or (sha256_file(path) if path.is_file() else None)
        if digest is not None:
            hits = self.lookup(digest)
            if hits:
                return SyntheticMatch("file", hits[0][0], hits[0][1], digest)
        if voxels and self.has_voxels:
            hits = self.lookup(voxel_sha256(load_image(path).array))
            if hits:
                return SyntheticMatch("voxels", hits[0][0], hits[0][1], None)
        return None

    def __contains__(self, sha256_hex: object) -> bool:
        return isinstance(sha256_hex, str) and bool(self.lookup(sha256_hex))

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(
            buffer,
            format=np.array(FORMAT),
            digests=self.digests,
            kinds=self.kinds,
            rows=self.rows,
            ids=self._ids,
            offsets=self._offsets,
        )
        return buffer.getvalue()

    def save(self, path: str | Path) -> Path:
        """Write the registry as ``.npz`` (atomically)."""
        atomic_write_bytes(path, self.to_bytes())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> SyntheticRegistry:
        """Read a registry written by :meth:`save` (no pickles are loaded).

        Raises:
            ProvenanceError: missing or not a registry file.
        """
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["format"]) != FORMAT:
                    raise ProvenanceError(f"{path}: not a {FORMAT} file")
                return cls(
                    data["digests"], data["kinds"], data["rows"], data["ids"], data["offsets"]
                )
        except FileNotFoundError:
            raise ProvenanceError(f"{path}: synthetic registry does not exist") from None
        except (OSError, KeyError, ValueError) as exc:
            raise ProvenanceError(f"{path}: unreadable synthetic registry ({exc})") from None


__all__ = ["KINDS", "RegistryBuilder", "SyntheticMatch", "SyntheticRegistry", "digest_key"]
