"""The model config: one frozen dataclass for every backend (pixel 2D/3D, latent, ControlNet)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from synthlesion.errors import ConfigError

Backend = Literal["pixel", "latent_inpaint", "controlnet"]
PredictionType = Literal["epsilon", "v_prediction"]


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a :class:`LesionDiffusionModel` (saved as ``model_config.yaml``).

    Attributes:
        backend: ``"pixel"`` (a UNet on the image itself, 2D or 3D), ``"latent_inpaint"``
            (fine-tuning a Stable-Diffusion-inpainting-layout checkpoint) or ``"controlnet"``
            (a ControlNet on a frozen base UNet of such a checkpoint). Latent backends are 2D.
        spatial_dims: 2 or 3.
        image_channels: C, the image channels generated jointly (MRI sequences, CT phases;
            1 for a single image). The pixel backend sees and predicts all C; the latent
            backends map up to 3 channels onto the VAE's RGB input.
        lesion_classes: K, the number of lesion mask channels (>= 1).
        num_class_embeds: number of lesion classes for the class embedding; ``None`` = off.
        num_attributes: A, the number of scalar attributes (e.g. lesion volume fraction, mean
            intensity), fed as A constant input channels; 0 = off.
        prediction_type: ``"epsilon"`` or ``"v_prediction"``.
        pixel_network: pixel backend only: ``"auto"`` (diffusers ``UNet2DModel`` in 2D, MONAI
            ``DiffusionModelUNet`` in 3D), ``"diffusers"`` (2D only) or ``"monai"`` (2D or 3D).
        sample_size: pixel backend: image side in pixels (stored in the diffusers UNet config).
        channels: pixel backend: feature channels per resolution level.
        attention_levels: pixel backend: self-attention at each level (same length as channels).
        layers_per_block: pixel backend: residual blocks per level.
        norm_num_groups: pixel backend: GroupNorm groups (must divide every entry of channels).
        attention_head_dim: pixel backend: channels per attention head.
        num_train_timesteps, beta_schedule, beta_start, beta_end: the DDPM noise schedule. For
            latent backends they are replaced by the pretrained checkpoint's scheduler values
            (the resolved config saved with the model holds those).
        pretrained_path: latent backends: local diffusers-layout folder (``unet/``, ``vae/``,
            ``text_encoder/``, ``tokenizer/``, ``scheduler/``), read once by ``from_config``.
        default_prompt: latent backends: the prompt used when a batch carries none.
        controlnet_embedding_channels: ControlNet conditioning-embedding channels; ``None``
            picks (16, 32, 96, 256) cut or extended to log2(VAE downsampling) + 1 entries.
    """

    backend: Backend = "pixel"
    spatial_dims: int = 2
    image_channels: int = 1
    lesion_classes: int = 1
    num_class_embeds: int | None = None
    num_attributes: int = 0
    prediction_type: PredictionType = "epsilon"
    pixel_network: Literal["auto", "diffusers", "monai"] = "auto"
    sample_size: int = 64
    channels: tuple[int, ...] = (64, 128, 256, 256)
    attention_levels: tuple[bool, ...] = (False, False, True, True)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    attention_head_dim: int = 8
    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"] = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    pretrained_path: str | None = None
    default_prompt: str = ""
    controlnet_embedding_channels: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.spatial_dims not in (2, 3):
            problems.append(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if self.image_channels < 1:
            problems.append(f"image_channels must be >= 1, got {self.image_channels}")
        if self.lesion_classes < 1:
            problems.append(f"lesion_classes must be >= 1, got {self.lesion_classes}")
        if self.num_class_embeds is not None and self.num_class_embeds < 1:
            problems.append(f"num_class_embeds must be >= 1 or null, got {self.num_class_embeds}")
        if self.num_attributes < 0:
            problems.append(f"num_attributes must be >= 0, got {self.num_attributes}")
        if self.num_train_timesteps < 1:
            problems.append(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")
        if self.backend == "pixel":
            if len(self.channels) != len(self.attention_levels):
                problems.append(
                    f"channels {list(self.channels)} and attention_levels "
                    f"{list(self.attention_levels)} must have the same length"
                )
            if any(c % self.norm_num_groups for c in self.channels):
                problems.append(
                    f"norm_num_groups {self.norm_num_groups} must divide every entry of "
                    f"channels {list(self.channels)}"
                )
            if self.pixel_network == "diffusers" and self.spatial_dims != 2:
                problems.append("pixel_network 'diffusers' (UNet2DModel) is 2D only; use 'monai'")
        else:
            if self.spatial_dims != 2:
                problems.append(f"backend {self.backend!r} is 2D only (spatial_dims: 2)")
            if self.image_channels > 3:
                problems.append(
                    f"backend {self.backend!r} maps at most 3 image channels onto the VAE's RGB "
                    f"input, got image_channels {self.image_channels}; use the pixel backend"
                )
            if not self.pretrained_path:
                problems.append(f"backend {self.backend!r} needs pretrained_path (a local folder)")
        if problems:
            raise ConfigError("model config: " + "; ".join(problems))

    @property
    def network(self) -> Literal["diffusers", "monai"]:
        """The pixel-space network family actually used (``auto`` resolved)."""
        if self.pixel_network == "auto":
            return "diffusers" if self.spatial_dims == 2 else "monai"
        return self.pixel_network

    def replace(self, **changes: object) -> ModelConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
