"""Training lesion diffusion models: the data path (train split only, RAS, resampled,
normalised, cached, cropped around lesions), an accelerate loop with safe resumable
checkpoints, previews, and the exported model with its training record.

Entry points: ``synthlesion train --config configs/X.yaml`` or
``accelerate launch training/train_lesion_diffusion.py --config configs/X.yaml``, or in Python::

    from synthlesion.training import load_train_config, train
    result = train(load_train_config("configs/train_phantom2d_cpu.yaml"), resume="latest")

Names are imported lazily, so ``synthlesion --help`` does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CheckpointError": "synthlesion.training.errors",
    "TrainingAbortedError": "synthlesion.training.errors",
    "TrainingDataError": "synthlesion.training.errors",
    "TrainConfig": "synthlesion.training.config",
    "load_train_config": "synthlesion.training.config",
    "TrainResult": "synthlesion.training.loop",
    "train": "synthlesion.training.loop",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'synthlesion.training' has no attribute {name!r}")
