"""The evaluation's data path: one guarded build, training cases in memory, and a test set
that is read only through the dataset package's evaluation guard.

* :func:`require_real_source` refuses, before anything is built, a ``data`` path that is a
  synthetic set (a sampling output folder or manifest) or a dataset listing synthetic cases:
  the test split is taken from it.
* :func:`build_dataset` runs :class:`~synthlesion.dataset.DatasetBuilder` over the real data,
  the locked splits and every synthetic manifest (diffusion and hand-crafted), so that all
  synthetic content is in the build's registry and every guard runs.
* :class:`GuardedTestSet` reads the test (or val) list through
  :meth:`EvaluationDataset.from_build` and :func:`make_eval_loader` every time it is scored.
* :func:`probe_evaluation_guard` offers a synthetic case to the evaluation loader and records
  that it is refused (a live check of the guard, shown in the report).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from synthlesion.data.intensity import IntensityNormaliser
from synthlesion.data.io import load_image
from synthlesion.data.sources import load_cases
from synthlesion.evaluation.errors import EvaluationError, SyntheticTestDataError
from synthlesion.evaluation.segmenter import ArrayCase, normalise

logger = logging.getLogger(__name__)

BUILD_DIR = "build"


def _is_manifest(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            first = handle.readline(4096)
    except OSError:
        return False
    return b'"record":"header"' in first and b"synthlesion-manifest" in first


def require_real_source(data: str | Path, *, patient_pattern: str | None = None) -> list[Any]:
    """Load the real cases the splits (and so the test split) come from, refusing synthetic data.

    Raises:
        SyntheticTestDataError: ``data`` is a synthetic set folder or manifest, or lists cases
            marked synthetic.
    """
    path = Path(data)
    if path.is_dir() and ((path / "manifest.jsonl").is_file() or any(path.glob("*.lock.json"))):
        raise SyntheticTestDataError(
            f"{path}: is a synthetic set (it holds a synthetic-case manifest); the test split "
            "must come from the real dataset: set data to the real dataset.json and list the "
            "synthetic set under diffusion.manifests"
        )
    if path.is_file() and path.suffix == ".jsonl" and _is_manifest(path):
        raise SyntheticTestDataError(
            f"{path}: is a synthetic-case manifest; the test split must come from the real "
            "dataset (list the manifest under diffusion.manifests instead)"
        )
    cases = load_cases(path, patient_pattern=patient_pattern)
    synthetic = [c.case_id for c in cases if c.origin != "real"]
    if synthetic:
        listed = ", ".join(synthetic[:5]) + (" ..." if len(synthetic) > 5 else "")
        raise SyntheticTestDataError(
            f"{path}: lists {len(synthetic)} synthetic case(s) ({listed}); the evaluation reads "
            "its test split from this data, which must hold real cases only (use the original "
            "real dataset, not a built training set)"
        )
    return cases


def build_dataset(
    data: str | Path,
    splits: str | Path,
    manifests: Sequence[Path],
    out: Path,
    *,
    reuse: bool,
    include_rejected: bool = False,
    excluded: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Build (or reuse) the guarded dataset; returns its build record.

    ``excluded`` (case id -> reason) leaves out synthetic cases a later gate refused.

    Raises:
        SyntheticTestDataError: a guard found synthetic content in an evaluation split.
        GuardViolation: any other guard refused (nothing is written).
    """
    from synthlesion.dataset import BuildConfig, DatasetBuilder
    from synthlesion.dataset.builder import read_build_record
    from synthlesion.provenance import SyntheticInEvaluation

    if reuse and (out / "build.json").is_file():
        return read_build_record(out)
    config = BuildConfig(
        name="synthlesion-evaluation",
        link_mode="none",
        include_rejected=include_rejected,
        excluded=dict(excluded or {}),
    )
    try:
        DatasetBuilder(data, splits, [Path(m) for m in manifests], config).build(out)
    except SyntheticInEvaluation as exc:
        raise SyntheticTestDataError(
            f"the evaluation split of {data} holds synthetic content: {exc}"
        ) from exc
    return read_build_record(out)


@dataclass(frozen=True)
class TrainingPool:
    """The build's training cases in memory, split by origin.

    The segmenter reads the first image channel (``channel_names["0"]``); ``image_channels``
    says how many the cases hold (the others are left out, and the results say so).
    """

    real: list[ArrayCase]
    synthetic: dict[str, list[ArrayCase]]  # generator kind -> cases
    lesion_values: tuple[int, ...]
    organ_values: tuple[int, ...]
    modality: str
    image_channels: int = 1

    def real_by_id(self) -> dict[str, ArrayCase]:
        return {c.case_id: c for c in self.real}


def generator_kinds(manifests: Mapping[str, Sequence[Path]]) -> dict[str, str]:
    """Generator folder sha256 -> kind (``diffusion``/``handcrafted``) from manifest headers."""
    from synthlesion.provenance import read_manifest

    kinds: dict[str, str] = {}
    for kind, paths in manifests.items():
        for path in paths:
            kinds[read_manifest(path).generator.sha256] = kind
    return kinds


