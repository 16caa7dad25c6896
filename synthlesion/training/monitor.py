"""Run-time companions of the training loop: stop signals, the metrics log (JSONL plus
optional TensorBoard through accelerate), and small cross-process helpers."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from synthlesion.config import config_to_dict
from synthlesion.errors import ConfigError
from synthlesion.storage import atomic_write_text
from synthlesion.training.config import TrainConfig

logger = logging.getLogger(__name__)


class StopSignals:
    """First SIGINT/SIGTERM: ask for a checkpoint at the next step boundary; second: abort
    (``KeyboardInterrupt``)."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if self.requested is not None:
            raise KeyboardInterrupt(f"second signal {signal.Signals(signum).name}: aborting")
        self.requested = signum
        logger.warning(
            "%s received: saving a checkpoint at the next step boundary (send it "
            "again to abort without saving)",
            signal.Signals(signum).name,
        )

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class MetricsLog:
    """``metrics.jsonl`` (always, main process) plus accelerate trackers when configured."""

    def __init__(self, path: Path, accelerator: Accelerator, enabled: bool) -> None:
        self.path = path
        self.accelerator = accelerator
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []

    def truncate_after(self, step: int) -> None:
        """Drop rows past ``step`` (left by a run that died after its last checkpoint)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self.accelerator.trackers:
            self.accelerator.log(scalars, step=row["step"])

    def images(self, step: int, pictures: dict[str, Any]) -> None:
        if not self.enabled or not self.accelerator.trackers:
            return
        try:
            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
            for tag, picture in pictures.items():
                writer.add_image(tag, np.asarray(picture), step, dataformats="HWC")
        except Exception as exc:  # a tracker problem never stops training
            logger.debug("could not log images: %s", exc)


def tracker_name(config: TrainConfig) -> str | None:
    installed = importlib.util.find_spec("tensorboard") is not None
    if config.report_to == "tensorboard" and not installed:
        raise ConfigError(
            "report_to is 'tensorboard' but tensorboard is not installed "
            "(pip install 'synthlesion[tensorboard]', or report_to: auto)"
        )
    return "tensorboard" if config.report_to != "none" and installed else None


def make_accelerator(config: TrainConfig) -> Accelerator:
    """The run's Accelerator (mixed precision, optional TensorBoard, project folder)."""
    return Accelerator(
        mixed_precision=config.mixed_precision,
        log_with=tracker_name(config),
        project_dir=str(config.output_dir),
        step_scheduler_with_optimizer=False,
    )


def all_processes(accelerator: Accelerator, flag: bool) -> bool:
    """``flag`` on every process (one tiny all-reduce when there are several)."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([0.0 if flag else 1.0], device=accelerator.device)
    return float(accelerator.reduce(value, "sum")) == 0.0


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    return not all_processes(accelerator, not flag)


def mean_over_processes(accelerator: Accelerator, values: list[float]) -> float:
    value = sum(values) / max(len(values), 1)
    if accelerator.num_processes == 1:
        return value
    return float(accelerator.reduce(torch.tensor([value], device=accelerator.device), "mean"))


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` of a nested dict."""
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}{key}."))
    return flat


def flat_hparams(config: TrainConfig) -> dict[str, Any]:
    """The config as flat scalars (what trackers accept as hyper-parameters)."""
    return {
        k: v if isinstance(v, (int, float, str, bool)) else str(v)
        for k, v in flatten(config_to_dict(config)).items()
    }
