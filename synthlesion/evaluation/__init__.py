"""Proof that synthetic lesions help: the downstream evaluation harness, the hand-crafted
baseline, fidelity measures, the report, and the end-to-end demo.

* :func:`run_evaluation` (``synthlesion evaluate --config``): trains a small MONAI segmenter
  under several arms (real only, classical augmentation, lesion copy-paste, hand-crafted
  lesions, diffusion lesions at several shares) with the same budget and seeds, scores each on
  the real test split read through the dataset package's evaluation guard, compares the arms
  case by case, measures the synthetic lesions' fidelity and writes ``report.html``.
* :func:`run_handcrafted`: the SynTumor-style baseline generator, writing a manifest like
  ``synthlesion sample`` does.
* :func:`run_demo` (``synthlesion demo``): the whole toolkit on the embedded phantom.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ArmConfig": "synthlesion.evaluation.config",
    "EvaluateConfig": "synthlesion.evaluation.config",
    "FidelityConfig": "synthlesion.evaluation.config",
    "HandcraftedConfig": "synthlesion.pipelines.handcrafted",
    "MetricsConfig": "synthlesion.evaluation.config",
    "SegmenterConfig": "synthlesion.evaluation.config",
    "load_evaluate_config": "synthlesion.evaluation.config",
    "EvaluationConfigError": "synthlesion.evaluation.errors",
    "EvaluationError": "synthlesion.evaluation.errors",
    "RunFolderError": "synthlesion.evaluation.errors",
    "SyntheticTestDataError": "synthlesion.evaluation.errors",
    "run_evaluation": "synthlesion.evaluation.harness",
    "run_handcrafted": "synthlesion.pipelines.handcrafted",
    "case_metrics": "synthlesion.evaluation.metrics",
    "paired_comparison": "synthlesion.evaluation.stats",
    "write_report": "synthlesion.evaluation.report",
    "Scenario": "synthlesion.evaluation.scenario",
    "make_scenario": "synthlesion.evaluation.scenario",
    "run_demo": "synthlesion.evaluation.demo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'synthlesion.evaluation' has no attribute {name!r}")
