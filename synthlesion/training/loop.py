"""The training loop (accelerate): one function, :func:`train`.

Everything that can be wrong with the inputs (config, dataset, splits, model folder,
checkpoint) is checked before the first step. Then each optimizer step runs
``gradient_accumulation_steps`` micro-batches through the model's ``training_loss`` with
noise and timesteps drawn from the run's own generator; a NaN/Inf loss skips the step (no
update) and aborts after ``max_nonfinite_steps`` in a row, saving the last good state first.
SIGINT/SIGTERM save a checkpoint at the next step boundary (a second signal aborts; the
checkpoint in progress is then discarded, never left looking complete). Several processes
(``accelerate launch``) train with DDP; only the main process logs and writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from diffusers.optimization import get_scheduler

from synthlesion.config import config_to_dict, save_config
from synthlesion.errors import ConfigError
from synthlesion.models import LesionDiffusionModel, ModelConfig
from synthlesion.storage import atomic_write_json
from synthlesion.training import checkpoint as ckpt
from synthlesion.training.augment import CropAugmenter
from synthlesion.training.config import TrainConfig
from synthlesion.training.crops import (
    CropBatchSampler,
    CropDataset,
    CropMaker,
    DataPosition,
    crop_spec,
    fixed_crops,
    make_loader,
)
from synthlesion.training.data import TrainingData, ensure_phantom, load_training_data
from synthlesion.training.ema import EMA
from synthlesion.training.errors import CheckpointError, TrainingAbortedError
from synthlesion.training.monitor import (
    MetricsLog,
    StopSignals,
    all_processes,
    any_process,
    flat_hparams,
    flatten,
    make_accelerator,
    mean_over_processes,
)
from synthlesion.training.preview import run_preview, validation_loss
from synthlesion.training.record import export_model, training_record

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
MODEL_DIR = "model"
PREVIEW_DIR = "previews"


@dataclass
class TrainerState:
    """Counters saved in every checkpoint (``trainer_state.json``)."""

    global_step: int = 0
    epoch: int = 0
    batch: int = 0
    nonfinite_in_row: int = 0
    skipped_steps: int = 0
    resumed_from: list[str] = field(default_factory=list)


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        status: ``"completed"`` (``max_steps`` reached, model exported), ``"interrupted"``
            (a signal; checkpoint saved) or ``"stopped"`` (``stop_at_step``; checkpoint saved).
        global_step: Optimizer steps done.
        checkpoint: The last checkpoint written, if any.
        model_dir: The exported model folder (``completed`` only).
        metrics: Every metrics row logged by this call.
        step_seconds: Wall time of each optimizer step of this call.
    """

    status: str
    global_step: int
    output_dir: Path
    checkpoint: Path | None = None
    model_dir: Path | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)


def _seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> 1)


def _check_compatible(config: TrainConfig, model_config: ModelConfig, data: TrainingData) -> None:
    problems = []
    if len(config.data.roi_size) != model_config.spatial_dims:
        problems.append(
            f"data.roi_size {list(config.data.roi_size)} has "
            f"{len(config.data.roi_size)} values; the model is "
            f"{model_config.spatial_dims}D"
        )
    if model_config.image_channels != data.image_channels:
        problems.append(
            f"model.image_channels is {model_config.image_channels} but the dataset's cases have "
            f"{data.image_channels} image channel(s) {list(data.channel_names)}"
        )
    if model_config.lesion_classes != data.lesion_classes:
        problems.append(
            f"model.lesion_classes is {model_config.lesion_classes} but the dataset "
            f"has {data.lesion_classes} lesion label(s) "
            f"{list(data.preprocessing.lesion_labels)}"
        )
    if config.data.class_conditioning != (model_config.num_class_embeds is not None):
        problems.append("data.class_conditioning and model.num_class_embeds must go together")
    elif (
        model_config.num_class_embeds is not None
        and model_config.num_class_embeds < data.lesion_classes
    ):
        problems.append(
            f"model.num_class_embeds {model_config.num_class_embeds} < "
            f"{data.lesion_classes} lesion classes"
        )
    if len(config.data.attributes) != model_config.num_attributes:
        problems.append(
            f"data.attributes {list(config.data.attributes)} gives "
            f"{len(config.data.attributes)} attribute(s); model.num_attributes is "
            f"{model_config.num_attributes}"
        )
    if problems:
        raise ConfigError("training config does not fit the model: " + "; ".join(problems))


