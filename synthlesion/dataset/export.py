"""Writing the dataset folder: nnU-Net v2 / Decathlon layout, evaluation lists, atomic publish.

Helpers of :class:`~synthlesion.dataset.builder.DatasetBuilder`: file placement in
imagesTr/labelsTr (links, copies, or none), JSON lists streamed without holding them in memory,
the real-only evaluation lists, the temporary sibling folder renamed into place, and
:func:`read_build_record`, which checks that a build's files are unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import numpy as np

from synthlesion.data.cases import Case
from synthlesion.data.splits import Splits
from synthlesion.dataset.errors import BuildExistsError, DatasetError
from synthlesion.dataset.guards import RealCaseFacts
from synthlesion.provenance.paths import check_case_id
from synthlesion.storage import atomic_write, sha256_file

logger = logging.getLogger(__name__)

BUILD_FILE = "build.json"
BUILD_FORMAT = "synthlesion-build/1"
REGISTRY_FILE = "synthetic_registry.npz"
CARD_FILE = "dataset_card.md"
SYNTHETIC_FILE = "synthetic.json"
SPLITS_FINAL_FILE = "splits_final.json"  # nnU-Net's cross-validation folds
EVAL_FOLDERS = {"val": ("imagesVal", "labelsVal"), "test": ("imagesTs", "labelsTs")}
ENDINGS = (".nii.gz", ".nii")


def sibling_folder(out: Path, what: str) -> Path:
    """A new hidden folder beside ``out`` (created with the usual permissions)."""
    path = out.parent / f".{out.name}.{what}-{uuid.uuid4().hex[:12]}"
    path.mkdir()
    return path


class TrainingLayout:
    """One file ending and one channel count for the whole training set (nnU-Net needs it)."""

    def __init__(self) -> None:
        self.ending: str | None = None
        self.channels: int | None = None

    def check(self, case_id: str, images: Sequence[str], mask: str | None) -> None:
        check_case_id(case_id, f"training case {case_id}")
        if self.channels is None:
            self.channels = len(images)
        elif len(images) != self.channels:
            raise DatasetError(
                f"case {case_id}: {len(images)} image channel(s), other training "
                f"cases have {self.channels}"
            )
        for path in (*images, *([mask] if mask else [])):
            ending = next((e for e in ENDINGS if path.lower().endswith(e)), None)
            if ending is None:
                raise DatasetError(f"case {case_id}: {path} is not a .nii/.nii.gz file")
            if self.ending is None:
                self.ending = ending
            elif ending != self.ending:
                raise DatasetError(
                    f"case {case_id}: {path} ends in {ending}, other cases in "
                    f"{self.ending}; nnU-Net needs one file ending"
                )


def labels_and_channels(cases: Sequence[Case]) -> tuple[dict[int, str], dict[str, str]]:
    labels: dict[int, str] = {}
    channels: dict[str, str] = {}
    for case in cases:
        for value, name in case.labels.items():
            if labels.setdefault(value, name) != name:
                raise DatasetError(
                    f"case {case.case_id}: label {value} is {name!r}, other cases "
                    f"call it {labels[value]!r}"
                )
        for index, modality in enumerate(case.modalities):
            channels.setdefault(str(index), modality)
    return labels or {0: "background", 1: "lesion"}, channels or {"0": "unknown"}


class CaseLinker:
    """Places one case's files as imagesTr/{case}_{channel:04d}{ending} and labelsTr/{case}
    (or another folder pair: imagesVal/labelsVal, imagesTs/labelsTs for the evaluation cases);
    with mode ``"none"`` it only returns the sources' paths relative to the build folder.

    Modes: ``"auto"`` (default: a hard link, or a copy where the files sit on another file
    system), ``"hardlink"``, ``"copy"``: the build folder holds its files and can be copied or
    moved anywhere (into ``nnUNet_raw``); ``"symlink"``: relative links to the sources, valid
    only while the build keeps its place relative to them."""

    def __init__(self, tmp: Path, final: Path, mode: str, ending: str) -> None:
        self.tmp, self.final, self.mode, self.ending = str(tmp), str(final), mode, ending
        self._relative: dict[tuple[str, str], str] = {}
        self._pending: list[tuple[str, str]] = []
        # link/copy system calls release the GIL: a few threads hide their latency
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="synthlesion-link")

    def __enter__(self) -> CaseLinker:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self.flush()
        finally:
            self._pool.shutdown(wait=True)

    def flush(self) -> None:
        """Create the links queued so far, in a few slices at once (raises the first failure)."""
        pending, self._pending = self._pending, []
        step = max(1, -(-len(pending) // 8))
        for _ in self._pool.map(
            self._place_all, [pending[i : i + step] for i in range(0, len(pending), step)]
        ):
            pass

    def _place_all(self, pairs: list[tuple[str, str]]) -> None:
        for name, target in pairs:
            self._place(name, target)

    def case(
        self,
        case_id: str,
        images: Sequence[str],
        mask: str | None,
        folders: tuple[str, str] = ("imagesTr", "labelsTr"),
    ) -> dict[str, Any]:
        if self.mode == "none":
            return {
                "image": [self._rel(p, self.final) for p in images],
                "label": self._rel(mask, self.final) if mask is not None else None,
            }
        image_dir, label_dir = folders
        names = [f"{image_dir}/{case_id}_{c:04d}{self.ending}" for c in range(len(images))]
        label = f"{label_dir}/{case_id}{self.ending}" if mask is not None else None
        for folder in folders:
            os.makedirs(f"{self.tmp}/{folder}", exist_ok=True)
        self._pending.extend(zip(names, images, strict=True))
        if mask is not None and label is not None:
            self._pending.append((label, mask))
        if len(self._pending) >= 4096:
            self.flush()
        return {"image": names, "label": label}

    def _rel(self, target: str, start: str) -> str:
        """``os.path.relpath(target, start)``, with the folder part cached."""
        folder, name = os.path.split(target)
        key = (folder, start)
        relative = self._relative.get(key)
        if relative is None:
            relative = self._relative[key] = os.path.relpath(folder, start)
        return name if relative == "." else f"{relative}/{name}"

    def _place(self, name: str, target: str) -> None:
        link = f"{self.tmp}/{name}"
        if self.mode == "symlink":
            os.symlink(self._rel(target, f"{self.final}/{name.partition('/')[0]}"), link)
        elif self.mode in ("hardlink", "auto"):
            try:
                os.link(target, link)
            except OSError as exc:
                if self.mode == "auto":  # another file system: copy
                    shutil.copyfile(target, link)
                    return
                raise DatasetError(
                    f"cannot hard-link {target} ({exc}); use link_mode 'auto' or 'copy'"
                ) from None
        else:
            shutil.copyfile(target, link)


class JsonListWriter:
    """Streams ``{...head, key: [items], extra_key: {name: value}}`` as JSON without holding
    the list (the optional mapping goes through a side file)."""

    def __init__(
        self, path: Path, head: dict[str, Any], key: str, extra_key: str | None = None
    ) -> None:
        self.path, self.head, self.key, self.count = path, head, key, 0
        self.extra_key, self.extra_count = extra_key, 0
        self.handle: IO[str] = open(path, "w", encoding="utf-8")  # noqa: SIM115
        self.side: IO[str] | None = (
            open(path.with_name(path.name + ".part"), "w+", encoding="utf-8")  # noqa: SIM115
            if extra_key
            else None
        )

    def __enter__(self) -> JsonListWriter:
        text = json.dumps(self.head, indent=2)
        self.handle.write(text[:-2] + f',\n  "{self.key}": [')
        return self

    def add(self, item: dict[str, Any]) -> None:
        self.handle.write(("\n    " if self.count == 0 else ",\n    ") + json.dumps(item))
        self.count += 1

    def add_extra(self, name: str, value: Any) -> None:
        if self.side is None:
            raise ValueError(f"{self.path}: add_extra needs a writer made with extra_key")
        self.side.write(
            ("\n    " if self.extra_count == 0 else ",\n    ")
            + f"{json.dumps(name)}: {json.dumps(value)}"
        )
        self.extra_count += 1

    def __exit__(self, *exc: object) -> None:
        self.handle.write("\n  ]")
        if self.side is not None:
            self.handle.write(f',\n  "{self.extra_key}": {{')
            self.side.seek(0)
            shutil.copyfileobj(self.side, self.handle)
            self.handle.write("\n  }")
            self.side.close()
            os.unlink(self.side.name)
        self.handle.write("\n}\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()


def write_eval_list(
    path: Path,
    side: str,
    real: dict[str, RealCaseFacts],
    final: Path,
    splits: Splits,
    labels: dict[int, str],
    channels: dict[str, str],
    ending: str,
    placed: dict[str, dict[str, Any]] | None = None,
) -> None:
    """``val.json`` / ``test.json``: the real cases of one evaluation side, with their file
    hashes; paths relative to the build folder (``placed``: where the build put each case's
    files; else the sources themselves)."""
    facts = sorted((f for f in real.values() if f.side == side), key=lambda f: f.case.case_id)
    head = {
        "format": "synthlesion-eval-list/1",
        "split": side,
        "origin": "real",
        "splits_sha256": splits.sha256,
        "channel_names": channels,
        "labels": {name: value for value, name in sorted(labels.items())},
        "file_ending": ending,
        "numCases": len(facts),
    }
    with JsonListWriter(path, head, side) as writer:
        for fact in facts:
            case = fact.case
            where = (placed or {}).get(case.case_id) or {
                "image": [os.path.relpath(os.path.realpath(p), final) for p in case.images],
                "label": (
                    os.path.relpath(os.path.realpath(case.mask), final)
                    if case.mask is not None
                    else None
                ),
            }
            writer.add(
                {
                    "image": where["image"],
                    "label": where["label"],
                    "case_id": case.case_id,
                    "patient_id": case.patient_id,
                    "origin": "real",
                    "image_sha256": list(fact.image_sha256),
                    "label_sha256": fact.mask_sha256,
                }
            )


def write_nnunet_folds(
    path: Path,
    real_train: Sequence[RealCaseFacts],
    synthetic: Callable[[], Iterable[tuple[str, str]]],
    *,
    folds: int = 5,
    seed: int = 0,
) -> int:
    """Write nnU-Net's ``splits_final.json``: k folds over the training patients.

    Every fold's ``val`` holds real cases only, grouped by patient (all scans of a patient in
    the same fold); a synthetic case sits in ``train`` of exactly the folds whose ``val`` does
    not hold its source patient, so nnU-Net's cross-validation never validates on synthetic
    data nor on a patient whose lesions it trained on. Streamed: memory does not grow with the
    number of synthetic cases.

    Args:
        path: Where to write (atomically).
        real_train: The real training cases.
        synthetic: Called once per fold, gives ``(case id, source patient)`` of every synthetic
            training case.
        folds: Wanted folds (fewer when there are fewer patients; ``[]`` below two patients).
        seed: Seed of the patient shuffle.

    Returns:
        The number of folds written.
    """
    patients = sorted({f.case.patient_id for f in real_train})
    k = min(folds, len(patients))
    with atomic_write(path, "w") as out:  # ASCII (json.dumps escapes the rest)
        if k < 2:
            out.write("[]\n")
            return 0
        order = np.random.default_rng(seed).permutation(len(patients))
        fold_of = {patients[i]: rank % k for rank, i in enumerate(order)}
        out.write("[")
        for fold in range(k):
            val = sorted(f.case.case_id for f in real_train if fold_of[f.case.patient_id] == fold)
            train = sorted(f.case.case_id for f in real_train if fold_of[f.case.patient_id] != fold)
            out.write(("\n  " if fold == 0 else ",\n  ") + '{"train": [')
            out.write(", ".join(json.dumps(c) for c in train))
            first = not train
            for case_id, patient in synthetic():
                if fold_of.get(patient, -1) != fold:
                    out.write(("" if first else ", ") + json.dumps(case_id))
                    first = False
            out.write('], "val": [' + ", ".join(json.dumps(c) for c in val) + "]}")
        out.write("\n]\n")
    return k


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            yield json.loads(line)


def write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def check_target(out: Path, overwrite: bool) -> None:
    if not (out.exists() or out.is_symlink()):
        return
    if out.is_symlink() or not out.is_dir():
        raise BuildExistsError(f"{out}: exists and is not a folder; refusing to replace it")
    if (out / BUILD_FILE).is_file():
        if not overwrite:
            raise BuildExistsError(
                f"{out}: holds another dataset build; pass overwrite (--overwrite) to replace it"
            )
        return
    if any(out.iterdir()):
        raise BuildExistsError(
            f"{out}: holds files that are not a synthlesion build; refusing "
            "to replace them (choose an empty or new folder)"
        )


def publish(tmp: Path, out: Path, overwrite: bool) -> None:
    check_target(out, overwrite)
    if out.is_dir() and (out / BUILD_FILE).is_file():
        old = sibling_folder(out, "old")
        os.rename(out, old / out.name)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if out.is_dir():
            out.rmdir()
        os.rename(tmp, out)
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_build_record(out_dir: str | Path) -> dict[str, Any]:
    """Read a build's ``build.json``, checking that the dataset files still hash as built.

    Raises:
        DatasetError: not a build, or a listed file changed after the build.
    """
    out = Path(out_dir)
    try:
        record = json.loads((out / BUILD_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{out}: not a synthlesion dataset build (no {BUILD_FILE})") from None
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{out / BUILD_FILE}: unreadable ({exc})") from None
    if not isinstance(record, dict) or record.get("format") != BUILD_FORMAT:
        raise DatasetError(f"{out / BUILD_FILE}: not a {BUILD_FORMAT} record")
    for name, digest in record.get("files", {}).items():
        path = out / name
        if not path.is_file() or sha256_file(path) != digest:
            raise DatasetError(
                f"{path}: changed after the build (sha256 differs from "
                f"{BUILD_FILE}); rebuild instead of editing"
            )
    return record


__all__ = [
    "BUILD_FILE",
    "BUILD_FORMAT",
    "CARD_FILE",
    "REGISTRY_FILE",
    "SYNTHETIC_FILE",
    "read_build_record",
]
