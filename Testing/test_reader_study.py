"""The reader-study session (CTSemanticSynthSlicerLib/reader_study.py): plan from a seed, CSV after every answer,
resume, statistics. Pure Python: no Slicer needed."""

import csv
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "CTSemanticSynth"))

from CTSemanticSynthSlicerLib.reader_study import (  # noqa: E402
    COLUMNS,
    ReaderStudy,
    StudyCase,
    casesFromFolder,
    clopperPearson,
)

CASES = [StudyCase(f"case{i:02d}", f"/r{i}.nii.gz", f"/s{i}.nii.gz") for i in range(10)]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def shown(study: ReaderStudy) -> tuple:
    """Put the current case on screen (as the module does after showing it) and return it."""
    current = study.current()
    study.markShown(current[1].caseId)
    return current


def answer_all(study: ReaderStudy, pick_synthetic: bool) -> None:
    """Answer every case, finding the synthetic side or not; the synthetic side gets 2, the real side 4."""
    while study.current() is not None:
        side = shown(study)[2]
        other = "right" if side == "left" else "left"
        scores = {side: 2, other: 4}
        study.answer(side if pick_synthetic else other, scores["left"], scores["right"])


def test_plan_follows_the_seed_and_balances_the_sides(tmp_path):
    a = ReaderStudy(tmp_path / "a.csv", CASES, "R1", seed=7)
    b = ReaderStudy(tmp_path / "b.csv", CASES, "R2", seed=7)
    c = ReaderStudy(tmp_path / "c.csv", CASES, "R1", seed=8)
    assert a.plan == b.plan and a.plan != c.plan
    assert sorted(case for case, _ in a.plan) == [c.caseId for c in CASES]
    assert [case for case, _ in a.plan] != [c.caseId for c in CASES]  # shuffled
    assert [side for _, side in a.plan].count("left") == 5  # as many left as right
    assert not (tmp_path / "a.csv").exists()  # nothing written before the first answer


def test_every_answer_is_written_and_the_csv_holds_the_truth(tmp_path):
    path = tmp_path / "answers.csv"
    study = ReaderStudy(path, CASES, "Dr A", seed=3)
    position, case, side = shown(study)
    assert position == 1 and case.caseId == study.plan[0][0] and side == study.plan[0][1]
    wrong = "right" if side == "left" else "left"
    assert study.answer(wrong, 5, 1, note="looks\nreal") is False
    rows = read_rows(path)
    assert list(rows[0]) == list(COLUMNS) and len(rows) == 1
    row = rows[0]
    assert (row["reader"], row["seed"], row["position"], row["case"]) == ("Dr A", "3", "1", case.caseId)
    assert (row["synthetic_side"], row["chosen_side"], row["correct"]) == (side, wrong, "0")
    assert (row["score_left"], row["score_right"]) == ("5", "1")
    assert row["score_synthetic"] == ("5" if side == "left" else "1")
    assert row["score_real"] == ("1" if side == "left" else "5")
    assert row["note"] == "looks real"
    assert study.current()[1].caseId == study.plan[1][0]


def test_a_session_continues_where_the_reader_stopped(tmp_path):
    path = tmp_path / "answers.csv"
    first = ReaderStudy(path, CASES, "R1", seed=11)
    for _ in range(4):
        first.answer(shown(first)[2], 3, 3)
    resumed = ReaderStudy(path, CASES, "R1", seed=11)
    assert resumed.current() == first.current()
    assert resumed.current()[0] == 5 and len(resumed.rows) == 4
    answer_all(resumed, pick_synthetic=True)
    rows = read_rows(path)
    assert [r["case"] for r in rows] == [case for case, _ in first.plan]  # each case once, in plan order
    assert resumed.finished and resumed.current() is None
    with pytest.raises(ValueError, match="every case"):
        resumed.answer("left", 3, 3)


def test_another_reader_or_seed_cannot_continue_a_file(tmp_path):
    path = tmp_path / "answers.csv"
    study = ReaderStudy(path, CASES, "R1", seed=1)
    shown(study)
    study.answer("left", 3, 3)
    with pytest.raises(ValueError, match="belongs to reader 'R1' with seed 1"):
        ReaderStudy(path, CASES, "R2", seed=1)
    with pytest.raises(ValueError, match="belongs to reader"):
        ReaderStudy(path, CASES, "R1", seed=2)
    with pytest.raises(ValueError, match="not in this study's plan"):
        ReaderStudy(path, CASES[:0] + [StudyCase("other", "a", "b")], "R1", seed=1)


def test_invalid_answers_are_refused_and_nothing_is_written(tmp_path):
    path = tmp_path / "answers.csv"
    study = ReaderStudy(path, CASES, "R1", seed=1)
    shown(study)
    for args in (("choose...", 3, 3), ("left", 0, 3), ("right", 3, 6)):
        with pytest.raises(ValueError):
            study.answer(*args)
    assert not path.exists() and study.current()[0] == 1
    with pytest.raises(ValueError, match="reader"):
        ReaderStudy(path, CASES, "  ", seed=1)
    with pytest.raises(ValueError, match="unique"):
        ReaderStudy(path, CASES + CASES[:1], "R1", seed=1)


