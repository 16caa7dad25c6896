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


def _pm(stat: Mapping[str, Any] | None, digits: int = 3) -> str:
    if not stat or stat.get("mean") is None or not math.isfinite(stat["mean"]):
        return "n/a"
    return f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}"


def arms_table(results: Mapping[str, Any]) -> list[str]:
    """Fixed-width lines: arm, Dice, sensitivity, false positives per case, HD95."""
    lines = [f"  {'arm':<16}{'Dice':>16}{'sensitivity':>16}{'FP/case':>16}{'HD95 mm':>18}"]
    for a in results["arms"]:
        m = a["metrics"]
        lines.append(
            f"  {a['name']:<16}{_pm(m.get('dice')):>16}{_pm(m.get('sensitivity')):>16}"
            f"{_pm(m.get('fp_per_case'), 2):>16}{_pm(m.get('hd95_mm'), 1):>18}"
        )
    return lines


def comparison_lines(results: Mapping[str, Any], *, brief: bool = False) -> list[str]:
    """One line per Dice comparison: mean paired difference, CI and Wilcoxon p.

    ``brief`` keeps the comparisons against the reference arm and those of the best diffusion
    arm against each baseline.
    """
    diffusion = [a for a in results["arms"] if a["kind"] == "diffusion"]
    best = (
        max(diffusion, key=lambda a: a["metrics"]["dice"]["mean"] or -1.0)["name"]
        if diffusion
        else None
    )
    lines = []
    for c in results["comparisons"]:
        if c["metric"] != "dice" or c["mean_diff"] is None:
            continue
        if brief and c["against"] != results["reference_arm"] and c["arm"] != best:
            continue
        lines.append(
            f"  {c['arm']} − {c['against']}: ΔDice {c['mean_diff']:+.3f} "
            f"[{c['ci_low']:+.3f}, {c['ci_high']:+.3f}], Wilcoxon p "
            f"{c['wilcoxon_p']:.3g}"
        )
    return lines


__all__ = ["StageBars", "arms_table", "comparison_lines"]
