"""One driver for writing a synthetic set, whatever makes the lesions.

:class:`SyntheticSetRun` owns everything a synthetic set needs besides the lesions themselves:
the output folder (refused inside a real data root), the manifest (resumed on a rerun), the
plan (source scans x cases per scan, a limit, a shard of a several-GPU run), the per-case seeds
(:func:`case_seed`: a rerun makes the same case again), every output path checked before
anything is made or written, the synthetic mark in every file, the files written under a
temporary name and renamed, the manifest row written last, and a report in which every failed
case is listed. A generator plugs in through :class:`CaseGenerator`: given a case id, a source
case and a seed it returns a :class:`GeneratedCase` (the volumes and the row's facts), and
writes nothing itself. The diffusion sampler (:mod:`synthlesion.pipelines.sampling`) and the
hand-crafted baseline (:mod:`synthlesion.pipelines.handcrafted`) both run through it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from synthlesion.data.cases import Case
from synthlesion.data.io import save_image
from synthlesion.data.sources import synthetic_files_listed_in
from synthlesion.data.synthetic_mark import mark_volume
from synthlesion.data.volume import Volume
from synthlesion.errors import SynthlesionError
from synthlesion.provenance.errors import ManifestError, ProvenanceError, UnsafePath
from synthlesion.provenance.identity import GeneratorRef
from synthlesion.provenance.manifest_writer import ManifestWriter
from synthlesion.provenance.paths import RootGuard, check_case_id
from synthlesion.storage import atomic_write_json

logger = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]


def case_seed(base_seed: int, case_id: str) -> int:
    """A per-case seed that depends only on the base seed and the case id."""
    digest = hashlib.sha256(f"{base_seed}:{case_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass
class GeneratedCase:
    """What a generator made of one source scan; the driver writes it.

    Attributes:
        images: One volume per image channel, each on the source's grid.
        mask: The label map (source labels plus the new lesions).
        mask_origin: ``"bank"``, ``"procedural"`` or ``"user"``.
        scheduler: Sampling scheduler (``"handcrafted"`` for the baseline).
        steps: Sampling steps (0 for the baseline).
        quality: Quality-gate record (``passed`` and per-lesion values); JSON-ready and finite.
        passed: Whether the case passed its quality gates.
        mask_source_sha256, mask_source_case, mask_source_patient: The real mask a
            transplanted lesion was cut from (``"bank"``), else ``None``.
        mask_sources: Every transplanted lesion's real mask (``{"sha256", "case", "patient"}``).
    """

    images: Sequence[Volume]
    mask: Volume
    mask_origin: str
    scheduler: str
    steps: int
    quality: Mapping[str, Any]
    passed: bool = True
    mask_source_sha256: str | None = None
    mask_source_case: str | None = None
    mask_source_patient: str | None = None
    mask_sources: Sequence[Mapping[str, str | None]] = ()


class CaseGenerator(Protocol):
    """Makes one synthetic case from one source scan (and writes nothing)."""

    def make_case(self, case_id: str, source: Case, seed: int) -> GeneratedCase: ...


@dataclass
class SyntheticSetReport:
    """What a run did; every failed case is listed, never dropped silently."""

    out_dir: Path
    manifest: Path
    written: list[str] = field(default_factory=list)
    skipped_existing: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    rejected_by_quality: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "written": self.written,
            "skipped_existing": self.skipped_existing,
            "failed": self.failed,
            "rejected_by_quality": self.rejected_by_quality,
            "seconds": round(self.seconds, 3),
        }


def refuse_inside_data_root(
    out_dir: Path, data: str | Path | None, cases: Iterable[Case] = ()
) -> None:
    """Refuse an output folder equal to or inside the real data's folder, or inside any folder
    that holds a real case's file (a CSV may list scans kept elsewhere): a later folder scan
    would read the synthetic files as real cases.

    Raises:
        ProvenanceError: naming both folders.
    """
    roots: set[Path] = set()
    if data is not None:
        data = Path(data)
        roots.add(data if data.is_dir() else data.parent)
    for case in cases:
        for path in (*case.images, *([case.mask] if case.mask is not None else [])):
            roots.add(Path(path).parent)
    real_out = Path(os.path.realpath(out_dir))
    for root in sorted(roots):
        real_root = Path(os.path.realpath(root))
        if real_out == real_root or real_root in real_out.parents:
            raise ProvenanceError(
                f"{out_dir}: the synthetic set must not be written into the real data folder "
                f"{root} (a folder scan would read its files as real cases); choose a folder "
                "outside it"
            )


class SyntheticSetRun:
    """Writes one synthetic set (see the module docstring).

    Args:
        out_dir: The synthetic set's folder (``imagesTr/``, ``labelsTr/``, the manifest).
        generator: The generator of every case (recorded in the manifest and the mark).
        splits_sha256: sha256 of the locked splits the sources come from.
        data: The real data (dataset.json, manifest or folder): ``out_dir`` may not lie in it.
        cases: The real cases: ``out_dir`` may not lie in a folder holding their files.
        manifest_name: The manifest's file name (shards of a several-GPU run have their own).
        recoverable: Errors that fail one case (listed in the report), not the run.

    Raises:
        ProvenanceError: ``out_dir`` inside the real data folder, or a manifest of another run
            or generator in it.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        generator: GeneratorRef,
        splits_sha256: str | None,
        data: str | Path | None = None,
        cases: Iterable[Case] = (),
        manifest_name: str = "manifest.jsonl",
        recoverable: tuple[type[Exception], ...] = (SynthlesionError,),
    ) -> None:
        self.out_dir = Path(out_dir)
        refuse_inside_data_root(self.out_dir, data, cases)
        self.generator = generator
        self.recoverable = recoverable
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.guard = RootGuard(self.out_dir)
        self.manifest = self.out_dir / manifest_name
        # files other manifests in the folder list (another run, other shards): never rewritten
        self.foreign = synthetic_files_listed_in(self.out_dir, exclude=self.manifest)
        try:
            self.writer = ManifestWriter(
                self.manifest, self.out_dir, generator=generator, splits_sha256=splits_sha256
            )
        except ManifestError as exc:
            raise ProvenanceError(f"{exc}; write this run into a new folder") from None

    def write_settings(
        self, name: str, settings: Mapping[str, Any], *, may_change: Collection[str] = ()
    ) -> None:
        """Record the run's settings beside the manifest (e.g. ``sample_options.json``).

        A folder whose manifest already holds cases made with other settings is refused: a
        resumed run keeps those cases, so the record would misdescribe them. Settings named in
        ``may_change`` (those that do not change what a case holds, e.g. the device) may differ.

        Raises:
            ProvenanceError: the folder's cases were made with other settings.
        """
        path = self.out_dir / name
        now = json.loads(json.dumps(dict(settings), default=str))
        if path.is_file() and len(self.writer):
            try:
                before = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ProvenanceError(
                    f"{path}: unreadable ({exc}); the folder's {len(self.writer)} case(s) "
                    "cannot be checked against this run's settings. Use a new folder"
                ) from None
            if not isinstance(before, dict):
                before = {}
            changed = sorted(
                k
                for k in set(before) | set(now)
                if k not in may_change and before.get(k) != now.get(k)
            )
            if changed:
                shown = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:4])
                raise ProvenanceError(
                    f"{self.out_dir}: holds {len(self.writer)} case(s) made with other "
                    f"settings ({shown}); a rerun would keep them under the new settings' "
                    "record. Use a new folder, or the same settings to resume"
                )
        atomic_write_json(path, now)

    def paths_for(self, case_id: str, channels: int) -> tuple[list[str], str]:
        """The relative image and mask paths of a case, checked to stay inside ``out_dir``.

        Raises:
            UnsafePath: an unsafe case id or a path leaving the folder.
        """
        where = f"{self.manifest} case {case_id}"
        check_case_id(case_id, where)
        images = [f"imagesTr/{case_id}_{c:04d}.nii.gz" for c in range(channels)]
        mask = f"labelsTr/{case_id}.nii.gz"
        for rel in (*images, mask):
            try:
                (self.out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # e.g. a dangling symbolic link in its place
                raise UnsafePath(
                    f"{where}: cannot make {(self.out_dir / rel).parent} ({exc.strerror}); the "
                    "output folder's imagesTr/labelsTr must be plain folders inside it",
                    case_id=case_id,
                ) from None
            real = self.guard.resolve(rel, where, case_id=case_id)
            if Path(real) in self.foreign:
                raise UnsafePath(
                    f"{where}: {rel} belongs to another manifest in {self.out_dir} (another "
                    "run or shard layout); write this run into a new folder",
                    case_id=case_id,
                )
        return images, mask

    def run(
        self,
        plan: Sequence[tuple[str, Case]],
        generator: CaseGenerator,
        *,
        base_seed: int,
        progress: Progress | None = None,
    ) -> SyntheticSetReport:
        """Make every case of ``plan`` (``(case id, source case)``) the manifest lacks."""
        started = time.perf_counter()
        report = SyntheticSetReport(self.out_dir, self.manifest)
        with self.writer:
            for done, (case_id, source) in enumerate(plan, start=1):
                if case_id in self.writer:
                    report.skipped_existing.append(case_id)
                else:
                    try:
                        passed = self._make(case_id, source, generator, base_seed)
                        report.written.append(case_id)
                        if not passed:
                            report.rejected_by_quality.append(case_id)
                    except (*self.recoverable, UnsafePath) as exc:
                        logger.info("%s: %s", case_id, exc)
                        report.failed.append(
                            {"case_id": case_id, "source": source.case_id, "problem": str(exc)}
                        )
                if progress is not None:
                    progress(done, len(plan), case_id)
        report.seconds = time.perf_counter() - started
        return report

    def _make(self, case_id: str, source: Case, generator: CaseGenerator, base_seed: int) -> bool:
        seed = case_seed(base_seed, case_id)
        check_case_id(case_id, f"{self.manifest} case {case_id}")  # before any work
        made = generator.make_case(case_id, source, seed)
        images, mask = self.paths_for(case_id, len(made.images))  # before anything is written
        facts = {
            "case": case_id,
            "run": self.writer.run_id,
            "source_case": source.case_id,
            "generator": self.generator.sha256,
        }
        for volume, rel in zip(made.images, images, strict=True):
            save_image(mark_volume(volume, facts), self.out_dir / rel)
        save_image(mark_volume(made.mask, facts), self.out_dir / mask)
        # the gate's verdict is the generator's flag, recorded where the builder reads it
        quality = {**dict(made.quality), "passed": bool(made.passed)}
        self.writer.append_case(
            case_id=case_id,
            source=source,
            images=images,
            mask=mask,
            mask_origin=made.mask_origin,
            scheduler=made.scheduler,
            steps=made.steps,
            seed=seed,
            quality=quality,
            source_split="train",
            mask_source_sha256=made.mask_source_sha256,
            mask_source_case=made.mask_source_case,
            mask_source_patient=made.mask_source_patient,
            mask_sources=list(made.mask_sources),
        )
        return bool(made.passed)


def plan_cases(
    sources: Sequence[Case],
    per_case: int,
    *,
    prefix: str,
    limit: int | None = None,
    shard: tuple[int, int] = (0, 1),
) -> list[tuple[str, Case]]:
    """``(case id, source)`` of a run: ``{prefix}_{source}_{k:02d}`` for k < ``per_case``, the
    first ``limit`` of them, every ``world``-th from ``rank`` for a shard."""
    rank, world = shard
    plan = [(f"{prefix}_{src.case_id}_{k:02d}", src) for src in sources for k in range(per_case)]
    if limit is not None:
        plan = plan[:limit]
    return plan[rank::world]


__all__ = [
    "CaseGenerator",
    "GeneratedCase",
    "SyntheticSetReport",
    "SyntheticSetRun",
    "case_seed",
    "plan_cases",
    "refuse_inside_data_root",
]
