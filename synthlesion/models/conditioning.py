"""Conditioning: one definition of what the model sees, for every backend, 2D and 3D.

The model is asked to paint a region of a real scan. Its inputs are

* the noisy image (or noisy VAE latent) ``x_t``;
* the *context* (the real image with the region to fill blanked, :func:`make_context`);
* the *region* mask (1 = fill here);
* the *lesion* mask, one channel per lesion class (all zero = fill with healthy tissue);
* optionally a lesion class index (a learned class embedding added to the time embedding);
* optionally A scalar *attributes* (e.g. lesion volume fraction, mean intensity), injected as
  A extra constant input channels (:func:`attribute_channels`). Constant channels were chosen
  over an MLP on the time embedding because every backend accepts extra input channels
  without touching diffusers or MONAI internals (pixel UNets: more ``in_channels``; latent
  inpainting UNet: zero-initialised extra ``conv_in`` channels; ControlNet: more control-image
  channels), so attributes mean the same thing everywhere;
* latent backends only: a text prompt through the CLIP text encoder.

Because region and lesion are separate inputs the same model removes lesions (a region with an
empty lesion mask, :func:`empty_lesion`) and can be pretrained self-supervised on healthy scans
(random regions, empty lesion) before fine-tuning on lesions.

Shapes: ``S`` is ``(H, W)`` in 2D and ``(D, H, W)`` in 3D; ``B`` batch, ``K`` lesion classes,
``A`` attributes. Images are float in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from synthlesion.models.errors import BatchError
from synthlesion.models.model_config import ModelConfig

CONTEXT_FILL_VALUE = 0.0
"""Value written into the region in the context. 0 is the middle of the [-1, 1] window, the
value the Stable-Diffusion inpainting checkpoints saw in their masked image; -1 would look like
air/background. The region mask channel tells the model which zeros are blanked."""


def make_context(image: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """The real image with the region to fill blanked (the one definition of the context).

    Args:
        image: (B, C, *S) real image in [-1, 1] (C image channels).
        region: (B, 1, *S) mask, 1 = region to fill (the same region in every channel).

    Returns:
        (B, C, *S) ``image * (1 - region) + CONTEXT_FILL_VALUE * region``.
    """
    return image * (1 - region) + CONTEXT_FILL_VALUE * region


def empty_lesion(region: torch.Tensor, lesion_classes: int) -> torch.Tensor:
    """An all-zero lesion mask for ``region``: asks the model for healthy tissue (lesion removal).

    Args:
        region: (B, 1, *S) region mask.
        lesion_classes: K.

    Returns:
        (B, K, *S) zeros of ``region``'s dtype and device.
    """
    return region.new_zeros((region.shape[0], lesion_classes, *region.shape[2:]))


def _max_pool(mask: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    spatial_dims = mask.ndim - 2
    if spatial_dims not in (2, 3):
        raise BatchError(
            f"mask must be (B, C, *S) with 2 or 3 spatial dims, got {tuple(mask.shape)}"
        )
    pool = F.max_pool2d if spatial_dims == 2 else F.max_pool3d
    return pool(mask, kernel_size=kernel, stride=stride, padding=padding)


def dilate_mask(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Dilate a mask by ``radius`` pixels (max-pool, kernel ``2 * radius + 1``, 2D or 3D).

    Args:
        mask: (B, C, *S) mask (binary or soft; values are only ever maxed).
        radius: dilation in pixels/voxels (>= 0; 0 returns ``mask`` unchanged).

    Returns:
        (B, C, *S) dilated mask.
    """
    if radius < 0:
        raise ValueError(f"dilation radius must be >= 0, got {radius}")
    if radius == 0:
        return mask
    return _max_pool(mask, 2 * radius + 1, 1, radius)


