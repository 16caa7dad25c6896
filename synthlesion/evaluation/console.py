"""Console output for the entry points (``synthlesion evaluate``/``demo``, the benchmark):
progress bars per stage and the closing summary. The library itself only logs."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO


class StageBars:
    """Progress per stage: a tqdm bar on a terminal, elsewhere (logs, CI, pipes) a plain line
    at most every ``every_s`` seconds; opened on a label's first update, closed on the next
    label or line.

    Args:
        enabled: ``False`` shows no progress (``--no-progress``); ``None`` picks a bar on a
            terminal and lines otherwise.
        stream: Where bars and lines go.
    """

    def __init__(
        self, enabled: bool | None = None, stream: TextIO | None = None, every_s: float = 20.0
    ) -> None:
        self.enabled = enabled
        self.every_s = every_s
        self.stream = stream or sys.stderr
        self.bar: Any = None
        self.label: str | None = None
        self.shown = 0.0
        isatty = getattr(self.stream, "isatty", None)
        self.terminal = bool(isatty and isatty())

    def line(self, message: str) -> None:
        """Print a stage line (above any open bar)."""
        self.close()
        print(message, file=self.stream, flush=True)

    def update(self, label: str, done: int, total: int) -> None:
        if self.enabled is False:
            return
        if label != self.label:
            self.close()
            self.label = label
            self.shown = time.monotonic()
            if self.terminal or self.enabled:
                from tqdm.auto import tqdm

                self.bar = tqdm(
                    total=total,
                    desc=label,
                    unit="step",
                    file=self.stream,
                    dynamic_ncols=True,
                    leave=False,
                )
        if self.bar is not None:
            self.bar.total = total
            self.bar.n = done
            self.bar.refresh()
            return
        now = time.monotonic()
        if now - self.shown >= self.every_s:
            self.shown = now
            print(f"      {label}: {done}/{total}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.label = None, None


def _num(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def _f(value: Any, digits: int = 3, signed: bool = False) -> str:
    number = _num(value)
    if not math.isfinite(number):
        return "n/a"
    return f"{number:+.{digits}f}" if signed else f"{number:.{digits}f}"


def _interval(mean: Any, ci: Any, digits: int = 3, signed: bool = False) -> str:
    """``mean [low, high]`` (the interval left out where it is missing)."""
    if not math.isfinite(_num(mean)):
        return "n/a"
    low, high = (ci[0], ci[1]) if isinstance(ci, (list, tuple)) and len(ci) == 2 else (None, None)
    if not (math.isfinite(_num(low)) and math.isfinite(_num(high))):
        return _f(mean, digits, signed)
    return f"{_f(mean, digits, signed)} [{_f(low, digits, signed)}, {_f(high, digits, signed)}]"


def _p(value: Any) -> str:
    number = _num(value)
    return f"{number:.3g}" if math.isfinite(number) else "n/a"


def _row(label: str, figures: Mapping[str, Any]) -> str:
    return (
        f"  {label:<26}{_interval(figures.get('dice_mean'), figures.get('dice_ci')):>24}"
        f"{_f(figures.get('positive_patch_share')):>10}{_f(figures.get('sensitivity')):>8}"
        f"{_f(figures.get('fp_per_case'), 2):>9}"
    )


def arms_table(results: Mapping[str, Any]) -> list[str]:
    """Fixed-width lines, one per ``arm@budget``: lesion Dice mean [95% CI], the share of
    positive patches, sensitivity and false positives per case; then the threshold floor per
    budget and the upper reference."""
    lines = [
        f"  {'arm@budget':<26}{'Dice [95% CI]':>24}{'pos.share':>10}{'sens.':>8}{'FP/case':>9}"
    ]
    arms = results.get("arms")
    for key, figures in (arms if isinstance(arms, Mapping) else {}).items():
        lines.append(_row(str(key), figures if isinstance(figures, Mapping) else {}))
    floors = results.get("threshold_floor")
    for budget, floor in (floors if isinstance(floors, Mapping) else {}).items():
        lines.append(_row(f"threshold floor@{budget}", floor if isinstance(floor, Mapping) else {}))
    upper = results.get("upper_reference")
    if isinstance(upper, Mapping):
        lines.append(_row("upper reference", upper))
    return lines


def comparison_lines(results: Mapping[str, Any], *, brief: bool = False) -> list[str]:
    """One line per comparison: the mean paired Dice difference, its 95% CI and the
    Holm-corrected p (``brief``: only the comparisons against the reference arm)."""
    reference = results.get("reference_arm")
    comparisons = results.get("comparisons")
    lines = []
    for key, c in (comparisons if isinstance(comparisons, Mapping) else {}).items():
        if not isinstance(c, Mapping):
            continue
        if brief and c.get("against") != reference:
            continue
        arm, against = str(key).partition("_vs_")[::2]
        if c.get("arm") is not None and c.get("budget") is not None:
            arm = f"{c['arm']}@{c['budget']}"
        lines.append(
            f"  {arm} − {c.get('against', against)}: ΔDice "
            f"{_interval(c.get('mean_diff'), [c.get('ci_low'), c.get('ci_high')], signed=True)}"
            f", p_holm {_p(c.get('p_holm'))} (Wilcoxon p {_p(c.get('p_wilcoxon'))}, "
            f"{c.get('pairs', 'n/a')} pairs)"
            + (
                "  [trained on no lesion of its own: every one failed the gate or found no place]"
                if c.get("arm_new_lesion_share") == 0
                else ""
            )
        )
    return lines


def convergence_line(results: Mapping[str, Any]) -> str:
    """Whether the real arm converged, with the test Dice change when doubling its steps."""
    convergence = results.get("convergence")
    if not isinstance(convergence, Mapping) or not convergence:
        return "convergence: not checked in this run"
    changes = ", ".join(
        f"{budget} "
        + _interval(
            c.get("test_dice_change_when_doubled") if isinstance(c, Mapping) else None,
            c.get("ci") if isinstance(c, Mapping) else None,
            signed=True,
        )
        for budget, c in convergence.items()
    )
    word = "yes" if results.get("real_converged") else "NO"
    return f"real arm converged: {word} (test Dice change when doubling the steps: {changes})"


__all__ = ["StageBars", "arms_table", "comparison_lines", "convergence_line"]
