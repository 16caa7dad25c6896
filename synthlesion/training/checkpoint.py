"""Resumable checkpoints written without pickle, never half-visible.

A checkpoint is a folder ``checkpoint-{step}`` holding, each as ``NAME.safetensors`` (the
tensors) plus ``NAME.json`` (everything else, with references to the tensors):

* ``model``: trainable parameters and buffers; ``optimizer``; ``lr_scheduler``; ``scaler``
  (fp16); ``ema`` (when on);
* ``rng_state_{rank}``: torch, numpy, Python ``random`` and CUDA generator states and the
  run's own generators (noise/timesteps, data), one file per process;
* ``trainer_state.json``: step, data position (epoch, batch), counters;
* ``COMPLETE``: written last, listing every file with its size and sha256.

It is written to ``.checkpoint-{step}.tmp``, marked complete, then renamed; older checkpoints
are pruned only after that. Loading refuses a folder without ``COMPLETE``, a file whose hash
changed, a pickle file and a missing RNG file (each a :class:`CheckpointError`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from synthlesion.storage import atomic_write_bytes, atomic_write_json, sha256_file
from synthlesion.training.errors import CheckpointError

logger = logging.getLogger(__name__)

FORMAT = "synthlesion-checkpoint/1"
COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_NAME = re.compile(r"^checkpoint-(\d+)$")


# --- flattening any state dict into tensors + JSON ------------------------------------------


def flatten_state(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (dicts, lists, tuples, tensors, numpy arrays, scalars) into a
    dict of tensors and a JSON-able skeleton referencing them.

    Dict keys keep their type (int keys of optimizer states stay int); tuples stay tuples.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            key = path or "value"
            tensors[key] = value.detach().to("cpu", copy=True).contiguous()  # no shared storage
            return {"__tensor__": key}
        if isinstance(value, np.ndarray):
            return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, Mapping):
            items = []
            for k, v in value.items():
                if not isinstance(k, (str, int)) or isinstance(k, bool):
                    raise CheckpointError(f"cannot save state key {k!r} of type {type(k).__name__}")
                items.append([k, walk(v, f"{path}.{k}" if path else str(k))])
            return {"__dict__": items}
        if isinstance(value, tuple):
            return {"__tuple__": [walk(v, f"{path}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise CheckpointError(f"cannot save state value at {path!r} of type {type(value).__name__}")

    return tensors, walk(obj, "")


def unflatten_state(tensors: Mapping[str, torch.Tensor], skeleton: Any, where: str = "") -> Any:
    """Inverse of :func:`flatten_state`."""

    def walk(value: Any) -> Any:
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, dict):
            if "__tensor__" in value:
                key = value["__tensor__"]
                if key not in tensors:
                    raise CheckpointError(f"{where}: tensor {key!r} is missing")
                return tensors[key]
            if "__ndarray__" in value:
                return np.asarray(value["__ndarray__"], dtype=value["dtype"])
            if "__tuple__" in value:
                return tuple(walk(v) for v in value["__tuple__"])
            if "__dict__" in value:
                return {k: walk(v) for k, v in value["__dict__"]}
            raise CheckpointError(f"{where}: malformed state entry {sorted(value)}")
        return value

    return walk(skeleton)


def write_state(folder: Path, name: str, state: Any) -> None:
    """Write ``name.safetensors`` and ``name.json`` (atomically, each)."""
    tensors, skeleton = flatten_state(state)
    atomic_write_bytes(folder / f"{name}.safetensors", save_tensors(tensors))
    atomic_write_json(folder / f"{name}.json", {"format": FORMAT, "state": skeleton})


def read_state(folder: Path, name: str) -> Any:
    """Read what :func:`write_state` wrote.

    Raises:
        CheckpointError: a file is missing or unreadable.
    """
    files = [folder / f"{name}.safetensors", folder / f"{name}.json"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{folder}: missing {', '.join(missing)}")
    try:
        tensors = load_tensors(files[0].read_bytes())
        data = json.loads(files[1].read_text(encoding="utf-8"))
    except Exception as exc:  # safetensors and json raise several types
        raise CheckpointError(f"{folder}: cannot read {name} ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{folder / files[1].name}: not a {FORMAT} state file")
    return unflatten_state(tensors, data["state"], str(folder / name))


# --- random states ---------------------------------------------------------------------------


def capture_rng(generators: Mapping[str, torch.Generator]) -> dict[str, Any]:
    """Every random state the run depends on (global ones and the run's generators)."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),  # noqa: NPY002 - saved so third-party use resumes too
        "python": random.getstate(),
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(
    state: Mapping[str, Any], generators: Mapping[str, torch.Generator], where: str
) -> None:
    """Put back what :func:`capture_rng` captured.

    Raises:
        CheckpointError: a generator of the run has no saved state.
    """
    missing = [k for k in ("torch", "numpy", "python", "generators") if k not in state]
    missing += [f"generators.{n}" for n in generators if n not in state.get("generators", {})]
    if missing:
        raise CheckpointError(f"{where}: random state lacks {', '.join(missing)}")
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    for name, generator in generators.items():
        generator.set_state(state["generators"][name])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- folders ---------------------------------------------------------------------------------


def checkpoint_step(path: Path) -> int | None:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: Path) -> tuple[list[Path], list[Path]]:
    """``(complete, incomplete)`` checkpoint folders of a run, each sorted by step."""
    complete, incomplete = [], []
    if Path(output_dir).is_dir():
        for path in Path(output_dir).iterdir():
            if path.is_dir() and checkpoint_step(path) is not None:
                (complete if (path / COMPLETE).is_file() else incomplete).append(path)
    key = checkpoint_step
    return sorted(complete, key=key), sorted(incomplete, key=key)  # type: ignore[arg-type]


