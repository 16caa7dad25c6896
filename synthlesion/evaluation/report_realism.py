"""The realism section of the evaluation report (:mod:`synthlesion.evaluation.report`).

Its tables (repaint against the mean-fill baseline; KID, the real-vs-synthetic classifier and
texture, each against its real-vs-real floor; adherence and memorisation) and its charts (KID,
classifier AUC and texture per generator), read from ``results.json``.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

from synthlesion.evaluation.charts import Canvas, RefLine, Series, bar_chart
from synthlesion.evaluation.report_format import (
    _ci,
    _dict,
    _fmt,
    _get,
    _num,
    _ok,
    _pm,
    _table,
)


def _realism_tables(results: Mapping[str, Any], generators: Sequence[str]) -> str:
    realism = _dict(results.get("realism"))
    lesions = _dict(realism.get("lesions"))
    cells = realism.get("cells") or ([realism["cell"]] if realism.get("cell") else [])
    intro = (
        f"<p>Measured in cell{'s' if len(cells) != 1 else ''} "
        f"{html.escape(', '.join(str(c) for c in cells)) or '–'} (the largest budget), "
        f"against {_fmt(_num(lesions.get('held_out')), 0)} held-out real lesions (val and "
        f"test) the generators never saw; {_fmt(_num(lesions.get('train')), 0)} labelled "
        "train lesions give the real-vs-real floors. Figures are means over those cells.</p>"
    )
    repaint = _dict(realism.get("repaint"))
    rows, classes = [], []
    for name in ["mean_fill", *generators]:
        r = _dict(repaint.get(name))
        rows.append(
            [
                "mean fill (baseline)" if name == "mean_fill" else html.escape(name),
                _fmt(_num(r.get("lesions")), 0),
                _fmt(r.get("mse"), 4),
                _fmt(r.get("psnr"), 2),
                _fmt(r.get("ssim"), 3),
            ]
        )
        classes.append("ref" if name == "mean_fill" else "")
    repaint_html = (
        "<h3>Repaint</h3>"
        + _table("repaint", ["painted by", "lesions", "MSE", "PSNR dB", "SSIM"], rows, classes)
        + "<p class='note'>Held-out real lesions blanked (mean fill of the tissue ring) and "
        "painted back into the same mask; scores inside the mask on images in [0, 1] (BraTS "
        "local-inpainting normalisation). Lower MSE, higher PSNR and SSIM are closer to the "
        "real lesion; the mean fill is the do-nothing baseline.</p>"
    )
    kid, auc, texture = (
        _dict(realism.get("kid")),
        _dict(realism.get("classifier_auc")),
        _dict(realism.get("texture")),
    )
    rows, classes = [], []
    for name in generators:
        a, t = _dict(auc.get(name)), _dict(texture.get(name))
        rows.append(
            [
                html.escape(name),
                _fmt(_num(lesions.get(name)), 0),
                _pm(_dict(kid.get(name)), 4),
                _fmt(a.get("auc")),
                _ci(a.get("ci_low"), a.get("ci_high")),
                _fmt(t.get("mean_ks")),
                _fmt(t.get("mean_wasserstein_sd")),
            ]
        )
        classes.append("")
    floor_auc, floor_texture = (
        _dict(realism.get("classifier_auc_floor")),
        _dict(realism.get("texture_floor")),
    )
    rows.append(
        [
            "real vs real (floor)",
            _fmt(_num(lesions.get("train")), 0),
            _pm(_dict(realism.get("kid_floor")), 4),
            _fmt(floor_auc.get("auc")),
            _ci(floor_auc.get("ci_low"), floor_auc.get("ci_high")),
            _fmt(floor_texture.get("mean_ks")),
            _fmt(floor_texture.get("mean_wasserstein_sd")),
        ]
    )
    classes.append("ref")
    control = _dict(realism.get("classifier_auc_control"))
    if control:
        rows.append(
            [
                "real vs lesion blanked (control)",
                _fmt(_num(lesions.get("held_out")), 0),
                "–",
                _fmt(control.get("auc")),
                _ci(control.get("ci_low"), control.get("ci_high")),
                "–",
                "–",
            ]
        )
        classes.append("ref")
    distribution_html = (
        "<h3>Distribution, classifier and texture</h3>"
        + _table(
            "realism-distribution",
            [
                "lesions",
                "count",
                "KID (mean ± sd)",
                "classifier AUC",
                "AUC 95% CI",
                "texture mean KS",
                "mean W1 / sd",
            ],
            rows,
            classes,
        )
        + "<p class='note'>KID: kernel inception distance of lesion crops in the feature "
        "space of the real-only segmenter's bottleneck (lower is closer; floor: the labelled "
        "train lesions against the held-out ones). Classifier AUC: a cross-validated small "
        "CNN telling held-out real lesions from the generator's (0.5: indistinguishable; "
        "DeLong interval; floor: two halves of the held-out lesions; control: the same crops "
        "with their lesion blanked, which a classifier with any power tells apart). Texture: mean "
        "Kolmogorov–Smirnov statistic and Wasserstein distance (in units of the real sd) "
        "over first-order, GLCM and shape descriptors (floor: train against held-out).</p>"
    )
    fidelity = _dict(realism.get("fidelity"))
    rows = []
    for name in generators:
        f = _dict(fidelity.get(name))
        adh, mem = _dict(f.get("adherence")), _dict(f.get("memorisation"))
        rows.append(
            [
                html.escape(name),
                _fmt(adh.get("voxel_fraction"), 2),
                _fmt(adh.get("mean_lesion_fraction"), 2),
                _fmt(adh.get("lesion_detection"), 2),
                f"{_fmt(mem.get('nearest_ncc_mean'), 2)} / {_fmt(mem.get('nearest_ncc_max'), 2)}",
                f"{_fmt(_num(mem.get('flagged')), 0)} (NCC ≥ {_fmt(mem.get('threshold'), 2)})"
                if mem
                else "–",
            ]
        )
    fidelity_html = (
        "<h3>Adherence and memorisation</h3>"
        + _table(
            "fidelity",
            [
                "generator",
                "adherence: voxels found",
                "mean lesion fraction",
                "lesions found",
                "nearest NCC mean / max",
                "near-copies",
            ],
            rows,
        )
        + "<p class='note'>Adherence: the share of the painted lesion's voxels (per lesion, "
        "and of lesions touched) that the real-only segmenter marks. Memorisation: normalised "
        "correlation of each synthetic lesion's crop with the nearest real training lesion; "
        "at or above the threshold it counts as a near-copy.</p>"
    )
    return intro + repaint_html + distribution_html + fidelity_html


def _realism_charts(
    results: Mapping[str, Any], generators: Sequence[str]
) -> list[tuple[str, str, Canvas]]:
    realism = _dict(results.get("realism"))
    if not realism or not generators:
        return []
    kid, auc, texture = (
        _dict(realism.get("kid")),
        _dict(realism.get("classifier_auc")),
        _dict(realism.get("texture")),
    )
    kid_floor = _num(_get(realism, "kid_floor", "mean"))
    auc_floor = _num(_get(realism, "classifier_auc_floor", "auc"))
    ks_floor = _num(_get(realism, "texture_floor", "mean_ks"))
    charts = [
        (
            "realism_kid",
            "KID per generator (mean ± sd over subsets), dashed: the real-vs-real floor",
            bar_chart(
                "KID of lesion crops (lower is closer to real)",
                list(generators),
                [
                    Series(
                        "KID",
                        [_num(_get(kid, g, "mean")) for g in generators],
                        [_num(_get(kid, g, "sd")) for g in generators],
                    )
                ],
                lines=[RefLine(kid_floor, f"real floor {kid_floor:.4f}")] if _ok(kid_floor) else [],
            ),
        ),
        (
            "realism_classifier_auc",
            "Real-vs-synthetic classifier AUC per generator (95% DeLong CI); dashed: the "
            "real-vs-real floor and chance (0.5)",
            bar_chart(
                "Classifier AUC, real vs synthetic (0.5: indistinguishable)",
                list(generators),
                [
                    Series(
                        "AUC",
                        [_num(_get(auc, g, "auc")) for g in generators],
                        lows=[_num(_get(auc, g, "ci_low")) for g in generators],
                        highs=[_num(_get(auc, g, "ci_high")) for g in generators],
                    )
                ],
                bounds=(0.0, 1.0),
                lines=[
                    RefLine(0.5, "chance 0.5", "#888"),
                    *(
                        [RefLine(auc_floor, f"real floor {auc_floor:.3f}", "#2a7a3b")]
                        if _ok(auc_floor)
                        else []
                    ),
                ],
            ),
        ),
        (
            "realism_texture",
            "Texture and shape descriptors: mean KS statistic against the held-out lesions; "
            "dashed: the real-vs-real floor",
            bar_chart(
                "Texture / shape mean KS (lower is closer)",
                list(generators),
                [Series("mean KS", [_num(_get(texture, g, "mean_ks")) for g in generators])],
                bounds=(0.0, 1.0),
                lines=[RefLine(ks_floor, f"real floor {ks_floor:.3f}")] if _ok(ks_floor) else [],
            ),
        ),
    ]
    return charts
