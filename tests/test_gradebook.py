"""Nothing finished is lost: rows on disk as they finish, a re-run grades only what changed, and the
exports for school systems (Canvas/Moodle CSV, Gradescope's results.json) hold what they promise."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from coursekit.course.engine import WRITTEN, Result
from coursekit.course.gradebook import (
    Journal,
    grade,
    grader_fingerprint,
    row_from_dict,
    row_to_dict,
    write_gradebook,
    write_lms_gradebook,
    write_written_answers,
)
from coursekit.course.gradescope import results_json, validate_results, write_bundle
from coursekit.course.runner import GradeRow, read_written_answers
from coursekit.course.sandbox import Limits

ROOT = Path(__file__).resolve().parents[1]
SOLUTION = ROOT / "solutions" / "01_forward_process.ipynb"
EXERCISE = ROOT / "exercises" / "01_forward_process.ipynb"
LIMITS = Limits(question_seconds=20, total_seconds=120, memory_mb=1500)


def _class_of_three(folder: Path) -> Path:
    submissions = folder / "in"
    for student, source in (("ann", SOLUTION), ("bob", EXERCISE), ("cem", SOLUTION)):
        (submissions / student).mkdir(parents=True)
        shutil.copy(source, submissions / student / "01_forward_process.ipynb")
    return submissions


def test_a_grader_killed_half_way_loses_nothing_and_a_rerun_grades_only_what_is_missing(tmp_path):
    submissions = _class_of_three(tmp_path)
    out = tmp_path / "grades.csv"
    journal = out.with_suffix(".journal.jsonl")
    command = [sys.executable, "-m", "coursekit", "grade", str(submissions), "--out", str(out), "--workers", "1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300

    def rows_on_disk() -> tuple[int, int]:  # (journal lines, CSV rows); the journal is written first
        lines = journal.read_text().count("\n") if journal.exists() else 0
        table = out.read_text().count("\n") - 1 if out.exists() else 0
        return lines, table

    while time.monotonic() < deadline:
        lines, table = rows_on_disk()
        if lines >= 1 and lines == table:  # kill between rows, never inside one row's two writes
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = journal.read_text().count("\n")
    assert 1 <= finished <= 3
    with out.open() as file:  # the CSV written so far holds every finished row, whole
        assert len(list(csv.DictReader(file))) == finished

    messages = []
    rows = grade([submissions], out=out, limits=LIMITS, progress=False, announce=messages.append)
    assert [row.total for row in rows] == [7, 0, 7]
    if finished < 3:
        assert f"{finished} submission(s) unchanged since they were graded: kept; grading {3 - finished}" in messages
    assert journal.read_text().count("\n") == 3

    (submissions / "bob" / "01_forward_process.ipynb").write_bytes(SOLUTION.read_bytes())  # bob hands in again
    messages.clear()
    rows = grade([submissions], out=out, limits=LIMITS, progress=False, announce=messages.append)
    assert "2 submission(s) unchanged since they were graded: kept; grading 1" in messages
    assert [row.total for row in rows] == [7, 7, 7]
    with out.open() as file:
        assert [row["total"] for row in csv.DictReader(file)] == ["7", "7", "7"]


def test_the_journal_skips_a_torn_line_and_rows_of_another_grader(tmp_path):
    journal = Journal(tmp_path / "grades.journal.jsonl", grader_fingerprint())
    journal.add(GradeRow(file="a.ipynb", student="a", exercise="01", sha256="1"))
    with journal.path.open("a") as file:
        file.write(json.dumps({"grader": "an older grader", "row": {"file": "b.ipynb"}}) + "\n")
        file.write('{"grader": "torn')
    assert list(journal.finished()) == [("a.ipynb", "1")]


def test_lms_gradebook_one_row_per_student_one_column_per_exercise(tmp_path):
    from coursekit.course.engine import Result

    def row(student, identifier, exercise, points):
        return GradeRow(
            file=f"{student}/{exercise}.ipynb",
            student=student,
            student_id=identifier,
            exercise=exercise,
            results=[Result(f"{exercise}.q1", "passed", points, 7, "")],
        )

    rows = [row("ann", "s1", "01", 7), row("ann", "s1", "02", 3), row("bob", "s2", "01", 5), row("eve", "", "01", 7)]
    messages = []
    write_lms_gradebook(rows, tmp_path / "lms.csv", "SIS Login ID", messages.append)
    with (tmp_path / "lms.csv").open() as file:
        table = list(csv.DictReader(file))
    assert list(table[0]) == ["Student", "SIS Login ID", "Exercise 01 (9 points)", "Exercise 02 (7 points)"]
    assert [(r["SIS Login ID"], r["Exercise 01 (9 points)"], r["Exercise 02 (7 points)"]) for r in table] == [
        ("s1", "7", "3"),
        ("s2", "5", ""),
    ]
    assert "1 submission(s) without a student ID" in messages[0]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gradescope")
    archive = write_bundle(folder / "autograder", "01")
    return folder / "autograder", archive


def test_the_bundle_holds_what_gradescope_runs(bundle):
    folder, archive = bundle
    names = zipfile.ZipFile(archive).namelist()
    assert {"setup.sh", "run_autograder", "coursekit-src/pyproject.toml", "coursekit-src/coursekit/checks.py"} <= set(
        names
    )
    assert "coursekit-src/coursekit/course/exercise_cells.json" in names
    assert os.access(folder / "run_autograder", os.X_OK) and os.access(folder / "setup.sh", os.X_OK)
    setup = (folder / "setup.sh").read_text()
    assert "bubblewrap" in setup and "index-url" not in setup


@pytest.mark.parametrize(("source", "score"), [(SOLUTION, 7), (EXERCISE, 0)])
def test_run_autograder_writes_valid_results(bundle, tmp_path, source, score):
    folder, _ = bundle
    (tmp_path / "submission").mkdir()
    shutil.copy(source, tmp_path / "submission" / "my_notebook.ipynb")
    environment = dict(os.environ, AUTOGRADER_ROOT=str(tmp_path), COURSEKIT_PYTHON=sys.executable)
    subprocess.run([str(folder / "run_autograder")], env=environment, check=True, timeout=300)
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    assert validate_results(results) == []
    assert results["score"] == score == sum(test["score"] for test in results["tests"])
    assert [test["max_score"] for test in results["tests"]] == [2, 3, 2]
    assert all(test["status"] == ("passed" if score else "failed") for test in results["tests"])


def test_results_for_a_submission_without_one_notebook(tmp_path):
    from coursekit.course.gradescope import main

    (tmp_path / "submission").mkdir()
    main(["--submission", str(tmp_path / "submission"), "--results", str(tmp_path / "results.json")])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["score"] == 0 and results["tests"] == [] and "exactly one .ipynb" in results["output"]
    assert validate_results(results) == []


def test_the_validator_catches_what_gradescope_would_refuse():
    good = results_json(GradeRow(file="x", student="x"))
    assert validate_results(good) == []
    assert validate_results({"tests": [{"score": 1}]})  # max_score, name, output, visibility missing
    assert validate_results({"score": "7", "tests": []})
    assert validate_results({"score": 1, "visibility": "everyone", "tests": []})


def test_without_isolation_the_grader_still_grades_and_says_so(tmp_path):
    submissions = tmp_path / "in"
    submissions.mkdir()
    shutil.copy(SOLUTION, submissions / "01_ann.ipynb")
    shutil.copy(ROOT / "tests" / "fixtures" / "submissions" / "01_memory_hog.ipynb", submissions / "01_bob.ipynb")
    messages = []
    rows = grade(
        [submissions], out=tmp_path / "g.csv", limits=LIMITS, progress=False, isolation=False, announce=messages.append
    )
    assert messages[0].startswith("WARNING: grading without isolation")
    assert [row.total for row in rows] == [7, 5] and all(row.error == "" for row in rows), [r.error for r in rows]


def _rows_as_a_new_run_builds_them() -> list[GradeRow]:
    automatic = [
        Result("01.q1", "passed", 2, 2, ""),
        Result("01.q2", "passed", 3, 3, ""),
        Result("01.q3", "passed", 2, 2, ""),
    ]
    return [
        GradeRow(
            "a.ipynb", "ann", exercise="01", results=automatic, sha256="aa", written={"01.q4": "Because SNR < 1."}
        ),
        GradeRow("b.ipynb", "bob", exercise="01", results=automatic, sha256="bb", written={"01.q4": ""}),
    ]


def _table(path: Path, key: str = "student") -> dict[str, dict]:
    with path.open() as file:
        return {record[key]: record for record in csv.DictReader(file)}


def _type_mark(path: Path, student: str, question: str, mark: str) -> None:
    with path.open() as file:
        records = list(csv.DictReader(file))
    for record in records:
        if record["student"] == student:
            record[question] = mark
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)


def test_written_answers_wait_for_the_teacher_and_the_marks_typed_in_are_kept(tmp_path):
    out = tmp_path / "grades.csv"
    write_gradebook(_rows_as_a_new_run_builds_them(), out)
    table = _table(out)
    assert table["ann"]["01.q4"] == "" and table["ann"]["to_grade_by_hand"] == "01.q4 (2 points)"
    assert (table["ann"]["total"], table["ann"]["max"]) == ("7", "9")
    assert table["bob"]["01.q4"] == "0" and table["bob"]["to_grade_by_hand"] == ""  # nothing written: 0, no wait

    _type_mark(out, "ann", "01.q4", "1.5")  # the teacher marks it, then grades again (new rows, same files)
    rows = _rows_as_a_new_run_builds_them()
    write_gradebook(rows, out)
    table = _table(out)
    assert (table["ann"]["01.q4"], table["ann"]["total"], table["ann"]["to_grade_by_hand"]) == ("1.5", "8.5", "")
    messages = []
    write_lms_gradebook(
        [GradeRow(**{**vars(rows[0]), "student_id": "s1"})], tmp_path / "lms.csv", announce=messages.append
    )
    assert _table(tmp_path / "lms.csv", "Student")["ann"]["Exercise 01 (9 points)"] == "8.5" and messages == []

    _type_mark(out, "ann", "01.q4", "3")  # more than the question is worth: kept as typed, not counted, said
    write_gradebook(_rows_as_a_new_run_builds_them(), out)
    table = _table(out)
    assert (table["ann"]["01.q4"], table["ann"]["total"]) == ("3", "7")
    assert "'3' is not a mark from 0 to 2" in table["ann"]["to_grade_by_hand"]

    changed = _rows_as_a_new_run_builds_them()
    changed[0].sha256 = "cc"  # a new version of the submission: its answer has not been read yet
    write_gradebook(changed, out)
    assert _table(out)["ann"]["01.q4"] == "" and _table(out)["ann"]["to_grade_by_hand"] == "01.q4 (2 points)"
    messages = []
    write_lms_gradebook(
        [GradeRow(**{**vars(changed[0]), "student_id": "s1"})], tmp_path / "lms.csv", announce=messages.append
    )
    assert any("still to grade by hand" in message for message in messages)

    answers = write_written_answers(changed, tmp_path / "grades.written.md").read_text()
    assert WRITTEN["01.q4"].prompt in answers and "Because SNR < 1." in answers and "no answer: 0 points" in answers
    assert row_from_dict(json.loads(json.dumps(row_to_dict(changed[0])))).written == changed[0].written


def test_written_answers_are_read_from_their_tagged_cell_or_after_their_heading():
    exercise = json.loads((Path(__file__).resolve().parents[1] / "exercises" / "01_forward_process.ipynb").read_text())
    assert read_written_answers(exercise, "01") == {"01.q4": ""}  # as handed out: the placeholder only
    for cell in exercise["cells"]:
        if "answer:01.q4" in cell["metadata"].get("tags", []):
            cell["source"] = ["The digit fades where the SNR falls below 1."]
            answered = json.loads(json.dumps(exercise))
            del cell["metadata"]["tags"]  # an editor that drops tags
    assert read_written_answers(answered, "01") == {"01.q4": "The digit fades where the SNR falls below 1."}
    assert read_written_answers(exercise, "01") == {"01.q4": "The digit fades where the SNR falls below 1."}


def test_feedback_for_rows_read_back_needs_no_question_bank_imported_first(tmp_path):
    """A rerun that keeps every row imports no bank; its feedback must still know each written question."""
    code = (
        "from coursekit.course.gradebook import write_feedback\n"
        "from coursekit.course.runner import GradeRow\n"
        "row = GradeRow(file='alice/01.ipynb', student='alice', exercise='01', written={'01.q4': 'because'})\n"
        f"write_feedback([row], {str(tmp_path)!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    (feedback,) = tmp_path.glob("*.md")
    assert "01.q4 (written answer): to be graded by your teacher" in feedback.read_text()
