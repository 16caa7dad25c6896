"""``synthlesion evaluate``: the downstream protocol. For every patient split and labelled
budget (a *cell*, :mod:`synthlesion.evaluation.protocol`), make each generator's lesions from
that budget only, build the guarded dataset, train the same segmenter under every arm and seed
(:mod:`synthlesion.evaluation.cell`), score it on the real test split through the evaluation
guard; then pool the cells into means with hierarchical-bootstrap intervals, paired tests with
Holm's correction, the convergence check, the floors and references, and the realism figures
(:mod:`synthlesion.evaluation.summary`); write ``results.json`` and the report.

Run folder (``out_dir``)::

    evaluate_config.yaml        the resolved config
    run.json                    run id, config hash, status (a folder of another run is refused)
    cells/<split>-b<budget>/    dataset.json + splits.json (the cell's real cases), handcrafted/,
                                diffusion/ (model and sampled set), build/ (the guarded
                                dataset), arms/<arm>/seed-<n>/ (result.json, model.safetensors),
                                gate.json, floor.json, realism.json
    results.json                every figure
    report.html, figures/       the report and its figures as PNG

A rerun with the same config resumes: finished cells, models and arm runs are read back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from synthlesion import __version__
from synthlesion.config import config_to_dict, save_config
from synthlesion.data.intensity import IntensityNormaliser
from synthlesion.evaluation import datasets as evdata
from synthlesion.evaluation.cell import CellOutcome, run_cell
from synthlesion.evaluation.config import EvaluateConfig
from synthlesion.evaluation.errors import EvaluationConfigError, RunFolderError
from synthlesion.evaluation.metrics import jsonable
from synthlesion.evaluation.protocol import plan_cells
from synthlesion.evaluation.summary import summarise_protocol
from synthlesion.storage import atomic_write_json, canonical_json_hash

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
RUN_FORMAT = "synthlesion-evaluation-run/1"
Progress = Callable[[str], None]


def config_hash(config: EvaluateConfig) -> str:
    """Hash of the settings that shape the results (threads, device and report left out)."""
    plain = config_to_dict(config)
    for key in ("threads", "device", "report", "out_dir"):
        plain.pop(key, None)
    return canonical_json_hash(plain)


def input_hashes(config: EvaluateConfig) -> dict[str, Any]:
    """The content of the run's inputs: the real-case list's file (or a folder's listing of
    names and sizes) and every splits file's own sha256, so a rerun on changed data or splits
    is never served the old results."""
    from synthlesion.data.splits import load_splits
    from synthlesion.storage import sha256_file

    data = Path(config.data)
    if data.is_file():
        data_hash = sha256_file(data)
    else:
        from synthlesion.pipelines.train_lesions import is_cache_file

        listing = sorted(
            (str(p.relative_to(data)), p.stat().st_size)
            for p in data.rglob("*")
            if p.is_file() and not is_cache_file(p)  # the set-up's cache is not data
        )
        data_hash = canonical_json_hash(listing)
    return {
        "data_sha256": data_hash,
        "splits_sha256": [load_splits(p).sha256 for p in config.splits],
    }


def claim_run_folder(out: Path, config: EvaluateConfig) -> bool:
    """Make ``out`` this run's folder; returns True when resuming the same run (the same
    settings on the same data and splits).

    Raises:
        RunFolderError: ``out`` holds another run's results (other settings, or the same
            settings on data or splits whose content changed), or files that are not a run.
    """
    digest = config_hash(config)
    inputs = input_hashes(config)
    marker = out / RUN_FILE
    if marker.is_file():
        try:
            run = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            run = {}
        if run.get("format") != RUN_FORMAT or run.get("config_sha256") != digest:
            raise RunFolderError(
                f"{out}: holds the results of another evaluation run (config sha256 "
                f"{str(run.get('config_sha256'))[:12]}, this config {digest[:12]}); nothing was "
                "overwritten: choose a new out_dir or remove the old one"
            )
        recorded = run.get("inputs")
        if recorded is not None and recorded != inputs:
            changed = [k for k in inputs if recorded.get(k) != inputs[k]]
            raise RunFolderError(
                f"{out}: its results were made from other content of {', '.join(changed)} "
                f"({config.data}, {', '.join(str(s) for s in config.splits)} changed since); "
                "nothing was reused or overwritten: choose a new out_dir"
            )
        if recorded is None:  # a run folder from before input hashes: record them now
            atomic_write_json(marker, {**run, "inputs": inputs})
        return True
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunFolderError(
            f"{out}: exists and holds files that are not an evaluation run; nothing was "
            "overwritten: choose a new or empty out_dir"
        )
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "evaluate_config.yaml")
    atomic_write_json(
        marker,
        {
            "format": RUN_FORMAT,
            "config_sha256": digest,
            "inputs": inputs,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "synthlesion_version": __version__,
            "status": "running",
        },
    )
    return False


@contextlib.contextmanager
def _threads(count: int | None) -> Iterator[None]:
    if count is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _log(progress: Progress | None, message: str) -> None:
    logger.info(message)
    if progress is not None:
        progress(message)


def run_evaluation(
    config: EvaluateConfig,
    *,
    progress: Progress | None = None,
    step_progress: Callable[[str, int, int], None] | None = None,
    only_cells: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run every cell (split x budget), arm and seed; score, compare, measure realism; write
    ``results.json`` and the report.

    Args:
        config: The resolved config.
        progress: Called with one line per stage (entry points print it).
        step_progress: Called as ``(label, step, total)`` during each training run.
        only_cells: Run only these cells (names as ``s0-b4``) and return ``{"cells": [...]}``
            without pooling or writing results: workers running cells side by side; a last
            call without it resumes every finished cell and pools them.

    Returns:
        The results (also written to ``out_dir/results.json``).

    Raises:
        EvaluationConfigError: budgets beyond a split's lesion scans, a test side too small,
            no real arm (all before anything is written).
        RunFolderError: ``out_dir`` holds another run.
        SyntheticTestDataError: the test split would hold synthetic data.
        GuardViolation, ...: a generator's set fails the builder's guards (before its cell
            trains).
    """
    out = Path(config.out_dir)
    started = time.perf_counter()
    cases = evdata.require_real_source(config.data)  # before anything is written
    if not any(a.kind == "real" for a in config.arms):
        raise EvaluationConfigError(
            "arms: the protocol needs a real arm (the reference, the gate's segmenter and the "
            "convergence check)"
        )
    cells = plan_cells(config, cases)
    if only_cells is not None:
        unknown = sorted(set(only_cells) - {c.name for c in cells})
        if unknown:
            raise EvaluationConfigError(
                f"only_cells: {unknown} are not cells of this run "
                f"({', '.join(c.name for c in cells)})"
            )
    resume = claim_run_folder(out, config)
    modality = cases[0].modality if cases else "unknown"
    normaliser = IntensityNormaliser.for_modality(modality)
    largest = max((c.budget or 0 for c in cells if not c.reference), default=0)
    outcomes: list[CellOutcome] = []
    with _threads(config.threads):
        for number, cell in enumerate(cells, start=1):
            if only_cells is not None and cell.name not in only_cells:
                continue
            _log(progress, f"cell {number}/{len(cells)}: {cell.name}")
            outcome = run_cell(
                config,
                cell,
                cases,
                out / "cells" / cell.name,
                normaliser,
                realism=(cell.budget or 0) == largest and not cell.reference,
                resume=resume,
                progress=progress,
                step_progress=step_progress,
            )
            outcomes.append(outcome)
        if only_cells is not None:
            return {"cells": [o.cell.name for o in outcomes]}
        results = summarise_protocol(config, cells, outcomes)
        results["config_sha256"] = config_hash(config)
        results["seconds"] = round(time.perf_counter() - started, 1)
        if config.report:
            from synthlesion.evaluation.report import REPORT_FILE, write_report

            results["report"] = str(out / REPORT_FILE)
            examples = next((o.examples for o in outcomes if o.examples), {})
            card = outcomes[0].card
            write_report(out, jsonable(results), examples, card)
            _log(progress, f"report: {results['report']}")
        atomic_write_json(out / "results.json", jsonable(results))
        run = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
        atomic_write_json(out / RUN_FILE, {**run, "status": "complete"})
    return results


__all__ = ["claim_run_folder", "config_hash", "run_evaluation"]