def downsample_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Downsample a mask by an integer factor with max-pooling (never interpolation).

    A latent pixel is inside the mask when any image pixel it covers is; a binary mask stays
    binary.

    Args:
        mask: (B, C, *S) mask; every entry of S must be divisible by ``factor``.
        factor: downsampling factor (1 returns ``mask`` unchanged).

    Returns:
        (B, C, *(S // factor)) mask.

    Raises:
        BatchError: a spatial size is not divisible by ``factor``.
    """
    if factor == 1:
        return mask
    if any(s % factor for s in mask.shape[2:]):
        raise BatchError(
            f"spatial size {tuple(mask.shape[2:])} must be divisible by the latent factor {factor}"
        )
    return _max_pool(mask, factor, factor, 0)


def attribute_channels(attributes: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Broadcast per-sample attributes to constant image channels.

    Args:
        attributes: (B, A) float attributes.
        spatial_shape: S, the spatial size of the channels to make.

    Returns:
        (B, A, *S) tensor; channel a is constant ``attributes[:, a]``.
    """
    view = attributes.reshape(*attributes.shape, *([1] * len(spatial_shape)))
    return view.expand(*attributes.shape, *spatial_shape)


def loss_weight_map(
    region: torch.Tensor, lesion: torch.Tensor, lesion_weight: float, dilation: int, factor: int = 1
) -> torch.Tensor:
    """Per-pixel loss weight: ``1 + (lesion_weight - 1) * m``.

    ``m`` is the union of region and lesion masks, dilated by ``dilation`` pixels at image
    resolution, then max-pooled by ``factor`` to the model's resolution (the latent grid).

    Args:
        region: (B, 1, *S) region mask.
        lesion: (B, K, *S) lesion mask.
        lesion_weight: weight inside the (dilated) lesion/region (> 0; 1 = plain MSE).
        dilation: dilation radius in image pixels (>= 0).
        factor: downsampling factor to the model's resolution (1 in pixel space).

    Returns:
        (B, 1, *(S // factor)) weights.
    """
    if lesion_weight <= 0:
        raise ValueError(f"lesion_weight must be > 0, got {lesion_weight}")
    union = torch.maximum(region, lesion.amax(dim=1, keepdim=True))
    union = downsample_mask(dilate_mask(union, dilation), factor)
    return 1.0 + (lesion_weight - 1.0) * union


def weighted_mse(
    prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """Weighted mean of squared errors, ``sum(w * (p - t)^2) / sum(w)`` over every element.

    Normalising by the weights keeps the loss on the scale of a plain MSE whatever
    ``lesion_weight`` is, so the learning rate need not change with it. Computed in float32.

    Args:
        prediction: (B, C, *s) model output.
        target: (B, C, *s) epsilon or v target.
        weight: (B, 1, *s) weights (broadcast over channels).

    Returns:
        Scalar loss.
    """
    weight = weight.float().expand_as(prediction)
    error = (prediction.float() - target.float()) ** 2
    return (weight * error).sum() / weight.sum()


def prediction_target(
    scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The training target for the scheduler's ``prediction_type``.

    Args:
        scheduler: the training DDPM scheduler (its config holds ``prediction_type``).
        x0: (B, C, *s) clean image or latent.
        noise: (B, C, *s) the Gaussian noise added.
        timesteps: (B,) int64 timesteps.

    Returns:
        (B, C, *s) ``noise`` (epsilon) or ``scheduler.get_velocity(x0, noise, t)`` (v).
    """
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}")


@dataclass
class ConditionInputs:
    """A validated batch, at image resolution.

    Attributes:
        image: (B, C, *S) float image in [-1, 1] (C = ``config.image_channels``).
        region: (B, 1, *S) region mask (image dtype).
        lesion: (B, K, *S) lesion mask (image dtype).
        class_labels: (B,) int64 or ``None`` when the model has no class embedding.
        attributes: (B, A) float or ``None`` when the model has no attributes.
        prompts: B strings (latent backends) or ``None``.
    """

    image: torch.Tensor
    region: torch.Tensor
    lesion: torch.Tensor
    class_labels: torch.Tensor | None
    attributes: torch.Tensor | None
    prompts: list[str] | None

    @property
    def context(self) -> torch.Tensor:
        """(B, C, *S) the image with the region blanked (:func:`make_context`)."""
        return make_context(self.image, self.region)


@dataclass
class PreparedCondition:
    """Conditioning already at the model's resolution, reusable over all sampling steps.

    Attributes:
        spatial: (B, C, *s) channels concatenated after ``x_t`` on the UNet input (pixel
            backend: context, region, lesion, attributes; latent inpainting: region, context
            latent, lesion, attributes at latent resolution; ControlNet: what its base UNet
            takes, possibly zero channels).
        control: (B, Cc, H, W) ControlNet control image at image resolution, else ``None``.
        class_labels: (B,) int64 or ``None``.
        text: (B, T, D) text-encoder hidden states (latent backends) or ``None``.
    """

    spatial: torch.Tensor
    control: torch.Tensor | None = None
    class_labels: torch.Tensor | None = None
    text: torch.Tensor | None = None


def _tensor(batch: Mapping[str, Any], key: str) -> torch.Tensor:
    if key not in batch:
        raise BatchError(f"batch has no {key!r} (keys: {sorted(batch)})")
    value = batch[key]
    if not isinstance(value, torch.Tensor):
        raise BatchError(f"batch[{key!r}] must be a tensor, got {type(value).__name__}")
    return value


def read_batch(
    batch: Mapping[str, Any],
    config: ModelConfig,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> ConditionInputs:
    """Validate a training/sampling batch (see the issue-4 contract) and move it to ``device``.

    Args:
        batch: dict with "image" (B, C, *S), "region" (B, 1, *S), "lesion" (B, K, *S), and
            "class_labels" (B,) / "attributes" (B, A) / "prompt" (B strings) when used.
        config: the model config (K, A, spatial dims, class embedding).
        device: where the model lives; ``None`` keeps the tensors where they are.
        dtype: float dtype for image, masks and attributes (the model's); ``None`` keeps the
            image's.

    Raises:
        BatchError: a missing key, a wrong shape or dtype, a class label out of range.
    """
    image = _tensor(batch, "image")
    if not image.is_floating_point():
        raise BatchError(f"batch['image'] must be float, got {image.dtype}")
    n = config.spatial_dims
    c = config.image_channels
    if image.ndim != n + 2 or image.shape[1] != c:
        raise BatchError(
            f"batch['image'] must be (B, {c}, *S) ({c} image channel(s)) with {n} spatial dims, "
            f"got {tuple(image.shape)}"
        )
    bsz, spatial = image.shape[0], tuple(image.shape[2:])
    region = _tensor(batch, "region")
    if tuple(region.shape) != (bsz, 1, *spatial):
        raise BatchError(f"batch['region'] must be {(bsz, 1, *spatial)}, got {tuple(region.shape)}")
    lesion = _tensor(batch, "lesion")
    want = (bsz, config.lesion_classes, *spatial)
    if tuple(lesion.shape) != want:
        raise BatchError(
            f"batch['lesion'] must be {want} (K = lesion_classes = "
            f"{config.lesion_classes}), got {tuple(lesion.shape)}"
        )
    labels = None
    if config.num_class_embeds is not None:
        labels = _tensor(batch, "class_labels")
        if labels.shape != (bsz,) or labels.is_floating_point():
            raise BatchError(
                f"batch['class_labels'] must be int64 ({bsz},), "
                f"got {labels.dtype} {tuple(labels.shape)}"
            )
        if bsz and (labels.min() < 0 or labels.max() >= config.num_class_embeds):
            raise BatchError(
                f"batch['class_labels'] must lie in [0, {config.num_class_embeds}), "
                f"got {labels.tolist()}"
            )
        labels = labels.long()
    attributes = None
    if config.num_attributes:
        attributes = _tensor(batch, "attributes")
        if tuple(attributes.shape) != (bsz, config.num_attributes):
            raise BatchError(
                f"batch['attributes'] must be ({bsz}, {config.num_attributes}), "
                f"got {tuple(attributes.shape)}"
            )
    prompts = None
    if config.backend != "pixel":
        raw = batch.get("prompt")
        if raw is None:
            prompts = [config.default_prompt] * bsz
        elif isinstance(raw, str):
            prompts = [raw] * bsz
        else:
            prompts = [str(p) for p in raw]
            if len(prompts) != bsz:
                raise BatchError(f"batch['prompt'] must hold {bsz} strings, got {len(prompts)}")
    dtype = dtype or image.dtype

    def move(t: torch.Tensor | None, cast: bool = True) -> torch.Tensor | None:
        if t is None:
            return None
        return t.to(device=device, dtype=dtype if cast else t.dtype)

    return ConditionInputs(
        image=move(image),
        region=move(region),
        lesion=move(lesion),
        class_labels=move(labels, cast=False),
        attributes=move(attributes),
        prompts=prompts,
    )
