"""Build a training dataset from real cases, locked splits and synthetic-case manifests.

``train`` holds the real training cases plus the synthetic cases whose source patients are in
train; ``val`` and ``test`` hold real cases only. The output folder is laid out as nnU-Net v2
raw data and a Decathlon datalist at once::

    out/
      dataset.json            training set: nnU-Net v2 keys + a MONAI/Decathlon "training" list
      imagesTr/{case}_0000.nii.gz   links (or copies) of the real and synthetic training images
      labelsTr/{case}.nii.gz        ... and their masks
      val.json, test.json     the real evaluation cases, untouched (paths to the original files)
      synthetic.json          the synthetic training cases on their own, with provenance
      synthetic_registry.npz  content hashes of every synthetic case (for evaluation loaders)
      dataset_card.md         counts, sources, generators, ratios, guard results, hashes
      build_config.yaml       the resolved BuildConfig
      build.json              the build record (written last; marks a complete build)

Manifests are streamed: per synthetic row only a few dozen bytes stay in memory (a case-id key
and the registry entries); the row itself goes to a work file that the writing pass reads back.
Everything is written into a temporary sibling folder that is renamed into place at the end,
so a failed or interrupted build leaves nothing under the output name.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from array import array
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from synthlesion import __version__
from synthlesion.config import config_to_dict, save_config
from synthlesion.data.cases import Case
from synthlesion.data.sources import load_cases
from synthlesion.data.splits import Splits
from synthlesion.dataset.card import render_card
from synthlesion.dataset.errors import DatasetError
from synthlesion.dataset.export import (
    BUILD_FILE,
    BUILD_FORMAT,
    CARD_FILE,
    EVAL_FOLDERS,
    REGISTRY_FILE,
    SPLITS_FINAL_FILE,
    SYNTHETIC_FILE,
    CaseLinker,
    JsonListWriter,
    TrainingLayout,
    check_target,
    labels_and_channels,
    publish,
    read_build_record,
    read_jsonl,
    sibling_folder,
    write_eval_list,
    write_nnunet_folds,
    write_synced,
)
from synthlesion.dataset.guards import (
    EVAL_SIDES,
    EvaluationContent,
    GeneratorChecker,
    GuardReport,
    RealCaseFacts,
    RowChecker,
    ViolationSink,
    case_id_key,
    check_duplicate_ids,
    check_real_against_registry,
    index_real_cases,
    load_splits_checked,
    not_an_evaluation_scan,
)
from synthlesion.errors import ConfigError
from synthlesion.provenance.errors import GuardViolation, SplitMismatch
from synthlesion.provenance.identity import utc_now
from synthlesion.provenance.manifest import read_manifest
from synthlesion.provenance.registry import RegistryBuilder, SyntheticRegistry
from synthlesion.storage import sha256_file

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildConfig:
    """How to build the dataset (loadable from YAML with ``load_config``).

    Attributes:
        synthetic_share: Target share of synthetic samples per epoch in ``train`` (0..1), or
            ``None`` for the natural share (every case weighted alike).
        share_mode: ``"weights"``: list every eligible synthetic case and give each item a
            ``sample_weight`` so that the expected share per epoch is ``synthetic_share``;
            ``"fixed"``: pick (with ``seed``) just enough synthetic cases that they make up
            ``synthetic_share`` of the listed training cases, all weighted 1.
        seed: Seed of the ``"fixed"`` draw.
        link_mode: How imagesTr/labelsTr (and imagesVal/imagesTs for the evaluation cases)
            hold the files: ``"auto"`` (default: hard links, copies across file systems),
            ``"hardlink"`` or ``"copy"`` keep the build self-contained and portable (copy it
            anywhere, e.g. into ``nnUNet_raw``); ``"symlink"`` (relative links to the sources,
            valid only while the build keeps its place); or ``"none"``: no per-case files,
            dataset.json lists
            the files where they are (its ``training`` list, and nnU-Net v2's ``dataset`` key),
            and imagesTr/labelsTr stay empty (nnU-Net's integrity check wants the folders).
            ``"none"`` avoids two links per synthetic case on very large builds.
        verify_files: Hash every synthetic file and compare with its manifest row. Off, the
            re-hash is skipped, but a synthetic file that has the size of a real val/test scan
            is still hashed and refused if it is that scan (the content check of evaluation
            scans is never skipped).
        verify_generators: Recompute each generator's model-folder hash.
        check_voxels: Decode the real val/test scans and compare their voxel hashes with the
            synthetic registry (catches re-compressed synthetic copies).
        require_known_mask_source: Refuse a transplanted mask whose real source is unknown.
        include_rejected: Also build synthetic cases that failed their quality gate
            (excluded by default; counted in the dataset card either way).
        excluded: Synthetic case id -> reason, for cases a later gate refused (e.g. the
            evaluation's segmenter gate); they count as failing their quality gate, and the
            dataset card says how many a later gate left out.
        rejected_weight: Sampling weight of an included rejected case relative to a passed
            synthetic case (0..1].
        name: Dataset name written into dataset.json (``None``: the real dataset's own name,
            else ``"synthlesion"``).
        patient_pattern: Regex giving patient ids from case ids when the real source has none.
    """

    synthetic_share: float | None = None
    share_mode: Literal["weights", "fixed"] = "weights"
    seed: int = 0
    link_mode: Literal["auto", "symlink", "hardlink", "copy", "none"] = "auto"
    verify_files: bool = True
    verify_generators: bool = True
    check_voxels: bool = True
    require_known_mask_source: bool = False
    include_rejected: bool = False
    rejected_weight: float = 1.0
    excluded: Mapping[str, str] = field(default_factory=dict)
    name: str | None = None
    patient_pattern: str | None = None

    def __post_init__(self) -> None:
        share = self.synthetic_share
        if share is not None and not 0.0 <= share <= 1.0:
            raise ConfigError(f"synthetic_share must lie in [0, 1], got {share}")
        if share == 1.0 and self.share_mode == "fixed":
            raise ConfigError("share_mode 'fixed' needs synthetic_share < 1 (some real cases)")
        if self.share_mode not in ("weights", "fixed"):
            raise ConfigError(f"share_mode must be 'weights' or 'fixed', got {self.share_mode!r}")
        if not 0.0 < self.rejected_weight <= 1.0:
            raise ConfigError(f"rejected_weight must lie in (0, 1], got {self.rejected_weight}")
        if self.link_mode not in ("auto", "symlink", "hardlink", "copy", "none"):
            raise ConfigError(
                f"link_mode must be auto, symlink, hardlink, copy or none, got {self.link_mode!r}"
            )


@dataclass(frozen=True)
class ManifestSource:
    """A manifest and the dataset root its paths are relative to (default: its folder)."""

    path: Path
    root: Path | None = None

    @property
    def resolved_root(self) -> Path:
        return self.root if self.root is not None else self.path.parent


@dataclass(frozen=True)
class BuildResult:
    """A finished build."""

    out_dir: Path
    dataset_json: Path
    build_id: str
    counts: dict[str, Any]
    guards: dict[str, dict[str, int]]


@dataclass
class _Scan:
    real: dict[str, RealCaseFacts]
    registry: SyntheticRegistry
    eligible: int
    manifests: list[dict[str, Any]]
    generators: list[dict[str, Any]]
    unknown_mask_sources: int
    ending: str | None
    channels: int | None
    rows_without_voxels: int
    rejected_by_quality: int = 0
    excluded_by_later_gate: int = 0


class DatasetBuilder:
    """Builds the guarded training/evaluation dataset (see the module docstring).

    Args:
        real: The real cases, or a path :func:`load_cases` understands (dataset.json, folder,
            CSV/JSONL).
        splits: The locked :class:`Splits`, or the path of the splits file.
        manifests: Synthetic-case manifests: paths (root = their folder), ``(path, root)``
            pairs or :class:`ManifestSource`.
        config: Build options.

    Raises:
        PatientOnTwoSides: the splits file puts a patient on two sides.
        SplitError, CaseSourceError: unreadable splits or real cases.
    """

    def __init__(
        self,
        real: Sequence[Case] | str | Path,
        splits: Splits | str | Path,
        manifests: Iterable[
            str | Path | ManifestSource | tuple[str | Path, str | Path | None]
        ] = (),
        config: BuildConfig | None = None,
    ) -> None:
        self.config = config or BuildConfig()
        self.real_source = str(real) if isinstance(real, (str, Path)) else "<cases>"
        self.dataset_name = _dataset_name(real) if isinstance(real, (str, Path)) else None
        self.cases = (
            load_cases(real, patient_pattern=self.config.patient_pattern)
            if isinstance(real, (str, Path))
            else list(real)
        )
        self.splits = splits if isinstance(splits, Splits) else load_splits_checked(splits)
        self.splits_path = "<splits>" if isinstance(splits, Splits) else str(splits)
        self.manifests = [_manifest_source(m) for m in manifests]

    # -- public ------------------------------------------------------------------------
    def check(self) -> GuardReport:
        """Run every guard without writing anything; returns all violations found."""
        sink = ViolationSink(collect=True)
        work = Path(tempfile.mkdtemp(prefix="synthlesion-check-"))
        try:
            scan = self._scan(work, sink)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return GuardReport(sink.violations, sink.summary(), self._counts(scan, None))

    def admitted_synthetic(self) -> tuple[list[dict[str, Any]], GuardReport]:
        """The synthetic cases a build would take into training, without writing anything.

        Every guard runs (violations are collected, not raised); a row that fails one, or its
        quality gate (unless ``include_rejected``), is left out. Each admitted case is a dict
        with ``case_id``, ``source_case``, ``source_patient``, ``generator`` (sha256),
        ``generator_path``, ``manifest`` (index), ``row``, ``mask_origin``, ``images`` and
        ``mask`` (resolved paths) and ``passed``. The report's ``counts`` hold
        ``rejected_by_quality`` and the manifests' row counts.
        """
        sink = ViolationSink(collect=True)
        work = Path(tempfile.mkdtemp(prefix="synthlesion-check-"))
        try:
            scan = self._scan(work, sink)
            with open(work / "synthetic.jsonl", encoding="utf-8") as lines:
                admitted = [json.loads(line) for line in lines if line.strip()]
        finally:
            shutil.rmtree(work, ignore_errors=True)
        counts = self._counts(scan, None)
        counts["rejected_by_quality"] = scan.rejected_by_quality
        counts["manifest_rows"] = sum(m["rows"] for m in scan.manifests)
        return admitted, GuardReport(sink.violations, sink.summary(), counts)

    def build(
        self, out_dir: str | Path, *, overwrite: bool = False, report: bool = False
    ) -> BuildResult:
        """Check every guard, then write the dataset folder atomically.

        Args:
            out_dir: The dataset folder to create.
            overwrite: Replace a folder holding an earlier build.
            report: Collect every violation and raise them together
                (:class:`GuardViolations`) instead of stopping at the first.

        Raises:
            GuardViolation: a guard refused (nothing is written).
            BuildExistsError: ``out_dir`` holds a build and ``overwrite`` is off, or holds
                other files.
        """
        out = Path(out_dir)
        check_target(out, overwrite)
        sink = ViolationSink(collect=report)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = sibling_folder(out, "building")
        try:
            scan = self._scan(tmp / "_work", sink)
            sink.raise_collected()
            result = self._write(tmp, out, scan, sink)
            shutil.rmtree(tmp / "_work")
            publish(tmp, out, overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("built %s: %s", out, result.counts)
        return BuildResult(out, out / "dataset.json", result.build_id, result.counts, result.guards)

    # -- pass 1: guards ----------------------------------------------------------------
    def _scan(self, work: Path, sink: ViolationSink) -> _Scan:
        work.mkdir(parents=True, exist_ok=True)
        real = index_real_cases(self.cases, self.splits, sink)
        rows = RowChecker(
            real, self.splits, sink, require_known_mask_source=self.config.require_known_mask_source
        )
        generators = GeneratorChecker(
            self.splits, sink, verify_folder=self.config.verify_generators
        )
        registry = RegistryBuilder()
        keys = array("Q", (case_id_key(c.case_id) for c in self.cases))
        layout = TrainingLayout()
        for fact in real.values():
            if fact.side == "train":
                case = fact.case
                layout.check(
                    case.case_id,
                    [str(p) for p in case.images],
                    str(case.mask) if case.mask is not None else None,
                )
        eligible, without_voxels, rejected, manifests = 0, 0, 0, []
        excluded = 0
        evaluation_files = EvaluationContent(real) if not self.config.verify_files else None
        with (
            open(work / "ids.txt", "w", encoding="utf-8") as ids,
            open(work / "synthetic.jsonl", "w", encoding="utf-8") as fragment,
        ):
            for index, source in enumerate(self.manifests):
                try:
                    reader = read_manifest(
                        source.path,
                        source.resolved_root,
                        verify_files=self.config.verify_files,
                        on_violation=sink,
                        on_rejected=registry.add_row,
                    )
                except GuardViolation as exc:  # lock missing or swapped: the next manifest
                    sink(exc)
                    continue
                recorded = reader.header.get("splits_sha256")
                sink.checked("split-mismatch")
                if recorded is not None and recorded != self.splits.sha256:
                    sink(
                        SplitMismatch(
                            f"{source.path}: made against the splits with sha256 "
                            f"{str(recorded)[:12]}, but this build uses {self.splits.sha256[:12]} "
                            f"({self.splits_path}); sample again with the splits in use",
                            path=source.path,
                        )
                    )
                    continue
                accepted = 0
                for row in reader:
                    registry.add_row(row)
                    keys.append(case_id_key(row.case_id))
                    ids.write(row.case_id + "\n")
                    without_voxels += row.image_voxel_sha256 is None
                    where = f"{source.path} row {row.row}"
                    ok = rows.check(row, where)
                    ok = generators.check(row.generator, source.resolved_root, source.path) and ok
                    if not ok:
                        continue
                    images, mask = reader.last_paths
                    if evaluation_files is not None:
                        ok = not_an_evaluation_scan(row, [*images, mask], evaluation_files, sink)
                        if not ok:
                            continue
                    passed = row.quality.get("passed", True) is True  # "false", 0, null: failed
                    if passed and row.case_id in self.config.excluded:
                        passed = False  # refused by a later gate
                        excluded += 1
                    if not passed:
                        rejected += 1
                        if not self.config.include_rejected:
                            continue
                    layout.check(row.case_id, images, mask)
                    fragment.write(
                        json.dumps(
                            {
                                "case_id": row.case_id,
                                "source_patient": row.source_patient,
                                "source_case": row.source_case,
                                "generator": row.generator.sha256,
                                "generator_path": row.generator.path,
                                "manifest": index,
                                "row": row.row,
                                "mask_origin": row.mask_origin,
                                "images": list(images),
                                "mask": mask,
                                "passed": passed,
                            }
                        )
                        + "\n"
                    )
                    eligible += 1
                    accepted += 1
                sink.checked("manifest-integrity", reader.rows_read)
                sink.checked("unsafe-path", reader.rows_read)
                manifests.append(
                    {
                        "path": str(source.path),
                        "root": str(source.resolved_root),
                        "run_id": reader.run_id,
                        "rows": reader.rows_read,
                        "unsealed_rows": reader.unsealed,
                        "chain_head": reader.chain_head,
                        "generator": reader.generator.to_dict(),
                        "accepted": accepted,
                        "splits_sha256": reader.header.get("splits_sha256"),
                    }
                )
        rows.finish()
        check_duplicate_ids(keys, work / "ids.txt", self.cases, sink)
        del keys
        finished = registry.finish()
        check_real_against_registry(real, finished, sink, check_voxels=self.config.check_voxels)
        return _Scan(
            real,
            finished,
            eligible,
            manifests,
            [_generator_dict(f) for f in generators.facts.values()],
            rows.unknown_mask_sources,
            layout.ending,
            layout.channels,
            without_voxels,
            rejected,
            excluded,
        )

    # -- pass 2: writing ---------------------------------------------------------------
    def _write(self, tmp: Path, out: Path, scan: _Scan, sink: ViolationSink) -> BuildResult:
        config = self.config
        final = Path(os.path.realpath(out.parent)) / out.name
        ending = scan.ending or ".nii.gz"
        train_real = sorted(
            (f for f in scan.real.values() if f.side == "train"), key=lambda f: f.case.case_id
        )
        n_real = len(train_real)
        selected = _select(scan.eligible, n_real, config)
        n_syn = int(selected.sum()) if selected is not None else scan.eligible
        w_real, w_syn = _weights(n_real, n_syn, config)
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        labels, channel_names = labels_and_channels(self.cases)
        nnunet_paths = "dataset" if config.link_mode == "none" else None
        with CaseLinker(tmp, final, config.link_mode, ending) as link:
            # the evaluation cases travel with the build (imagesVal/, imagesTs/): portable
            placed: dict[str, dict[str, Any]] = {}
            evaluation: dict[str, list[dict[str, Any]]] = {}
            for side, folders in EVAL_FOLDERS.items():
                evaluation[side] = []
                for fact in sorted(
                    (f for f in scan.real.values() if f.side == side),
                    key=lambda f: f.case.case_id,
                ):
                    case = fact.case
                    paths = link.case(
                        case.case_id,
                        [os.path.realpath(p) for p in case.images],
                        os.path.realpath(case.mask) if case.mask is not None else None,
                        folders,
                    )
                    placed[case.case_id] = paths
                    evaluation[side].append({**paths, "case_id": case.case_id})
            head = {
                "name": config.name or self.dataset_name or "synthlesion",
                "description": "Real training cases plus synthetic cases of training patients, "
                "built by synthlesion; evaluation cases (real only) in validation/test, "
                "val.json/test.json; nnU-Net folds in splits_final.json.",
                "reference": "synthlesion.dataset",
                "licence": "see the source datasets",
                "channel_names": channel_names,
                "modality": channel_names,
                "labels": {name: value for value, name in sorted(labels.items())},
                "numTraining": n_real + n_syn,
                "file_ending": ending,
                "validation": evaluation["val"],  # MONAI load_decathlon_datalist keys
                "test": evaluation["test"],
                "synthlesion": {
                    "format": BUILD_FORMAT,
                    "splits_sha256": self.splits.sha256,
                    "share_mode": config.share_mode,
                    "synthetic_share": config.synthetic_share,
                    "sample_weight": {"real": w_real, "synthetic": w_syn},
                },
            }
            with (
                JsonListWriter(tmp / "dataset.json", head, "training", nnunet_paths) as training,
                JsonListWriter(
                    tmp / SYNTHETIC_FILE,
                    {"format": "synthlesion-synthetic-list/1", "numCases": n_syn},
                    "synthetic",
                ) as synthetic,
            ):
                for fact in train_real:
                    case = fact.case
                    if case.mask is None:
                        raise DatasetError(
                            f"real training case {case.case_id} has no mask; nnU-Net "
                            "needs a label for every training case"
                        )
                    paths = link.case(
                        case.case_id,
                        [os.path.realpath(p) for p in case.images],
                        os.path.realpath(case.mask),
                    )
                    training.add(
                        {
                            **paths,
                            "case_id": case.case_id,
                            "patient_id": case.patient_id,
                            "origin": "real",
                            "source_patient": case.patient_id,
                            "generator": None,
                            "sample_weight": w_real,
                        }
                    )
                    if nnunet_paths:
                        training.add_extra(
                            case.case_id, {"images": paths["image"], "label": paths["label"]}
                        )
                for number, item in enumerate(read_jsonl(tmp / "_work" / "synthetic.jsonl")):
                    if selected is not None and not selected[number]:
                        continue
                    paths = link.case(item["case_id"], item["images"], item["mask"])
                    entry = {
                        **paths,
                        "case_id": item["case_id"],
                        "patient_id": item["source_patient"],
                        "origin": "synthetic",
                        "source_patient": item["source_patient"],
                        "generator": item["generator"],
                        "sample_weight": w_syn
                        * (1.0 if item["passed"] else config.rejected_weight),
                        "quality_passed": item["passed"],
                    }
                    training.add(entry)
                    if nnunet_paths:
                        training.add_extra(
                            item["case_id"], {"images": paths["image"], "label": paths["label"]}
                        )
                    synthetic.add(
                        {
                            **entry,
                            "source_case": item["source_case"],
                            "generator_path": item["generator_path"],
                            "manifest": self.manifests[item["manifest"]].path.as_posix(),
                            "row": item["row"],
                            "mask_origin": item["mask_origin"],
                        }
                    )
        for side in EVAL_SIDES:
            write_eval_list(
                tmp / f"{side}.json",
                side,
                scan.real,
                final,
                self.splits,
                labels,
                channel_names,
                ending,
                placed,
            )

        def synthetic_in_train() -> Iterable[tuple[str, str]]:
            for number, item in enumerate(read_jsonl(tmp / "_work" / "synthetic.jsonl")):
                if selected is None or selected[number]:
                    yield item["case_id"], item["source_patient"]

        folds = write_nnunet_folds(
            tmp / SPLITS_FINAL_FILE, train_real, synthetic_in_train, seed=config.seed
        )
        scan.registry.save(tmp / REGISTRY_FILE)
        save_config(config, tmp / "build_config.yaml")
        counts = self._counts(scan, (n_real, n_syn))
        build_id = uuid.uuid4().hex
        record = {
            "format": BUILD_FORMAT,
            "build_id": build_id,
            "created": utc_now(),
            "synthlesion_version": __version__,
            "config": config_to_dict(config),
            "inputs": {
                "real": self.real_source,
                "real_cases": len(self.cases),
                "splits_sha256": self.splits.sha256,
                "manifests": scan.manifests,
            },
            "generators": scan.generators,
            "counts": counts,
            "sampling": {
                "mode": config.share_mode,
                "synthetic_share": config.synthetic_share,
                "sample_weight": {"real": w_real, "synthetic": w_syn},
                "expected_share": _expected_share(n_real, n_syn, w_real, w_syn),
            },
            "link_mode": config.link_mode,
            "nnunet_folds": folds,
            "file_ending": ending,
            "notes": _notes(scan, n_syn, config),
            "guards": sink.summary(),
        }
        record["files"] = {
            name: sha256_file(tmp / name)
            for name in (
                "dataset.json",
                "val.json",
                "test.json",
                SYNTHETIC_FILE,
                REGISTRY_FILE,
                SPLITS_FINAL_FILE,
                "build_config.yaml",
            )
        }
        (tmp / CARD_FILE).write_text(render_card(record), encoding="utf-8")
        record["files"][CARD_FILE] = sha256_file(tmp / CARD_FILE)
        write_synced(tmp / BUILD_FILE, json.dumps(record, indent=2) + "\n")
        return BuildResult(out, out / "dataset.json", build_id, counts, record["guards"])

    def _counts(self, scan: _Scan, train: tuple[int, int] | None) -> dict[str, Any]:
        by_side: Counter[str] = Counter(f.side for f in scan.real.values())
        patients = {
            s: len({f.case.patient_id for f in scan.real.values() if f.side == s})
            for s in ("train", *EVAL_SIDES)
        }
        counts: dict[str, Any] = {
            side: {"real": by_side[side], "synthetic": 0, "patients": patients[side]}
            for side in ("train", *EVAL_SIDES)
        }
        counts["synthetic_rows"] = sum(m["rows"] for m in scan.manifests)
        counts["synthetic_eligible"] = scan.eligible
        counts["train"]["synthetic"] = train[1] if train else scan.eligible
        counts["synthetic_rejected_by_quality"] = scan.rejected_by_quality
        counts["synthetic_excluded_by_later_gate"] = scan.excluded_by_later_gate
        counts["synthetic_rejected_included"] = (
            scan.rejected_by_quality if self.config.include_rejected else 0
        )
        counts["registry_entries"] = len(scan.registry)
        return counts


# -- helpers ---------------------------------------------------------------------------


def _dataset_name(real: str | Path) -> str | None:
    """The ``name`` of the real data's dataset.json, when it has one (kept in the build)."""
    path = Path(real)
    path = path / "dataset.json" if path.is_dir() else path
    if path.suffix != ".json" or not path.is_file():
        return None
    try:
        name = json.loads(path.read_text(encoding="utf-8")).get("name")
    except (OSError, ValueError, AttributeError):
        return None
    return str(name) if isinstance(name, str) and name.strip() else None


def _manifest_source(item: Any) -> ManifestSource:
    if isinstance(item, ManifestSource):
        return item
    if isinstance(item, tuple):
        path, root = item
        return ManifestSource(Path(path), Path(root) if root is not None else None)
    return ManifestSource(Path(item))


def _select(eligible: int, n_real: int, config: BuildConfig) -> np.ndarray | None:
    if config.share_mode != "fixed" or config.synthetic_share is None:
        return None
    share = config.synthetic_share
    wanted = round(share * n_real / (1.0 - share))
    if wanted > eligible:
        logger.warning(
            "fixed share %.3f needs %d synthetic cases, only %d are eligible",
            share,
            wanted,
            eligible,
        )
        wanted = eligible
    mask = np.zeros(eligible, dtype=bool)
    if wanted:
        mask[np.random.default_rng(config.seed).choice(eligible, size=wanted, replace=False)] = True
    return mask


def _weights(n_real: int, n_syn: int, config: BuildConfig) -> tuple[float, float]:
    share = config.synthetic_share
    if config.share_mode == "fixed" or share is None or n_real == 0 or n_syn == 0:
        return 1.0, 1.0
    total = n_real + n_syn
    return (1.0 - share) * total / n_real, share * total / n_syn


def _expected_share(n_real: int, n_syn: int, w_real: float, w_syn: float) -> float:
    mass = n_real * w_real + n_syn * w_syn
    return n_syn * w_syn / mass if mass else 0.0


def _notes(scan: _Scan, n_syn: int, config: BuildConfig) -> list[str]:
    notes = []
    if scan.rows_without_voxels:
        notes.append(
            f"{scan.rows_without_voxels} synthetic row(s) carry no voxel hashes: only "
            "byte copies of those cases can be caught, not re-compressed ones"
        )
    if scan.unknown_mask_sources:
        notes.append(
            f"{scan.unknown_mask_sources} transplanted mask(s) come from a real mask "
            "outside this dataset (side unknown)"
        )
    if not config.verify_files:
        notes.append(
            "synthetic files were not hashed against their manifest rows (verify_files off); "
            "files of a real val/test scan's size were still compared with those scans"
        )
    if scan.rejected_by_quality:
        later = (
            f" ({scan.excluded_by_later_gate} of them refused by a later gate: "
            + "; ".join(sorted(set(config.excluded.values()))[:3])
            + ")"
            if scan.excluded_by_later_gate
            else ""
        )
        notes.append(
            f"{scan.rejected_by_quality} synthetic case(s) failed their quality gate{later}: "
            + (
                f"included with weight {config.rejected_weight:g} (include_rejected)"
                if config.include_rejected
                else "left out (include_rejected to build them)"
            )
        )
    if not config.check_voxels:
        notes.append("real val/test scans were not decoded to compare voxel hashes")
    if n_syn and config.share_mode == "fixed" and scan.eligible > n_syn:
        notes.append(
            f"{scan.eligible - n_syn} eligible synthetic case(s) left out by the fixed "
            "ratio (still in the registry)"
        )
    notes.append(
        "nnU-Net: copy splits_final.json into nnUNet_preprocessed/<dataset>/ before training: "
        "its folds validate on real cases only, grouped by patient, and train on synthetic "
        "cases only in the folds of their source patient (nnU-Net's own random folds would "
        "mix synthetic cases into validation); report results on val.json/test.json"
    )
    return notes


def _generator_dict(facts: Any) -> dict[str, Any]:
    return {
        **facts.ref.to_dict(),
        "manifest": facts.manifest,
        "rows": facts.rows,
        "patients_trained": facts.patients_trained,
        "ok": facts.ok,
        "evaluation_overlap": facts.evaluation_overlap,
        "problem": facts.problem,
    }


__all__ = [
    "BUILD_FILE",
    "BuildConfig",
    "BuildResult",
    "DatasetBuilder",
    "GuardReport",
    "ManifestSource",
    "read_build_record",
]
