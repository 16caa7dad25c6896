"""Writing synthetic-case manifests: :class:`ManifestWriter` and :func:`reseal_manifest`.

The format is documented in :mod:`synthlesion.provenance.manifest`, which re-exports both names
(``from synthlesion.provenance import ManifestWriter``).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

from synthlesion.data.cases import Case
from synthlesion.provenance.errors import ManifestError, ManifestTampered
from synthlesion.provenance.identity import GeneratorRef, package_versions, utc_now, voxel_sha256
from synthlesion.provenance.manifest import (
    FORMAT,
    GENESIS,
    LOCK_FORMAT,
    ManifestReader,
    ManifestRow,
    encode_record,
    file_problem,
    lock_path_for,
    read_lock,
    split_line,
)
from synthlesion.provenance.paths import RootGuard, check_case_id
from synthlesion.storage import atomic_write_bytes, atomic_write_json, sha256_file

try:  # POSIX only: keeps two writers off one manifest
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)


class ManifestWriter:
    """Append synthetic-case rows to a manifest, one atomic line at a time.

    Opening an existing manifest resumes it: a torn last line is dropped, complete rows after
    the lock's count are checked against their files and sealed, and :meth:`__contains__`
    tells which cases are already done (so a rerun makes only the missing ones).

    Args:
        path: The manifest (``.jsonl``); its lock goes beside it.
        root: Dataset root the row paths are relative to (default: the manifest's folder).
        generator: The generator of this run; required for a new manifest, and must equal the
            header's when resuming (``None`` adopts it).
        run_id: Id of the run (default: a new random id; when resuming, the header's).
        splits_sha256: sha256 of the locked splits file the sampler used.
        durable: ``fsync`` every appended row (turn off only for bulk conversions).
        verify_files: Hash each row's files before appending and compare with the row.

    Raises:
        ManifestError: another writer holds the manifest, or resuming with another generator
            or run id.
    """

    def __init__(
        self,
        path: str | Path,
        root: str | Path | None = None,
        *,
        generator: GeneratorRef | None = None,
        run_id: str | None = None,
        splits_sha256: str | None = None,
        durable: bool = True,
        verify_files: bool = True,
    ) -> None:
        self.path = Path(path)
        self.root = Path(root) if root is not None else self.path.parent
        self.guard = RootGuard(self.root)
        self.durable = durable
        self.verify_files = verify_files
        self._versions = package_versions()
        self._ids: set[str] = set()
        self.rows = 0
        self._exclusive = _take_writer_lock(self.path)
        try:
            if self.path.exists():
                self._resume(generator, run_id)
            else:
                if generator is None:
                    raise ManifestError(f"{self.path}: a new manifest needs its generator")
                self._create(generator, run_id or uuid.uuid4().hex, splits_sha256)
            self._handle = open(self.path, "ab")  # noqa: SIM115 - closed in close()
        except BaseException:
            self._exclusive.close()
            raise

    # -- opening -----------------------------------------------------------------------
    def _create(self, generator: GeneratorRef, run_id: str, splits_sha256: str | None) -> None:
        if lock_path_for(self.path).exists():
            raise ManifestError(
                f"{lock_path_for(self.path)} exists without its manifest; "
                "remove it or restore the manifest"
            )
        header = {
            "record": "header",
            "format": FORMAT,
            "run_id": run_id,
            "created": utc_now(),
            "generator": generator.to_dict(),
            "splits_sha256": splits_sha256,
            "package_versions": self._versions,
        }
        line, digest = encode_record(header, GENESIS)
        atomic_write_bytes(self.path, line)
        self.generator, self.run_id, self.splits_sha256 = generator, run_id, splits_sha256
        self.header_sha256 = self.chain_head = digest
        self._seal()

    def _resume(self, generator: GeneratorRef | None, run_id: str | None) -> None:
        _drop_torn_tail(self.path)
        if not lock_path_for(self.path).exists() and _line_count(self.path) == 1:
            self._reseal_header_only()
        reader = ManifestReader(self.path, self.root, verify_files=False)
        for row in reader:
            if row.row > reader.lock["rows"] and self.verify_files:
                images, mask = reader.last_paths
                for real, digest in (
                    *zip(images, row.image_sha256, strict=True),
                    (mask, row.mask_sha256),
                ):
                    problem = file_problem(real, digest)
                    if problem:
                        raise ManifestTampered(
                            f"{self.path} row {row.row} (case {row.case_id}): unsealed row's "
                            f"file {real} {problem}",
                            case_id=row.case_id,
                            path=self.path,
                            row=row.row,
                        )
            self._ids.add(row.case_id.casefold())
        if generator is not None and generator != reader.generator:
            raise ManifestError(
                f"{self.path}: resuming with generator {generator.path} "
                f"({generator.sha256[:12]}), but the manifest was made by "
                f"{reader.generator.path} ({reader.generator.sha256[:12]})"
            )
        if run_id is not None and run_id != reader.run_id:
            raise ManifestError(
                f"{self.path}: run id {run_id} differs from the manifest's {reader.run_id}"
            )
        self.generator, self.run_id = reader.generator, reader.run_id
        self.splits_sha256 = reader.header.get("splits_sha256")
        self.header_sha256, self.chain_head = reader.header_sha256, reader.chain_head
        self.rows = reader.rows_read
        if reader.unsealed:
            logger.info(
                "%s: sealing %d row(s) written after the last lock update",
                self.path,
                reader.unsealed,
            )
            self._seal()

    def _reseal_header_only(self) -> None:
        parts = split_line(self.path.read_bytes().rstrip(b"\n"))
        if parts is None:
            raise ManifestError(f"{self.path}: not a synthlesion manifest")
        header = json.loads(parts[0])
        self.generator = GeneratorRef.from_dict(header.get("generator"), str(self.path))
        self.run_id, self.splits_sha256 = header.get("run_id"), header.get("splits_sha256")
        self.header_sha256 = self.chain_head = parts[1]
        self.rows = 0
        self._seal()

    def _seal(self) -> None:
        atomic_write_json(
            lock_path_for(self.path),
            {
                "format": LOCK_FORMAT,
                "manifest": self.path.name,
                "run_id": self.run_id,
                "generator": self.generator.to_dict(),
                "splits_sha256": self.splits_sha256,
                "rows": self.rows,
                "header_sha256": self.header_sha256,
                "chain_head": self.chain_head,
                "updated": utc_now(),
            },
        )

    # -- appending ---------------------------------------------------------------------
    def __len__(self) -> int:
        """Cases the manifest holds (its earlier rows and this run's)."""
        return len(self._ids)

    def __contains__(self, case_id: object) -> bool:
        return isinstance(case_id, str) and case_id.casefold() in self._ids

    def append(self, row: ManifestRow) -> ManifestRow:
        """Append one complete row (its ``row`` number is assigned here); returns it.

        Raises:
            ManifestError: the case id is already in the manifest, or the row is malformed.
            UnsafePath: a path escapes the root.
            ManifestTampered: a file is missing or does not hash as the row says.
        """
        return self.append_many([row])[0]

    def append_many(self, rows: Iterable[ManifestRow]) -> list[ManifestRow]:
        """Append several rows with one write and one lock update (for bulk conversions)."""
        lines, written, head = [], [], self.chain_head
        ids: set[str] = set()
        for row in rows:
            number = self.rows + len(written) + 1
            row = replace(
                row,
                row=number,
                created=row.created or utc_now(),
                package_versions=row.package_versions or self._versions,
                row_sha256=None,
            )
            record = self._check(row, ids)
            line, head = encode_record(record, head)
            lines.append(line)
            written.append(replace(row, row_sha256=head))
        if not lines:
            return []
        data = memoryview(b"".join(lines))
        while data:  # a regular file takes it all at once unless the disk fills up
            data = data[os.write(self._handle.fileno(), data) :]
        if self.durable:
            os.fsync(self._handle.fileno())
        self._ids.update(ids)
        self.rows += len(written)
        self.chain_head = head
        self._seal()
        return written

    def _check(self, row: ManifestRow, ids: set[str]) -> dict[str, Any]:
        where = f"{self.path} new row {row.row} (case {row.case_id})"
        check_case_id(row.case_id, where)
        key = row.case_id.casefold()
        if key in self._ids or key in ids:
            raise ManifestError(f"{where}: case id already in the manifest (ignoring case)")
        if row.generator != self.generator:
            raise ManifestError(f"{where}: generator differs from this run's")
        record = row.to_record()
        try:
            ManifestRow.from_record(record, where)
        except ValueError as exc:
            raise ManifestError(str(exc)) from None
        paths = [self.guard.resolve(p, where, case_id=row.case_id) for p in row.images]
        paths.append(self.guard.resolve(row.mask, where, case_id=row.case_id))
        for real, digest in zip(paths, (*row.image_sha256, row.mask_sha256), strict=True):
            if not os.path.isfile(real):
                raise ManifestTampered(
                    f"{where}: {real} does not exist; write the files first, the row last",
                    case_id=row.case_id,
                )
            if self.verify_files:
                problem = file_problem(real, digest)
                if problem:
                    raise ManifestTampered(f"{where}: {real} {problem}", case_id=row.case_id)
        ids.add(key)
        return record

    def append_case(
        self,
        *,
        case_id: str,
        source: Case,
        images: Sequence[str],
        mask: str,
        mask_origin: str,
        scheduler: str,
        steps: int,
        seed: int,
        quality: Mapping[str, Any] | None = None,
        source_split: str | None = None,
        mask_source_sha256: str | None = None,
        mask_source_case: str | None = None,
        mask_source_patient: str | None = None,
        mask_sources: Sequence[Mapping[str, str | None]] = (),
        voxel_hashes: bool = True,
    ) -> ManifestRow:
        """Hash a finished synthetic case's files and append its row.

        Args:
            case_id: The synthetic case's id.
            source: The real case the lesion was painted into.
            images: Output image path(s) relative to the root, one per channel.
            mask: Output mask path relative to the root.
            mask_origin: ``"bank"``, ``"procedural"`` or ``"user"``.
            scheduler, steps, seed: Sampling facts.
            quality: Quality-gate values.
            source_split: The source patient's side as the sampler saw it.
            mask_source_sha256, mask_source_case, mask_source_patient: The real mask a
                transplanted (``"bank"``) lesion was cut from (``BankLesion`` carries them).
            mask_sources: Every transplanted lesion's real mask, as ``{"sha256", "case",
                "patient"}`` (for cases with several lesions from several masks).
            voxel_hashes: Also decode the outputs and record :func:`voxel_sha256` (lets the
                guards catch re-compressed copies).
        """
        from synthlesion.data.io import load_image

        where = f"{self.path} case {case_id}"
        real = [self.guard.resolve(p, where, case_id=case_id) for p in images]
        real_mask = self.guard.resolve(mask, where, case_id=case_id)
        row = ManifestRow(
            case_id=case_id,
            source_case=source.case_id,
            source_patient=source.patient_id,
            images=tuple(images),
            mask=mask,
            image_sha256=tuple(sha256_file(p) for p in real),
            mask_sha256=sha256_file(real_mask),
            source_image_sha256=tuple(sha256_file(p) for p in source.images),
            source_mask_sha256=sha256_file(source.mask) if source.mask is not None else None,
            mask_origin=mask_origin,
            generator=self.generator,
            scheduler=scheduler,
            steps=int(steps),
            seed=int(seed),
            quality=dict(quality or {}),
            source_split=source_split,
            image_voxel_sha256=(
                tuple(voxel_sha256(load_image(p).array) for p in real) if voxel_hashes else None
            ),
            mask_voxel_sha256=voxel_sha256(load_image(real_mask).array) if voxel_hashes else None,
            mask_source_sha256=mask_source_sha256,
            mask_source_case=mask_source_case,
            mask_source_patient=mask_source_patient,
            mask_sources=tuple(
                {"sha256": m.get("sha256"), "case": m.get("case"), "patient": m.get("patient")}
                for m in mask_sources
            ),
        )
        return self.append(row)

    # -- closing -----------------------------------------------------------------------
    def close(self) -> None:
        """Release the manifest (the lock is already up to date after every append)."""
        if not self._handle.closed:
            self._handle.close()
        if not self._exclusive.closed:
            self._exclusive.close()

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def reseal_manifest(path: str | Path, root: str | Path | None = None) -> dict[str, Any]:
    """Drop a torn last line, check and seal rows written after the last lock update.

    Returns:
        The new lock record.
    """
    with ManifestWriter(path, root):
        pass
    return read_lock(path)


def _take_writer_lock(path: Path) -> IO[bytes]:
    """Hold ``.<manifest>.writer`` exclusively (POSIX ``flock``) while a writer is open, so a
    second writer can neither append nor truncate a torn line under the first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(f".{path.name}.writer")
    try:  # never through a symbolic link: the lock file stays where the manifest is
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise ManifestError(f"{lock}: cannot open the writer lock ({exc.strerror})") from None
    handle = os.fdopen(fd, "ab")
    if fcntl is not None:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise ManifestError(f"{path}: another writer has this manifest open") from None
    return handle


def _drop_torn_tail(path: Path) -> None:
    size = path.stat().st_size
    if size == 0:
        raise ManifestError(f"{path}: empty manifest (no header)")
    with open(path, "rb+") as handle:
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return
        keep, block = 0, 1 << 16
        position = size
        while position > 0:
            start = max(0, position - block)
            handle.seek(start)
            chunk = handle.read(position - start)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            position = start
        if keep == 0:
            raise ManifestError(f"{path}: the header line itself is cut short")
        logger.warning(
            "%s: dropping a torn last line (%d bytes) left by an interrupted write",
            path,
            size - keep,
        )
        handle.truncate(keep)
        handle.flush()
        os.fsync(handle.fileno())


def _line_count(path: Path) -> int:
    with open(path, "rb") as handle:
        return sum(1 for _ in handle)


__all__ = ["ManifestWriter", "reseal_manifest"]
