"""Latent-space backends on a Stable-Diffusion-inpainting-layout checkpoint (2D only).

Components, read from a local diffusers folder with each component's ``from_pretrained``:
``unet/`` (``UNet2DConditionModel``), ``vae/`` (``AutoencoderKL``), ``text_encoder/``
(``CLIPTextModel``), ``tokenizer/`` (``CLIPTokenizer``), ``scheduler/`` (any diffusers
scheduler config; its noise schedule is kept, the training scheduler is a ``DDPMScheduler``).
Only safetensors weights are ever loaded.

Grayscale/HU images (already windowed to [-1, 1]) enter the VAE as float, repeated to its 3
channels (never through 8-bit RGB); decoding averages the 3 output channels. Images of 2 or 3
channels (MRI sequences, CT phases) are mapped onto the RGB input (:func:`to_vae_rgb`) and read
back from it; more than 3 are refused (``ModelConfig`` check): use the pixel backend. Masks reach latent
resolution by max-pooling (:func:`~synthlesion.models.conditioning.downsample_mask`).

``latent_inpaint``: the UNet is fine-tuned. Its input is, in the diffusers inpainting-pipeline
order, ``[x_t (L), region (1), context latent (L), lesion (K), attributes (A)]``. A plain
(``L``) or SD-inpainting (``2L + 1``) ``conv_in`` is widened to ``2L + 1 + K + A`` channels,
the new weights zero so the pretrained behaviour is unchanged at step 0. With
``num_class_embeds`` a zero-initialised class embedding is added to the time embedding.

``controlnet``: ``ControlNetModel.from_unet(base_unet)`` on a FROZEN base UNet, which keeps the
input it was trained with (``L``, ``2L + 1`` or ``2L + 1 + K + A`` channels, as above). The
control image, at image resolution, is ``[region (1), lesion (K), attributes (A)]``, preceded
by the context image (C channels) when the base UNet does not see the context latent. A class embedding,
if asked for and absent from the base, goes into the ControlNet only. The VAE and the text
encoder are always frozen.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
from safetensors import SafetensorError
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as hf_logging

from synthlesion.errors import ConfigError
from synthlesion.models.backends import Backend
from synthlesion.models.conditioning import (
    ConditionInputs,
    PreparedCondition,
    attribute_channels,
    downsample_mask,
)
from synthlesion.models.errors import BatchError, ModelFolderError
from synthlesion.models.folder import SCHEDULER_FILE, check_component, check_files
from synthlesion.models.model_config import ModelConfig

logger = logging.getLogger(__name__)

_DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
_COMPONENTS = {  # subfolder -> (kind, weights file name)
    "unet": ("model", _DIFFUSERS_WEIGHTS),
    "vae": ("model", _DIFFUSERS_WEIGHTS),
    "text_encoder": ("model", "model.safetensors"),
    "tokenizer": ("tokenizer", ""),
}
_DEFAULT_EMBEDDING_CHANNELS = (16, 32, 96, 256)


def _components(config: ModelConfig, with_controlnet: bool) -> dict[str, tuple[str, str]]:
    parts = dict(_COMPONENTS)
    if with_controlnet and config.backend == "controlnet":
        parts["controlnet"] = ("model", _DIFFUSERS_WEIGHTS)
    return parts


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Silence transformers' per-file progress bars (the library prints none of its own)."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _load_components(config: ModelConfig, root: Path, with_controlnet: bool) -> dict:
    """Check then load each component of a diffusers-layout folder (safetensors only)."""
    for sub, (kind, weights) in _components(config, with_controlnet).items():
        check_component(root, sub, kind, weights)
    loaders = {
        "unet": UNet2DConditionModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel,
        "tokenizer": CLIPTokenizer,
        "controlnet": ControlNetModel,
    }
    loaded = {}
    for sub in _components(config, with_controlnet):
        kwargs = {"local_files_only": True}
        if sub != "tokenizer":
            kwargs["use_safetensors"] = True
        try:
            with _no_progress_bars():
                loaded[sub] = loaders[sub].from_pretrained(str(root / sub), **kwargs)
        except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
            raise ModelFolderError(root, f"cannot load {sub}/: {exc}") from None
    return loaded


def to_vae_rgb(image: torch.Tensor) -> torch.Tensor:
    """Map C <= 3 image channels onto a VAE's 3 RGB input channels.

    C = 1 is repeated (grey), C = 2 fills the third channel with the mean of the two, C = 3 is
    used as it is. Values stay float in [-1, 1] (never 8-bit).

    Args:
        image: (B, C, H, W) with C in 1..3.

    Returns:
        (B, 3, H, W).
    """
    c = image.shape[1]
    if c == 1:
        return image.repeat(1, 3, 1, 1)
    if c == 2:
        return torch.cat([image, image.mean(dim=1, keepdim=True)], dim=1)
    if c == 3:
        return image
    raise BatchError(f"a VAE takes at most 3 image channels, got {c}")


def from_vae_rgb(rgb: torch.Tensor, channels: int) -> torch.Tensor:
    """Inverse of :func:`to_vae_rgb`: (B, 3, H, W) -> (B, C, H, W); C = 1 averages the three."""
    if channels == 1:
        return rgb.mean(dim=1, keepdim=True)
    return rgb[:, :channels]


def widen_conv_in(unet: UNet2DConditionModel, in_channels: int) -> None:
    """Give ``unet.conv_in`` more input channels; the new weights are zero.

    The old weights keep their channel positions (the first ``old`` inputs), so the UNet
    computes exactly what it did as long as the new channels are ignored (zero weights).

    Args:
        unet: a diffusers conditional UNet, modified in place (config updated too).
        in_channels: the new number of input channels (>= the old one).
    """
    old = unet.conv_in
    if in_channels == old.in_channels:
        return
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        old.kernel_size,
        old.stride,
        old.padding,
        bias=old.bias is not None,
    ).to(old.weight.device, old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels] = old.weight
        if old.bias is not None:
            new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=in_channels)


def add_class_embedding(model: UNet2DConditionModel | ControlNetModel, num_classes: int) -> None:
    """Add a zero-initialised ``nn.Embedding`` class embedding (summed to the time embedding).

    The config records ``num_class_embeds`` so that ``from_pretrained`` rebuilds it.
    """
    dim = model.time_embedding.linear_2.out_features
    embedding = nn.Embedding(num_classes, dim).to(model.time_embedding.linear_2.weight.device)
    nn.init.zeros_(embedding.weight)
    model.class_embedding = embedding
    model.register_to_config(num_class_embeds=num_classes)


def _check_class_embedding(model: nn.Module, config: ModelConfig, name: str) -> bool:
    """Whether ``model`` has a usable class embedding; raise when it contradicts ``config``."""
    embedding = getattr(model, "class_embedding", None)
    if embedding is None:
        return False
    if not isinstance(embedding, nn.Embedding):
        raise ConfigError(f"{name}: class embedding {type(embedding).__name__} is not supported")
    if config.num_class_embeds != embedding.num_embeddings:
        raise ConfigError(
            f"{name} has a class embedding of {embedding.num_embeddings} classes "
            f"but num_class_embeds is {config.num_class_embeds}"
        )
    return True


class LatentBackend(Backend):
    """SD-inpainting-layout latent diffusion (``latent_inpaint``) or ControlNet (``controlnet``).

    Args:
        config: resolved model config (``backend`` is ``latent_inpaint`` or ``controlnet``).
        unet: the (trainable or frozen base) conditional UNet, input already widened.
        vae: frozen ``AutoencoderKL`` (3 image channels).
        text_encoder: frozen ``CLIPTextModel``.
        tokenizer: its ``CLIPTokenizer``.
        controlnet: the trainable ControlNet (``controlnet`` backend) else ``None``.
        source: the folder the components came from (named in errors).
    """

    def __init__(
        self,
        config: ModelConfig,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        controlnet: ControlNetModel | None = None,
        source: Path | None = None,
    ) -> None:
        super().__init__(config)
        where = source or Path(config.pretrained_path or ".")
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer = tokenizer
        self.controlnet = controlnet
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.x0_channels = vae.config.latent_channels
        if vae.config.in_channels != 3:
            raise ModelFolderError(
                where, f"vae/ takes {vae.config.in_channels} channels, expected 3"
            )
        extra = config.lesion_classes + config.num_attributes
        n, lat = unet.config.in_channels, self.x0_channels
        layouts = {lat: "plain", 2 * lat + 1: "inpaint", 2 * lat + 1 + extra: "full"}
        if n not in layouts or (controlnet is None and layouts[n] != "full"):
            raise ModelFolderError(
                where,
                f"unet/ has {n} input channels; expected {2 * lat + 1 + extra} "
                f"(latent {lat} + region 1 + context latent {lat} + K {config.lesion_classes}"
                f" + A {config.num_attributes})"
                + (f", {lat} or {2 * lat + 1}" if controlnet else ""),
            )
        self.unet_layout = layouts[n]
        for frozen in self.frozen_modules():
            frozen.requires_grad_(False)
            frozen.eval()

    # ----------------------------------------------------------------------------- structure
    def frozen_modules(self) -> list[nn.Module]:
        """VAE, text encoder, and the base UNet under a ControlNet."""
        frozen: list[nn.Module] = [self.vae, self.text_encoder]
        if self.controlnet is not None:
            frozen.append(self.unet)
        return frozen

    def train(self, mode: bool = True) -> LatentBackend:
        """Switch training mode; frozen components always stay in eval mode."""
        super().train(mode)
        for frozen in self.frozen_modules():
            frozen.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The UNet's (``latent_inpaint``) or the ControlNet's (``controlnet``) parameters."""
        trained = self.unet if self.controlnet is None else self.controlnet
        return [p for p in trained.parameters() if p.requires_grad]

    def enable_gradient_checkpointing(self) -> None:
        """diffusers' checkpointing on the trained network (and the base UNet it feeds)."""
        self.unet.enable_gradient_checkpointing()
        if self.controlnet is not None:
            self.controlnet.enable_gradient_checkpointing()

    # ------------------------------------------------------------------------------ spaces
    def encode(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, C, H, W) image in [-1, 1] -> (B, L, H / f, W / f) scaled VAE latents.

        The C <= 3 image channels are mapped onto the VAE's RGB input by :func:`to_vae_rgb`.

        Args:
            image: float image; H and W divisible by the VAE factor f.
            generator: draws from the latent distribution when given; ``None`` takes its mode
                (deterministic, used for the context).
        """
        c = self.config.image_channels
        if image.ndim != 4 or image.shape[1] != c or any(s % self.factor for s in image.shape[2:]):
            raise BatchError(
                f"latent encode needs (B, {c}, H, W) with H, W divisible by "
                f"{self.factor}, got {tuple(image.shape)}"
            )
        x = to_vae_rgb(image.to(self.vae.dtype))
        with torch.no_grad():
            dist = self.vae.encode(x).latent_dist
            z = dist.sample(generator=generator) if generator is not None else dist.mode()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (z - shift) * self.vae.config.scaling_factor

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """(B, L, h, w) scaled latents -> (B, C, h * f, w * f) image (:func:`from_vae_rgb`)."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        z = x0.to(self.vae.dtype) / self.vae.config.scaling_factor + shift
        return from_vae_rgb(self.vae.decode(z).sample, self.config.image_channels)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """B prompts -> (B, T, D) CLIP last hidden states (T = tokenizer max length)."""
        length = min(
            self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings
        )
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        ).input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0]

    # ------------------------------------------------------------------------ conditioning
    def prepare(self, inputs: ConditionInputs) -> PreparedCondition:
        """Latent-resolution UNet extras, pixel-resolution control image, text states."""
        f = self.factor
        region = downsample_mask(inputs.region, f)
        latent_shape = region.shape[2:]
        full = [region, self.encode(inputs.context), downsample_mask(inputs.lesion, f)]
        if inputs.attributes is not None:
            full.append(attribute_channels(inputs.attributes, latent_shape))
        parts = {"plain": [], "inpaint": full[:2], "full": full}[self.unet_layout]
        spatial = torch.cat(parts, dim=1) if parts else region[:, :0]
        control = None
        if self.controlnet is not None:
            pieces = [inputs.region, inputs.lesion]
            if self.unet_layout == "plain":  # C context channels
                pieces.insert(0, inputs.context)
            if inputs.attributes is not None:
                pieces.append(attribute_channels(inputs.attributes, inputs.image.shape[2:]))
            control = torch.cat(pieces, dim=1)
        return PreparedCondition(
            spatial=spatial,
            control=control,
            class_labels=inputs.class_labels,
            text=self.encode_prompt(inputs.prompts or [""] * len(region)),
        )

    def forward(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: PreparedCondition
    ) -> torch.Tensor:
        """(B, L, h, w) noisy latents, (B,) timesteps -> (B, L, h, w) prediction."""
        x = torch.cat([noisy, cond.spatial.to(noisy.dtype)], dim=1)
        text = cond.text.to(noisy.dtype)
        unet_labels = cond.class_labels if self.unet.class_embedding is not None else None
        if self.controlnet is None:
            return self.unet(x, timesteps, text, class_labels=unet_labels).sample
        cn_labels = cond.class_labels if self.controlnet.class_embedding is not None else None
        down, mid = self.controlnet(
            x,
            timesteps,
            text,
            controlnet_cond=cond.control.to(noisy.dtype),
            class_labels=cn_labels,
            return_dict=False,
        )
        return self.unet(
            x,
            timesteps,
            text,
            class_labels=unet_labels,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample

    # ----------------------------------------------------------------------------- folders
    def save(self, folder: Path) -> None:
        """``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` (+ ``controlnet/``)."""
        self.unet.save_pretrained(folder / "unet", safe_serialization=True)
        self.vae.save_pretrained(folder / "vae", safe_serialization=True)
        with _no_progress_bars():
            self.text_encoder.save_pretrained(folder / "text_encoder")
        self.tokenizer.save_pretrained(folder / "tokenizer")
        if self.controlnet is not None:
            self.controlnet.save_pretrained(folder / "controlnet", safe_serialization=True)

    @staticmethod
    def required_files(config: ModelConfig) -> list[str]:
        """Each component's config (weights and vocab are checked per component on load)."""
        files = [
            "unet/config.json",
            "vae/config.json",
            "text_encoder/config.json",
            "tokenizer/tokenizer_config.json",
        ]
        if config.backend == "controlnet":
            files.append("controlnet/config.json")
        return files

    @classmethod
    def build(cls, config: ModelConfig) -> tuple[LatentBackend, DDPMScheduler]:
        """Load ``config.pretrained_path``, adapt the UNet or add a ControlNet, freeze the rest.

        Raises:
            ModelFolderError: a missing component file, pickle-only weights, an unexpected
                UNet input width.
            ConfigError: a class embedding in the checkpoint that contradicts the config.
        """
        root = Path(config.pretrained_path or "")
        if not root.is_dir():
            raise ModelFolderError(root, "pretrained_path is not a folder")
        check_files(root, [SCHEDULER_FILE])
        parts = _load_components(config, root, with_controlnet=False)
        scheduler = _training_scheduler(root, config)
        sched = scheduler.config
        config = config.replace(
            num_train_timesteps=sched.num_train_timesteps,
            beta_schedule=sched.beta_schedule,
            beta_start=float(sched.beta_start),
            beta_end=float(sched.beta_end),
        )
        unet, vae = parts["unet"], parts["vae"]
        lat = vae.config.latent_channels
        has_classes = _check_class_embedding(unet, config, "unet/")
        controlnet = None
        if config.backend == "latent_inpaint":
            if unet.config.in_channels in (lat, 2 * lat + 1):
                widen_conv_in(unet, 2 * lat + 1 + config.lesion_classes + config.num_attributes)
            if config.num_class_embeds is not None and not has_classes:
                add_class_embedding(unet, config.num_class_embeds)
        else:
            controlnet = _make_controlnet(config, unet, vae, lat)
        backend = cls(
            config, unet, vae, parts["text_encoder"], parts["tokenizer"], controlnet, source=root
        )
        return backend, scheduler

    @classmethod
    def load(cls, config: ModelConfig, folder: Path) -> LatentBackend:
        """Components read back from a saved model folder."""
        parts = _load_components(config, folder, with_controlnet=True)
        for name in ("unet", "controlnet"):
            if name in parts:
                try:
                    _check_class_embedding(parts[name], config, f"{folder}/{name}")
                except ConfigError as exc:
                    raise ModelFolderError(folder, str(exc)) from None
        return cls(
            config,
            parts["unet"],
            parts["vae"],
            parts["text_encoder"],
            parts["tokenizer"],
            parts.get("controlnet"),
            source=folder,
        )


def _training_scheduler(root: Path, config: ModelConfig) -> DDPMScheduler:
    """A DDPMScheduler with the checkpoint's noise schedule and the config's prediction type."""
    try:
        pretrained = DDPMScheduler.load_config(str(root / "scheduler"))
    except (OSError, ValueError) as exc:
        raise ModelFolderError(root, f"cannot read {SCHEDULER_FILE}: {exc}") from None
    old = pretrained.get("prediction_type", "epsilon")
    if old != config.prediction_type:
        logger.warning(
            "%s was trained for %s; fine-tuning it for %s", root, old, config.prediction_type
        )
    return DDPMScheduler.from_config(
        pretrained, prediction_type=config.prediction_type, clip_sample=False
    )


def _make_controlnet(
    config: ModelConfig, unet: UNet2DConditionModel, vae: AutoencoderKL, lat: int
) -> ControlNetModel:
    """``ControlNetModel.from_unet(unet)`` whose control image is region + lesion (+ extras)."""
    levels = len(vae.config.block_out_channels)  # log2(VAE downsampling) + 1
    channels = config.controlnet_embedding_channels
    if channels is None:
        channels = _DEFAULT_EMBEDDING_CHANNELS[:levels] + (256,) * max(0, levels - 4)
    if len(channels) != levels:
        raise ConfigError(
            f"controlnet_embedding_channels needs {levels} entries (VAE "
            f"downsampling 2^{levels - 1}), got {list(channels)}"
        )
    cond_channels = 1 + config.lesion_classes + config.num_attributes
    if unet.config.in_channels == lat:
        # the base UNet does not see the context: the control image does (C channels)
        cond_channels += config.image_channels
    controlnet = ControlNetModel.from_unet(
        unet,
        conditioning_embedding_out_channels=tuple(channels),
        conditioning_channels=cond_channels,
    )
    if config.num_class_embeds is not None and controlnet.class_embedding is None:
        add_class_embedding(controlnet, config.num_class_embeds)
    return controlnet
