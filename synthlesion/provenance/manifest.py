"""The synthetic-case manifest: one JSON line per synthetic case, hash-chained and locked.

Files
-----
``<name>.jsonl`` (the manifest) and ``<name>.lock.json`` (its lock, beside it); while a
writer is open it also holds ``.<name>.jsonl.writer`` (an empty file, ``flock``-ed). Line 1 of
the manifest is a header record; every further line is one synthetic case. Paths in rows are
relative to the *dataset root* (by default the manifest's folder) with ``/`` separators.

Header record (line 1)::

    record          "header"
    format          "synthlesion-manifest/1"
    run_id          id of the sampling run (hex)
    created         ISO 8601 UTC time the manifest was started
    generator       {"path", "sha256", "training_record_sha256"}: see below
    splits_sha256   sha256 of the locked splits file the sampler used, or null
    package_versions  {"synthlesion": "0.1.0", "torch": ..., ...}
    row_sha256      chain hash (below)

Case row (lines 2...), every field always present (null where noted)::

    record                "case"
    row                   1, 2, 3... (line number - 1; no gaps)
    case_id               synthetic case id: 1-128 of [A-Za-z0-9._-], starting alphanumeric
    source_case           the real case whose scan the lesion was painted into
    source_patient        that real case's patient id
    source_split          "train"/"val"/"test" as the sampler saw it, or null
    images                [path per channel], relative to the dataset root
    mask                  label map path, relative to the dataset root
    image_sha256          [sha256 of each output image file]
    mask_sha256           sha256 of the output mask file
    image_voxel_sha256    [voxel_sha256 of each output image's decoded voxels] or null
    mask_voxel_sha256     voxel_sha256 of the output mask or null
    source_image_sha256   [sha256 of each source (real) image file]
    source_mask_sha256    sha256 of the source case's mask file, or null (unlabelled source)
    mask_origin           "bank" (a real lesion transplanted), "procedural" or "user"
    mask_source_sha256    sha256 of the real mask file the lesion was cut from (required for
                          "bank"; else null)
    mask_source_case      that real mask's case id, or null
    mask_source_patient   that real mask's patient id, or null
    mask_sources          every real mask transplanted into this case (several lesions):
                          [{"sha256", "case", "patient"}] ("case"/"patient" may be null);
                          [] when there is none or only the one above
    generator             {"path": model folder (relative to the root or absolute),
                           "sha256": model_folder_sha256, "training_record_sha256": sha256 of
                           its training_record.json}; equal to the header's
    scheduler             scheduler name ("ddim", ...)
    steps                 sampling steps (int)
    seed                  per-case seed (int)
    quality               quality-gate values (JSON object)
    package_versions      {"synthlesion": ..., "torch": ..., ...}
    created               ISO 8601 UTC time the row was written
    row_sha256            chain hash; always the last field of the line

Integrity
---------
Each record is written as ``B[:-1] + ',"row_sha256":"' + H + '"}'`` where ``B`` is the record
without ``row_sha256`` as canonical JSON (sorted keys, no spaces, ASCII) and
``H = sha256(H_prev + B)`` in hex, ``H_prev`` being the previous line's ``row_sha256`` (64 zeros
before the header). So an edit of any field of a row, including its hashes or split, breaks
its ``row_sha256``; an edit that also recomputes it breaks the next row's; a removed, inserted
or reordered row breaks the chain and the ``row`` numbers. The lock holds the run id, the
generator, the header hash, the row count and the chain head at that count: removing rows from
the end, or swapping the manifest, is caught there. The files themselves are checked against
``image_sha256``/``mask_sha256`` on read (``verify_files``). This detects hand edits and
accidents, not a forger who recomputes every hash: there is no secret key. Against that, the
dataset builder does not trust a row's claims: it takes the patient and the side from the real
source case (whose file hashes must match ``source_image_sha256``), and checks the generator's
training record and every evaluation file against the content hashes of all rows.

Writing
-------
:class:`ManifestWriter` appends one line per case with a single ``write`` on a file opened in
append mode, ``fsync``s it, then rewrites the lock atomically. A row is accepted only once its
files exist (and, by default, hash as claimed), so a row is always written last. A crash can
leave a torn last line (no newline): it is detected and dropped when the writer reopens the
manifest; complete rows written after the last lock update are re-checked and sealed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synthlesion.data.sources import SYNTHETIC_MANIFEST_FORMAT
from synthlesion.provenance.errors import GuardViolation, ManifestError, ManifestTampered
from synthlesion.provenance.identity import (
    GeneratorRef,
    is_sha256,
)
from synthlesion.provenance.paths import RootGuard, check_case_id
from synthlesion.storage import sha256_file

logger = logging.getLogger(__name__)

FORMAT = SYNTHETIC_MANIFEST_FORMAT  # "synthlesion-manifest/1"
LOCK_FORMAT = "synthlesion-manifest-lock/1"
GENESIS = "0" * 64
MASK_ORIGINS = ("bank", "procedural", "user")
SIDES = ("train", "val", "test")
_HASH_KEY = b',"row_sha256":"'
_SUFFIX = len(_HASH_KEY) + 64 + 2
OnViolation = Callable[[GuardViolation], None]


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (manifests are strict JSON)")


def lock_path_for(manifest: str | Path) -> Path:
    """``runs/x/manifest.jsonl`` -> ``runs/x/manifest.lock.json``."""
    manifest = Path(manifest)
    stem = manifest.name[:-6] if manifest.name.endswith(".jsonl") else manifest.name
    return manifest.with_name(stem + ".lock.json")


@dataclass(frozen=True, slots=True)
class ManifestRow:
    """One synthetic case as recorded in a manifest (see the module docstring for each field)."""

    case_id: str
    source_case: str
    source_patient: str
    images: tuple[str, ...]
    mask: str
    image_sha256: tuple[str, ...]
    mask_sha256: str
    source_image_sha256: tuple[str, ...]
    source_mask_sha256: str | None
    mask_origin: str
    generator: GeneratorRef
    scheduler: str
    steps: int
    seed: int
    quality: Mapping[str, Any] = field(default_factory=dict)
    package_versions: Mapping[str, str] = field(default_factory=dict)
    created: str = ""
    row: int = 0
    source_split: str | None = None
    image_voxel_sha256: tuple[str, ...] | None = None
    mask_voxel_sha256: str | None = None
    mask_source_sha256: str | None = None
    mask_source_case: str | None = None
    mask_source_patient: str | None = None
    mask_sources: tuple[Mapping[str, str | None], ...] = ()
    row_sha256: str | None = None

    def transplanted_masks(self) -> list[tuple[str | None, str | None, str | None]]:
        """``(sha256, case, patient)`` of every real mask a lesion was cut from, no repeats."""
        found = []
        if self.mask_source_sha256 is not None or self.mask_source_patient is not None:
            found.append((self.mask_source_sha256, self.mask_source_case, self.mask_source_patient))
        for source in self.mask_sources:
            item = (source.get("sha256"), source.get("case"), source.get("patient"))
            if item not in found:
                found.append(item)
        return found

    def to_record(self) -> dict[str, Any]:
        """The JSON record without ``row_sha256``."""
        return {
            "record": "case",
            "row": self.row,
            "case_id": self.case_id,
            "source_case": self.source_case,
            "source_patient": self.source_patient,
            "source_split": self.source_split,
            "images": list(self.images),
            "mask": self.mask,
            "image_sha256": list(self.image_sha256),
            "mask_sha256": self.mask_sha256,
            "image_voxel_sha256": (
                list(self.image_voxel_sha256) if self.image_voxel_sha256 is not None else None
            ),
            "mask_voxel_sha256": self.mask_voxel_sha256,
            "source_image_sha256": list(self.source_image_sha256),
            "source_mask_sha256": self.source_mask_sha256,
            "mask_origin": self.mask_origin,
            "mask_source_sha256": self.mask_source_sha256,
            "mask_source_case": self.mask_source_case,
            "mask_source_patient": self.mask_source_patient,
            "mask_sources": [dict(m) for m in self.mask_sources],
            "generator": self.generator.to_dict(),
            "scheduler": self.scheduler,
            "steps": self.steps,
            "seed": self.seed,
            "quality": dict(self.quality),
            "package_versions": dict(self.package_versions),
            "created": self.created,
        }

    @classmethod
    def from_record(
        cls, data: Mapping[str, Any], where: str, row_sha256: str | None = None
    ) -> ManifestRow:
        """Parse and type-check a record; raises ``ValueError`` naming the bad field."""
        missing = _ROW_FIELDS - data.keys()
        extra = data.keys() - _ROW_FIELDS - {"row_sha256"}
        if missing or extra:
            raise ValueError(f"{where}: missing fields {sorted(missing)}, unknown {sorted(extra)}")
        for key in ("case_id", "source_case", "source_patient", "mask", "scheduler", "created"):
            if not isinstance(data[key], str) or not data[key]:
                raise ValueError(f"{where}: {key} must be a non-empty string")
        for key in ("row", "steps", "seed"):
            if not isinstance(data[key], int) or isinstance(data[key], bool):
                raise ValueError(f"{where}: {key} must be an integer")
        images = _str_list(data["images"], f"{where}: images")
        image_sha = _hash_list(data["image_sha256"], len(images), f"{where}: image_sha256")
        source_sha = _hash_list(data["source_image_sha256"], None, f"{where}: source_image_sha256")
        voxels = data["image_voxel_sha256"]
        if voxels is not None:
            voxels = _hash_list(voxels, len(images), f"{where}: image_voxel_sha256")
        for key, optional in (
            ("mask_sha256", False),
            ("source_mask_sha256", True),
            ("mask_voxel_sha256", True),
            ("mask_source_sha256", True),
        ):
            value = data[key]
            if not (value is None and optional) and not is_sha256(value):
                raise ValueError(f"{where}: {key} must be a sha256 hex digest")
        if data["mask_origin"] not in MASK_ORIGINS:
            raise ValueError(f"{where}: mask_origin must be one of {MASK_ORIGINS}")
        if data["mask_origin"] == "bank" and data["mask_source_sha256"] is None:
            raise ValueError(f"{where}: a 'bank' mask needs mask_source_sha256 (the real mask)")
        if data["source_split"] not in (None, *SIDES):
            raise ValueError(f"{where}: source_split must be train, val, test or null")
        for key in ("mask_source_case", "mask_source_patient"):
            if data[key] is not None and not isinstance(data[key], str):
                raise ValueError(f"{where}: {key} must be a string or null")
        sources = data["mask_sources"]
        if not isinstance(sources, list) or not all(
            isinstance(m, dict)
            and set(m) == {"sha256", "case", "patient"}
            and is_sha256(m["sha256"])
            and all(m[k] is None or isinstance(m[k], str) for k in ("case", "patient"))
            for m in sources
        ):
            raise ValueError(
                f"{where}: mask_sources must be a list of {{sha256, case, patient}} objects"
            )
        for key in ("quality", "package_versions"):
            if not isinstance(data[key], dict):
                raise ValueError(f"{where}: {key} must be an object")
        return cls(
            case_id=data["case_id"],
            source_case=data["source_case"],
            source_patient=data["source_patient"],
            images=images,
            mask=data["mask"],
            image_sha256=image_sha,
            mask_sha256=data["mask_sha256"],
            source_image_sha256=source_sha,
            source_mask_sha256=data["source_mask_sha256"],
            mask_origin=data["mask_origin"],
            generator=GeneratorRef.from_dict(data["generator"], where),
            scheduler=data["scheduler"],
            steps=data["steps"],
            seed=data["seed"],
            quality=data["quality"],
            package_versions=data["package_versions"],
            created=data["created"],
            row=data["row"],
            source_split=data["source_split"],
            image_voxel_sha256=voxels,
            mask_voxel_sha256=data["mask_voxel_sha256"],
            mask_source_sha256=data["mask_source_sha256"],
            mask_source_case=data["mask_source_case"],
            mask_source_patient=data["mask_source_patient"],
            mask_sources=tuple(sources),
            row_sha256=row_sha256 or data.get("row_sha256"),
        )


_ROW_FIELDS = frozenset(
    ManifestRow(
        "x", "x", "x", (), "x", (), "", (), None, "user", GeneratorRef("x", "", ""), "x", 0, 0
    ).to_record()
)


def _str_list(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where} must be a non-empty list of strings")
    return tuple(value)


def _hash_list(value: Any, length: int | None, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(is_sha256(v) for v in value):
        raise ValueError(f"{where} must be a non-empty list of sha256 hex digests")
    if length is not None and len(value) != length:
        raise ValueError(f"{where} must hold one digest per image ({length})")
    return tuple(value)


def encode_record(record: Mapping[str, Any], previous: str) -> tuple[bytes, str]:
    """One manifest line (with newline) for ``record`` chained to ``previous``; and its hash."""
    body = json.dumps(
        record, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()
    digest = hashlib.sha256(previous.encode("ascii") + body).hexdigest()
    return body[:-1] + _HASH_KEY + digest.encode("ascii") + b'"}\n', digest


def split_line(line: bytes) -> tuple[bytes, str] | None:
    """``(body, stored hash)`` of a line without its newline, or ``None`` if malformed."""
    if len(line) <= _SUFFIX or line[-_SUFFIX:-66] != _HASH_KEY or not line.endswith(b'"}'):
        return None
    return line[:-_SUFFIX] + b"}", line[-66:-2].decode("ascii", "replace")


def _raise(violation: GuardViolation) -> None:
    raise violation


class ManifestReader:
    """Streams the rows of a manifest, checking integrity, paths and (optionally) files.

    Iterate it to get :class:`ManifestRow` objects one at a time; memory does not grow with
    the number of rows. The lock checks (rows removed from the end) run once the last line has
    been read, so consume the whole iterator before trusting the result.

    Args:
        path: The manifest (``.jsonl``).
        root: The dataset root its paths are relative to (default: the manifest's folder).
        verify_files: Hash each row's output image(s) and mask and compare with the row.
        on_violation: Called with each :class:`GuardViolation` found (the row is then
            skipped); by default the first one is raised.
        on_rejected: Called with each row that failed a check but could be parsed, before
            ``on_violation`` (the builder still registers its content hashes).

    Attributes:
        header: The header record.
        lock: The lock record.
        rows_read: Rows read so far (skipped rows included).
        unsealed: Complete rows after the lock's count (a sampler interrupted between writing
            a row and updating the lock); accepted, with a warning.
        torn_tail: Whether the last line was cut short (ignored; a writer drops it).
        last_paths: Real paths ``(images, mask)`` of the row last yielded.

    Raises:
        ManifestError: the manifest or its header is unreadable or of another format.
        ManifestTampered, UnsafePath: see the module docstring (through ``on_violation``).
    """

    def __init__(
        self,
        path: str | Path,
        root: str | Path | None = None,
        *,
        verify_files: bool = True,
        on_violation: OnViolation | None = None,
        on_rejected: Callable[[ManifestRow], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.root = Path(root) if root is not None else self.path.parent
        self.guard = RootGuard(self.root)
        self.verify_files = verify_files
        self.on_violation = on_violation or _raise
        self.on_rejected = on_rejected
        self.lock = read_lock(self.path)
        self.rows_read = 0
        self.unsealed = 0
        self.torn_tail = False
        self.chain_head = GENESIS
        self.last_paths: tuple[tuple[str, ...], str] = ((), "")
        try:
            with open(self.path, "rb") as handle:
                first = handle.readline()
        except OSError as exc:
            raise ManifestError(f"{self.path}: cannot read manifest ({exc})") from None
        self.header, self.header_sha256 = self._read_header(first)
        self.generator = GeneratorRef.from_dict(self.header["generator"], f"{self.path} header")
        self.run_id = str(self.header["run_id"])

    def _read_header(self, line: bytes) -> tuple[dict[str, Any], str]:
        where = f"{self.path} line 1 (header)"
        parts = split_line(line.rstrip(b"\n")) if line.endswith(b"\n") else None
        if parts is None:
            raise ManifestError(f"{where}: not a synthlesion manifest header")
        body, stored = parts
        try:
            header = json.loads(body, parse_constant=_refuse_constant)
        except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
            raise ManifestError(f"{where}: not strict JSON") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ManifestError(f"{where}: format is not {FORMAT}")
        if hashlib.sha256(GENESIS.encode() + body).hexdigest() != stored:
            raise ManifestTampered(
                f"{where}: the header was edited (row_sha256 mismatch)", path=self.path, row=0
            )
        if (
            stored != self.lock.get("header_sha256")
            or header.get("run_id") != self.lock.get("run_id")
            or header.get("generator") != self.lock.get("generator")
        ):
            raise ManifestTampered(
                f"{where}: header does not match {lock_path_for(self.path).name} (run id, "
                "generator or header hash differ): the manifest or its lock was swapped",
                path=self.path,
                row=0,
            )
        self.chain_head = stored
        return header, stored

    def __iter__(self) -> Iterator[ManifestRow]:
        sealed = int(self.lock["rows"])
        previous = self.header_sha256
        head_at_seal = previous if sealed == 0 else None
        number = 0
        with open(self.path, "rb") as handle:
            handle.readline()
            for raw in handle:
                number += 1
                self.rows_read = number
                where = f"{self.path} line {number + 1} (row {number})"
                if not raw.endswith(b"\n"):
                    if number <= sealed:
                        self.on_violation(
                            ManifestTampered(
                                f"{where}: row is cut short inside the sealed part",
                                path=self.path,
                                row=number,
                            )
                        )
                    else:
                        self.torn_tail = True
                        logger.warning("%s: ignoring a torn last line (interrupted write)", where)
                    number -= 1
                    break
                parts = split_line(raw[:-1])
                row = self._row(parts, number, previous, where)
                previous = parts[1] if parts is not None else previous
                if number == sealed:
                    head_at_seal = previous
                if number > sealed:
                    self.unsealed += 1
                if row is not None:
                    yield row
        self.rows_read = number
        self._finish(number, sealed, head_at_seal, previous)

    def _row(
        self, parts: tuple[bytes, str] | None, number: int, previous: str, where: str
    ) -> ManifestRow | None:
        if parts is None:
            self.on_violation(
                ManifestTampered(
                    f"{where}: row_sha256 is missing or not the last field: the line was edited",
                    path=self.path,
                    row=number,
                )
            )
            return None
        body, stored = parts
        try:
            data = json.loads(body, parse_constant=_refuse_constant)
            if not isinstance(data, dict) or data.get("record") != "case":
                raise ValueError(f"{where}: not a case record")
            row: ManifestRow | None = ManifestRow.from_record(data, where, stored)
            problem = None
        except (ValueError, UnicodeDecodeError) as exc:
            row, problem = None, f"{where}: {exc}"
        if hashlib.sha256(previous.encode("ascii") + body).hexdigest() != stored:
            return self._reject(
                row,
                ManifestTampered(
                    f"{where}: content does not match its row_sha256: row {number} was edited by "
                    f"hand (or {f'row {number - 1}' if number > 1 else 'the header'} was edited "
                    "and re-hashed, breaking the chain)",
                    path=self.path,
                    row=number,
                ),
            )
        if row is None or row.row != number:
            return self._reject(
                row,
                ManifestTampered(
                    problem or f"{where}: row number {row.row if row else None}, expected {number}",
                    path=self.path,
                    row=number,
                ),
            )
        if row.generator != self.generator:
            return self._reject(
                row,
                ManifestTampered(
                    f"{where} (case {row.case_id}): generator differs from the manifest header's",
                    case_id=row.case_id,
                    path=self.path,
                    row=number,
                ),
            )
        try:
            check_case_id(row.case_id, where)
            images = tuple(self.guard.resolve(p, where, case_id=row.case_id) for p in row.images)
            mask = self.guard.resolve(row.mask, where, case_id=row.case_id)
        except GuardViolation as exc:
            exc.row = number
            return self._reject(row, exc)
        if self.verify_files:
            expected = (*zip(images, row.image_sha256, strict=True), (mask, row.mask_sha256))
            for real, digest in expected:
                problem = file_problem(real, digest)
                if problem:
                    return self._reject(
                        row,
                        ManifestTampered(
                            f"{where} (case {row.case_id}): {real} {problem}",
                            case_id=row.case_id,
                            path=self.path,
                            row=number,
                        ),
                    )
        self.last_paths = (images, mask)
        return row

    def _reject(self, row: ManifestRow | None, violation: GuardViolation) -> None:
        """Report a row that failed a check; its content hashes still go to ``on_rejected``
        (a registry stays conservative: a rejected row's files are still synthetic)."""
        if row is not None and self.on_rejected is not None:
            self.on_rejected(row)
        self.on_violation(violation)

    def _finish(self, number: int, sealed: int, head_at_seal: str | None, head: str) -> None:
        if number < sealed:
            self.on_violation(
                ManifestTampered(
                    f"{self.path}: the lock records {sealed} rows but the manifest holds {number}: "
                    f"rows {number + 1}..{sealed} were removed",
                    path=self.path,
                    row=number + 1,
                )
            )
        elif head_at_seal != self.lock.get("chain_head"):
            self.on_violation(
                ManifestTampered(
                    f"{self.path} row {sealed}: the chain head differs from the lock's: rows up to "
                    f"{sealed} were edited and re-hashed, or the lock was edited",
                    path=self.path,
                    row=sealed,
                )
            )
        if self.unsealed:
            logger.warning(
                "%s: %d complete row(s) after the lock's count (an interrupted run); "
                "reopening it with ManifestWriter seals them",
                self.path,
                self.unsealed,
            )
        self.chain_head = head


def file_problem(path: str, digest: str) -> str | None:
    try:
        actual = sha256_file(path)
    except FileNotFoundError:
        return "does not exist"
    except OSError as exc:
        return f"cannot be read ({exc})"
    if actual != digest:
        return "differs from the sha256 its row records: the file or the row changed"
    return None


def read_manifest(
    path: str | Path,
    root: str | Path | None = None,
    *,
    verify_files: bool = True,
    on_violation: OnViolation | None = None,
    on_rejected: Callable[[ManifestRow], None] | None = None,
) -> ManifestReader:
    """Open a manifest for streaming; iterate the result for its rows.

    See :class:`ManifestReader` for the arguments and the errors raised while iterating.
    """
    return ManifestReader(
        path, root, verify_files=verify_files, on_violation=on_violation, on_rejected=on_rejected
    )


def read_lock(manifest: str | Path) -> dict[str, Any]:
    """Read and shape-check the lock beside ``manifest``.

    Raises:
        ManifestTampered: the lock is missing.
        ManifestError: the lock is unreadable or of another format.
    """
    path = lock_path_for(manifest)
    try:
        lock = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestTampered(
            f"{manifest}: its lock {path.name} is missing (deleted, or the manifest was copied "
            "without it); a manifest is only trusted with its lock",
            path=manifest,
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: unreadable manifest lock ({exc})") from None
    if (
        not isinstance(lock, dict)
        or lock.get("format") != LOCK_FORMAT
        or not isinstance(lock.get("rows"), int)
        or not is_sha256(lock.get("chain_head"))
    ):
        raise ManifestError(f"{path}: not a {LOCK_FORMAT} lock")
    return lock


ROW_FIELDS: tuple[str, ...] = tuple(sorted(_ROW_FIELDS | {"row_sha256"}))
"""Every field of a case row, ``row_sha256`` included."""

__all__ = [
    "FORMAT",
    "LOCK_FORMAT",
    "MASK_ORIGINS",
    "ManifestReader",
    "ManifestRow",
    "ROW_FIELDS",
    "encode_record",
    "lock_path_for",
    "read_lock",
    "read_manifest",
]
