"""Batched test-time augmentation: augment K times, predict, invert, average.

All K augmented copies of a batch go through the model as one batch (or in chunks), every
prediction is mapped back to the original space with the inverse of its own spatial
transform (flips exactly, affines and elastic deformations with one fused grid), and the
predictions are averaged with their coverage as weight (voxels an augmentation moved out of
the field of view do not count), with the variance as an uncertainty map.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from synthlesion.augment.base import AugmentationError, BatchInfo, Params
from synthlesion.augment.spatial import RandFlip, SpatialTransform
from synthlesion.augment.warp import Step, warp_tensors


@dataclass
class TTAResult:
    """Output of :class:`TestTimeAugmentation`.

    Attributes:
        mean: ``(B, C_out, *spatial)`` coverage-weighted mean prediction.
        variance: ``(B, C_out, *spatial)`` weighted variance across augmentations.
        coverage: ``(B, 1, *spatial)`` summed weight (number of augmentations that saw
            each voxel, fractional at the edges).
        params: One :class:`Params` per transform, rows ordered ``k * B + b``.
    """

    mean: torch.Tensor
    variance: torch.Tensor
    coverage: torch.Tensor
    params: list[Params]


class TestTimeAugmentation:
    """Apply K spatial augmentations, run a model on all of them, invert and average.

    Args:
        transforms: Spatial transforms (their keys are ignored; their settings, generators,
            spacing and padding are used). Default: random flips on every axis.
        num_augmentations: K, the number of copies per input.
        include_identity: Copy 0 of every input is not augmented.
        chunk_size: Largest batch passed to the model at once (None: all K * B together).
        mode: Interpolation of the predictions when inverted (``"bilinear"`` for
            probabilities or logits, ``"nearest"`` for discrete outputs).
        no_grad: Run the model under ``torch.no_grad()``.
        seed: Seeds every transform (None: keep their own states).
    """

    __test__ = False  # not a pytest class

    def __init__(
        self,
        transforms: Sequence[SpatialTransform] | None = None,
        num_augmentations: int = 8,
        *,
        include_identity: bool = True,
        chunk_size: int | None = None,
        mode: str = "bilinear",
        no_grad: bool = True,
        seed: int | None = None,
    ) -> None:
        if transforms is None:
            transforms = [RandFlip("image", flip_probability=0.5)]
        for t in transforms:
            if not isinstance(t, SpatialTransform):
                raise AugmentationError(
                    f"{type(t).__name__} is not a spatial transform; TTA "
                    "inverts spatial transforms only",
                    transform="TTA",
                )
        if num_augmentations < 1:
            raise AugmentationError(
                f"num_augmentations={num_augmentations} must be >= 1", transform="TTA"
            )
        if mode not in ("bilinear", "nearest"):
            raise AugmentationError(
                f"mode={mode!r} must be 'bilinear' or 'nearest'", transform="TTA"
            )
        self.transforms = list(transforms)
        self.num_augmentations = int(num_augmentations)
        self.include_identity = include_identity
        self.chunk_size = chunk_size
        self.mode = mode
        self.no_grad = no_grad
        if seed is not None:
            for i, t in enumerate(self.transforms):
                t.set_random_state(seed * 1009 + i)

    def augment(
        self, image: torch.Tensor, spacing: Sequence[float] | torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[Step], BatchInfo]:
        """The ``(K * B, C, *spatial)`` augmented copies, their steps and geometry."""
        if not isinstance(image, torch.Tensor) or image.ndim not in (4, 5):
            raise AugmentationError(
                "image must be a (B, C, X, Y) or (B, C, X, Y, Z) tensor",
                key="image",
                transform="TTA",
            )
        if not image.is_floating_point():
            raise AugmentationError(
                f"dtype {image.dtype} is not floating point", key="image", transform="TTA"
            )
        batch, k = image.shape[0], self.num_augmentations
        shape = tuple(int(s) for s in image.shape[2:])
        if spacing is None:
            spacing = self.transforms[0].spacing or (1.0,) * len(shape)
        sp = torch.as_tensor(spacing, dtype=torch.float64, device=image.device)
        sp = sp.expand(batch, len(shape)) if sp.ndim == 1 else sp
        info = BatchInfo(batch * k, shape, image.device, image.dtype, sp.repeat(k, 1))
        steps: list[Step] = []
        for t in self.transforms:
            params = t.sample(info)
            if self.include_identity:
                params.applied[:batch] = False
                params = Params(t.neutral(params.values, params.applied, info), params.applied)
            steps.append((type(t), params.values, params.applied))
        copies = image.repeat((k,) + (1,) * (image.ndim - 1))
        images, _ = warp_tensors({"x": copies}, {}, steps, info, self.transforms[0].padding_mode)
        return images["x"], steps, info

    def __call__(
        self,
        model: Callable[[torch.Tensor], torch.Tensor],
        image: torch.Tensor,
        spacing: Sequence[float] | torch.Tensor | None = None,
    ) -> TTAResult:
        """Predict with TTA.

        Args:
            model: Maps ``(N, C, *spatial)`` to ``(N, C_out, *spatial)``.
            image: ``(B, C, *spatial)`` batch.
            spacing: Voxel size in mm (``(d,)`` or ``(B, d)``).
        """
        augmented, steps, info = self.augment(image, spacing)
        chunk = self.chunk_size or augmented.shape[0]
        with torch.no_grad() if self.no_grad else torch.enable_grad():
            preds = torch.cat(
                [model(augmented[i : i + chunk]) for i in range(0, augmented.shape[0], chunk)]
            )
        if preds.shape[0] != augmented.shape[0] or preds.shape[2:] != augmented.shape[2:]:
            raise AugmentationError(
                f"model output {tuple(preds.shape)} must keep the batch and spatial shape of "
                f"its input {tuple(augmented.shape)}",
                transform="TTA",
            )
        work = preds if preds.is_floating_point() else preds.to(torch.float32)
        ones = torch.ones_like(work[:, :1])
        stacked = torch.cat([work, ones], 1)
        back, _ = warp_tensors(
            {"p": stacked}, {}, steps, info, "zeros", inverse=True, image_mode=self.mode
        )
        back = back["p"]
        value, weight = back[:, :-1], back[:, -1:]
        valid = weight > 1e-6
        value = torch.where(valid, value / torch.where(valid, weight, 1), 0)
        weight = torch.where(valid, weight, 0)
        batch = image.shape[0]
        total = mean = m2 = None
        for k in range(self.num_augmentations):  # weighted Welford: exact for equal values
            y, w = value[k * batch : (k + 1) * batch], weight[k * batch : (k + 1) * batch]
            if mean is None:
                total, mean, m2 = w.clone(), torch.where(w > 0, y, 0), torch.zeros_like(y)
                continue
            new_total = total + w
            delta = y - mean
            r = torch.where(new_total > 0, w / torch.where(new_total > 0, new_total, 1), 0)
            mean = mean + delta * r
            m2 = m2 + total * delta * r * delta
            total = new_total
        variance = torch.where(total > 0, m2 / torch.where(total > 0, total, 1), 0)
        params = [Params(values, applied) for _, values, applied in steps]
        return TTAResult(mean, variance, total, params)
