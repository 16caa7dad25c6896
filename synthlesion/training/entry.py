"""Command-line glue shared by ``synthlesion train`` and ``training/train_lesion_diffusion.py``
(both also work under ``accelerate launch``)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from synthlesion.config import add_override_argument, count_arg

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The training options (``--config``, ``--set``, ``--resume``, ``--stop-at-step``)."""
    parser.add_argument("--config", required=True, help="training YAML (see configs/train_*.yaml)")
    add_override_argument(parser, "optim.learning_rate=1e-4")
    parser.add_argument(
        "--resume",
        default=None,
        metavar="latest|PATH",
        help="resume from the newest complete checkpoint of output_dir "
        "('latest'; a new run when there is none) or from a folder",
    )
    parser.add_argument(
        "--stop-at-step",
        type=count_arg,
        default=None,
        help="save a checkpoint and stop after this many steps",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Train from parsed arguments; returns the exit status (0 done, 130 interrupted)."""
    from synthlesion.training.config import load_train_config
    from synthlesion.training.loop import make_accelerator, train

    config = load_train_config(args.config, args.overrides)
    accelerator = make_accelerator(config)
    if not accelerator.is_main_process:  # only the main process reports progress
        logging.getLogger("synthlesion").setLevel(logging.WARNING)
    bar: Any = None
    if accelerator.is_main_process and not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.max_steps, desc="train", unit="step", dynamic_ncols=True)

    def progress(step: int, row: dict[str, Any]) -> None:
        if bar is None:
            return
        bar.n = step
        shown = {k: f"{v:.4g}" for k, v in row.items() if k in ("loss", "val/loss", "lr")}
        if shown:
            bar.set_postfix(shown, refresh=False)
        bar.refresh()

    try:
        result = train(
            config,
            resume=args.resume,
            stop_at_step=args.stop_at_step,
            progress=progress,
            accelerator=accelerator,
        )
    finally:
        if bar is not None:
            bar.close()
    if accelerator.is_main_process:
        where = result.model_dir or result.checkpoint
        print(f"{result.status} at step {result.global_step}: {where}", file=sys.stderr)
    return 130 if result.status == "interrupted" else 0
