"""The reader study: made from the demo's outputs, taken in a real headless browser, scored."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from synthlesion.cli import main
from synthlesion.reader_study import (
    AnswerLog,
    AnswersError,
    ReaderConflict,
    StudyError,
    make_server,
    make_study,
    score_study,
)
from synthlesion.reader_study.score import fleiss_kappa, roc_auc, wilson
from synthlesion.reader_study.study import KEY_FORMAT, STUDY_FORMAT
from synthlesion.storage import sha256_bytes

CHROMIUM = next(
    (p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).exists()), None
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    from synthlesion.evaluation.demo import run_demo

    out = tmp_path_factory.mktemp("reader") / "demo"
    run_demo(out, quick=True, threads=1)
    return out


def _make(demo: Path, out: Path, **kwargs):
    return make_study(
        demo / "data" / "phantom" / "dataset.json", demo / "data" / "splits.json",
        [demo / "synthetic" / "manifest.jsonl"], out, **kwargs,
    )  # fmt: skip


@pytest.fixture(scope="module")
def study(demo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study") / "study one"
    _make(demo, out, n=5, seed=1, real_split="train", include_rejected=True)
    return out


def _forbidden(demo: Path, study: Path) -> list[str]:
    """Case ids, patient ids and paths of the study's cases: none may reach the page."""
    key = json.loads((study.parent / f"{study.name}.key.json").read_text())
    words = [str(demo), "imagesTr", "labelsTr", "manifest", "nii"]
    for case in key["cases"]:
        words += [case["case_id"], case["patient_id"]]
        if case["generator"]:
            words.append(case["generator"])
    return words


@pytest.mark.slow
def test_study_is_blinded_and_the_key_stays_outside(demo, study):
    key_path = study.parent / f"{study.name}.key.json"
    key = json.loads(key_path.read_text())
    assert key["format"] == KEY_FORMAT and len(key["cases"]) == 10
    assert sorted(c["truth"] for c in key["cases"]) == ["real"] * 5 + ["synthetic"] * 5
    study_json = json.loads((study / "study.json").read_text())
    assert study_json["format"] == STUDY_FORMAT
    assert study_json["key_sha256"] == sha256_bytes(key_path.read_bytes())
    assert not list(study.rglob("*key*"))
    forbidden = _forbidden(demo, study)
    for path in [study / "study.json", *(study / "page").rglob("*")]:
        if path.is_file():
            data = path.read_bytes()
            for word in forbidden:
                assert word.encode() not in data, (path, word)
            if path.suffix == ".json":
                text = data.decode()
                assert "real" not in text and "synthetic" not in text and "truth" not in text
    # the order mixes the classes; views are lesion-centred crops with a lesion outline
    truths = [
        next(c["truth"] for c in key["cases"] if c["study_id"] == i) for i in study_json["cases"]
    ]
    assert truths != sorted(truths) and truths != sorted(truths, reverse=True)
    for case in study_json["cases"]:
        meta = json.loads((study / "page" / "cases" / f"{case}.json").read_text())
        mask = np.frombuffer((study / "page" / "cases" / f"{case}.mask").read_bytes(), np.uint8)
        mask = mask.reshape(meta["shape"])
        assert mask[tuple(meta["centre"])] or mask.any()
        assert meta["window"] == [40.0, 400.0]  # CT: the soft-tissue window


def test_bad_requests_to_make_are_refused(demo, tmp_path):
    with pytest.raises(StudyError, match="larger than the real pool"):
        _make(demo, tmp_path / "s", n=500, real_split="train", include_rejected=True)
    with pytest.raises(StudyError, match="--split 'nope'"):
        _make(demo, tmp_path / "s", n=1, real_split="nope")
    with pytest.raises(StudyError, match="must not lie inside"):
        _make(demo, tmp_path / "s", n=1, real_split="train", key=tmp_path / "s" / "k.json")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    with pytest.raises(StudyError, match="not empty"):
        _make(demo, tmp_path / "full", n=1, real_split="train", include_rejected=True)
    assert (tmp_path / "full" / "x").read_text() == "mine"


def test_cases_failing_guards_or_the_gate_are_left_out_and_counted(demo, tmp_path):
    manifest = tmp_path / "manifest"
    shutil.copytree(demo / "synthetic", manifest)
    rows = (manifest / "manifest.jsonl").read_bytes().splitlines(keepends=True)
    (manifest / "manifest.jsonl").write_bytes(b"".join(rows[:2] + rows[3:]))  # a row cut out
    args = (demo / "data" / "phantom" / "dataset.json", demo / "data" / "splits.json",
            [manifest / "manifest.jsonl"])  # fmt: skip
    result = make_study(*args, tmp_path / "s", n=1, real_split="train", include_rejected=True)
    assert result["left_out"]["guard_violations"] >= 1  # the broken rows, counted
    with pytest.raises(StudyError, match="synthetic pool.*failed a guard"):
        make_study(*args, tmp_path / "s2", n=2, real_split="train", include_rejected=True)
    strict = tmp_path / "strict"
    with pytest.raises(StudyError, match="synthetic pool") as info:
        _make(demo, strict, n=1, real_split="train")  # the gate's rejects are left out
    rejected = sum(
        1 for line in (demo / "synthetic" / "manifest.jsonl").read_text().splitlines()[1:]
        if '"passed":false' in line
    )  # fmt: skip
    if rejected:
        assert f"{rejected} the quality gate" in str(info.value)


