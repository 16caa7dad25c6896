"""Make a blinded reader study: real and synthetic lesion cases, opaque ids, a key kept apart.

A study is a folder::

    DIR/study.json             what the server needs: study id, case order, settings (no truth)
    DIR/page/                  everything a browser may load: the page and one view per case
    DIR/page/cases/<id>.json   view geometry and default window (no name, path or truth)
    DIR/page/cases/<id>.bin    float32 voxels of a lesion-centred crop
    DIR/page/cases/<id>.mask   uint8 lesion outline mask of the same crop
    DIR/answers/<reader>.jsonl hash-chained answers (written by the server)

and a key beside it, ``DIR.key.json`` (or ``--key``): opaque id -> truth, case, generator,
lesion size. The key never enters the folder the page is served from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from synthlesion.data.cases import Case
from synthlesion.data.sources import load_cases
from synthlesion.dataset.builder import BuildConfig, DatasetBuilder
from synthlesion.dataset.guards import load_splits_checked
from synthlesion.reader_study.errors import StudyError
from synthlesion.reader_study.render import View, render_view
from synthlesion.storage import atomic_write_bytes, atomic_write_json, sha256_bytes

logger = logging.getLogger(__name__)

STUDY_FORMAT = "synthlesion-reader-study/1"
KEY_FORMAT = "synthlesion-reader-study-key/1"
PAGE_FILES = ("index.html", "app.js", "style.css")


@dataclass(frozen=True)
class StudyCase:
    """One case of a study, as the key records it."""

    study_id: str  # the opaque id shown to readers
    truth: str  # "real" or "synthetic"
    case_id: str
    patient_id: str
    generator: str | None
    passed_gate: bool | None
    lesion_size_mm: float
    lesion_voxels: int
    lesions_in_view: int = 1


def default_key_path(study_dir: str | Path) -> Path:
    """``DIR.key.json``: beside the study folder, never inside what is served."""
    path = Path(study_dir)
    return path.parent / f"{path.name}.key.json"


def make_study(
    data: str | Path,
    splits: str | Path,
    manifests: Sequence[str | Path],
    out: str | Path,
    *,
    n: int = 50,
    seed: int = 0,
    real_split: str = "test",
    key: str | Path | None = None,
    include_rejected: bool = False,
    outline: bool = False,
    crop: int = 96,
    context_slices: int = 12,
    overwrite: bool = False,
    log: Any = None,
) -> dict[str, Any]:
    """Draw ``n`` real and ``n`` synthetic lesion cases, render them blinded, write the study.

    Args:
        data: The real cases (dataset.json or folder; :func:`load_cases`).
        splits: The locked splits file.
        manifests: Synthetic-case manifests; cases failing a guard or their quality gate are
            left out and counted (``include_rejected`` keeps the gate's rejects).
        out: The study folder (refused if it exists, unless ``overwrite``).
        n: Cases per class (real and synthetic): 2n cases in all.
        seed: Seeds the draw and the order.
        real_split: Split the real lesion cases come from.
        key: Where the key goes (default ``DIR.key.json``; refused inside ``DIR``).
        outline: Show the lesion outline by default (readers can toggle it).
        crop: In-plane size of the lesion-centred crop (voxels).
        context_slices: Slices on each side of the lesion centre a reader can scroll (3D).
        overwrite: Replace an earlier study (and its key).
        log: ``callable(str)`` for progress lines.

    Returns:
        The summary written into ``study.json`` plus the counts of left-out cases.

    Raises:
        StudyError: too few cases in a pool, an existing folder, a key inside the folder.
    """
    say = log or (lambda _msg: None)
    out = Path(out)
    key_path = Path(key) if key is not None else default_key_path(out)
    if key_path.resolve().is_relative_to(out.resolve()):
        raise StudyError(f"the key {key_path} must not lie inside the study folder {out}")
    if n < 1:
        raise StudyError(f"--n {n}: at least one case per class")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise StudyError(f"{out} exists and is not empty; choose another folder or --overwrite")
    if out.exists() and any((out / "answers").glob("*.jsonl")):
        raise StudyError(
            f"{out} holds readers' answers ({out / 'answers'}); a new study would throw them "
            "away: score them first and choose another folder"
        )
    if key_path.exists() and not overwrite:
        raise StudyError(f"the key {key_path} exists (another study's?); choose another --key")
    if key_path.is_dir():
        raise StudyError(f"the key path {key_path} is a folder; give a file name")
    for manifest in manifests:
        if not Path(manifest).is_file():
            raise StudyError(f"manifest {manifest}: no such file")
    rng = np.random.default_rng(seed)
    cases = load_cases(data)
    split_table = load_splits_checked(splits)
    by_id = {c.case_id: c for c in cases}

    if real_split not in split_table.sides:
        raise StudyError(f"--split {real_split!r}: the splits have {sorted(split_table.sides)}")
    real_pool = sorted(
        (c for c in cases
         if split_table.side_of_case(c.case_id) == real_split and c.mask is not None
         and (c.has_lesion if c.has_lesion is not None else _mask_has_lesion(c))),
        key=lambda c: c.case_id,
    )  # fmt: skip
    builder = DatasetBuilder(
        cases, split_table, list(manifests), BuildConfig(include_rejected=include_rejected)
    )
    admitted, report = builder.admitted_synthetic()
    left_out = {
        "guard_violations": len(report.violations),
        "rejected_by_quality": int(report.counts.get("rejected_by_quality", 0))
        if not include_rejected
        else 0,
        "gate_rejects_included": int(report.counts.get("rejected_by_quality", 0))
        if include_rejected
        else 0,
        "manifest_rows": int(report.counts.get("manifest_rows", 0)),
    }
    for violation in report.violations:
        logger.warning("left out: %s", violation)
    say(
        f"pools: {len(real_pool)} real lesion cases in {real_split}, {len(admitted)} synthetic "
        f"cases admitted of {left_out['manifest_rows']} rows ({left_out['guard_violations']} "
        f"guard violations, {left_out['rejected_by_quality']} rejected by the quality gate)"
    )
    for name, pool in (("real", real_pool), ("synthetic", admitted)):
        if n > len(pool):
            raise StudyError(
                f"--n {n} is larger than the {name} pool ({len(pool)} cases"
                + (f" with a lesion in split {real_split!r}" if name == "real" else
                   f" admitted from {len(manifests)} manifest(s): {left_out['guard_violations']} "
                   f"failed a guard, {left_out['rejected_by_quality']} the quality gate")
                + "); lower --n"
            )  # fmt: skip
    real_pick = [real_pool[i] for i in sorted(rng.choice(len(real_pool), n, replace=False))]
    syn_pick = [admitted[i] for i in sorted(rng.choice(len(admitted), n, replace=False))]

    study_id = secrets.token_hex(8)
    salt = secrets.token_hex(16)
    tmp = out.with_name(out.name + ".making")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "page" / "cases").mkdir(parents=True)
    (tmp / "answers").mkdir()
    entries: list[tuple[StudyCase, View]] = []
    try:
        items: list[tuple[str, Case, Case | None, dict[str, Any] | None]] = []
        items += [("real", c, None, None) for c in real_pick]
        for row in syn_pick:
            source = by_id.get(row["source_case"])
            labels = source.labels if source is not None else {0: "background", 1: "lesion"}
            modality = source.modality if source is not None else "unknown"
            syn = Case(row["case_id"], row["source_patient"], tuple(row["images"]), row["mask"],
                       modality=modality, labels=labels, origin="synthetic")  # fmt: skip
            items.append(("synthetic", syn, source, row))
        order = rng.permutation(len(items))
        for count, index in enumerate(order, start=1):
            truth, case, source, row = items[index]
            opaque = hashlib.sha256(f"{salt}:{case.case_id}".encode()).hexdigest()[:16]
            say(f"  rendering case {count}/{len(items)}")
            view = render_view(case, source, crop=crop, context_slices=context_slices,
                               seed=int(rng.integers(2**31)))  # fmt: skip
            write_view(tmp / "page", opaque, view)
            entries.append((StudyCase(
                study_id=opaque, truth=truth, case_id=case.case_id, patient_id=case.patient_id,
                generator=_generator_label(row) if row is not None else None,
                passed_gate=bool(row["passed"]) if row is not None else None,
                lesion_size_mm=view.lesion_size_mm, lesion_voxels=view.lesion_voxels,
                lesions_in_view=view.lesions_in_view,
            ), view))  # fmt: skip
        write_page(tmp / "page")
        _warn_if_counts_differ(entries, say)
        key_record = {
            "format": KEY_FORMAT,
            "study_id": study_id,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seed": seed,
            "cases": [vars(e) for e, _ in entries],
            "left_out": left_out,
        }
        key_bytes = json.dumps(key_record, indent=1, sort_keys=True).encode()
        study = {
            "format": STUDY_FORMAT,
            "study_id": study_id,
            "created": key_record["created"],
            "cases": [e.study_id for e, _ in entries],
            "dims": sorted({v.spatial_dims for _, v in entries}),
            "outline": bool(outline),
            "key_sha256": sha256_bytes(key_bytes),
            "n_per_class": n,
        }
        atomic_write_json(tmp / "study.json", study)
        key_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(key_path, key_bytes)  # first: a failure leaves the old study whole
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"study {study_id}: {2 * n} cases in {out} (key: {key_path})")
    return {**study, "left_out": left_out, "key": str(key_path)}


def write_view(page: Path, opaque: str, view: View) -> None:
    """One case's files under ``page/cases``: voxels, outline mask, geometry (nothing else)."""
    base = page / "cases" / opaque
    base.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(base.with_suffix(".bin"), view.voxels.astype("<f4").tobytes())
    atomic_write_bytes(base.with_suffix(".mask"), view.outline.astype(np.uint8).tobytes())
    atomic_write_json(base.with_suffix(".json"), view.public())


def write_page(page: Path) -> None:
    """The reading page's own files (HTML, script, style) into ``page``."""
    page.mkdir(parents=True, exist_ok=True)
    for name in PAGE_FILES:
        data = resources.files("synthlesion.reader_study").joinpath("page", name).read_bytes()
        atomic_write_bytes(page / name, data)


def _warn_if_counts_differ(entries: list[tuple[StudyCase, View]], say: Any) -> None:
    """Readers must judge the lesion, not count lesions: warn when the classes show
    different numbers of lesions per view (e.g. real scans with several lesions, healthy scans
    painted once)."""
    counts = {
        truth: [e.lesions_in_view for e, _ in entries if e.truth == truth]
        for truth in ("real", "synthetic")
    }
    means = {t: float(np.mean(c)) for t, c in counts.items() if c}
    if len(means) == 2 and abs(means["real"] - means["synthetic"]) >= 0.5:
        message = (
            f"lesions per view differ between the classes (real {means['real']:.1f}, synthetic "
            f"{means['synthetic']:.1f}): readers may tell them apart by counting; paint several "
            "lesions per scan or draw real cases with one lesion"
        )
        logger.warning(message)
        say("warning: " + message)


def _mask_has_lesion(case: Case) -> bool:
    """Whether the case's label map holds a lesion voxel (when the source does not say)."""
    from synthlesion.data.io import load_image

    values = case.lesion_labels or tuple(v for v in case.labels if v != 0)
    return bool(np.isin(np.asarray(load_image(case.mask).array), values).any())


def _generator_label(row: dict[str, Any]) -> str:
    """A short name of the generator (its folder name and hash prefix)."""
    path = Path(str(row.get("generator_path") or "generator"))
    name = path.name if path.name not in ("model", "") else path.parent.name or path.name
    return f"{name}@{str(row.get('generator'))[:8]}"


def load_study(study_dir: str | Path, key: str | Path | None = None) -> tuple[dict, dict | None]:
    """``(study.json, key or None)``; refuses a key that belongs to another study."""
    study_dir = Path(study_dir)
    try:
        study = json.loads((study_dir / "study.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StudyError(f"{study_dir}: not a reader-study folder ({exc})") from None
    if study.get("format") != STUDY_FORMAT:
        raise StudyError(f"{study_dir}/study.json: format {study.get('format')!r} is not a study")
    key_path = Path(key) if key is not None else default_key_path(study_dir)
    if key is None and not key_path.exists():
        return study, None
    try:
        raw = key_path.read_bytes()
    except OSError as exc:
        raise StudyError(f"{key_path}: cannot read the key ({exc})") from None
    if sha256_bytes(raw) != study.get("key_sha256"):
        raise StudyError(
            f"{key_path} is not the key of the study in {study_dir} (study "
            f"{study.get('study_id')}); it belongs to another study or was edited"
        )
    return study, json.loads(raw)
