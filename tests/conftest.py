"""Shared fixtures: tiny NIfTI cases written straight through nibabel (not through our writer),
so that tests of the reader do not depend on the writer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

AFFINE = np.array([[-1.0, 0, 0, 90.0], [0, 1.0, 0, -120.0], [0, 0, 2.5, -60.0], [0, 0, 0, 1]])


def ct_image(shape=(24, 20, 12), seed=0) -> np.ndarray:
    """A small CT-like int16 volume: air around an ellipsoid body of soft tissue."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    body = sum(g**2 for g in grid) < 0.8
    image = np.where(body, 40, -1000) + rng.normal(0, 10, shape)
    return image.astype(np.int16)


def lesion_mask(shape=(24, 20, 12), centre=(12, 10, 6), radius=3) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    inside = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2
    return inside.astype(np.uint8)


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    image = nib.Nifti1Image(array, affine)
    image.set_data_dtype(array.dtype)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    nib.save(image, str(path))
    return path


def write_dataset(
    root: Path,
    cases: dict[str, tuple[np.ndarray, np.ndarray | None]],
    *,
    labels=None,
    affines=None,
    patients=None,
    modality="CT",
) -> Path:
    """Write a Decathlon-style folder; ``cases`` maps case id -> (image, mask)."""
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    affines = affines or {}
    training = []
    for case_id, (image, mask) in cases.items():
        image_affine, mask_affine = affines.get(case_id, (AFFINE, AFFINE))
        write_nifti(root / "imagesTr" / f"{case_id}_0000.nii.gz", image, image_affine)
        entry = {"image": f"./imagesTr/{case_id}_0000.nii.gz", "case_id": case_id}
        if mask is not None:
            write_nifti(root / "labelsTr" / f"{case_id}.nii.gz", mask, mask_affine)
            entry["label"] = f"./labelsTr/{case_id}.nii.gz"
        if patients:
            entry["patient_id"] = patients[case_id]
        training.append(entry)
    spec = {
        "name": "test",
        "channel_names": {"0": modality},
        "labels": labels or {"background": 0, "lesion": 1},
        "numTraining": len(training),
        "file_ending": ".nii.gz",
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(spec))
    return root / "dataset.json"


@pytest.fixture
def clean_case(tmp_path: Path) -> Path:
    """A one-case clean dataset; returns dataset.json."""
    return write_dataset(tmp_path / "clean", {"case_a": (ct_image(), lesion_mask())})


def single_torch_thread():
    """Generator for a module fixture: tiny networks run fastest on one torch thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def phantom_with_splits(
    root: Path,
    *,
    n_patients: int,
    seed: int,
    lesion_fraction: float,
    kind: str = "mri",
    size: int = 32,
) -> tuple[Path, Path]:
    """A small 2D phantom dataset and its locked splits file."""
    from synthlesion.data.phantom import make_phantom_dataset
    from synthlesion.data.sources import load_cases
    from synthlesion.data.splits import save_splits, split_patients

    dataset = make_phantom_dataset(
        root / f"{kind}2d",
        kind=kind,
        spatial_dims=2,
        n_patients=n_patients,
        size=size,
        seed=seed,
        lesion_fraction=lesion_fraction,
    )
    splits = root / "splits.json"
    save_splits(split_patients(load_cases(dataset), seed=0), splits)
    return dataset, splits


def randomise(*modules: Any, seed: int = 0) -> None:
    """Give zero-initialised weights (MONAI's output conv, new conv_in channels, class
    embeddings, ControlNet zero convs) small random values, as training would, so that wiring
    tests see every input's effect."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                noise = torch.randn(p.shape, generator=g) * 0.1
                if p.ndim > 1 and not p.any():
                    p.copy_(noise)
                elif p.ndim == 4:  # a conv whose new input channels are zero
                    unused = p.abs().sum(dim=(0, 2, 3)) == 0
                    p[:, unused] = noise[:, unused]
