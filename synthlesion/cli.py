"""The ``synthlesion`` console command. It parses arguments and calls the package; every
subcommand is also a plain Python function.

Exit status: 0 success, 1 the job ran and found problems (or failed on bad data), 2 bad usage.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from synthlesion import __version__
from synthlesion.config import (
    add_override_argument,
    bounded_count_arg,
    count_arg,
    device_arg,
    length_arg,
    parse_assignment,
    positive_arg,
    regex_arg,
    seed_arg,
    share_arg,
    weight_arg,
)
from synthlesion.errors import ConfigError, SynthlesionError

logger = logging.getLogger("synthlesion")

Handler = Callable[[argparse.Namespace], int]


# --- subcommands -------------------------------------------------------------------------
# Each block: a parser builder and a handler. Imports stay inside handlers so that
# `synthlesion --help` is fast and a missing optional dependency only hits its own command.


def _add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="check a dataset.json, manifest or folder for bad data")
    p.add_argument(
        "path", help="dataset.json, Decathlon/nnU-Net folder, CSV/JSONL manifest or folder"
    )
    p.add_argument(
        "--tolerance-mm",
        type=length_arg,
        default=1e-3,
        help="largest allowed image/mask difference in spacing, origin, direction (mm)",
    )
    p.add_argument(
        "--empty-mask",
        choices=["error", "warn", "ignore"],
        default="error",
        help="policy for a mask with no foreground voxel at all",
    )
    p.add_argument(
        "--outside-body",
        type=share_arg,
        default=0.5,
        help="report a lesion whose fraction outside the body exceeds this",
    )
    p.add_argument(
        "--patient-pattern",
        type=regex_arg,
        default=None,
        help="regex over the case id giving the patient id (group 'patient' or 1)",
    )
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
    p.add_argument(
        "--fractions",
        type=share_arg,
        nargs=3,
        default=(0.7, 0.15, 0.15),
        metavar=("TRAIN", "VAL", "TEST"),
        help="shares of patients per side",
    )
    p.add_argument(
        "--folds",
        type=bounded_count_arg(2, 100),
        default=None,
        help="k folds (plus the test share)",
    )
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument(
        "--patient-pattern",
        type=regex_arg,
        default=None,
        help="regex over the case id giving the patient id (group 'patient' or 1)",
    )
    p.add_argument("--no-stratify", action="store_true", help="ignore lesion presence")
    p.set_defaults(handler=_cmd_split)


def _cmd_split(args: argparse.Namespace) -> int:
    from pathlib import Path

    from synthlesion.data.sources import load_cases
    from synthlesion.data.splits import require_listed_files, save_splits, split_patients

    out = Path(args.out)
    if out.exists():
        print(
            f"synthlesion split: error: {out} exists; a locked splits file is never "
            "overwritten (remove it first)",
            file=sys.stderr,
        )
        return 1
    cases = load_cases(args.path, patient_pattern=args.patient_pattern)
    require_listed_files(cases)
    splits = split_patients(
        cases,
        fractions=args.fractions,
        folds=args.folds,
        seed=args.seed,
        stratify=not args.no_stratify,
    )
    digest = save_splits(splits, out)
    counts = ", ".join(
        f"{side} {len(splits.patients(side))} patients / {len(splits.case_ids(side))} cases"
        for side in ("train", "val", "test")
    )
    print(f"wrote {out} (sha256 {digest[:12]}): {counts}")
    return 0


def _add_phantom(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "phantom", help="write the procedural phantom dataset (NIfTI + dataset.json)"
    )
    p.add_argument("--out", required=True, help="folder to write dataset.json, imagesTr, labelsTr")
    p.add_argument(
        "--kind",
        choices=["ct", "mri", "brain-mri-multi"],
        default="ct",
        help="ct: abdomen in HU, liver + lesions; mri: FLAIR-like head, brain + lesions; "
        "brain-mri-multi: BraTS-like FLAIR/T1/T1c/T2 brain-tumour MRI (3D only), labels "
        "NETC/SNFH/ET/RC, brain masks in brainmasks/",
    )
    p.add_argument("--dims", type=int, choices=[2, 3], default=3, help="3D volumes or 2D slices")
    p.add_argument(
        "--patients",
        type=bounded_count_arg(1, 10_000),
        default=None,
        help="number of patients (default 8 in 3D, 100 in 2D)",
    )
    p.add_argument(
        "--size",
        type=bounded_count_arg(8, 1024),
        default=None,
        help="in-plane voxels (default 96 in 3D, 128 in 2D; 64 for brain-mri-multi)",
    )
    p.add_argument(
        "--full-size",
        action="store_true",
        help="brain-mri-multi only: the BraTS grid, 240 x 240 x 155 at 1 mm",
    )
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument(
        "--lesion-fraction",
        type=share_arg,
        default=None,
        help="share of patients with lesions, the rest are healthy (default 0.6; 0.75 for "
        "brain-mri-multi)",
    )
    p.add_argument(
        "--followup-fraction",
        type=share_arg,
        default=None,
        help="share of patients with a second time point (default 0.5; 0.4 for brain-mri-multi)",
    )
    p.add_argument(
        "--lesion-model",
        choices=["types", "ellipsoid"],
        default=None,
        help="ct/mri: typed lesions (cysts, rimmed metastases with halos, heterogeneous masses, "
        "infiltrative lesions; mass effect; the default) or the older deformed ellipsoids (for "
        "reproducing older figures)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace a different dataset.json already in --out"
    )
    p.set_defaults(handler=_cmd_phantom)


def _cmd_phantom(args: argparse.Namespace) -> int:
    if args.kind == "brain-mri-multi":
        from synthlesion.data.phantom_brain import (
            DEFAULT_FOLLOWUP_FRACTION,
            FULL_SHAPE,
            make_brain_multiseq_dataset,
        )

        if args.dims != 3:
            raise ConfigError("phantom: --kind brain-mri-multi makes 3D volumes only (--dims 3)")
        if args.lesion_model is not None:
            raise ConfigError("phantom: --lesion-model applies to --kind ct and mri only")
        if args.full_size and args.size not in (None, FULL_SHAPE[0]):
            raise ConfigError(
                f"phantom: --full-size is the {FULL_SHAPE[0]} x {FULL_SHAPE[1]} x "
                f"{FULL_SHAPE[2]} grid; leave out --size {args.size}"
            )
        path = make_brain_multiseq_dataset(
            args.out,
            n_patients=8 if args.patients is None else args.patients,
            size=64 if args.size is None else args.size,
            seed=args.seed,
            lesion_fraction=0.75 if args.lesion_fraction is None else args.lesion_fraction,
            full_size=args.full_size,
            overwrite=args.overwrite,
            followup_fraction=DEFAULT_FOLLOWUP_FRACTION
            if args.followup_fraction is None
            else args.followup_fraction,
        )
        print(path)
        return 0
    if args.full_size:
        raise ConfigError("phantom: --full-size applies to --kind brain-mri-multi only")
    from synthlesion.data.phantom import make_phantom_dataset

    path = make_phantom_dataset(
        args.out,
        kind=args.kind,
        spatial_dims=args.dims,
        n_patients=args.patients,
        size=args.size,
        seed=args.seed,
        lesion_fraction=0.6 if args.lesion_fraction is None else args.lesion_fraction,
        followup_fraction=0.5 if args.followup_fraction is None else args.followup_fraction,
        overwrite=args.overwrite,
        lesion_model=args.lesion_model or "types",
    )
    print(path)
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    from synthlesion.training.entry import add_arguments

    p = sub.add_parser(
        "train",
        help="train a lesion diffusion model from a YAML config (also under accelerate launch)",
    )
    add_arguments(p)
    p.set_defaults(handler=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from synthlesion.training.entry import run

    return run(args)


def _add_build_dataset(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build-dataset",
        help="build a guarded train (real + synthetic) / val / test dataset folder",
        description="Real training cases plus synthetic cases of training patients; real-only "
        "val/test lists; nnU-Net v2 / Decathlon layout, dataset card. Refuses synthetic data in "
        "evaluation, evaluation patients in training, tampered manifests and unsafe paths.",
    )
    p.add_argument("real", help="real cases: dataset.json, Decathlon/nnU-Net folder or manifest")
    p.add_argument("--splits", required=True, help="locked splits file (synthlesion split)")
    p.add_argument(
        "--manifest",
        action="append",
        default=[],
        metavar="JSONL",
        help="synthetic-case manifest (repeat for several)",
    )
    p.add_argument(
        "--manifest-root",
        default=None,
        help="dataset root of the manifests' paths (default: each manifest's folder)",
    )
    p.add_argument("--out", required=True, help="dataset folder to write")
    p.add_argument("--config", default=None, help="BuildConfig YAML")
    add_override_argument(p, "synthetic_share=0.3", dest="set")
    p.add_argument(
        "--synthetic-share",
        type=share_arg,
        default=None,
        help="target synthetic share per epoch in train (0..1)",
    )
    p.add_argument(
        "--share-mode",
        choices=["weights", "fixed"],
        default=None,
        help="per-item sampling weights, or a fixed ratio of listed cases",
    )
    p.add_argument("--seed", type=seed_arg, default=None, help="seed of the fixed-ratio draw")
    p.add_argument(
        "--link",
        choices=["auto", "hardlink", "copy", "symlink", "none"],
        default=None,
        help="how the build holds the files: auto (default: hard links, copies across file "
        "systems) or hardlink/copy keep it portable; symlink and none (dataset.json lists them "
        "in place) only work where the build was made",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier build")
    p.add_argument(
        "--report",
        action="store_true",
        help="list every guard violation instead of stopping at the first",
    )
    p.add_argument(
        "--no-verify-files",
        action="store_true",
        help="do not hash synthetic files against their manifest rows",
    )
    p.add_argument(
        "--no-verify-generators", action="store_true", help="do not re-hash generator model folders"
    )
    p.add_argument(
        "--include-rejected", type=weight_arg, default=None, metavar="WEIGHT",
        help="also build synthetic cases that failed their quality gate, with this sampling "
        "weight in (0, 1] relative to passed ones (default: they are left out)",
    )  # fmt: skip
    p.add_argument(
        "--no-voxel-check",
        action="store_true",
        help="do not decode real val/test scans to compare voxel hashes",
    )
    p.add_argument(
        "--patient-pattern",
        type=regex_arg,
        default=None,
        help="regex over the case id giving the patient id (group 'patient' or 1)",
    )
    p.set_defaults(handler=_cmd_build_dataset)


def _cmd_build_dataset(args: argparse.Namespace) -> int:
    import dataclasses

    from synthlesion.config import load_config
    from synthlesion.dataset import BuildConfig, DatasetBuilder
    from synthlesion.provenance import GuardViolation, GuardViolations

    overrides = list(args.set)
    for key, value in (
        ("synthetic_share", args.synthetic_share),
        ("share_mode", args.share_mode),
        ("seed", args.seed),
        ("link_mode", args.link),
        ("rejected_weight", args.include_rejected),
        ("include_rejected", True if args.include_rejected is not None else None),
    ):
        if value is not None:
            overrides.append(f"{key}={value}")
    for key, off in (
        ("verify_files", args.no_verify_files),
        ("verify_generators", args.no_verify_generators),
        ("check_voxels", args.no_voxel_check),
    ):
        if off:
            overrides.append(f"{key}=false")
    config = load_config(BuildConfig, args.config, overrides)
    if args.patient_pattern is not None:  # a regex is no YAML scalar: set it directly
        config = dataclasses.replace(config, patient_pattern=args.patient_pattern)
    manifests = [(m, args.manifest_root) for m in args.manifest]
    builder = DatasetBuilder(args.real, args.splits, manifests, config)
    try:
        result = builder.build(args.out, overwrite=args.overwrite, report=args.report)
    except GuardViolation as exc:
        if not args.report:
            raise
        found = exc.violations if isinstance(exc, GuardViolations) else [exc]
        print(
            f"synthlesion build-dataset: {len(found)} guard violation(s); nothing written",
            file=sys.stderr,
        )
        for violation in found:
            print(f"  [{violation.guard}] {violation.message}", file=sys.stderr)
        return 1
    counts = result.counts
    print(
        f"wrote {result.out_dir}: train {counts['train']['real']} real + "
        f"{counts['train']['synthetic']} synthetic, val {counts['val']['real']}, "
        f"test {counts['test']['real']} (card: {result.out_dir / 'dataset_card.md'})"
    )
    return 0


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="paint synthetic lesions into train-split scans")
    p.add_argument(
        "--model", required=True, help="trained model folder (with training_record.json)"
    )
    p.add_argument("--data", required=True, help="real cases: dataset.json, manifest or folder")
    p.add_argument("--splits", required=True, help="locked splits file of --data")
    p.add_argument("--out", required=True, help="synthetic set folder (manifest.jsonl inside)")
    p.add_argument(
        "--per-case",
        type=bounded_count_arg(1, 1000),
        default=1,
        help="synthetic cases per source scan",
    )
    p.add_argument("--lesions-per-case", type=bounded_count_arg(1, 100), default=1)
    p.add_argument(
        "--scheduler", choices=["dpmsolver++", "ddim", "unipc", "ddpm"], default="dpmsolver++"
    )
    p.add_argument("--steps", type=bounded_count_arg(1, 10_000), default=20)
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument(
        "--batch-size", type=bounded_count_arg(1, 4096), default=8, help="regions per network call"
    )
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--mask-source", choices=["bank", "procedural", "user"], default="bank")
    p.add_argument("--user-masks", default=None, help="folder of {source case id}.nii.gz masks")
    p.add_argument(
        "--region-masks", default=None,
        help="folder of {source case id}.nii.gz placement regions (e.g. brain masks): lesions "
        "go only there (default: the organ labels, else the scan's foreground)",
    )  # fmt: skip
    p.add_argument(
        "--region-label", type=seed_arg, default=None,
        help="a label value of the source's label map that is the placement region",
    )  # fmt: skip
    p.add_argument("--healthy-only", action="store_true", help="only scans without a lesion")
    p.add_argument(
        "--min-border-distance-mm", type=length_arg, default=2.0,
        help="distance every new lesion voxel keeps from the placement region's border",
    )  # fmt: skip
    p.add_argument(
        "--min-lesion-distance-mm", type=length_arg, default=5.0,
        help="distance every new lesion keeps from existing and other new lesions",
    )  # fmt: skip
    p.add_argument(
        "--dilation-mm", type=length_arg, default=3.0, help="blend margin around a lesion"
    )
    p.add_argument(
        "--feather-mm", type=length_arg, default=1.5, help="feather band inside the margin"
    )
    p.add_argument(
        "--lesion-volume-mm3", type=positive_arg, nargs=2, default=None, metavar=("LOW", "HIGH"),
        help="procedural lesion volumes (mm^3; mm^2 in 2D) when the train split has no real "
        "lesion to learn sizes from",
    )  # fmt: skip
    p.add_argument("--limit", type=count_arg, default=None, help="at most this many cases")
    p.add_argument(
        "--attribute", action="append", default=[], metavar="NAME=VALUE",
        help="attribute-conditioned models: a fixed value (mean_intensity in image units, "
        "volume_fraction); repeatable",
    )  # fmt: skip
    p.add_argument(
        "--patient-pattern", type=regex_arg, default=None,
        help="regex over the case id giving the patient id (group 'patient' or 1)",
    )  # fmt: skip
    p.set_defaults(handler=_cmd_sample)


def _attribute_values(items: list[str]) -> dict[str, float] | None:
    """``["mean_intensity=80", ...]`` as a dict (None when empty)."""
    values: dict[str, float] = {}
    for item in items:
        name, value = parse_assignment(item, "--attribute", "NAME=NUMBER")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"--attribute {item!r} must look like NAME=NUMBER")
        values[name] = float(value)
    return values or None


def _cmd_sample(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from synthlesion.pipelines.sampling import SampleOptions, run_sampling

    options = SampleOptions(
        per_case=args.per_case,
        lesions_per_case=args.lesions_per_case,
        scheduler=args.scheduler,
        steps=args.steps,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        mask_source=args.mask_source,
        user_masks=Path(args.user_masks) if args.user_masks else None,
        region_masks=Path(args.region_masks) if args.region_masks else None,
        region_label=args.region_label,
        min_border_distance_mm=args.min_border_distance_mm,
        min_lesion_distance_mm=args.min_lesion_distance_mm,
        dilation_mm=args.dilation_mm,
        feather_mm=args.feather_mm,
        **({"lesion_volume_mm3": tuple(args.lesion_volume_mm3)} if args.lesion_volume_mm3 else {}),
        healthy_only=args.healthy_only,
        limit=args.limit,
        attributes=_attribute_values(args.attribute),
    )
    bar = tqdm(total=0, unit="case", desc="sampling", disable=None)

    def progress(done: int, total: int, case_id: str) -> None:
        bar.total = total
        bar.set_postfix_str(case_id)
        bar.update(1)

    try:
        report = run_sampling(
            args.model,
            args.data,
            args.splits,
            args.out,
            options,
            progress=progress,
            patient_pattern=args.patient_pattern,
        )
    finally:
        bar.close()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # accelerate launch: merge on the main process
        from accelerate import PartialState

        from synthlesion.pipelines.sampling import merge_manifest_shards

        state = PartialState()
        state.wait_for_everyone()
        if state.is_main_process:
            report.manifest = merge_manifest_shards(args.out)
    print(
        f"wrote {len(report.written)} case(s), kept {len(report.skipped_existing)} from an "
        f"earlier run, {len(report.failed)} failed, {len(report.rejected_by_quality)} below "
        f"the quality gate; manifest: {report.manifest}"
    )
    for failure in report.failed:
        print(f"FAILED {failure['case_id']} (source {failure['source']}): {failure['problem']}")
    return 1 if report.failed else 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="downstream evaluation: train a segmenter per arm, score on the guarded test split",
        description="Trains a small MONAI segmenter under several arms (real only, classical "
        "augmentation, lesion copy-paste, hand-crafted lesions, diffusion lesions at several "
        "shares) with the same budget and seeds, scores each on the real test split read "
        "through the evaluation guard, compares the arms case by case, measures the synthetic "
        "lesions' fidelity and writes results.json and report.html into out_dir.",
    )
    p.add_argument("--config", required=True, help="evaluation YAML (see configs/evaluate_*.yaml)")
    add_override_argument(p, "segmenter.steps=100")
    p.add_argument("--out", default=None, help="run folder (overrides out_dir)")
    p.add_argument(
        "--threads", type=bounded_count_arg(1, 1024), default=None, help="torch CPU threads"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from synthlesion.evaluation.config import load_evaluate_config
    from synthlesion.evaluation.console import (
        StageBars,
        arms_table,
        comparison_lines,
        convergence_line,
    )
    from synthlesion.evaluation.harness import run_evaluation

    overrides = list(args.overrides)
    if args.out is not None:
        overrides.append(f"out_dir={args.out}")
    if args.threads is not None:
        overrides.append(f"threads={args.threads}")
    config = load_evaluate_config(args.config, overrides)
    bars = StageBars(False if args.no_progress else None)
    try:
        results = run_evaluation(config, progress=bars.line, step_progress=bars.update)
    finally:
        bars.close()
    print(
        "\n".join(
            [
                "arms per labelled budget (lesion Dice mean [95% hierarchical-bootstrap CI "
                "over splits, seeds and cases], share of patches with a lesion, lesion-wise "
                "sensitivity, false positives per case):",
                *arms_table(results),
                "paired per-case Dice differences, arm − against (95% hierarchical-bootstrap "
                "CI, Wilcoxon p with Holm's correction):",
                *comparison_lines(results),
                convergence_line(results),
            ]
        )
    )
    print(
        f"results: {config.out_dir}/results.json"
        + (f"\nreport: {results['report']}" if "report" in results else "")
    )
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job end to end on the embedded phantom (no data needed)",
        description="Phantom (2D CT, few labelled lesion scans, many healthy ones) -> locked "
        "splits -> a tiny diffusion model trained on the CPU -> lesions painted into healthy "
        "scans -> the guarded dataset -> a quick downstream evaluation and its report. About "
        "10 minutes on 2 CPU cores; --quick is a smoke run of about 30 s.",
    )
    p.add_argument("--out", default="runs/demo", help="a new or empty folder (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="smoke-sized run (about 30 s)")
    p.add_argument(
        "--threads", type=bounded_count_arg(1, 1024), default=None, help="torch CPU threads"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    import time

    from synthlesion.evaluation.console import (
        StageBars,
        arms_table,
        comparison_lines,
        convergence_line,
    )
    from synthlesion.evaluation.demo import run_demo

    started = time.perf_counter()
    bars = StageBars(False if args.no_progress else None, stream=sys.stdout)
    bars.line(f"synthlesion demo{' (quick)' if args.quick else ''} -> {args.out}")
    try:
        result = run_demo(
            args.out,
            quick=args.quick,
            threads=args.threads,
            overwrite=args.overwrite,
            log=bars.line,
            steps=bars.update,
        )
    finally:
        bars.close()
    minutes, seconds = divmod(round(time.perf_counter() - started), 60)
    paths = result.paths
    report = paths.get("report")
    seeds = len(result.results.get("seeds") or [])
    splits = len(result.results.get("splits") or [])
    lines = [
        "",
        f"arms (lesion Dice mean [95% bootstrap CI over {splits} patient "
        f"split{'s' if splits != 1 else ''}, {seeds} seeds and the test cases], "
        "share of patches with a lesion, sensitivity, false positives per case; a quick run, "
        "see the report):",
        *arms_table(result.results),
        "paired per-case Dice differences against the reference arm (95% bootstrap CI, "
        "Wilcoxon p with Holm's correction):",
        *comparison_lines(result.results, brief=True),
        convergence_line(result.results),
        "",
        f"done in {minutes}m{seconds:02d}s ("
        + ", ".join(f"{k} {v:.0f}s" for k, v in result.seconds.items())
        + f"). Everything is in "
        f"{result.out_dir}:",
        f"  phantom dataset  {paths['dataset']} (splits: {paths['splits']})",
        f"  diffusion model  {paths['model']}",
        f"  synthetic scans  {paths['synthetic']}",
        f"  built dataset    {paths['built_dataset']} (dataset.json, dataset_card.md)",
        f"  evaluation       {paths['results']}",
    ]
    if report is not None:
        lines.append(f"  report           {report}  <- open this in a browser")
    print("\n".join(lines))
    return 0


def _add_reader_study(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reader-study",
        help="a blinded real-vs-synthetic reader study in the browser: make, serve, score",
        description="make: draw real and synthetic lesion cases and render them blinded; "
        "serve: the local reading page; score: accuracy, sensitivity, specificity, AUC, "
        "binomial test and Fleiss' kappa.",
    )
    steps = p.add_subparsers(dest="step", metavar="STEP", required=True)
    make = steps.add_parser("make", help="make a study folder (and its key beside it)")
    make.add_argument("--data", required=True, help="real cases (dataset.json or folder)")
    make.add_argument("--splits", required=True, help="the locked splits file")
    make.add_argument(
        "--manifest", action="append", required=True, help="a synthetic manifest (repeatable)"
    )
    make.add_argument("--out", required=True, help="the study folder to create")
    make.add_argument(
        "--n", type=bounded_count_arg(1, 100_000), default=50, help="cases per class (default 50)"
    )
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--split", default="test", help="split the real lesion cases come from")
    make.add_argument("--key", default=None, help="where the key goes (default DIR.key.json)")
    make.add_argument(
        "--include-rejected", action="store_true", help="also cases their quality gate rejected"
    )
    make.add_argument("--outline", action="store_true", help="show lesion outlines by default")
    make.add_argument("--overwrite", action="store_true", help="replace an earlier study")
    serve = steps.add_parser("serve", help="serve a study's reading page on this machine")
    serve.add_argument("study", help="the study folder")
    serve.add_argument("--port", type=bounded_count_arg(0, 65535), default=8765)
    serve.add_argument("--host", default="127.0.0.1", help="address (default: this machine only)")
    score = steps.add_parser("score", help="score the readers' answers")
    score.add_argument("study", help="the study folder")
    score.add_argument("--key", default=None, help="the study's key (default DIR.key.json)")
    score.add_argument("--out", default=None, help="folder for scores.json/html (default DIR)")
    score.add_argument("--report", default=None, help="an HTML report to add the panel to")
    score.add_argument(
        "--include-unsubmitted", action="store_true", help="also readers who have not submitted"
    )
    p.set_defaults(handler=_cmd_reader_study)


def _cmd_reader_study(args: argparse.Namespace) -> int:
    if args.step == "make":
        from synthlesion.reader_study.study import make_study

        result = make_study(
            args.data, args.splits, args.manifest, args.out, n=args.n, seed=args.seed,
            real_split=args.split, key=args.key, include_rejected=args.include_rejected,
            outline=args.outline, overwrite=args.overwrite, log=print,
        )  # fmt: skip
        left = result["left_out"]
        print(
            f"left out of the synthetic pool: {left['guard_violations']} guard violation(s), "
            f"{left['rejected_by_quality']} rejected by the quality gate\n"
            f"serve it: synthlesion reader-study serve {args.out}"
        )
        return 0
    if args.step == "serve":
        from synthlesion.reader_study.server import make_server

        server = make_server(args.study, args.host, args.port)
        host, port = server.server_address[:2]
        print(f"reader study at http://{host}:{port}/  (Ctrl-C stops; answers are saved)")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
        return 0
    from synthlesion.reader_study.score import score_study

    result = score_study(
        args.study, key=args.key, out=args.out, report=args.report,
        include_unsubmitted=args.include_unsubmitted,
    )  # fmt: skip
    pooled = result["pooled"]
    ci = pooled["accuracy_ci95"]
    print(
        f"{len(result['readers'])} reader(s), {result['cases']} cases: pooled accuracy "
        f"{pooled['accuracy']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}], AUC "
        f"{pooled['auc'] if pooled['auc'] is None else round(pooled['auc'], 3)}, binomial p "
        f"{pooled['binomial_p']:.3g}; Fleiss' kappa {result['fleiss_kappa']}\n"
        f"scores: {Path(args.out or args.study) / 'scores.json'} (and scores.html)"
    )
    return 0


BUILDERS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_check,
    _add_split,
    _add_sample,
    _add_phantom,
    _add_train,
    _add_build_dataset,
    _add_evaluate,
    _add_demo,
    _add_reader_study,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="synthlesion",
        description="Synthetic lesions for medical imaging.",
    )
    parser.add_argument("--version", action="version", version=f"synthlesion {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
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
        level=logging.DEBUG
        if args.verbose > 1
        else logging.INFO
        if args.verbose
        else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        print(f"synthlesion {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # every failure is one line (the traceback with --debug)
        if args.debug:
            raise
        print(f"synthlesion {args.command}: error: {describe_error(exc)}", file=sys.stderr)
        return 1


def describe_error(exc: BaseException) -> str:
    """One line naming the file and the problem: the toolkit's own errors as they are, OS
    errors with their file (disk full, read-only, permission), anything else with its type."""
    if isinstance(exc, SynthlesionError):
        return str(exc)
    if isinstance(exc, OSError):
        where = exc.filename if exc.filename is not None else "a file"
        reason = exc.strerror or str(exc)
        hints = {
            errno.ENOSPC: " (the disk is full: free space, nothing was half written)",
            errno.EROFS: " (a read-only file system: choose another output folder)",
            errno.EACCES: " (permission denied: choose a folder you may write)",
        }
        return f"{where}: {reason}{hints.get(exc.errno or 0, '')}"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else 'no message'} (--debug shows where)"


if __name__ == "__main__":
    sys.exit(main())
