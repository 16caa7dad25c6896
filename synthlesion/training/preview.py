"""Validation during training: a deterministic validation loss, generated previews and a
lesion-fidelity figure, always on the same fixed crops of real cases.

Generation is a short diffusers-scheduler loop (DDIM or DPMSolverMultistep) over the model's
``predict``; the generated image is pasted into the real one inside the region only. The
fidelity figures compare the generated intensities inside each target lesion mask with the
real lesion's (mean, spread, and the contrast against a ring of tissue around it).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from PIL import Image, ImageDraw

from synthlesion.models.conditioning import CONTEXT_FILL_VALUE
from synthlesion.pipelines.quality import lesion_statistics
from synthlesion.storage import atomic_write_bytes
from synthlesion.training.crops import collate

logger = logging.getLogger(__name__)

TILE = 128


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _chunks(items: Sequence[dict], size: int) -> list[dict[str, Any]]:
    return [collate(items[i : i + size]) for i in range(0, len(items), size)]


@torch.no_grad()
def validation_loss(
    model: Any,
    items: Sequence[dict],
    *,
    batch_size: int,
    seed: int,
    lesion_weight: float,
    lesion_dilation: int,
    autocast: Any,
) -> float:
    """Mean ``training_loss`` over fixed crops with fixed noise and timesteps (comparable
    across evaluations), in eval mode."""
    device = model.device
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in _chunks(items, batch_size):
            with autocast():
                loss = model.training_loss(
                    _to_device(batch, device),
                    generator=generator,
                    lesion_weight=lesion_weight,
                    lesion_dilation=lesion_dilation,
                )
            n = batch["image"].shape[0]
            total += float(loss) * n
            count += n
    finally:
        model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def generate(
    model: Any,
    batch: dict[str, Any],
    *,
    scheduler: str = "ddim",
    num_inference_steps: int = 25,
    seed: int = 0,
    autocast: Any = None,
) -> torch.Tensor:
    """Paint ``batch``'s regions: (B, 1, *S) image equal to the real one outside the region.

    Args:
        model: A ``LesionDiffusionModel`` (its ``noise_scheduler`` config is reused).
        batch: Contract batch ("image", "region", "lesion", ...).
        scheduler: ``"ddim"`` or ``"dpm_solver"``.
        num_inference_steps: Scheduler steps.
        seed: Seed of the starting noise.
        autocast: Mixed-precision context factory (``accelerator.autocast``) or ``None``.
    """
    device = model.device
    batch = _to_device(batch, device)
    klass = DDIMScheduler if scheduler == "ddim" else DPMSolverMultistepScheduler
    sched = klass.from_config(model.noise_scheduler.config)
    sched.set_timesteps(num_inference_steps, device=device)
    was_training = model.training
    model.eval()
    try:
        cond = model.prepare(batch)
        x0 = model.encode(batch["image"])
        generator = torch.Generator(device=device).manual_seed(seed)
        x = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
        x = x * sched.init_noise_sigma
        for t in sched.timesteps:
            inp = sched.scale_model_input(x, t)
            if autocast is not None:
                with autocast():
                    out = model.predict(inp, t, cond)
            else:
                out = model.predict(inp, t, cond)
            x = sched.step(out.to(x.dtype), t, x).prev_sample
        painted = model.decode(x).clamp(-1, 1).float()
    finally:
        model.train(was_training)
    region = batch["region"].float()
    return batch["image"].float() * (1 - region) + painted * region


def fidelity(
    generated: np.ndarray,
    real: np.ndarray,
    lesion: np.ndarray,
    spacing: Sequence[float],
    ring_mm: float,
) -> dict[str, float] | None:
    """Lesion statistics (normalised intensity) of one crop, generated against real."""
    mask = lesion.astype(bool)
    if not mask.any():
        return None
    ring_mm = max(ring_mm, 1.5 * max(spacing))  # at least the voxels touching the lesion
    gen = lesion_statistics(generated, mask, spacing, ring_mm=ring_mm)
    ref = lesion_statistics(real, mask, spacing, ring_mm=ring_mm)
    return {
        "real_mean": ref.mean,
        "real_std": ref.std,
        "real_contrast": ref.contrast,
        "gen_mean": gen.mean,
        "gen_std": gen.std,
        "gen_contrast": gen.contrast,
    }


def summarise(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Means over crops, and the relative contrast error ``|gen - real| / |real|``."""
    if not rows:
        return {}
    out = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    out["contrast_rel_error"] = abs(out["gen_contrast"] - out["real_contrast"]) / max(
        abs(out["real_contrast"]), 1e-6
    )
    return out


# --- pictures --------------------------------------------------------------------------------


def _slice(array: np.ndarray, index: int | None) -> np.ndarray:
    """2D view: the array itself, or slice ``index`` along the last axis of a 3D array."""
    return array if array.ndim == 2 else array[..., index]


def _tile(values: np.ndarray) -> Image.Image:
    # Array axes are (R, A): show anterior up, right on the viewer's left (radiological view).
    pixels = np.clip((values + 1.0) * 127.5, 0, 255).astype(np.uint8)
    picture = Image.fromarray(np.flipud(pixels.T))
    return picture.resize((TILE, TILE), Image.NEAREST)