def load_training_pool(
    build: Path, kinds: Mapping[str, str], normaliser: IntensityNormaliser
) -> TrainingPool:
    """Read every training item of the build (through ``SyntheticAwareDataset.from_build``)."""
    from synthlesion.dataset import SyntheticAwareDataset

    dataset = SyntheticAwareDataset.from_build(build)
    spec = json.loads((build / "dataset.json").read_text(encoding="utf-8"))
    synthetic_list = json.loads((build / "synthetic.json").read_text(encoding="utf-8"))
    source_of = {e["case_id"]: e["source_case"] for e in synthetic_list["synthetic"]}
    labels = {int(v): k for k, v in spec["labels"].items()}
    from synthlesion.data.cases import lesion_label_values

    lesion_values = lesion_label_values(labels)
    organ_values = tuple(v for v in sorted(labels) if v and v not in lesion_values)
    modality = str(spec.get("channel_names", {}).get("0", "unknown"))
    real: list[ArrayCase] = []
    synthetic: dict[str, list[ArrayCase]] = {}
    for item in dataset.items:
        image = load_image(item["image"][0])
        label = load_image(item["label"])
        is_syn = item["origin"] == "synthetic"
        case = ArrayCase(
            item["case_id"],
            normalise(image.array, normaliser),
            np.asarray(label.array).astype(np.int16),
            image.spacing,
            is_syn,
            str(item.get("generator") or ""),
            source_of.get(item["case_id"], item["case_id"]),
            np.asarray(image.array, dtype=np.float32),
        )
        if is_syn:
            kind = kinds.get(case.generator)
            if kind is None:
                raise EvaluationError(
                    f"{build}: synthetic case {case.case_id} comes from an "
                    f"unknown generator {case.generator[:12]}"
                )
            synthetic.setdefault(kind, []).append(case)
        else:
            real.append(case)
    channels = max((len(item["image"]) for item in dataset.items), default=1)
    if channels > 1:
        logger.warning(
            "%s: the cases hold %d image channels (%s); the evaluation's segmenter reads the "
            "first (%s) only",
            build,
            channels,
            ", ".join(str(v) for v in spec.get("channel_names", {}).values()),
            modality,
        )
    return TrainingPool(real, synthetic, lesion_values, organ_values, modality, channels)


class GuardedTestSet:
    """The real evaluation split, read through the dataset package's evaluation guard.

    Every :meth:`cases` call iterates :func:`make_eval_loader` over
    :meth:`EvaluationDataset.from_build` (which refuses anything synthetic by tag, file hash or
    decoded voxels).

    Raises:
        SyntheticTestDataError: the guard refused an item.
    """

    def __init__(self, build: Path, split: str, normaliser: IntensityNormaliser) -> None:
        from synthlesion.dataset import EvaluationDataset
        from synthlesion.provenance import SyntheticInEvaluation

        self.build, self.split, self.normaliser = build, split, normaliser
        try:
            self.dataset = EvaluationDataset.from_build(build, split)
        except SyntheticInEvaluation as exc:
            raise SyntheticTestDataError(f"{build} {split}: {exc}") from exc
        if len(self.dataset) == 0:
            raise EvaluationError(f"{build}: the {split} split holds no case to evaluate on")
        self.spacing = {
            str(item["case_id"]): load_image(item["label"] or item["image"][0]).spacing
            for item in self.dataset.items
        }
        self.loads = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def cases(self) -> Iterator[ArrayCase]:
        from synthlesion.dataset import make_eval_loader
        from synthlesion.provenance import SyntheticInEvaluation

        self.loads += 1
        try:
            for batch in make_eval_loader(self.dataset, batch_size=1):
                case_id = str(batch["case_id"][0])
                image = batch["image"][0, 0].numpy()
                label = batch["label"][0, 0].numpy().astype(np.int16)
                yield ArrayCase(
                    case_id,
                    normalise(image, self.normaliser),
                    label,
                    self.spacing[case_id],
                    False,
                    "",
                    case_id,
                    image.astype(np.float32),
                )
        except SyntheticInEvaluation as exc:
            raise SyntheticTestDataError(f"{self.build} {self.split}: {exc}") from exc


def probe_evaluation_guard(build: Path) -> dict[str, Any]:
    """Offer one synthetic training case of the build to the evaluation loader.

    Returns:
        ``{"probed": case id or None, "refused": bool, "message": ...}``.
    """
    from synthlesion.dataset import EvaluationDataset
    from synthlesion.provenance import SyntheticInEvaluation, SyntheticRegistry

    listing = json.loads((build / "synthetic.json").read_text(encoding="utf-8"))["synthetic"]
    if not listing:
        return {"probed": None, "refused": None, "message": "no synthetic case to probe with"}
    entry = listing[0]
    item = {
        "image": [str(build / p) for p in entry["image"]],
        "label": str(build / entry["label"]),
        "case_id": entry["case_id"],
        "origin": "real",
    }  # even relabelled as real
    registry = SyntheticRegistry.load(build / "synthetic_registry.npz")
    try:
        EvaluationDataset([item], registry)
    except SyntheticInEvaluation as exc:
        return {"probed": entry["case_id"], "refused": True, "message": str(exc)}
    return {
        "probed": entry["case_id"],
        "refused": False,
        "message": "the evaluation loader accepted a synthetic case",
    }


__all__ = [
    "GuardedTestSet",
    "TrainingPool",
    "build_dataset",
    "generator_kinds",
    "load_training_pool",
    "probe_evaluation_guard",
    "require_real_source",
]