def _serve(study: Path):
    server = make_server(study, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs the system's chromium")
def test_a_reader_takes_the_study_in_a_real_browser(demo, study, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    taken = tmp_path / "taken"
    shutil.copytree(study, taken)
    shutil.copy(study.parent / f"{study.name}.key.json", tmp_path / "taken.key.json")
    server, url = _serve(taken)
    forbidden = _forbidden(demo, study)
    choices = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=["--no-sandbox"])  # fmt: skip
            page = browser.new_page()
            page.goto(url)
            page.fill("#reader-id", "reader-a")
            page.click("#start")
            expect(page.locator("#progress")).to_contain_text("case 1 of 10")
            html = page.content()
            for word in forbidden:
                assert word not in html, word
            for i in range(10):
                if i == 5:  # a reload in the middle: nothing lost, resumes at case 6
                    page.reload()
                    expect(page.locator("#progress")).to_contain_text("case 6 of 10 · 5 answered")
                answer = "synthetic" if i % 3 else "real"
                confidence = 1 + i % 5
                if i % 2:  # by keyboard
                    page.keyboard.press("s" if answer == "synthetic" else "r")
                    page.keyboard.press(str(confidence))
                else:
                    page.click(f"#btn-{answer}")
                    page.click(f".conf[data-value='{confidence}']")
                choices.append((answer, confidence))
                want = f"{i + 1} answered"
                expect(page.locator("#progress")).to_contain_text(want)
            # back one case and change the answer before submitting
            page.click("#prev")
            expect(page.locator("#progress")).to_contain_text("case 9 of 10")
            page.click("#btn-real")
            page.click(".conf[data-value='5']")
            choices[8] = ("real", 5)
            page.keyboard.press("o")  # the outline toggles, the page keeps working
            expect(page.locator("#submit")).to_be_enabled()
            page.click("#submit")
            expect(page.locator("#done")).to_be_visible()
            # another browser cannot take the same reader id
            other = browser.new_context().new_page()
            other.goto(url)
            other.fill("#reader-id", "reader-a")
            other.click("#start")
            expect(other.locator("#status")).to_contain_text("already taken")
            other.fill("#reader-id", "reader-b")  # a second reader works at the same time
            other.click("#start")
            expect(other.locator("#progress")).to_contain_text("case 1 of 10")
            other.click("#btn-real")
            other.click(".conf[data-value='3']")
            expect(other.locator("#progress")).to_contain_text("1 answered")
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    study_json = json.loads((taken / "study.json").read_text())
    log = AnswerLog(
        taken / "answers" / "reader-a.jsonl", study_json["study_id"], study_json["cases"]
    )
    assert log.submitted
    final = log.answers()
    assert [(final[c]["answer"], final[c]["confidence"]) for c in study_json["cases"]] == choices
    result = score_study(taken, include_unsubmitted=True)
    assert "reader-b" not in score_study(taken)["readers"]  # only submitted readers by default
    key = json.loads((tmp_path / "taken.key.json").read_text())
    truth = {c["study_id"]: c["truth"] for c in key["cases"]}
    correct = sum(final[c]["answer"] == truth[c] for c in study_json["cases"])
    reader_a = result["readers"]["reader-a"]
    assert reader_a["correct"] == correct and reader_a["submitted"]
    assert result["readers"]["reader-b"]["answered"] == 1
    assert not result["readers"]["reader-b"]["submitted"]
    assert (taken / "scores.html").read_text().count("<table>") == 3


def _fixed_study(tmp_path: Path) -> Path:
    """Six cases (3 real, 3 synthetic of two generators), two readers, fixed answers."""
    study = tmp_path / "fixed"
    (study / "answers").mkdir(parents=True)
    ids = [f"{i:016x}" for i in range(1, 7)]
    sizes = [5.0, 6.0, 10.0, 12.0, 20.0, 30.0]
    generators = [None, None, None, "g1", "g1", "g2"]
    key = {"format": KEY_FORMAT, "study_id": "s1", "cases": [
        {"study_id": i, "truth": "real" if g is None else "synthetic", "case_id": f"c{n}",
         "patient_id": f"p{n}", "generator": g, "passed_gate": None, "lesion_size_mm": s,
         "lesion_voxels": 1}
        for n, (i, s, g) in enumerate(zip(ids, sizes, generators, strict=True))]}  # fmt: skip
    key_bytes = json.dumps(key).encode()
    (tmp_path / "fixed.key.json").write_bytes(key_bytes)
    (study / "study.json").write_text(json.dumps({
        "format": STUDY_FORMAT, "study_id": "s1", "cases": ids, "key_sha256": sha256_bytes(key_bytes),
    }))  # fmt: skip
    answers = {
        "A": [("real", 5), ("synthetic", 2), ("real", 4), ("synthetic", 5), ("synthetic", 3), ("real", 1)],
        "B": [("real", 3), ("real", 4), ("synthetic", 2), ("real", 2), ("synthetic", 4), ("synthetic", 5)],
    }  # fmt: skip
    for reader, rows in answers.items():
        log = AnswerLog(study / "answers" / f"{reader}.jsonl", "s1", ids)
        log.open_session(reader, "t" * 16 + reader)
        for case, (answer, confidence) in zip(ids, rows, strict=True):
            log.answer("t" * 16 + reader, case, answer, confidence)
        log.submit("t" * 16 + reader)
    return study


def test_scores_reproduce_hand_checked_numbers(tmp_path):
    study = _fixed_study(tmp_path)
    result = score_study(study)
    for reader in ("A", "B"):
        r = result["readers"][reader]
        assert (r["correct"], r["n"]) == (4, 6)
        assert r["sensitivity"] == pytest.approx(2 / 3) and r["specificity"] == pytest.approx(2 / 3)
        assert r["auc"] == pytest.approx(8 / 9)
    pooled = result["pooled"]
    assert pooled["accuracy"] == pytest.approx(8 / 12)
    assert pooled["accuracy_ci95"] == pytest.approx([0.3906, 0.8619], abs=1e-4)  # Wilson, 8/12
    assert pooled["auc"] == pytest.approx(32 / 36)
    assert pooled["binomial_p"] == pytest.approx(2 * 794 / 4096)  # exact, two-sided
    assert result["fleiss_kappa"] == pytest.approx(-1 / 3)
    assert result["size_cuts_mm"] == pytest.approx([26 / 3, 44 / 3])
    small = next(v for k, v in result["by_lesion_size"].items() if k.startswith("small"))
    assert (small["correct"], small["n"]) == (3, 4)
    assert result["by_generator"]["g1"]["sensitivity"] == pytest.approx(3 / 4)
    assert result["by_generator"]["g2"]["sensitivity"] == pytest.approx(1 / 2)
    assert result["by_generator"]["real"]["specificity"] == pytest.approx(4 / 6)
    assert json.loads((study / "scores.json").read_text())["pooled"]["correct"] == 8
    assert main(["reader-study", "score", str(study)]) == 0


def test_statistics_helpers():
    assert wilson(0, 0) is None
    lo, hi = wilson(10, 10)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(0.7225, abs=1e-4)
    assert roc_auc([1, 2], [True, True]) is None
    assert fleiss_kappa(np.array([[2, 0], [0, 2]])) == pytest.approx(1.0)


def test_tampered_answers_and_other_studies_are_refused(tmp_path, capsys):
    study = _fixed_study(tmp_path)
    path = study / "answers" / "A.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + lines[1].replace(b'"real"', b'"synthetic"') + b"".join(lines[2:]))
    with pytest.raises(AnswersError, match="A.jsonl line 2: the hash chain breaks"):
        score_study(study)
    with pytest.raises(AnswersError, match="A.jsonl line 2"):
        make_server(study, port=0)
    assert main(["reader-study", "score", str(study)]) == 1
    assert "hash chain breaks" in capsys.readouterr().err
    # a key (or answers) from another study
    other = tmp_path / "other"
    other.mkdir()
    other_study = _fixed_study(other)
    (other / "fixed.key.json").write_text((other / "fixed.key.json").read_text() + " ")
    with pytest.raises(StudyError, match="not the key of the study"):
        score_study(other_study)
    copied = tmp_path / "copied"
    shutil.copytree(other_study, copied)
    shutil.copy(tmp_path / "fixed.key.json", tmp_path / "copied.key.json")
    study_json = json.loads((copied / "study.json").read_text())
    study_json["study_id"] = "s2"
    (copied / "study.json").write_text(json.dumps(study_json))
    with pytest.raises(AnswersError, match="another study"):
        score_study(copied)


def test_one_reader_id_one_session(tmp_path):
    study = _fixed_study(tmp_path)
    log = AnswerLog(study / "answers" / "C.jsonl", "s1", [f"{i:016x}" for i in range(1, 7)])
    log.open_session("C", "x" * 16)
    log.open_session("C", "x" * 16)  # the same browser resumes
    with pytest.raises(ReaderConflict, match="already taken"):
        log.open_session("C", "y" * 16)
    with pytest.raises(StudyError, match="reader id"):
        log.open_session("../evil", "x" * 16)
    with pytest.raises(StudyError, match="not answered"):
        log.submit("x" * 16)
    with pytest.raises(StudyError, match="confidence"):
        log.answer("x" * 16, f"{1:016x}", "real", 7)


@pytest.mark.skipif(CHROMIUM is None, reason="needs the system's chromium")
def test_a_3d_view_shows_three_scrollable_planes(tmp_path):
    """A 3D MRI case rendered as make_study does, read in the browser: three planes, the
    outline on the lesion, wheel scrolling, window sliders; no script error."""
    from playwright.sync_api import expect, sync_playwright

    from synthlesion.data.phantom import make_phantom_dataset
    from synthlesion.data.sources import load_cases
    from synthlesion.reader_study.render import render_view
    from synthlesion.reader_study.study import write_page, write_view

    dataset = make_phantom_dataset(tmp_path / "mri", kind="mri", spatial_dims=3, n_patients=3,
                                   size=32, lesion_fraction=1.0, followup_fraction=0.0)  # fmt: skip
    case = next(c for c in load_cases(dataset) if c.has_lesion)
    view = render_view(case, None, crop=24, context_slices=6)
    assert view.spatial_dims == 3 and view.outline[view.centre] == 1
    assert view.window != (40.0, 400.0)  # MRI: percentiles, not the CT window
    study = tmp_path / "study"
    write_page(study / "page")
    write_view(study / "page", "00000000000000aa", view)
    (study / "study.json").write_text(json.dumps({
        "format": STUDY_FORMAT, "study_id": "s3d", "cases": ["00000000000000aa"],
        "key_sha256": "0" * 64, "outline": True,
    }))  # fmt: skip
    server, url = _serve(study)
    errors: list[str] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=["--no-sandbox"])  # fmt: skip
            page = browser.new_page()
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url)
            page.fill("#reader-id", "r3d")
            page.click("#start")
            for plane in ("axial", "coronal", "sagittal"):
                expect(page.locator(f"#canvas-{plane}")).to_be_visible()
            label = page.locator("#label-axial")
            before = label.inner_text()
            page.locator("#canvas-axial").hover()
            page.mouse.wheel(0, 120)
            expect(label).not_to_have_text(before)
            # the outline is drawn in red on the lesion
            red = page.evaluate(
                "() => { const c = document.getElementById('canvas-axial');"
                " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
                " let n = 0; for (let i = 0; i < d.length; i += 4)"
                " { if (d[i] === 255 && d[i + 1] === 60) n++; } return n; }"
            )
            page.mouse.wheel(0, -120)
            page.fill("#window-width", "50")
            page.keyboard.press("]")
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    assert not errors, errors
    assert red > 0


