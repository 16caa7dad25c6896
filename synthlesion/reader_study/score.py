"""Score a reader study: can readers spot the synthetic lesions?

"Positive" is synthetic: sensitivity is the share of synthetic cases called synthetic,
specificity the share of real cases called real, accuracy the share called right; each with
a Wilson 95% interval. The ROC AUC ranks the answers on a 10-point scale (real with confidence
5 ... 1, then synthetic with confidence 1 ... 5; ties count half). The binomial test asks
whether the accuracy differs from chance (0.5, two-sided, exact). Fleiss' kappa measures how
much the readers agree with each other beyond chance, over the cases every reader answered.
Per reader, pooled (every reader-case answer one observation), per generator (the synthetic
cases of each generator, and the real ones) and per lesion size (tertiles of the study's
lesion diameters). A reader's latest answer per case counts; readers who have not submitted
are scored only with ``include_unsubmitted`` (and marked). Pooled intervals treat each
reader-case answer as independent: with several readers they overstate certainty.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from synthlesion.reader_study.answers import AnswerLog
from synthlesion.reader_study.errors import StudyError
from synthlesion.reader_study.study import load_study
from synthlesion.storage import atomic_write_json, atomic_write_text

Z95 = 1.959963984540054


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of a proportion (None when ``n`` is 0)."""
    if n == 0:
        return None
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def rating(answer: str, confidence: int) -> int:
    """1 (surely real) ... 10 (surely synthetic)."""
    return 5 + confidence if answer == "synthetic" else 6 - confidence


def roc_auc(ratings: Sequence[float], synthetic: Sequence[bool]) -> float | None:
    """P(a synthetic case rates above a real one), ties half (Mann-Whitney)."""
    pos = [r for r, s in zip(ratings, synthetic, strict=True) if s]
    neg = [r for r, s in zip(ratings, synthetic, strict=True) if not s]
    if not pos or not neg:
        return None
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def fleiss_kappa(counts: np.ndarray) -> float | None:
    """Fleiss' kappa of ``counts`` ``(cases, categories)``: raters per category per case,
    the same number of raters for every case (None for fewer than 2 raters or no variation)."""
    counts = np.asarray(counts, dtype=float)
    if counts.size == 0:
        return None
    raters = counts.sum(1)
    if raters.min() < 2 or not np.all(raters == raters[0]):
        return None
    m = raters[0]
    p_case = ((counts**2).sum(1) - m) / (m * (m - 1))
    p_bar = p_case.mean()
    p_cat = counts.sum(0) / counts.sum()
    p_e = float((p_cat**2).sum())
    if math.isclose(p_e, 1.0):
        return None
    return float((p_bar - p_e) / (1 - p_e))


