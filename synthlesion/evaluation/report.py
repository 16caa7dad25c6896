"""The evaluation report: one self-contained HTML file plus its figures as PNG files.

Charts are inline SVG (and the same charts as PNG under ``figures/``); image grids are PNG,
embedded as base64 and saved under ``figures/``. Sections: the verdict in a few sentences, the
arms' metrics (table and plots with +-1 sd error bars over seeds), paired comparisons, the
synthetic lesions' fidelity with example grids (context, mask, synthetic lesion, nearest real
lesion), the guard results and the dataset card.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from synthlesion.evaluation.charts import Series, bar_chart, forest_plot, image_grid
from synthlesion.storage import atomic_write_bytes, atomic_write_text

REPORT_FILE = "report.html"
FIGURES_DIR = "figures"

_CSS = """
body{font-family:Helvetica,Arial,sans-serif;margin:0;color:#222;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px;background:#fff}
h1{font-size:26px;margin:8px 0 4px}h2{font-size:20px;margin:34px 0 10px;border-bottom:1px solid
#ddd;padding-bottom:4px}h3{font-size:16px;margin:20px 0 8px}
.lead{font-size:15px;line-height:1.5;background:#eef4fb;border-left:4px solid #4c72b0;
padding:10px 14px;margin:14px 0}
table{border-collapse:collapse;margin:8px 0 14px;font-size:12px}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:right;white-space:nowrap}th{background:#f0f2f5}
td:first-child,th:first-child{text-align:left}
.figs{display:flex;flex-wrap:wrap;gap:14px}.figs figure{margin:0}
figcaption{font-size:12px;color:#555;max-width:560px}
.ok{color:#2a7a3b;font-weight:bold}.bad{color:#b23a3a;font-weight:bold}
code{background:#f0f2f5;padding:0 3px;font-size:12px}.card{font-size:13px}
.note{font-size:12px;color:#555}.wide{overflow-x:auto;max-width:100%}
"""


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _pm(stat: Mapping[str, Any] | None, digits: int = 3) -> str:
    if not stat:
        return "–"
    mean, sd = stat.get("mean"), stat.get("sd")
    if mean is None or (isinstance(mean, float) and not math.isfinite(mean)):
        return "–"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if sd is not None else f"{mean:.{digits}f}"


def markdown_to_html(text: str) -> str:
    """The Markdown subset of the dataset card: headings, tables, lists, paragraphs, code."""

    def inline(s: str) -> str:
        s = html.escape(s)
        s = re.sub(r"`([^`]*)`", r"<code>\1</code>", s)
        return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", s)

    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if not line:
            i += 1
            continue
        heading = re.match(r"(#{1,4}) (.*)", line)
        if heading:
            level = min(len(heading.group(1)) + 2, 6)
            out.append(f"<h{level}>{inline(heading.group(2))}</h{level}>")
            i += 1
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                    rows.append(cells)
                i += 1
            body = "".join(
                "<tr>"
                + "".join(
                    f"<{'th' if r == 0 else 'td'}>{inline(c)}</{'th' if r == 0 else 'td'}>"
                    for c in row
                )
                + "</tr>"
                for r, row in enumerate(rows)
            )
            out.append(f"<table>{body}</table>")
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{inline(lines[i][2:])}</li>")
                i += 1
            out.append(f"<ul>{''.join(items)}</ul>")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not lines[i].startswith(("#", "|", "- ")):
                para.append(lines[i].strip())
                i += 1
            out.append(f"<p>{inline(' '.join(para))}</p>")
    return "\n".join(out)


def _comparison(
    results: Mapping[str, Any], arm: str, against: str, metric: str = "dice"
) -> Mapping[str, Any] | None:
    for c in results["comparisons"]:
        if c["arm"] == arm and c["against"] == against and c["metric"] == metric:
            return c
    return None


def verdict(results: Mapping[str, Any]) -> list[str]:
    """Plain sentences: the best diffusion arm against the reference and each baseline."""
    arms = {a["name"]: a for a in results["arms"]}
    reference = results["reference_arm"]
    lines = []
    diffusion = [a for a in results["arms"] if a["kind"] == "diffusion"]
    if not diffusion:
        return ["No diffusion arm in this run."]
    best = max(diffusion, key=lambda a: _num(a["metrics"].get("dice", {}).get("mean")))
    for other in [reference] + [
        a["name"]
        for a in results["arms"]
        if a["kind"] in ("classical", "copy_paste", "handcrafted")
    ]:
        c = _comparison(results, best["name"], other)
        if c is None or other == best["name"]:
            continue
        diff = _num(c["mean_diff"])
        if not math.isfinite(diff):
            continue
        sure = c["ci_low"] is not None and (_num(c["ci_low"]) > 0 or _num(c["ci_high"]) < 0)
        word = "higher" if diff > 0 else "lower"
        lines.append(
            f"{best['name']} scores a mean lesion Dice {abs(diff):.3f} {word} than "
            f"{other} ({_num(arms[best['name']]['metrics']['dice']['mean']):.3f} vs "
            f"{_num(arms[other]['metrics']['dice']['mean']):.3f}; 95% CI of the paired "
            f"difference [{_num(c['ci_low']):+.3f}, {_num(c['ci_high']):+.3f}], Wilcoxon "
            f"p = {_num(c['wilcoxon_p']):.3g}, {c['cases']} test cases) — "
            + (
                "a difference the interval supports."
                if sure
                else "the interval includes zero: not a demonstrated difference."
            )
        )
    return lines


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def write_report(
    out: Path,
    results: Mapping[str, Any],
    examples: Mapping[str, Sequence[Mapping[str, Any]]],
    card: str,
) -> Path:
    """Write ``report.html`` and ``figures/*.png`` into ``out``; returns the report path."""
    figures = out / FIGURES_DIR
    arms = results["arms"]
    names = [a["name"] for a in arms]
    bins = results["size_bins"]
    charts: list[tuple[str, str, Any]] = []

    def metric_series(key: str) -> Series:
        stats = [a["metrics"].get(key, {}) for a in arms]
        return Series(
            key,
            [_num(s.get("mean")) for s in stats],
            [_num(s.get("sd")) for s in stats],
            [[_num(v) for v in s.get("values", [])] for s in stats],
        )

    charts.append(
        (
            "dice",
            "Lesion Dice per arm (mean ± sd over seeds; dots: seeds)",
            bar_chart(
                "Lesion Dice (higher is better)", names, [metric_series("dice")], bounds=(0.0, 1.0)
            ),
        )
    )
    charts.append(
        (
            "sensitivity_by_size",
            "Lesion-wise sensitivity by lesion size",
            bar_chart(
                "Lesion-wise sensitivity by size",
                names,
                [Series(b, *_cols(arms, f"sensitivity[{b}]")) for b in bins],
                bounds=(0.0, 1.0),
            ),
        )
    )
    charts.append(
        (
            "fp_by_size",
            "False-positive components per test case by size",
            bar_chart(
                "False positives per case by size (lower is better)",
                names,
                [Series(b, *_cols(arms, f"fp_per_case[{b}]")) for b in bins],
                bounds=(0.0, None),
            ),
        )
    )
    charts.append(
        (
            "hd95",
            "95th-percentile Hausdorff distance (mm), lesion cases",
            bar_chart(
                "HD95 in mm (lower is better)",
                names,
                [metric_series("hd95_mm")],
                bounds=(0.0, None),
            ),
        )
    )
    reference = results["reference_arm"]
    rows = [
        c for c in results["comparisons"] if c["metric"] == "dice" and c["against"] == reference
    ]
    if rows:
        charts.append(
            (
                "paired_dice",
                f"Paired per-case Dice difference against {reference} (mean and 95% bootstrap CI)",
                forest_plot(
                    f"Dice difference vs {reference}",
                    [c["arm"] for c in rows],
                    [_num(c["mean_diff"]) for c in rows],
                    [_num(c["ci_low"]) for c in rows],
                    [_num(c["ci_high"]) for c in rows],
                    x_label="Δ Dice",
                ),
            )
        )
    rows = [
        c for c in results["comparisons"] if c["metric"] == "dice" and c["against"] != reference
    ]
    if rows:
        charts.append(
            (
                "paired_dice_baselines",
                "Diffusion arms against each baseline "
                "(paired per-case Dice difference, 95% bootstrap CI)",
                forest_plot(
                    "Diffusion vs baselines",
                    [f"{c['arm']} − {c['against']}" for c in rows],
                    [_num(c["mean_diff"]) for c in rows],
                    [_num(c["ci_low"]) for c in rows],
                    [_num(c["ci_high"]) for c in rows],
                    x_label="Δ Dice",
                    width=620,
                ),
            )
        )
    chart_html = []
    for key, caption, canvas in charts:
        atomic_write_bytes(figures / f"{key}.png", canvas.png())
        chart_html.append(
            f"<figure>{canvas.svg(caption)}<figcaption>{html.escape(caption)} "
            f"(<code>{FIGURES_DIR}/{key}.png</code>)</figcaption></figure>"
        )
    grids = []
    for kind, rows_ in examples.items():
        if not rows_:
            continue
        png = image_grid(
            [[r["context"], r["mask"], r["synthetic"], r["nearest"]] for r in rows_],
            ["context (source)", "target mask", "synthetic", "nearest real"],
            [f"{r['case_id']}\nnearest: {r['nearest_case']}\nNCC {r['ncc']:.2f}" for r in rows_],
            mask_columns=(1,),
        )
        atomic_write_bytes(figures / f"grid_{kind}.png", png)
        grids.append(
            f'<figure><img alt="{kind} lesion examples" src="data:image/png;base64,'
            f'{_b64(png)}"><figcaption>{kind}: the source scan before painting, the '
            "target mask, the synthetic lesion, and the real training lesion whose crop "
            "correlates best with it (normalised correlation, NCC) "
            f"(<code>{FIGURES_DIR}/grid_{kind}.png</code>)</figcaption></figure>"
        )
    body = [
        f"<h1>synthlesion downstream evaluation</h1><p class='note'>results "
        f"<code>{html.escape(str(Path(results['out_dir']) / 'results.json'))}</code> · config "
        f"sha256 <code>{results['config_sha256'][:16]}</code> · synthlesion "
        f"{html.escape(results['synthlesion_version'])} · {results.get('seconds', 0):.0f} s</p>",
        "<div class='lead'>" + "<br>".join(html.escape(v) for v in verdict(results)) + "</div>",
        _setup(results),
        "<h2>Arms</h2>",
        _arms_table(results),
        f"<div class='figs'>{''.join(chart_html)}</div>",
        "<h2>Paired comparisons</h2>",
        _comparisons_table(results),
        "<h2>Fidelity of the synthetic lesions</h2>",
        _fidelity_table(results),
        f"<div class='figs'>{''.join(grids)}</div>"
        if grids
        else "<p>No synthetic lesion to show.</p>",
        "<h2>Guards</h2>",
        _guards(results),
        "<h2>Dataset card</h2>",
        f"<div class='card'>{markdown_to_html(card)}</div>",
    ]
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>synthlesion "
        f"evaluation</title><style>{_CSS}</style></head><body><main>{''.join(body)}"
        "</main></body></html>\n"
    )
    path = out / REPORT_FILE
    atomic_write_text(path, page)
    return path


def _cols(
    arms: Sequence[Mapping[str, Any]], key: str
) -> tuple[list[float], list[float], list[list[float]]]:
    stats = [a["metrics"].get(key, {}) for a in arms]
    return (
        [_num(s.get("mean")) for s in stats],
        [_num(s.get("sd")) for s in stats],
        [[_num(v) for v in s.get("values", [])] for s in stats],
    )


def _setup(results: Mapping[str, Any]) -> str:
    d, seg = results["data"], results["segmenter"]
    synthetic = ", ".join(f"{v} {k}" for k, v in d["train_synthetic"].items()) or "none"
    return (
        "<h2>Set-up</h2><p>Training: "
        f"{d['train_real']} real scans ({d['train_real_lesion']} with lesions, "
        f"{d['train_real_healthy']} healthy) and synthetic scans ({synthetic}). Scored on the "
        f"real <b>{html.escape(results['test_split'])}</b> split ({d['test_cases']} scans), read "
        "only through the dataset package's evaluation guard. Every arm trains MONAI "
        f"<code>{html.escape(str(seg['network']))}</code> (channels {seg['channels']}) for "
        f"{seg['steps']} steps of {seg['batch_size']} samples, with seeds {results['seeds']}; "
        "a synthetic arm's share is the expected share of synthetic samples per draw. "
        "Training time per arm (all seeds): "
        + ", ".join(f"{html.escape(a['name'])} {a['seconds']:.0f} s" for a in results["arms"])
        + ".</p>"
    )


def _arms_table(results: Mapping[str, Any]) -> str:
    bins = results["size_bins"]
    head = [
        "arm",
        "kind",
        "share (drawn)",
        "Dice",
        "case Dice",
        "sensitivity",
        *[f"sens. {b}" for b in bins],
        "FP / case",
        "HD95 mm",
        "ASSD mm",
    ]
    rows = []
    for a in results["arms"]:
        m = a["metrics"]
        share = f"{a['share']:.2f} ({a['drawn_share']:.2f})" if a["share"] else "–"
        cells = [
            a["name"],
            a["kind"],
            share,
            _pm(m.get("dice")),
            _pm(m.get("case_dice")),
            _pm(m.get("sensitivity")),
            *[_pm(m.get(f"sensitivity[{b}]"), 2) for b in bins],
            _pm(m.get("fp_per_case"), 2),
            _pm(m.get("hd95_mm"), 1),
            _pm(m.get("assd_mm"), 2),
        ]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return (
        f"<div class='wide'><table id='arms'><tr>{''.join(f'<th>{h}</th>' for h in head)}</tr>{''.join(rows)}"
        "</table></div><p class='note'>mean ± sd over seeds. Dice, HD95 and ASSD over test scans "
        "with a lesion (a missed lesion's distances count as the image diagonal); case Dice "
        "over all test scans (a healthy scan scores 1 with no false positive, else 0); "
        "sensitivity per connected lesion (any overlap detects it), sizes by equivalent "
        "diameter.</p>"
    )


def _comparisons_table(results: Mapping[str, Any]) -> str:
    head = [
        "arm",
        "against",
        "metric",
        "mean Δ (paired)",
        "95% CI",
        "Wilcoxon p",
        "wins/losses/ties",
        "per-seed Δ",
    ]
    rows = []
    for c in results["comparisons"]:
        lo, hi = _num(c["ci_low"]), _num(c["ci_high"])
        good = (lo > 0) if c["metric"] == "dice" else (hi < 0)
        bad = (hi < 0) if c["metric"] == "dice" else (lo > 0)
        cls = " class='ok'" if good else " class='bad'" if bad else ""
        seeds = ", ".join(f"{v:+.3f}" for v in c.get("seed_diffs", []))
        cells = [
            c["arm"],
            c["against"],
            c["metric"],
            f"{_num(c['mean_diff']):+.3f}",
            f"[{lo:+.3f}, {hi:+.3f}]",
            f"{_num(c['wilcoxon_p']):.3g}",
            f"{c['wins']}/{c['losses']}/{c['ties']}",
            seeds,
        ]
        rows.append(
            "<tr>"
            + "".join(
                f"<td{cls if k == 3 else ''}>{html.escape(str(v))}</td>"
                for k, v in enumerate(cells)
            )
            + "</tr>"
        )
    return (
        f"<div class='wide'><table id='comparisons'><tr>"
        f"{''.join(f'<th>{h}</th>' for h in head)}</tr>"
        f"{''.join(rows)}</table></div><p class='note'>Per test case, each arm's score is averaged "
        "over the seeds; Δ = arm − against. Green: the 95% bootstrap interval lies on the "
        "better side of zero; red: on the worse side.</p>"
    )


def _fidelity_table(results: Mapping[str, Any]) -> str:
    fid = results.get("fidelity", {})
    ref = fid.get("reference", {})
    head = [
        "lesions",
        "count",
        "mean (real mean)",
        "W1 mean / sd",
        "W1 std / sd",
        "W1 contrast / sd",
        "adherence: voxels found",
        "lesions found",
        "nearest NCC mean / max",
        "near-copies",
    ]
    rows = []
    floor = ref.get("intensity_test_vs_train", {})
    adh = ref.get("adherence_real_test", {})
    nn = ref.get("nearest_ncc_train_vs_train", {})
    rows.append(
        [
            "real test vs real train (floor)",
            ref.get("test_lesions"),
            f"{_fmt(floor.get('mean', {}).get('mean'), 1)} "
            f"({_fmt(floor.get('mean', {}).get('real_mean'), 1)})",
            *[_fmt(floor.get(s, {}).get("w1_over_sd"), 2) for s in ("mean", "std", "contrast")],
            _fmt(adh.get("voxel_fraction"), 2),
            _fmt(adh.get("lesion_detection"), 2),
            f"{_fmt(nn.get('mean'), 2)} / {_fmt(nn.get('max'), 2)} (train vs train)",
            "–",
        ]
    )
    for name, g in fid.get("generators", {}).items():
        inten, a, m = g["intensity"], g["adherence"], g["memorisation"]
        rows.append(
            [
                name,
                g["lesions"],
                f"{_fmt(inten.get('mean', {}).get('mean'), 1)} "
                f"({_fmt(inten.get('mean', {}).get('real_mean'), 1)})",
                *[_fmt(inten.get(s, {}).get("w1_over_sd"), 2) for s in ("mean", "std", "contrast")],
                _fmt(a.get("voxel_fraction"), 2),
                _fmt(a.get("lesion_detection"), 2),
                f"{_fmt(m.get('nearest_ncc_mean'), 2)} / {_fmt(m.get('nearest_ncc_max'), 2)}",
                f"{m.get('flagged')} (NCC ≥ {m.get('threshold')})",
            ]
        )
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows
    )
    return (
        f"<div class='wide'><table id='fidelity'><tr>{''.join(f'<th>{h}</th>' for h in head)}</tr>{body}"
        "</table></div><p class='note'>Intensities in image units (HU for CT). W1: 1-Wasserstein "
        "distance of the per-lesion mean, spread and contrast to the real training lesions, "
        "divided by the real lesions' spread. Adherence: the real-only segmenter "
        f"({html.escape(str(fid.get('segmenter')))}) marks this share of the lesion voxels "
        "(and touches this share of lesions); its figures on the real test lesions are the "
        "yardstick. Memorisation: normalised correlation of each lesion's crop with the "
        "nearest real training lesion crop.</p>"
    )


def _guards(results: Mapping[str, Any]) -> str:
    build = results["guards"]["build"]
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{g['checked']}</td><td>{g['violations']}</td>"
        f"<td class='{'ok' if not g['violations'] else 'bad'}'>"
        f"{'passed' if not g['violations'] else 'refused'}</td></tr>"
        for name, g in build.items()
    )
    ev = results["guards"]["evaluation"]
    probe = ev["probe"]
    if probe["refused"]:
        probe_html = (
            f"<span class='ok'>refused</span>: synthetic case "
            f"<code>{html.escape(str(probe['probed']))}</code>, relabelled as real, was "
            f"offered to the evaluation loader: {html.escape(probe['message'])}"
        )
    elif probe["refused"] is None:
        probe_html = html.escape(probe["message"])
    else:
        probe_html = f"<span class='bad'>NOT refused</span>: {html.escape(probe['message'])}"
    return (
        f"<h3>Dataset build</h3><table id='guards'><tr><th>guard</th><th>checked</th>"
        f"<th>refused</th><th>result</th></tr>{rows}</table>"
        "<h3>Evaluation loader</h3><ul>"
        f"<li>{ev['cases_loaded']} real {html.escape(ev['split'])} scans, read through "
        f"<code>EvaluationDataset.from_build</code> and <code>make_eval_loader</code> "
        f"({ev['loader_passes']} passes; anything synthetic by tag, file hash or voxels "
        "would have stopped the run).</li>"
        f"<li>Live probe: {probe_html}</li></ul>"
    )


__all__ = ["markdown_to_html", "verdict", "write_report"]
