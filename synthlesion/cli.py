"""The ``synthlesion`` console command. It parses arguments and calls the package; every
subcommand is also a plain Python function.

Exit status: 0 success, 1 the job ran and found problems (or failed on bad data), 2 bad usage.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from synthlesion import __version__
from synthlesion.errors import SynthlesionError

logger = logging.getLogger("synthlesion")

Handler = Callable[[argparse.Namespace], int]


# --- subcommands -------------------------------------------------------------------------
# Each block: a parser builder and a handler. Imports stay inside handlers so that
# `synthlesion --help` is fast and a missing optional dependency only hits its own command.


def _add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="check a dataset.json, manifest or folder for bad data")
    p.add_argument("path", help="dataset.json, Decathlon/nnU-Net folder, CSV/JSONL manifest or folder")
    p.add_argument("--tolerance-mm", type=float, default=1e-3,
                   help="largest allowed image/mask difference in spacing, origin, direction (mm)")
    p.add_argument("--empty-mask", choices=["error", "warn", "ignore"], default="error",
                   help="policy for a mask with no foreground voxel at all")
    p.add_argument("--outside-body", type=float, default=0.5,
                   help="report a lesion whose fraction outside the body exceeds this")
    p.add_argument("--patient-pattern", default=None,
                   help="regex over the case id giving the patient id (group 'patient' or 1)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=_cmd_check)


def _cmd_check(args: argparse.Namespace) -> int:
    from synthlesion.data.validation import CheckOptions, check_dataset

    options = CheckOptions(
        tolerance_mm=args.tolerance_mm,
        empty_mask=args.empty_mask,
        outside_body_fraction=args.outside_body,
    )
    report = check_dataset(args.path, options=options, patient_pattern=args.patient_pattern)
    print(report.to_json() if args.json else report.to_text())
    return 0 if report.ok else 1


def _add_split(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("split", help="split cases by patient and write a locked splits file")
    p.add_argument("path", help="dataset.json, manifest or folder of cases")
    p.add_argument("--out", required=True, help="splits file to write (JSON)")
    p.add_argument("--fractions", type=float, nargs=3, default=(0.7, 0.15, 0.15),
                   metavar=("TRAIN", "VAL", "TEST"), help="shares of patients per side")
    p.add_argument("--folds", type=int, default=None, help="k folds (plus the test share)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--patient-pattern", default=None,
                   help="regex over the case id giving the patient id (group 'patient' or 1)")
    p.add_argument("--no-stratify", action="store_true", help="ignore lesion presence")
    p.set_defaults(handler=_cmd_split)


def _cmd_split(args: argparse.Namespace) -> int:
    from pathlib import Path

    from synthlesion.data.sources import load_cases
    from synthlesion.data.splits import save_splits, split_patients

    out = Path(args.out)
    if out.exists():
        print(f"synthlesion split: error: {out} exists; a locked splits file is never "
              "overwritten (remove it first)", file=sys.stderr)
        return 1
    cases = load_cases(args.path, patient_pattern=args.patient_pattern)
    splits = split_patients(cases, fractions=args.fractions, folds=args.folds, seed=args.seed,
                            stratify=not args.no_stratify)
    digest = save_splits(splits, out)
    counts = ", ".join(
        f"{side} {len(splits.patients(side))} patients / {len(splits.case_ids(side))} cases"
        for side in ("train", "val", "test")
    )
    print(f"wrote {out} (sha256 {digest[:12]}): {counts}")
    return 0


BUILDERS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_check,
    _add_split,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="synthlesion",
        description="Synthetic lesions for medical imaging.",
    )
    parser.add_argument("--version", action="version", version=f"synthlesion {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in BUILDERS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad usage, 0 on --help
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    handler: Handler = args.handler
    try:
        return handler(args)
    except SynthlesionError as exc:
        print(f"synthlesion {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"synthlesion {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