def test_clopper_pearson_matches_published_values():
    # exact binomial intervals (e.g. R's binom.test): 0/10, 5/10, 10/10, 7/20
    assert clopperPearson(0, 10) == pytest.approx((0.0, 0.30850), abs=1e-5)
    assert clopperPearson(5, 10) == pytest.approx((0.18709, 0.81291), abs=1e-5)
    assert clopperPearson(10, 10) == pytest.approx((0.69150, 1.0), abs=1e-5)
    assert clopperPearson(7, 20) == pytest.approx((0.15391, 0.59219), abs=1e-5)


def test_summary_accuracy_interval_and_mean_scores(tmp_path):
    path = tmp_path / "answers.csv"
    study = ReaderStudy(path, CASES, "R1", seed=5)
    for i in range(10):
        side = shown(study)[2]
        found = i < 7  # the reader finds the synthetic side 7 times out of 10
        chosen = side if found else ("right" if side == "left" else "left")
        scores = {side: 1 + i % 3, ("right" if side == "left" else "left"): 5}
        study.answer(chosen, scores["left"], scores["right"])
    summary = study.summary()
    assert (summary.answered, summary.correct, summary.accuracy) == (10, 7, 0.7)
    assert (summary.ciLow, summary.ciHigh) == pytest.approx(clopperPearson(7, 10))
    assert summary.meanScoreReal == 5.0
    assert summary.meanScoreSynthetic == pytest.approx((1 + 2 + 3) * 3 / 10 + 1 / 10)
    written = study.writeSummary()
    assert written == tmp_path / "answers_summary.csv"
    table = {row["quantity"]: row["value"] for row in read_rows(written)}
    assert table["accuracy"] == "0.700" and table["cases answered"] == "10"
    assert float(table["accuracy 95% CI low (Clopper-Pearson)"]) == pytest.approx(summary.ciLow, abs=1e-3)
    assert table["mean realism score, real CT"] == "5.000"


def test_no_running_score_before_the_last_case(tmp_path):
    study = ReaderStudy(tmp_path / "a.csv", CASES, "R1", seed=1)
    with pytest.raises(ValueError, match=r"after the last case \(0 of 10"):
        study.summary()
    for _ in range(9):
        study.answer(shown(study)[2], 3, 3)
    with pytest.raises(ValueError, match=r"after the last case \(9 of 10"):
        study.writeSummary()
    study.answer(shown(study)[2], 3, 3)
    assert study.summary().answered == 10


def test_an_answer_is_taken_only_for_the_case_on_screen(tmp_path):
    path = tmp_path / "a.csv"
    study = ReaderStudy(path, CASES, "R1", seed=1)
    with pytest.raises(ValueError, match="no case is on screen"):
        study.answer("left", 3, 3)
    with pytest.raises(ValueError, match="not the next case"):
        study.markShown(study.plan[1][0])
    shown(study)
    study.answer("left", 3, 3)
    with pytest.raises(ValueError, match="no case is on screen"):  # the next case has not been shown yet
        study.answer("left", 3, 3)
    assert len(read_rows(path)) == 1


def test_each_reader_gets_a_random_plan_recorded_in_the_csv_and_kept_on_resume(tmp_path):
    first, second = (ReaderStudy(tmp_path / f"{r}.csv", CASES, r) for r in ("R1", "R2"))
    assert first.seed != second.seed and first.plan != second.plan
    first.answer(shown(first)[2], 3, 3)
    assert read_rows(tmp_path / "R1.csv")[0]["seed"] == str(first.seed)
    resumed = ReaderStudy(tmp_path / "R1.csv", CASES, "R1")
    assert resumed.seed == first.seed and resumed.plan == first.plan and resumed.current() == first.current()


def test_a_repeated_answer_row_counts_once_and_a_conflicting_one_is_refused(tmp_path):
    path = tmp_path / "a.csv"
    study = ReaderStudy(path, CASES, "R1", seed=4)
    answer_all(study, pick_synthetic=True)
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(lines + lines[1:3]), encoding="utf-8")  # two answers pasted again
    resumed = ReaderStudy(path, CASES, "R1", seed=4)
    summary = resumed.summary()
    assert len(resumed.rows) == 10 and summary.answered == 10 and summary.correct == 10
    assert (summary.ciLow, summary.ciHigh) == pytest.approx(clopperPearson(10, 10))
    rows = read_rows(path)
    rows.append({**rows[0], "chosen_side": "right" if rows[0]["chosen_side"] == "left" else "left"})
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(ValueError, match=f"answers case '{rows[0]['case']}' twice, differently"):
        ReaderStudy(path, CASES, "R1", seed=4)


def test_cases_from_a_folder(tmp_path):
    for name, files in (("b", ("real.nii.gz", "synthetic.nrrd", "seg.nii.gz")), ("a", ("real.nrrd", "synthetic.nii"))):
        (tmp_path / name).mkdir()
        for f in files:
            (tmp_path / name / f).write_bytes(b"")
    cases = casesFromFolder(tmp_path)
    assert [c.caseId for c in cases] == ["a", "b"]
    assert cases[0].segmentation == "" and cases[1].segmentation.endswith("seg.nii.gz")
    assert cases[1].synthetic.endswith("synthetic.nrrd")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "real.nii.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="needs a real.* and a synthetic"):
        casesFromFolder(tmp_path)
    with pytest.raises(ValueError, match="no case folders"):
        casesFromFolder(tmp_path / "a")