def summarise(observations: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The figures of a set of ``{"truth", "answer", "confidence"}`` observations."""
    n = len(observations)
    synthetic = [o["truth"] == "synthetic" for o in observations]
    called = [o["answer"] == "synthetic" for o in observations]
    correct = sum(s == c for s, c in zip(synthetic, called, strict=True))
    tp = sum(s and c for s, c in zip(synthetic, called, strict=True))
    tn = sum((not s) and (not c) for s, c in zip(synthetic, called, strict=True))
    n_syn, n_real = sum(synthetic), n - sum(synthetic)
    out: dict[str, Any] = {"n": n, "n_synthetic": n_syn, "n_real": n_real, "correct": correct}
    for name, k, total in (("accuracy", correct, n), ("sensitivity", tp, n_syn),
                           ("specificity", tn, n_real)):  # fmt: skip
        out[name] = k / total if total else None
        ci = wilson(k, total)
        out[f"{name}_ci95"] = list(ci) if ci else None
    out["auc"] = roc_auc([rating(o["answer"], o["confidence"]) for o in observations], synthetic)
    out["binomial_p"] = float(stats.binomtest(correct, n, 0.5).pvalue) if n else None
    return out


def _size_bins(sizes: Sequence[float]) -> list[float]:
    """Two cut points: tertiles of the lesion diameters."""
    return [float(v) for v in np.quantile(np.asarray(sizes, dtype=float), [1 / 3, 2 / 3])]


def score_study(
    study_dir: str | Path,
    *,
    key: str | Path | None = None,
    out: str | Path | None = None,
    report: str | Path | None = None,
    include_unsubmitted: bool = False,
) -> dict[str, Any]:
    """Score every reader's answers against the key; write ``scores.json`` and
    ``scores.html`` (into ``out``, default the study folder; also as a panel appended to an
    evaluation ``report`` if given).

    Raises:
        StudyError: no key, a key of another study, no answers, an answers file that fails its
            hash chain.
    """
    study_dir = Path(study_dir)
    study, key_record = load_study(study_dir, key)
    if key_record is None:
        raise StudyError(f"{study_dir}: the key is missing (default {study_dir}.key.json; --key)")
    truth = {c["study_id"]: c for c in key_record["cases"]}
    cases = list(study["cases"])
    if set(truth) != set(cases):
        raise StudyError(f"{key or 'the key'}: its cases differ from the study's")
    answers_dir = study_dir / "answers"
    logs = {
        p.stem: AnswerLog(p, study["study_id"], cases) for p in sorted(answers_dir.glob("*.jsonl"))
    }
    unsubmitted = sorted(r for r, log in logs.items() if not log.submitted and log.answers())
    logs = {
        r: log for r, log in logs.items()
        if log.answers() and (log.submitted or include_unsubmitted)
    }  # fmt: skip
    if not logs:
        raise StudyError(
            f"{answers_dir}: no submitted answers yet"
            + (f" ({len(unsubmitted)} reader(s) still reading; --include-unsubmitted scores "
               "them)" if unsubmitted else "")
        )  # fmt: skip
    cuts = _size_bins([c["lesion_size_mm"] for c in truth.values()])

    def size_bin(case: Mapping[str, Any]) -> str:
        d = case["lesion_size_mm"]
        if d < cuts[0]:
            return f"small (< {cuts[0]:.1f} mm)"
        if d < cuts[1]:
            return f"medium ({cuts[0]:.1f}-{cuts[1]:.1f} mm)"
        return f"large (>= {cuts[1]:.1f} mm)"

    observations = []
    readers = {}
    for reader, log in logs.items():
        own = []
        for case, record in log.answers().items():
            info = truth[case]
            obs = {"reader": reader, "case": case, "truth": info["truth"],
                   "answer": record["answer"], "confidence": int(record["confidence"]),
                   "generator": info.get("generator") or "real", "size": size_bin(info)}  # fmt: skip
            own.append(obs)
        readers[reader] = {**summarise(own), "submitted": log.submitted,
                           "answered": len(own), "of": len(cases)}  # fmt: skip
        observations += own
    by_generator = {}
    for name in sorted({o["generator"] for o in observations}):
        group = [o for o in observations if o["generator"] == name]
        by_generator[name] = summarise(group)
    by_size = {}
    for name in sorted({o["size"] for o in observations}):
        by_size[name] = summarise([o for o in observations if o["size"] == name])
    complete = [c for c in cases if all(c in log.answers() for log in logs.values())]
    counts = np.array([[sum(log.answers()[c]["answer"] == a for log in logs.values())
                        for a in ("real", "synthetic")] for c in complete])  # fmt: skip
    result = {
        "study_id": study["study_id"],
        "cases": len(cases),
        "readers": readers,
        "pooled": summarise(observations),
        "fleiss_kappa": fleiss_kappa(counts) if len(logs) >= 2 else None,
        "kappa_cases": len(complete),
        "by_generator": by_generator,
        "by_lesion_size": by_size,
        "size_cuts_mm": cuts,
        "left_out": key_record.get("left_out", {}),
        "not_submitted": unsubmitted if not include_unsubmitted else [],
        "note": "pooled intervals and the binomial test treat every reader-case answer as "
        "independent; with several readers they overstate the certainty: read them per reader",
    }
    target = Path(out) if out is not None else study_dir
    target.mkdir(parents=True, exist_ok=True)
    atomic_write_json(target / "scores.json", result)
    panel = html_panel(result)
    atomic_write_text(target / "scores.html", _page(panel))
    if report is not None:
        _append_panel(Path(report), panel)
    return result


def _fmt(value: Any, ci: Any = None) -> str:
    if value is None:
        return "–"
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    if ci:
        text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    return text


def _row(name: str, s: Mapping[str, Any], extra: str = "") -> str:
    cells = [name, str(s["n"]), _fmt(s["accuracy"], s["accuracy_ci95"]),
             _fmt(s["sensitivity"], s["sensitivity_ci95"]),
             _fmt(s["specificity"], s["specificity_ci95"]), _fmt(s["auc"]),
             _fmt(s["binomial_p"]), extra]  # fmt: skip
    return "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"


def html_panel(result: Mapping[str, Any]) -> str:
    """The report panel: per reader, pooled, per generator, per lesion size."""
    head = ("<tr><th>who</th><th>n</th><th>accuracy [95% CI]</th><th>sensitivity (synthetic "
            "spotted)</th><th>specificity (real called real)</th><th>ROC AUC</th>"
            "<th>binomial p vs chance</th><th></th></tr>")  # fmt: skip
    rows = [
        _row(r, s, "" if s["submitted"] else "not submitted") for r, s in result["readers"].items()
    ]
    rows.append(_row("pooled", result["pooled"]))
    gen = [_row(g, s) for g, s in result["by_generator"].items()]
    size = [_row(b, s) for b, s in result["by_lesion_size"].items()]
    kappa = result["fleiss_kappa"]
    lines = [
        '<section class="panel" id="reader-study">',
        "<h2>Reader study: real or synthetic?</h2>",
        f"<p>Study {html.escape(result['study_id'])}: {result['cases']} cases, "
        f"{len(result['readers'])} reader(s). Accuracy 0.5 is chance: readers cannot tell the "
        "synthetic lesions from the real ones. Fleiss' kappa "
        f"{_fmt(kappa)} over {result['kappa_cases']} cases every reader answered.</p>",
        f"<table>{head}{''.join(rows)}</table>",
        f"<h3>Per generator</h3><table>{head}{''.join(gen)}</table>",
        f"<h3>Per lesion size</h3><table>{head}{''.join(size)}</table>",
        "</section>",
    ]
    return "\n".join(lines)


def _page(panel: str) -> str:
    return ("<!doctype html><html><head><meta charset='utf-8'><title>Reader study scores</title>"
            "<style>body{font-family:system-ui,sans-serif;margin:2rem}table{border-collapse:"
            "collapse}td,th{border:1px solid #ccc;padding:.3rem .5rem;text-align:left}</style>"
            f"</head><body>{panel}</body></html>")  # fmt: skip


def _append_panel(report: Path, panel: str) -> None:
    """Insert (or replace) the panel in an HTML report, atomically."""
    try:
        text = report.read_text(encoding="utf-8")
    except OSError as exc:
        raise StudyError(f"{report}: cannot read the report ({exc})") from None
    start = text.find('<section class="panel" id="reader-study">')
    end = text.find("</section>", start) if start >= 0 else -1
    if start >= 0 and end >= 0:
        text = text[:start] + panel + text[end + len("</section>") :]
    elif "</body>" in text:
        text = text.replace("</body>", panel + "\n</body>", 1)
    else:
        text += panel
    atomic_write_text(report, text)
