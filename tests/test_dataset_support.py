"""Shared helpers for the dataset tests (no tests here): a small real dataset from the phantom,
a locked split, a generator model folder with a training record, and synthetic cases written
through the manifest writer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from synthlesion.data.cases import Case
from synthlesion.data.io import load_image, save_image
from synthlesion.data.phantom import make_phantom_dataset
from synthlesion.data.sources import load_cases
from synthlesion.data.splits import Splits, save_splits, split_patients
from synthlesion.data.volume import Volume
from synthlesion.provenance.identity import GeneratorRef, hash_patient_id
from synthlesion.provenance.manifest import ManifestRow
from synthlesion.provenance.manifest_writer import ManifestWriter


@dataclass
class World:
    tmp: Path
    real_json: Path
    cases: list[Case]
    splits: Splits
    splits_path: Path
    synth_root: Path
    model_dir: Path
    generator: GeneratorRef
    manifest: Path

    def case(self, case_id: str) -> Case:
        return next(c for c in self.cases if c.case_id == case_id)

    def side_cases(self, side: str) -> list[Case]:
        members = set(self.splits.patients(side))
        return [c for c in self.cases if c.patient_id in members]

    def writer(self, **kwargs) -> ManifestWriter:
        kwargs.setdefault("generator", self.generator)
        return ManifestWriter(self.manifest, self.synth_root, **kwargs)


def make_generator(
    folder: Path, patients, *, weights: bytes = b"weights", record_as: str | None = None
) -> GeneratorRef:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "weights.safetensors").write_bytes(weights)
    (folder / "model_config.yaml").write_text("spatial_dims: 2\n")
    record = {
        "patient_hash_scheme": "synthlesion-patient-sha256/1",
        "patient_id_hashes": sorted(hash_patient_id(p) for p in patients),
    }
    (folder / "training_record.json").write_text(json.dumps(record))
    return GeneratorRef.from_folder(folder, record_as=record_as)


def make_world(tmp: Path, *, n_patients: int = 8, seed: int = 0, trained_on=None) -> World:
    real_json = make_phantom_dataset(
        tmp / "real", kind="ct", spatial_dims=2, n_patients=n_patients, size=24, seed=seed
    )
    cases = load_cases(real_json)
    splits = split_patients(cases, fractions=(0.5, 0.25, 0.25), seed=seed)
    splits_path = tmp / "splits.json"
    save_splits(splits, splits_path)
    synth_root = tmp / "synth"
    (synth_root / "images").mkdir(parents=True)
    (synth_root / "masks").mkdir(parents=True)
    patients = splits.patients("train") if trained_on is None else trained_on
    generator = make_generator(tmp / "model", patients, record_as="../model")  # relocatable
    return World(
        tmp,
        real_json,
        cases,
        splits,
        splits_path,
        synth_root,
        tmp / "model",
        generator,
        synth_root / "manifest.jsonl",
    )


def clone_world(template: World, dest: Path) -> World:
    """A copy of ``template`` under ``dest`` (manifest paths and generator are relative)."""
    import shutil

    shutil.copytree(template.tmp, dest, symlinks=True, dirs_exist_ok=True)
    cases = load_cases(dest / template.real_json.relative_to(template.tmp))
    return World(
        dest,
        dest / template.real_json.relative_to(template.tmp),
        cases,
        template.splits,
        dest / "splits.json",
        dest / "synth",
        dest / "model",
        template.generator,
        dest / "synth" / "manifest.jsonl",
    )


def paint(world: World, source: Case, case_id: str, *, seed: int = 0) -> tuple[str, str]:
    """Write a synthetic image/mask pair made from ``source``; returns their relative paths."""
    rng = np.random.default_rng(seed)
    image = load_image(source.image)
    mask = load_image(source.mask)
    array = image.array.copy()
    lesion = mask.array.copy()
    cx, cy = (s // 2 for s in array.shape[:2])
    array[cx - 2 : cx + 2, cy - 2 : cy + 2] += rng.integers(50, 200, size=(4, 4)).astype(
        array.dtype
    )
    lesion[cx - 2 : cx + 2, cy - 2 : cy + 2] = 2
    rel_image = f"images/{case_id}_0000.nii.gz"
    rel_mask = f"masks/{case_id}.nii.gz"
    save_image(Volume(array, image.affine, image.header), world.synth_root / rel_image)
    save_image(
        Volume(lesion.astype(mask.array.dtype), mask.affine, mask.header),
        world.synth_root / rel_mask,
    )
    return rel_image, rel_mask


def add_synthetic(
    world: World, writer: ManifestWriter, source: Case, case_id: str, *, seed: int = 0, **kwargs
) -> ManifestRow:
    rel_image, rel_mask = paint(world, source, case_id, seed=seed)
    kwargs.setdefault("mask_origin", "procedural")
    return writer.append_case(
        case_id=case_id,
        source=source,
        images=[rel_image],
        mask=rel_mask,
        scheduler="ddim",
        steps=10,
        seed=seed,
        quality={"passed": True, "seam": 0.5},
        **kwargs,
    )


def populate(world: World, per_case: int = 1, sides=("train",)) -> list[ManifestRow]:
    rows = []
    with world.writer() as writer:
        for side in sides:
            for source in world.side_cases(side):
                for k in range(per_case):
                    rows.append(
                        add_synthetic(
                            world, writer, source, f"syn_{source.case_id}_{k}", seed=len(rows)
                        )
                    )
    return rows


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def edit_row(path: Path, number: int, **changes) -> None:
    """Hand-edit row ``number`` (1-based) keeping its stored row_sha256, as a person would."""
    lines = path.read_bytes().splitlines(keepends=True)
    record = json.loads(lines[number])
    stored = record.pop("row_sha256")
    record.update(changes)
    body = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
    lines[number] = body[:-1] + b',"row_sha256":"' + stored.encode() + b'"}\n'
    path.write_bytes(b"".join(lines))


def forge(path: Path, edit=None, *, relock: bool = True) -> None:
    """Rewrite a manifest with a consistent hash chain (and lock), as a forger or a buggy tool
    would; ``edit(records)`` changes the records (header first) and returns them."""
    from synthlesion.provenance.manifest import GENESIS, encode_record, lock_path_for

    records = _records(path)
    for record in records:
        record.pop("row_sha256")
    if edit is not None:
        records = edit(records)
    out, head = [], GENESIS
    for record in records:
        line, head = encode_record(record, head)
        out.append(line)
        if record.get("record") == "header":
            header_hash = head
    path.write_bytes(b"".join(out))
    if relock:
        lock_path = lock_path_for(path)
        lock = json.loads(lock_path.read_text())
        lock.update(
            rows=len(records) - 1,
            chain_head=head,
            header_sha256=header_hash,
            run_id=records[0]["run_id"],
            generator=records[0]["generator"],
        )
        lock_path.write_text(json.dumps(lock))
