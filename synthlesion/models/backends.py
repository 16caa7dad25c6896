"""The backend interface shared by pixel-space and latent-space models, and its factory.

A backend owns the networks and knows its space: ``encode`` maps an image to the diffusion
variable ``x0`` (identity in pixel space, scaled VAE latents in latent space), ``prepare``
turns validated conditioning into tensors at the model's resolution, and ``forward`` runs the
denoiser. :class:`~synthlesion.models.lesion_diffusion.LesionDiffusionModel` adds the noise
schedule, the loss and the model folder on top, identically for every backend.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler
from torch import nn
from torch.utils.checkpoint import checkpoint

from synthlesion.models.conditioning import ConditionInputs, PreparedCondition
from synthlesion.models.model_config import ModelConfig


class Backend(nn.Module, ABC):
    """Networks of one backend behind one interface (2D or 3D).

    Attributes:
        config: the resolved model config.
        factor: spatial downsampling from image to ``x0`` (1 in pixel space, the VAE factor
            in latent space).
        x0_channels: channels of ``x0`` (C, the image channels, in pixel space; the VAE latent
            channels otherwise).
    """

    factor: int = 1
    x0_channels: int = 1

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config

    @abstractmethod
    def encode(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, C, *S) image in [-1, 1] -> (B, x0_channels, *(S // factor)) ``x0``."""

    @abstractmethod
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """(B, x0_channels, *s) ``x0`` -> (B, C, *S) image (not clamped)."""

    @abstractmethod
    def prepare(self, inputs: ConditionInputs) -> PreparedCondition:
        """Conditioning at the model's resolution (see :class:`PreparedCondition`)."""

    @abstractmethod
    def forward(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: PreparedCondition
    ) -> torch.Tensor:
        """(B, x0_channels, *s) noisy ``x_t`` and (B,) timesteps -> same-shape prediction."""

    @abstractmethod
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimiser updates (frozen components excluded)."""

    @abstractmethod
    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in the backward pass to save memory."""

    @abstractmethod
    def save(self, folder: Path) -> None:
        """Write the networks' weights (safetensors) and configs into ``folder``."""

    @staticmethod
    @abstractmethod
    def required_files(config: ModelConfig) -> list[str]:
        """Files (relative paths) a saved folder of this backend must hold."""

    @classmethod
    @abstractmethod
    def build(cls, config: ModelConfig) -> tuple[Backend, DDPMScheduler]:
        """New networks (pixel) or pretrained ones (latent) plus the training scheduler.

        The returned backend's ``config`` is the *resolved* config (e.g. the noise schedule
        of a pretrained checkpoint), which is what gets saved.
        """

    @classmethod
    @abstractmethod
    def load(cls, config: ModelConfig, folder: Path) -> Backend:
        """Networks read back from a saved model folder."""


def checkpoint_module_forward(module: nn.Module) -> None:
    """Make ``module`` recompute its activations in backward (non-reentrant checkpointing).

    Wraps the instance's ``forward`` (parameter names and the state dict are unchanged); active
    only in training mode with gradients enabled. Used for MONAI blocks, which have no
    built-in switch; diffusers models use their own ``enable_gradient_checkpointing``.
    """
    if getattr(module, "_synthlesion_checkpointed", False):
        return
    original = module.forward

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        if module.training and torch.is_grad_enabled():
            return checkpoint(original, *args, use_reentrant=False, **kwargs)
        return original(*args, **kwargs)

    module.forward = forward  # type: ignore[method-assign]
    module._synthlesion_checkpointed = True  # type: ignore[assignment]


def backend_class(config: ModelConfig) -> type[Backend]:
    """The backend class for ``config.backend``."""
    if config.backend == "pixel":
        from synthlesion.models.pixel import PixelBackend

        return PixelBackend
    from synthlesion.models.latent import LatentBackend

    return LatentBackend