def resolve_resume(output_dir: Path, resume: str) -> Path | None:
    """The checkpoint folder ``resume`` names: ``"latest"`` (the newest complete one, or
    ``None`` when the run has none yet) or a path.

    Raises:
        CheckpointError: the path does not exist or is not complete.
    """
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"{path}: checkpoint folder does not exist")
        return path
    complete, incomplete = list_checkpoints(output_dir)
    newest_complete = checkpoint_step(complete[-1]) if complete else -1
    for path in incomplete:
        if (checkpoint_step(path) or 0) > newest_complete:
            logger.warning(
                "skipping %s: half-written (no %s marker); it is never resumed from", path, COMPLETE
            )
    if not complete:
        logger.warning(
            "--resume latest: %s holds no complete checkpoint; starting a new run", output_dir
        )
        return None
    return complete[-1]


def verify_checkpoint(path: Path, required: list[str]) -> dict[str, Any]:
    """Check a checkpoint folder before anything is loaded from it.

    Raises:
        CheckpointError: no COMPLETE marker, a pickle file, a required file missing, a file
            whose size or sha256 differs from the marker's record.
    """
    pickles = sorted(p.name for p in path.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{path}: holds pickle file(s) {', '.join(pickles)}; synthlesion never unpickles "
            "(loading a pickle can run arbitrary code). Only synthlesion checkpoints "
            "(safetensors + JSON) can be resumed"
        )
    marker = path / COMPLETE
    if not marker.is_file():
        raise CheckpointError(
            f"{path}: no {COMPLETE} marker; the checkpoint is half-written "
            "(the run was killed while saving) and cannot be resumed"
        )
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
        files = dict(info["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{marker}: unreadable marker ({exc})") from None
    missing = [name for name in required if name not in files or not (path / name).is_file()]
    if missing:
        kind = "random-state" if any(m.startswith("rng_state") for m in missing) else "required"
        raise CheckpointError(
            f"{path}: missing {kind} file(s) {', '.join(missing)}; resuming without them would "
            "not reproduce the run"
        )
    for name, (size, digest) in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} listed in {COMPLETE} is missing")
        if file.stat().st_size != size or sha256_file(file) != digest:
            raise CheckpointError(
                f"{file}: content differs from the {COMPLETE} record (damaged or edited)"
            )
    return info


def write_checkpoint(
    output_dir: Path,
    step: int,
    writers: list[Callable[[Path], None]],
    *,
    is_main: bool,
    barrier: Callable[[], None],
    rank_writer: Callable[[Path], None],
    total_limit: int | None,
    info: Mapping[str, Any],
) -> Path:
    """Write ``checkpoint-{step}`` safely and prune old ones; every process must call this.

    Args:
        output_dir: The run folder.
        step: Optimizer step count.
        writers: Main-process writers, each given the temporary folder.
        is_main: Whether this is the main process.
        barrier: Waits for every process (``accelerator.wait_for_everyone``).
        rank_writer: This process's own writer (its RNG state).
        total_limit: Complete checkpoints kept; ``None`` keeps all.
        info: Extra facts for the COMPLETE marker.

    Returns:
        The final folder.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    if (final / COMPLETE).is_file():
        return final  # this step is already saved (e.g. periodic save, then a signal)
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    try:
        rank_writer(tmp)
        if is_main:
            for writer in writers:
                writer(tmp)
        barrier()
        if is_main:
            files = {p.name: [p.stat().st_size, sha256_file(p)] for p in sorted(tmp.iterdir())}
            atomic_write_json(
                tmp / COMPLETE, {"format": FORMAT, "step": step, **info, "files": files}
            )
            _fsync_dir(tmp)
            if final.exists():  # an incomplete folder of the same step from a killed run
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(output_dir)
    except BaseException:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if is_main:
        prune(output_dir, total_limit, keep=final)
    barrier()
    return final


def prune(output_dir: Path, total_limit: int | None, keep: Path) -> None:
    """Delete the oldest complete checkpoints beyond ``total_limit`` (never ``keep``) and
    stale temporary folders of earlier saves."""
    for stale in output_dir.glob(".checkpoint-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    if total_limit is None:
        return
    complete, _ = list_checkpoints(output_dir)
    excess = [p for p in complete if p != keep][: max(0, len(complete) - total_limit)]
    for path in excess:
        logger.info("removing old checkpoint %s (checkpoint.total_limit %d)", path, total_limit)
        # Drop the marker first: a removal cut short leaves an incomplete folder, never a
        # "complete" one with files missing.
        with contextlib.suppress(FileNotFoundError):
            (path / COMPLETE).unlink()
        shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --- model weights ----------------------------------------------------------------------------


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and all buffers (frozen pretrained parts are not repeated)."""
    state = {n: p for n, p in model.named_parameters() if p.requires_grad}
    state.update(dict(model.named_buffers()))
    return state


def load_model_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Copy saved tensors into ``model`` exactly.

    Raises:
        CheckpointError: a trainable parameter is missing, or names/shapes do not fit.
    """
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    targets = {**params, **buffers}
    unknown = sorted(set(state) - set(targets))
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in state)
    if unknown or missing:
        raise CheckpointError(
            f"{where}: weights do not fit the model (missing {missing[:5]}, "
            f"unexpected {unknown[:5]})"
        )
    with torch.no_grad():
        for name, value in state.items():
            target = targets[name]
            if tuple(target.shape) != tuple(value.shape):
                raise CheckpointError(
                    f"{where}: {name} has shape {tuple(value.shape)}, the model "
                    f"{tuple(target.shape)}"
                )
            target.copy_(value.to(target.device, target.dtype))
