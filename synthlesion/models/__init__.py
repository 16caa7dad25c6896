"""Mask-conditioned diffusion models for synthetic lesions (pixel 2D/3D, latent, ControlNet)."""

from __future__ import annotations

from synthlesion.models.conditioning import (
    CONTEXT_FILL_VALUE,
    ConditionInputs,
    PreparedCondition,
    attribute_channels,
    dilate_mask,
    downsample_mask,
    empty_lesion,
    loss_weight_map,
    make_context,
    prediction_target,
    read_batch,
)
from synthlesion.models.errors import BatchError, ModelFolderError
from synthlesion.models.lesion_diffusion import LesionDiffusionModel
from synthlesion.models.model_config import ModelConfig

__all__ = [
    "CONTEXT_FILL_VALUE",
    "BatchError",
    "ConditionInputs",
    "LesionDiffusionModel",
    "ModelConfig",
    "ModelFolderError",
    "PreparedCondition",
    "attribute_channels",
    "dilate_mask",
    "downsample_mask",
    "empty_lesion",
    "loss_weight_map",
    "make_context",
    "prediction_target",
    "read_batch",
]