def _required_files(config: TrainConfig, rank: int, scaled: bool) -> list[str]:
    names = ["model", "optimizer", "lr_scheduler", f"rng_state_{rank}"]
    names += ["ema"] if config.ema.enabled else []
    names += ["scaler"] if scaled else []
    return [f"{n}.{ext}" for n in names for ext in ("safetensors", "json")] + [ckpt.TRAINER_STATE]


def _warn_changed_config(config: TrainConfig, checkpoint: Path) -> None:
    """Log the config values that differ from the ones the checkpoint was trained with."""
    saved_path = checkpoint / "train_config.yaml"
    if not saved_path.is_file():
        return
    saved = flatten(yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {})
    now = flatten(config_to_dict(config))
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        logger.warning(
            "resuming %s with changed settings: %s",
            checkpoint,
            ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:10]),
        )


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


def train(
    config: TrainConfig,
    *,
    resume: str | Path | None = None,
    stop_at_step: int | None = None,
    model: LesionDiffusionModel | None = None,
    progress: Callable[[int, dict[str, Any]], None] | None = None,
    accelerator: Accelerator | None = None,
) -> TrainResult:
    """Train a lesion diffusion model as ``config`` says.

    Args:
        config: The resolved training config.
        resume: ``"latest"`` (the newest complete checkpoint of ``output_dir``; a new run when
            there is none) or a checkpoint folder; ``None`` starts afresh.
        stop_at_step: Save a checkpoint and return after this many steps (the schedule still
            runs to ``max_steps``; resume later to finish).
        model: A ready model instead of building one from ``config`` (tests, notebooks).
        progress: Called after every optimizer step with ``(step, metrics)``.
        accelerator: An existing Accelerator (default: one made from ``config``).

    Raises:
        ConfigError, SplitError, TrainingDataError, CheckpointError, ModelFolderError, ...:
            bad inputs, all before the first step.
        TrainingAbortedError: too many non-finite losses in a row (last good state saved).
    """
    out = Path(config.output_dir)
    accelerator = accelerator or make_accelerator(config)
    is_main, rank, world = (
        accelerator.is_main_process,
        accelerator.process_index,
        accelerator.num_processes,
    )
    device = accelerator.device
    scaled = accelerator.scaler is not None  # fp16 on a GPU

    # --- everything that can be wrong, before any step -----------------------------------
    resume_path = ckpt.resolve_resume(out, str(resume)) if resume is not None else None
    if resume_path is not None:
        ckpt.verify_checkpoint(resume_path, _required_files(config, rank, scaled))
        _warn_changed_config(config, resume_path)
    else:
        earlier, _ = ckpt.list_checkpoints(out)
        if earlier:
            raise CheckpointError(
                f"{out} holds checkpoints of an earlier run ({earlier[-1].name}); continue it "
                "with --resume latest, or choose another output_dir (a new run there would mix "
                "its checkpoints with the old ones)"
            )
    if model is None and config.init_from is not None:
        model = LesionDiffusionModel.from_pretrained(config.init_from)
    model_config = model.config if model is not None else config.model
    if is_main:
        ensure_phantom(config.data, model_config.spatial_dims)
    accelerator.wait_for_everyone()
    data = load_training_data(
        config.data,
        spatial_dims=model_config.spatial_dims,
        seed=config.seed,
        eval_source=config.validation.source,
    )
    _check_compatible(config, model_config, data)
    if model is None:
        torch.manual_seed(config.seed)  # the same initial weights on every process
        model = LesionDiffusionModel.from_config(model_config)
    torch.manual_seed(_seed_of(config.seed, rank, 1))  # global RNG (dropout) per process
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    spec = crop_spec(config.data, data, model_config.num_class_embeds)
    maker = CropMaker(data.train, spec)
    augmenter = None
    if config.augment.enabled:
        augmenter = CropAugmenter(
            config.augment, model_config.spatial_dims, config.data.spacing, config.seed, rank
        )
        augmenter.check(spec.roi_size)
    dataset = CropDataset(maker, config.seed, config.data.samples_per_epoch)

    params = model.trainable_parameters()
    ids = {id(p) for p in params}
    named = [(n, p) for n, p in model.named_parameters() if id(p) in ids]
    optim = config.optim
    optimizer = torch.optim.AdamW(
        params,
        lr=optim.learning_rate,
        betas=tuple(optim.betas),
        eps=optim.eps,
        weight_decay=optim.weight_decay,
    )
    lr_scheduler = get_scheduler(
        optim.lr_scheduler,
        optimizer,
        num_warmup_steps=optim.lr_warmup_steps,
        num_training_steps=config.max_steps,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    raw: LesionDiffusionModel = accelerator.unwrap_model(model)
    ema = (
        EMA(
            named,
            decay=config.ema.decay,
            update_after_step=config.ema.update_after_step,
            use_warmup=config.ema.use_warmup,
            inv_gamma=config.ema.inv_gamma,
            power=config.ema.power,
        )
        if config.ema.enabled
        else None
    )
    noise_gen = torch.Generator(device=device).manual_seed(_seed_of(config.seed, rank, 2))
    data_gen = torch.Generator().manual_seed(_seed_of(config.seed, rank, 3))
    generators = {"noise": noise_gen, "data": data_gen}
    state = TrainerState()
    if resume_path is not None:
        state = _load(
            resume_path, raw, optimizer, lr_scheduler, accelerator, ema, generators, rank, world
        )
        state.resumed_from.append(str(resume_path))
        logger.info(
            "resumed from %s at step %d (epoch %d, batch %d)",
            resume_path,
            state.global_step,
            state.epoch,
            state.batch,
        )
    metrics = MetricsLog(out / METRICS_FILE, accelerator, is_main)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "train_config.yaml")
        metrics.truncate_after(state.global_step if resume_path is not None else -1)
    if accelerator.log_with:
        accelerator.init_trackers("synthlesion", config=flat_hparams(config))

    val_items: list[dict] = []
    spacings: list[tuple[float, ...]] = []
    if is_main:
        eval_maker = CropMaker(data.evaluation, spec)
        val = config.validation
        val_items = fixed_crops(
            eval_maker, val.seed, max(val.num_crops, val.num_preview), val.num_preview
        )
        by_id = {p.case_id: eval_maker.crop_spacing(p) for p in data.evaluation}
        spacings = [by_id[item["case_id"]] for item in val_items]

    def save(step: int) -> Path:
        writers = [
            lambda d: ckpt.write_state(d, "model", ckpt.model_state(raw)),
            lambda d: ckpt.write_state(d, "optimizer", optimizer.state_dict()),
            lambda d: ckpt.write_state(d, "lr_scheduler", lr_scheduler.state_dict()),
            lambda d: atomic_write_json(d / ckpt.TRAINER_STATE, dataclasses.asdict(state)),
            lambda d: save_config(config, d / "train_config.yaml"),
        ]
        if ema is not None:
            writers.append(lambda d: ckpt.write_state(d, "ema", ema.state_dict()))
        if accelerator.scaler is not None:
            writers.append(lambda d: ckpt.write_state(d, "scaler", accelerator.scaler.state_dict()))
        path = ckpt.write_checkpoint(
            out,
            step,
            writers,
            is_main=is_main,
            barrier=accelerator.wait_for_everyone,
            rank_writer=lambda d: ckpt.write_state(
                d, f"rng_state_{rank}", ckpt.capture_rng(generators)
            ),
            total_limit=config.checkpoint.total_limit,
            info={"world_size": world, "seed": config.seed},
        )
        logger.info("saved %s", path)
        return path

    def evaluate(step: int, preview: bool) -> dict[str, float]:
        row: dict[str, float] = {}
        if is_main and val_items:
            val = config.validation
            row["val/loss"] = validation_loss(
                raw,
                val_items[: val.num_crops],
                batch_size=config.batch_size,
                seed=val.seed,
                lesion_weight=config.loss.lesion_weight,
                lesion_dilation=config.loss.lesion_dilation,
                autocast=accelerator.autocast,
            )
            if preview and val.num_preview > 0:
                use_ema = ema is not None and val.use_ema
                with ema.applied() if use_ema else contextlib.nullcontext():
                    found, pictures = run_preview(
                        raw,
                        val_items[: val.num_preview],
                        spacings[: val.num_preview],
                        out_dir=out / PREVIEW_DIR,
                        step=step,
                        scheduler=val.scheduler,
                        num_inference_steps=val.num_inference_steps,
                        seed=val.seed,
                        ring_mm=val.ring_mm,
                        batch_size=config.batch_size,
                        autocast=accelerator.autocast,
                    )
                row.update({f"preview/{k}": v for k, v in found.items()})
                metrics.images(step, {"preview/grid": pictures[0], "preview/fidelity": pictures[1]})
        accelerator.wait_for_everyone()
        return row

    result = TrainResult("completed", state.global_step, out)
    sampler = CropBatchSampler(
        config.data.samples_per_epoch,
        config.batch_size,
        rank=rank,
        world_size=world,
        start=DataPosition(state.epoch, state.batch),
    )
    position = DataPosition(state.epoch, state.batch)
    loader = make_loader(
        dataset,
        sampler,
        num_workers=config.data.num_workers,
        generator=data_gen,
        pin_memory=device.type == "cuda",
    )
    every_val = config.validation.every_n_steps
    every_ckpt = config.checkpoint.every_n_steps
    if state.global_step == 0 and every_val > 0:
        first = evaluate(0, preview=False)
        if first:
            metrics.log({"step": 0, **first})
    accum = config.gradient_accumulation_steps
    window: list[float] = []
    model.train()
    with StopSignals() as signals:
        batches = iter(loader)
        while state.global_step < config.max_steps:
            if any_process(accelerator, signals.requested is not None):
                result.status = "interrupted"
                break
            if stop_at_step is not None and state.global_step >= stop_at_step:
                result.status = "stopped"
                break
            started = time.perf_counter()
            losses: list[torch.Tensor] = []
            finite = True
            for micro in range(accum):
                batch = _to_device(next(batches), device)
                if augmenter is not None:
                    batch = augmenter(batch, position.epoch, position.batch)
                position.advance(sampler.batches_per_epoch)
                sync = (
                    contextlib.nullcontext() if micro == accum - 1 else accelerator.no_sync(model)
                )
                with sync:
                    loss = model(
                        batch, noise_gen, config.loss.lesion_weight, config.loss.lesion_dilation
                    )
                    if not all_processes(accelerator, bool(torch.isfinite(loss.detach()))):
                        finite = False
                        break
                    accelerator.backward(loss / accum)
                losses.append(loss.detach())
            state.epoch, state.batch = position.epoch, position.batch
            if not finite:
                optimizer.zero_grad(set_to_none=True)
                state.nonfinite_in_row += 1
                state.skipped_steps += 1
                logger.warning(
                    "step %d: non-finite loss; step skipped (%d in a row)",
                    state.global_step + 1,
                    state.nonfinite_in_row,
                )
                if state.nonfinite_in_row >= config.max_nonfinite_steps:
                    path = save(state.global_step)
                    raise TrainingAbortedError(
                        f"{state.nonfinite_in_row} non-finite losses in a row "
                        f"(max_nonfinite_steps {config.max_nonfinite_steps}); the last good state "
                        f"(step {state.global_step}) is saved in {path}. Lower the learning rate, "
                        "use bf16 instead of fp16, or check the data"
                    )
                continue
            state.nonfinite_in_row = 0
            grad_norm = None
            if optim.max_grad_norm is not None:
                grad_norm = accelerator.clip_grad_norm_(params, optim.max_grad_norm)
            optimizer.step()
            if not accelerator.optimizer_step_was_skipped:
                lr_scheduler.step()
                if ema is not None:
                    ema.step()
            optimizer.zero_grad(set_to_none=True)
            state.global_step += 1
            step = state.global_step
            result.step_seconds.append(time.perf_counter() - started)
            window.append(float(torch.stack(losses).mean()))
            row: dict[str, Any] = {}
            if step % config.log_every_n_steps == 0 or step == config.max_steps:
                row = {
                    "step": step,
                    "loss": mean_over_processes(accelerator, window),
                    "lr": lr_scheduler.get_last_lr()[0],
                    "epoch": state.epoch,
                    "skipped_steps": state.skipped_steps,
                }
                if grad_norm is not None:
                    row["grad_norm"] = float(grad_norm)
                if ema is not None:
                    row["ema_decay"] = ema.current_decay()
                window = []
            if every_val > 0 and step % every_val == 0 and step < config.max_steps:
                found = evaluate(step, preview=True)
                if found:
                    row = {"step": step, **row, **found}
            if row:
                metrics.log(row)
            if progress is not None:
                progress(step, row)
            if every_ckpt > 0 and step % every_ckpt == 0 and step < config.max_steps:
                result.checkpoint = save(step)

        if result.status == "completed":
            final = evaluate(state.global_step, preview=True)
            if final:
                metrics.log({"step": state.global_step, **final})
        result.checkpoint = save(state.global_step)
        if result.status == "completed":
            if is_main:
                record = training_record(
                    config,
                    data,
                    steps=state.global_step,
                    world_size=world,
                    weights="ema" if ema is not None else "raw",
                    resumed_from=state.resumed_from,
                    final_metrics=final,
                )
                result.model_dir = export_model(raw, ema, out / MODEL_DIR, record, config)
                logger.info("model written to %s", result.model_dir)
            accelerator.wait_for_everyone()
    accelerator.end_training()
    result.global_step = state.global_step
    result.metrics = metrics.rows
    return result


