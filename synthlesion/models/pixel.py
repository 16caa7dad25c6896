"""Pixel-space backend: a UNet on the image itself, 2D (diffusers or MONAI) or 3D (MONAI).

UNet input, channel order: ``[x_t (C), context (C), region (1), lesion (K), attributes (A)]``,
so ``in_channels = 2C + 1 + K + A``; output: C channels (epsilon or v). All C image channels
(MRI sequences, CT phases) are denoised jointly by one network, so a lesion is consistent in
position and appearance across them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel
from monai.networks.nets import DiffusionModelUNet
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from synthlesion.models.backends import Backend, checkpoint_module_forward
from synthlesion.models.conditioning import (
    ConditionInputs,
    PreparedCondition,
    attribute_channels,
)
from synthlesion.models.errors import ModelFolderError
from synthlesion.models.folder import WEIGHTS_FILE
from synthlesion.models.model_config import ModelConfig


def pixel_in_channels(config: ModelConfig) -> int:
    """UNet input channels: C x_t, C context, region, K lesion channels, A attribute channels."""
    return 2 * config.image_channels + 1 + config.lesion_classes + config.num_attributes


def make_pixel_unet(config: ModelConfig) -> nn.Module:
    """A freshly initialised denoising UNet for ``config`` (diffusers 2D or MONAI 2D/3D)."""
    in_channels = pixel_in_channels(config)
    if config.network == "diffusers":
        levels = config.attention_levels
        return UNet2DModel(
            sample_size=config.sample_size,
            in_channels=in_channels,
            out_channels=config.image_channels,
            block_out_channels=tuple(config.channels),
            layers_per_block=config.layers_per_block,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in levels),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(levels)),
            norm_num_groups=config.norm_num_groups,
            attention_head_dim=config.attention_head_dim,
            num_class_embeds=config.num_class_embeds,
        )
    return DiffusionModelUNet(
        spatial_dims=config.spatial_dims,
        in_channels=in_channels,
        out_channels=config.image_channels,
        num_res_blocks=config.layers_per_block,
        channels=tuple(config.channels),
        attention_levels=tuple(config.attention_levels),
        norm_num_groups=config.norm_num_groups,
        num_head_channels=config.attention_head_dim,
        num_class_embeds=config.num_class_embeds,
    )


def make_pixel_scheduler(config: ModelConfig) -> DDPMScheduler:
    """The training DDPM scheduler of a pixel model (samples clipped to [-1, 1])."""
    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        prediction_type=config.prediction_type,
        clip_sample=True,
    )


class PixelBackend(Backend):
    """A pixel-space denoiser; ``x0`` is the image, ``factor`` 1.

    Args:
        config: model config with ``backend == "pixel"``.
        unet: the network from :func:`make_pixel_unet`.
    """

    def __init__(self, config: ModelConfig, unet: nn.Module) -> None:
        super().__init__(config)
        self.unet = unet
        self.x0_channels = config.image_channels

    def encode(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Identity: (B, C, *S) -> (B, C, *S)."""
        return image

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Identity: (B, C, *S) -> (B, C, *S)."""
        return x0

    def prepare(self, inputs: ConditionInputs) -> PreparedCondition:
        """(B, C + 1 + K + A, *S) spatial conditioning: context, region, lesion, attributes."""
        parts = [inputs.context, inputs.region, inputs.lesion]
        if inputs.attributes is not None:
            parts.append(attribute_channels(inputs.attributes, inputs.image.shape[2:]))
        return PreparedCondition(spatial=torch.cat(parts, dim=1), class_labels=inputs.class_labels)

    def forward(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: PreparedCondition
    ) -> torch.Tensor:
        """(B, C, *S) x_t, (B,) timesteps -> (B, C, *S) prediction."""
        x = torch.cat([noisy, cond.spatial.to(noisy.dtype)], dim=1)
        if isinstance(self.unet, UNet2DModel):
            return self.unet(x, timesteps, class_labels=cond.class_labels).sample
        return self.unet(x, timesteps, class_labels=cond.class_labels)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter of the UNet."""
        return [p for p in self.parameters() if p.requires_grad]

    def enable_gradient_checkpointing(self) -> None:
        """diffusers' switch for UNet2DModel; per-block checkpointing for MONAI."""
        if isinstance(self.unet, UNet2DModel):
            self.unet.enable_gradient_checkpointing()
            return
        for block in [*self.unet.down_blocks, self.unet.middle_block, *self.unet.up_blocks]:
            checkpoint_module_forward(block)

    def save(self, folder: Path) -> None:
        """``weights.safetensors``: the UNet state dict (keys ``unet.*``)."""
        save_model(
            self,
            str(folder / WEIGHTS_FILE),
            metadata={"format": "pt", "synthlesion_backend": "pixel"},
        )

    @staticmethod
    def required_files(config: ModelConfig) -> list[str]:
        """``weights.safetensors``."""
        return [WEIGHTS_FILE]

    @classmethod
    def build(cls, config: ModelConfig) -> tuple[PixelBackend, DDPMScheduler]:
        """A randomly initialised UNet (torch's default generator) and its scheduler."""
        return cls(config, make_pixel_unet(config)), make_pixel_scheduler(config)

    @classmethod
    def load(cls, config: ModelConfig, folder: Path) -> PixelBackend:
        """The UNet of ``config`` with the weights of ``folder/weights.safetensors``."""
        backend = cls(config, make_pixel_unet(config))
        path = folder / WEIGHTS_FILE
        try:
            missing, unexpected = load_model(backend, str(path), strict=False)
        except SafetensorError as exc:  # truncated, not safetensors (a pickle), corrupt
            raise ModelFolderError(
                folder,
                f"{WEIGHTS_FILE} is not a readable safetensors file ({exc}); nothing "
                "was executed (pickled weights are never loaded)",
            ) from None
        except (RuntimeError, OSError, ValueError) as exc:
            raise ModelFolderError(
                folder, f"{WEIGHTS_FILE} does not fit {config.backend} model_config.yaml: {exc}"
            ) from None
        if missing or unexpected:
            raise ModelFolderError(
                folder,
                f"{WEIGHTS_FILE} does not fit model_config.yaml: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}",
            )
        return backend
