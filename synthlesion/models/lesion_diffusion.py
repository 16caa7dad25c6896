"""``LesionDiffusionModel``: one model class for every backend (see the issue-4 contract).

Training: ``loss = model.training_loss(batch, generator, lesion_weight, lesion_dilation)``.
Sampling (issue 5): ``x0 = model.encode(image)`` to size the noise, ``cond = model.prepare(batch)``
once, then ``model.predict(x_t, t, cond)`` with any diffusers scheduler built from
``<folder>/scheduler``, and ``model.decode(x0)``.

Model folder (``save_pretrained``), written to a temporary sibling and renamed into place::

    model_config.yaml          resolved ModelConfig (synthlesion.config.save_config)
    scheduler/scheduler_config.json   DDPMScheduler config (prediction type, betas)
    training_record.json       when given (manifest hash, splits hash, hashed patient ids)
    weights.safetensors        pixel backend: the UNet state dict
    unet/ vae/ text_encoder/ tokenizer/ [controlnet/]   latent backends: diffusers /
                               transformers save_pretrained folders (safetensors)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler
from torch import nn

from synthlesion.config import load_config, save_config
from synthlesion.errors import ConfigError
from synthlesion.models.backends import Backend, backend_class
from synthlesion.models.conditioning import (
    PreparedCondition,
    loss_weight_map,
    prediction_target,
    read_batch,
    weighted_mse,
)
from synthlesion.models.errors import BatchError, ModelFolderError
from synthlesion.models.folder import (
    CONFIG_FILE,
    SCHEDULER_DIR,
    SCHEDULER_FILE,
    check_files,
    refuse_pickles,
    staging_folder,
)
from synthlesion.models.model_config import ModelConfig
from synthlesion.provenance.record import TrainingRecord


class LesionDiffusionModel(nn.Module):
    """A mask-conditioned diffusion model that paints (or removes) lesions in a region.

    Args:
        backend: the networks (:class:`~synthlesion.models.backends.Backend`).
        noise_scheduler: the training ``DDPMScheduler`` (its ``prediction_type`` matches the
            config).

    Attributes:
        config: the resolved :class:`ModelConfig`.
        backend: the networks.
        noise_scheduler: the training ``DDPMScheduler``.
    """

    def __init__(self, backend: Backend, noise_scheduler: DDPMScheduler) -> None:
        super().__init__()
        self.backend = backend
        self.noise_scheduler = noise_scheduler
        if noise_scheduler.config.prediction_type != backend.config.prediction_type:
            raise ConfigError(
                f"scheduler prediction_type {noise_scheduler.config.prediction_type!r} differs "
                f"from the model's {backend.config.prediction_type!r}"
            )

    @property
    def config(self) -> ModelConfig:
        """The resolved model config."""
        return self.backend.config

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Float dtype of the parameters (batches are cast to it)."""
        return next(self.parameters()).dtype

    @property
    def latent_factor(self) -> int:
        """Spatial downsampling from image to ``x0`` (1 in pixel space)."""
        return self.backend.factor

    @property
    def x0_channels(self) -> int:
        """Channels of ``x0`` (1 in pixel space, VAE latent channels otherwise)."""
        return self.backend.x0_channels

    # ------------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: ModelConfig) -> LesionDiffusionModel:
        """A new model: random pixel UNet, or the pretrained latent checkpoint adapted.

        Random initialisation uses torch's default generator; seed it (``torch.manual_seed``)
        for a reproducible start.
        """
        backend, scheduler = backend_class(config).build(config)
        return cls(backend, scheduler)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | torch.device | None = None
    ) -> LesionDiffusionModel:
        """Load a folder written by :meth:`save_pretrained` (safetensors only).

        Args:
            path: the model folder.
            device: where to put the model (default: CPU).

        Raises:
            ModelFolderError: not a folder, not a synthlesion model (no ``model_config.yaml``),
                a missing file, a pickle weight file, weights that do not fit the config.
            ConfigError: ``model_config.yaml`` is invalid.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise ModelFolderError(folder, "no such model folder")
        refuse_pickles(folder)
        if not (folder / CONFIG_FILE).is_file():
            hint = ""
            if (folder / "unet").is_dir() or (folder / "model_index.json").is_file():
                hint = (
                    "; it looks like a diffusers checkpoint: start from it with "
                    "ModelConfig(backend='latent_inpaint', pretrained_path=...)"
                )
            raise ModelFolderError(
                folder, f"not a synthlesion model folder (missing file {CONFIG_FILE}){hint}"
            )
        config = load_config(ModelConfig, folder / CONFIG_FILE)
        kind = backend_class(config)
        check_files(folder, [SCHEDULER_FILE, *kind.required_files(config)])
        try:
            scheduler = DDPMScheduler.from_pretrained(
                str(folder / SCHEDULER_DIR), local_files_only=True
            )
        except (OSError, ValueError) as exc:
            raise ModelFolderError(folder, f"cannot read {SCHEDULER_FILE}: {exc}") from None
        if scheduler.config.prediction_type != config.prediction_type:
            raise ModelFolderError(
                folder,
                f"{SCHEDULER_FILE} predicts {scheduler.config.prediction_type!r} but "
                f"{CONFIG_FILE} says {config.prediction_type!r}",
            )
        model = cls(kind.load(config, folder), scheduler)
        return model.to(device or "cpu")

    def save_pretrained(
        self, path: str | Path, training_record: Mapping[str, Any] | None = None
    ) -> Path:
        """Write the model folder atomically (temporary sibling, then rename).

        Args:
            path: destination folder; an existing synthlesion model folder there is replaced.
            training_record: JSON-serialisable provenance from the training code (dataset
                manifest hash, splits hash, hashed patient ids), written as
                ``training_record.json``.

        Returns:
            ``path``.
        """
        path = Path(path)
        with staging_folder(path) as staging:
            save_config(self.config, staging / CONFIG_FILE)
            self.noise_scheduler.save_pretrained(str(staging / SCHEDULER_DIR))
            self.backend.save(staging)
            if training_record is not None:
                TrainingRecord(dict(training_record)).write(staging)
        return path

    # ----------------------------------------------------------------------------- training
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters to optimise (VAE, text encoder, base UNet under ControlNet excluded)."""
        return self.backend.trainable_parameters()

    def enable_gradient_checkpointing(self) -> None:
        """Trade compute for memory in the trained network."""
        self.backend.enable_gradient_checkpointing()

    def training_loss(
        self,
        batch: Mapping[str, Any],
        generator: torch.Generator | None = None,
        lesion_weight: float = 1.0,
        lesion_dilation: int = 0,
    ) -> torch.Tensor:
        """Weighted denoising loss on one batch.

        Draws ``t ~ U{0, T-1}`` and Gaussian noise from ``generator`` (and, for latent
        backends, the VAE latent sample), noises ``x0 = encode(image)``, and returns
        ``sum(w * (model(x_t) - target)^2) / sum(w)`` with target epsilon or v and
        ``w = 1 + (lesion_weight - 1) * dilate(region | lesion, lesion_dilation)`` max-pooled
        to the model's resolution.

        Args:
            batch: the contract batch ("image", "region", "lesion", and "class_labels",
                "attributes", "prompt" when used); see :func:`read_batch`.
            generator: owns the randomness; ``None`` uses torch's default generator.
            lesion_weight: extra weight inside the (dilated) region/lesion (> 0).
            lesion_dilation: dilation radius in image pixels/voxels (>= 0).

        Returns:
            Scalar float32 loss.
        """
        inputs = read_batch(batch, self.config, self.device, self.dtype)
        cond = self.backend.prepare(inputs)
        x0 = self.backend.encode(inputs.image, generator=generator)
        draw_on = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(x0.shape, generator=generator, device=draw_on)
        noise = noise.to(x0.device, x0.dtype)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (x0.shape[0],), generator=generator, device=draw_on)
        timesteps = timesteps.to(x0.device)
        noisy = self.noise_scheduler.add_noise(x0, noise, timesteps)
        target = prediction_target(self.noise_scheduler, x0, noise, timesteps)
        output = self.backend(noisy, timesteps, cond)
        weight = loss_weight_map(
            inputs.region, inputs.lesion, lesion_weight, lesion_dilation, self.backend.factor
        )
        return weighted_mse(output, target, weight)

    def forward(
        self,
        batch: Mapping[str, Any],
        generator: torch.Generator | None = None,
        lesion_weight: float = 1.0,
        lesion_dilation: int = 0,
    ) -> torch.Tensor:
        """Same as :meth:`training_loss` (so DDP / accelerate wrappers can call the model)."""
        return self.training_loss(batch, generator, lesion_weight, lesion_dilation)

    # ----------------------------------------------------------------------------- sampling
    def encode(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, C, *S) image in [-1, 1] -> (B, x0_channels, *(S // latent_factor)) ``x0``.

        Identity in pixel space; scaled VAE latents (mode, or a sample when ``generator`` is
        given) in latent space.
        """
        return self.backend.encode(image.to(self.device, self.dtype), generator=generator)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """(B, x0_channels, *s) ``x0`` -> (B, C, *(s * latent_factor)) image (not clamped)."""
        return self.backend.decode(x0.to(self.device, self.dtype))

    def prepare(self, batch: Mapping[str, Any]) -> PreparedCondition:
        """Validate ``batch`` and build its conditioning once (reuse it over sampling steps).

        ``batch`` needs "image" (for the context), "region", "lesion", and "class_labels",
        "attributes", "prompt" when the model uses them.
        """
        return self.backend.prepare(read_batch(batch, self.config, self.device, self.dtype))

    def predict(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor | int,
        batch: Mapping[str, Any] | PreparedCondition,
    ) -> torch.Tensor:
        """The model output (epsilon or v, per ``config.prediction_type``) for ``x_t``.

        Args:
            noisy: (B, x0_channels, *s) noisy ``x_t``.
            timesteps: (B,) or scalar timesteps.
            batch: a contract batch, or the result of :meth:`prepare` (cheaper when sampling).

        Returns:
            (B, x0_channels, *s) model output.
        """
        cond = batch if isinstance(batch, PreparedCondition) else self.prepare(batch)
        noisy = noisy.to(self.device, self.dtype)
        if cond.spatial.shape[0] != noisy.shape[0] or cond.spatial.shape[2:] != noisy.shape[2:]:
            raise BatchError(
                f"noisy {tuple(noisy.shape)} does not match the conditioning "
                f"{tuple(cond.spatial.shape)} (batch and spatial size)"
            )
        t = torch.as_tensor(timesteps, device=self.device)
        if t.ndim == 0:
            t = t.expand(noisy.shape[0])
        return self.backend(noisy, t, cond)
