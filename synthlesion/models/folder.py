"""Model-folder files: atomic folder writes, pickle refusal, required-file checks."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from synthlesion.models.errors import ModelFolderError

CONFIG_FILE = "model_config.yaml"
WEIGHTS_FILE = "weights.safetensors"
SCHEDULER_DIR = "scheduler"
SCHEDULER_FILE = "scheduler/scheduler_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
"""Weight files that ``torch.load`` would unpickle: refused, never opened."""


def refuse_pickles(folder: Path, subfolders: Iterable[str] | None = None) -> None:
    """Raise when ``folder`` (or the given subfolders) holds a pickle weight file.

    Raises:
        ModelFolderError: naming the first pickle file found.
    """
    roots = [folder] if subfolders is None else [folder / s for s in subfolders]
    for root in roots:
        if not root.is_dir():
            continue
        for file in sorted(root.rglob("*")):
            if file.is_file() and file.name.lower().endswith(PICKLE_SUFFIXES):
                raise ModelFolderError(
                    folder,
                    f"{file.relative_to(folder)} is a pickle weight file; synthlesion only "
                    "loads safetensors (convert it, e.g. with diffusers' save_pretrained("
                    "safe_serialization=True), and delete the pickle)",
                )


def check_files(folder: Path, files: Iterable[str]) -> None:
    """Raise naming every file of ``files`` (relative paths) missing from ``folder``."""
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise ModelFolderError(folder, f"missing file(s): {', '.join(missing)}")


def check_component(
    folder: Path,
    subfolder: str,
    kind: str,
    weights_name: str = "diffusion_pytorch_model.safetensors",
) -> None:
    """Check one diffusers/transformers component folder before ``from_pretrained``.

    Args:
        folder: the diffusers-layout root.
        subfolder: e.g. ``"unet"``.
        kind: ``"model"`` (needs ``config.json`` and safetensors weights) or ``"tokenizer"``
            (needs ``tokenizer_config.json`` and ``tokenizer.json`` or ``vocab.json`` +
            ``merges.txt``).
        weights_name: the usual weights file name, named in the error when no safetensors
            weights (single or sharded) are there.

    Raises:
        ModelFolderError: naming the missing file or the pickle-only weights.
    """
    root = folder / subfolder
    if not root.is_dir():
        raise ModelFolderError(folder, f"missing folder {subfolder}/")
    if kind == "tokenizer":
        check_files(folder, [f"{subfolder}/tokenizer_config.json"])
        if not (root / "tokenizer.json").is_file():
            check_files(folder, [f"{subfolder}/vocab.json", f"{subfolder}/merges.txt"])
        return
    check_files(folder, [f"{subfolder}/config.json"])
    weights = [
        p for p in root.iterdir() if p.name.endswith((".safetensors", ".safetensors.index.json"))
    ]
    if not weights:
        pickles = sorted(p.name for p in root.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
        hint = f" (only pickle weights: {', '.join(pickles)}; refused)" if pickles else ""
        raise ModelFolderError(folder, f"missing file {subfolder}/{weights_name}{hint}")


@contextlib.contextmanager
def staging_folder(path: Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``path``; move it to ``path`` only on success.

    An existing ``path`` is replaced only if it is a synthlesion model folder (it holds
    ``model_config.yaml``) or empty; it is renamed aside first and deleted after the new
    folder is in place, so ``path`` never holds a half-written model.

    Raises:
        ModelFolderError: ``path`` exists and is a file or an unrelated non-empty folder.
    """
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise ModelFolderError(path, "exists and is not a folder; refusing to overwrite")
        if any(path.iterdir()) and not (path / CONFIG_FILE).is_file():
            raise ModelFolderError(
                path, f"exists, is not empty and holds no {CONFIG_FILE}; refusing to overwrite"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    staging = path.parent / f".{path.name}.tmp-{tag}"
    staging.mkdir()
    try:
        yield staging
        if path.exists():
            old = path.parent / f".{path.name}.old-{tag}"
            os.replace(path, old)
            os.replace(staging, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