def test_crash_leftovers_copies_and_second_servers(tmp_path):
    study = _fixed_study(tmp_path)
    ids = [f"{i:016x}" for i in range(1, 7)]
    path = study / "answers" / "A.jsonl"
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"type":"answer","ca')  # a crash in the middle of a line
    log = AnswerLog(path, "s1", ids)  # the unfinished line was never acknowledged: ignored
    assert log.submitted and len(log.answers()) == 6
    assert score_study(study)["readers"]["A"]["correct"] == 4
    shutil.copy(study / "answers" / "B.jsonl", study / "answers" / "C.jsonl")
    with pytest.raises(AnswersError, match="C.jsonl: the answers of reader 'B'"):
        score_study(study)
    (study / "answers" / "C.jsonl").unlink()
    server = make_server(study, port=0)
    try:
        with pytest.raises(StudyError, match="already being served"):
            make_server(study, port=0)
    finally:
        server.server_close()
    make_server(study, port=0).server_close()  # free again once the first one stopped


def test_make_keeps_keys_and_answers(demo, study, tmp_path):
    key = study.parent / f"{study.name}.key.json"
    with pytest.raises(StudyError, match="exists"):
        _make(demo, tmp_path / "new", n=1, real_split="train", include_rejected=True, key=key)
    with pytest.raises(StudyError, match="no such file"):
        make_study(demo / "data" / "phantom" / "dataset.json", demo / "data" / "splits.json",
                   [demo / "synthetic" / "manfest.jsonl"], tmp_path / "x", n=1)  # fmt: skip
    answered = tmp_path / "answered"
    shutil.copytree(study, answered)
    (answered / "answers" / "someone.jsonl").write_text("")
    with pytest.raises(StudyError, match="readers' answers"):
        _make(demo, answered, n=1, real_split="train", include_rejected=True, overwrite=True,
              key=tmp_path / "k.json")  # fmt: skip
    assert (answered / "answers" / "someone.jsonl").exists()