def preview_grid(
    images: np.ndarray,
    regions: np.ndarray,
    lesions: np.ndarray,
    generated: np.ndarray,
    title: str = "",
) -> Image.Image:
    """Rows of context | region (grey) and lesion (white) | generated | real.

    Args:
        images, generated: (N, *S) in [-1, 1]; regions, lesions: (N, *S) in {0, 1}.
    """
    n = images.shape[0]
    head = 18
    grid = Image.new("L", (4 * TILE, head + n * TILE), 0)
    draw = ImageDraw.Draw(grid)
    for col, name in enumerate(("context", "mask", "generated", "real")):
        draw.text((col * TILE + 4, 3), name, fill=255)
    if title:
        draw.text((4 * TILE - 7 * len(title) - 4, 3), title, fill=160)
    for row in range(n):
        index = None
        if images.ndim == 4:  # 3D: the slice with most lesion
            index = int(np.argmax(lesions[row].sum(axis=(0, 1))))
        image = _slice(images[row], index)
        region = _slice(regions[row], index)
        lesion = _slice(lesions[row], index)
        context = np.where(region > 0, CONTEXT_FILL_VALUE, image)  # what the model sees
        mask = np.where(lesion > 0, 1.0, np.where(region > 0, 0.0, -1.0))
        for col, tile in enumerate((context, mask, _slice(generated[row], index), image)):
            grid.paste(_tile(tile), (col * TILE, head + row * TILE))
    return grid


def fidelity_figure(rows: Sequence[dict[str, float]], title: str = "") -> Image.Image:
    """Per crop: real (left, light) and generated (right, dark) lesion mean +- std, and the
    ring mean (tick), on the [-1, 1] intensity axis."""
    width, height, top, bottom, left = max(240, 70 * len(rows) + 60), 260, 24, 20, 40
    figure = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(figure)
    span = height - top - bottom

    def y(value: float) -> float:
        return top + (1.0 - (float(np.clip(value, -1, 1)) + 1.0) / 2.0) * span

    for tick in (-1.0, -0.5, 0.0, 0.5, 1.0):
        draw.line((left - 4, y(tick), width - 10, y(tick)), fill=(225, 225, 225))
        draw.text((2, y(tick) - 6), f"{tick:+.1f}", fill=(90, 90, 90))
    draw.text(
        (left, 4), title or "lesion intensity: real (blue) vs generated (red)", fill=(0, 0, 0)
    )
    for i, row in enumerate(rows):
        x0 = left + 20 + 70 * i
        for dx, prefix, colour in ((0, "real", (40, 90, 200)), (22, "gen", (200, 50, 40))):
            mean, std = row[f"{prefix}_mean"], row[f"{prefix}_std"]
            ring = mean - row[f"{prefix}_contrast"]
            draw.line((x0 + dx, y(mean - std), x0 + dx, y(mean + std)), fill=colour, width=2)
            draw.ellipse((x0 + dx - 4, y(mean) - 4, x0 + dx + 4, y(mean) + 4), fill=colour)
            draw.line((x0 + dx - 7, y(ring), x0 + dx + 7, y(ring)), fill=colour, width=1)
        draw.text((x0 - 6, height - bottom + 4), f"#{i}", fill=(0, 0, 0))
    return figure


def save_png(picture: Image.Image, path: Path) -> Path:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def run_preview(
    model: Any,
    items: Sequence[dict],
    spacings: Sequence[Sequence[float]],
    *,
    out_dir: Path,
    step: int,
    scheduler: str,
    num_inference_steps: int,
    seed: int,
    ring_mm: float,
    batch_size: int,
    autocast: Any = None,
) -> tuple[dict[str, float], list[Image.Image]]:
    """Generate the preview crops, write the grid and fidelity PNGs, return the metrics."""
    painted = []
    for i, batch in enumerate(_chunks(items, batch_size)):
        painted.append(
            generate(
                model,
                batch,
                scheduler=scheduler,
                num_inference_steps=num_inference_steps,
                seed=seed + i,
                autocast=autocast,
            ).cpu()
        )
    generated = torch.cat(painted)[:, 0].numpy()
    batch = collate(items)
    images = batch["image"][:, 0].numpy()
    regions = batch["region"][:, 0].numpy()
    lesions = batch["lesion"].amax(dim=1).numpy()
    rows = [
        r
        for r in (
            fidelity(generated[i], images[i], lesions[i], spacings[i], ring_mm)
            for i in range(len(items))
        )
        if r is not None
    ]
    metrics = summarise(rows)
    grid = preview_grid(images, regions, lesions, generated, title=f"step {step}")
    figure = fidelity_figure(rows, title=f"step {step}: lesion mean +- std, ring (tick)")
    save_png(grid, out_dir / f"step-{step:07d}.png")
    save_png(figure, out_dir / f"fidelity-{step:07d}.png")
    return metrics, [grid.convert("RGB"), figure]
