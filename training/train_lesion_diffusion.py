"""Train a mask-conditioned lesion diffusion model from a YAML config.

One process (CPU or one GPU)::

    python training/train_lesion_diffusion.py --config configs/train_phantom2d_cpu.yaml

Several GPUs / nodes (DDP through accelerate; logging and saving on the main process only)::

    accelerate launch --multi_gpu --num_processes 4 training/train_lesion_diffusion.py \\
        --config configs/train_ct_liver_3d.yaml --resume latest

Same as ``synthlesion train --config ...``. Options: ``--set key.sub=value`` (repeatable),
``--resume latest|PATH``, ``--stop-at-step N``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from synthlesion.training.entry import add_arguments

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from synthlesion.errors import SynthlesionError
    from synthlesion.training.entry import run

    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return run(args)
    except SynthlesionError as exc:
        print(f"train_lesion_diffusion: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("train_lesion_diffusion: aborted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