def _load(
    path: Path,
    raw: LesionDiffusionModel,
    optimizer: Any,
    lr_scheduler: Any,
    accelerator: Accelerator,
    ema: EMA | None,
    generators: dict[str, torch.Generator],
    rank: int,
    world: int,
) -> TrainerState:
    """Load every part of a verified checkpoint (model, optimizer, schedule, scaler, EMA,
    random states, data position)."""
    info = json.loads((path / ckpt.COMPLETE).read_text(encoding="utf-8"))
    if int(info.get("world_size", 1)) != world:
        raise CheckpointError(
            f"{path}: saved by {info.get('world_size')} process(es), resumed "
            f"with {world}; resume with the same number of processes"
        )
    ckpt.load_model_state(raw, ckpt.read_state(path, "model"), str(path / "model.safetensors"))
    optimizer.load_state_dict(ckpt.read_state(path, "optimizer"))
    lr_scheduler.load_state_dict(ckpt.read_state(path, "lr_scheduler"))
    if accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(ckpt.read_state(path, "scaler"))
    if ema is not None:
        ema.load_state_dict(ckpt.read_state(path, "ema"), str(path / "ema.safetensors"))
    ckpt.restore_rng(
        ckpt.read_state(path, f"rng_state_{rank}"), generators, str(path / f"rng_state_{rank}")
    )
    raw_state = json.loads((path / ckpt.TRAINER_STATE).read_text(encoding="utf-8"))
    known = {f.name for f in dataclasses.fields(TrainerState)}
    state = TrainerState(**{k: v for k, v in raw_state.items() if k in known})
    if not math.isfinite(state.global_step):
        raise CheckpointError(f"{path}: bad trainer state")
    return state
