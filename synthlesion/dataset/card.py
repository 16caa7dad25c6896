"""The dataset card: a Markdown page describing one build, made from its build record."""

from __future__ import annotations

from typing import Any


def render_card(record: dict[str, Any]) -> str:
    """Markdown card for a build record (``build.json`` content, before the card's own hash).

    Sections: counts per split and origin, sources (real data, splits, manifests), generators,
    the synthetic share and sampling weights, every guard's result, notes, and file hashes.
    """
    counts = record["counts"]
    sampling = record["sampling"]
    lines = [
        f"# Dataset card: {record['config']['name']}",
        "",
        f"Built by synthlesion {record['synthlesion_version']} on {record['created']} "
        f"(build `{record['build_id']}`). Evaluation splits hold real cases only; synthetic "
        "cases come only from training patients and from generators that never trained on an "
        "evaluation patient.",
        "",
        "## Counts",
        "",
        "| split | real cases | synthetic cases | patients |",
        "|---|---:|---:|---:|",
    ]
    for side in ("train", "val", "test"):
        c = counts[side]
        lines.append(f"| {side} | {c['real']} | {c['synthetic']} | {c['patients']} |")
    lines += [
        "",
        f"Synthetic rows read: {counts['synthetic_rows']}; eligible for training: "
        f"{counts['synthetic_eligible']}; registry entries: {counts['registry_entries']}.",
        "",
        "## Sources",
        "",
        f"- Real cases: `{record['inputs']['real']}` ({record['inputs']['real_cases']} cases)",
        f"- Locked splits: sha256 `{record['inputs']['splits_sha256']}`",
    ]
    for m in record["inputs"]["manifests"]:
        lines.append(
            f"- Manifest `{m['path']}` (root `{m['root']}`): run `{m['run_id']}`, {m['rows']} "
            f"rows ({m['unsealed_rows']} unsealed), {m['accepted']} accepted, chain head "
            f"`{m['chain_head']}`"
        )
    lines += ["", "## Generators", ""]
    if record["generators"]:
        lines += [
            "| model folder | folder sha256 | training record sha256 | patients trained | "
            "rows | evaluation overlap |",
            "|---|---|---|---:|---:|---|",
        ]
        for g in record["generators"]:
            overlap = ", ".join(g["evaluation_overlap"]) or "none"
            lines.append(
                f"| `{g['path']}` | `{g['sha256'][:16]}` | `{g['training_record_sha256'][:16]}` "
                f"| {g['patients_trained']} | {g['rows']} | {overlap} |"
            )
    else:
        lines.append("No synthetic cases.")
    weights = sampling["sample_weight"]
    share = sampling["synthetic_share"]
    lines += [
        "",
        "## Synthetic share",
        "",
        f"- Mode: {sampling['mode']}; configured share: "
        f"{'natural' if share is None else f'{share:.3f}'}",
        f"- Sample weights: real {weights['real']:.6g}, synthetic {weights['synthetic']:.6g}",
        f"- Expected synthetic share per epoch: {sampling['expected_share']:.3f}",
        f"- Files in imagesTr/labelsTr: {record['link_mode']} ({record['file_ending']})",
        "",
        "## Guards",
        "",
        "| guard | checked | refused |",
        "|---|---:|---:|",
    ]
    for name, result in record["guards"].items():
        lines.append(f"| {name} | {result['checked']} | {result['violations']} |")
    if record.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {note}" for note in record["notes"]]
    lines += ["", "## Files", "", "| file | sha256 |", "|---|---|"]
    for name, digest in record["files"].items():
        lines.append(f"| `{name}` | `{digest}` |")
    lines.append("")
    return "\n".join(lines)


__all__ = ["render_card"]
