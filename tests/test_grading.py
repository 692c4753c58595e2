"""The grader on the solutions, on untouched exercises, and on broken and hostile submissions.

One folder holds 11 solutions, 11 untouched exercises and 29 broken or hostile fixtures (51 notebooks,
several of which try to kill the grader, forge their outputs or write outside their folder); the
whole folder is graded once, and every test below reads that run.
"""

import csv
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from coursekit.cli import main
from coursekit.course.gradebook import find_submissions, grade, student_id, student_name
from coursekit.course.runner import NEEDS_A_LOOK
from coursekit.course.sandbox import Limits

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "submissions"
LIMITS = Limits(question_seconds=15, total_seconds=120, memory_mb=1500)
ESCAPES = [
    Path("/tmp") / name
    for name in (
        "coursekit-escaped-absolute.txt",
        "coursekit-escaped-subprocess.txt",
        "coursekit-escaped-libc.txt",
        "coursekit-escaped-answer.txt",
    )
]


def _digests(folder):
    return {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    for escaped in ESCAPES:
        escaped.unlink(missing_ok=True)
    out = tmp_path_factory.mktemp("grades")
    submissions = out / "in"
    shutil.copytree(FIXTURES, submissions / "fixtures")
    shutil.copytree(ROOT / "solutions", submissions / "solutions")
    shutil.copytree(ROOT / "exercises", submissions / "exercises")
    before = _digests(submissions)
    messages = []
    rows = grade([submissions], out=out / "grades.csv", limits=LIMITS, progress=False, announce=messages.append)
    return {
        "rows": {Path(row.file).relative_to(submissions).as_posix(): row for row in rows},
        "count": len(find_submissions([submissions])),
        "out": out,
        "before": before,
        "after": _digests(submissions),
        "messages": messages,
    }


def _results(row):
    return {result.question: result for result in row.results}


def test_every_submission_gets_a_row_and_none_is_modified(graded):
    assert graded["count"] == len(list(FIXTURES.glob("*.ipynb"))) + 2 * len(EXERCISES) == 51
    assert len(graded["rows"]) == graded["count"]
    assert graded["before"] == graded["after"]
    for escaped in ESCAPES:
        assert not escaped.exists(), escaped
    assert not (graded["out"].parent / "coursekit-escaped.txt").exists()


def test_the_run_says_how_it_isolates(graded):
    assert graded["messages"][0].startswith(("isolation: bubblewrap", "WARNING: grading without isolation"))


def test_students_are_named_by_their_folder_or_their_file(graded):
    assert graded["rows"]["solutions/01_forward_process.ipynb"].student == "solutions"
    assert student_name(Path("/in/alice_01.ipynb"), [Path("/in")]) == "alice_01"


EXERCISES = sorted(path.stem for path in (ROOT / "solutions").glob("*.ipynb"))


def test_solutions_get_full_marks(graded):
    assert len(EXERCISES) == 11
    for name in EXERCISES:
        row = graded["rows"][f"solutions/{name}.ipynb"]
        assert row.total == row.maximum > 0 and row.error == "" and row.review == [], (name, row.error, row.review)


def test_untouched_exercises_get_zero_and_nothing_to_review(graded):
    for name in EXERCISES:
        row = graded["rows"][f"exercises/{name}.ipynb"]
        assert row.total == 0 and row.maximum > 0 and row.error == "" and row.review == [], (name, row.error)
        assert all(result.status == "not implemented" for result in row.results)


@pytest.mark.parametrize(
    "name",
    [
        "01_replaces_run_implementation.ipynb",
        "01_patches_by_strings.ipynb",
        "01_wraps_torch_save.ipynb",
        "01_sys_modules_reference.ipynb",
        "01_frames_and_gc.ipynb",
        "01_patches_allclose.ipynb",
    ],
)
def test_forged_outputs_score_nothing(graded, name):
    row = graded["rows"][f"fixtures/{name}"]
    assert row.total == 0, (name, row.results)
    assert row.review, name  # and the teacher is told what was tried


def test_answers_that_reach_out_need_a_human_look_with_the_line_quoted(graded):
    rows = graded["rows"]
    references = _results(rows["fixtures/01_sys_modules_reference.ipynb"])
    assert references["01.q1"].status == NEEDS_A_LOOK and "sys.modules" in references["01.q1"].message
    assert references["01.q2"].status == NEEDS_A_LOOK and "__import__" in references["01.q2"].message
    for name in ("01_kills_the_grader_in_answer", "01_libc_write_in_answer", "01_writes_outside_in_answer"):
        results = _results(rows[f"fixtures/{name}.ipynb"])
        assert results["01.q1"].status == NEEDS_A_LOOK and results["01.q1"].points == 0, name
        assert results["01.q2"].passed and results["01.q3"].passed, name  # the other answers still count
    gc = _results(rows["fixtures/01_frames_and_gc.ipynb"])["01.q3"]
    assert gc.status == NEEDS_A_LOOK and "import gc" in gc.message


def test_code_outside_the_answer_cells_never_runs(graded):
    rows = graded["rows"]
    for name in ("01_kills_the_grader", "01_libc_write", "01_writes_outside", "01_runs_programs", "01_kills_kernel"):
        row = rows[f"fixtures/{name}.ipynb"]
        assert row.total == 7 and row.error == "", (name, row.error)
        assert any("not run (outside the answer cells)" in item for item in row.review), name
    assert rows["fixtures/01_patch_in_answer_cell.ipynb"].total == 0  # the patch never ran; its answer is wrong
    assert rows["fixtures/01_deleted_checks.ipynb"].total == 7  # deleting check cells changes nothing
    assert rows["fixtures/Copy of 01_forward_process (colab).ipynb"].total == 7  # Colab-only lines skipped
    assert rows["fixtures/01_syntax_error_elsewhere.ipynb"].total == 7


def test_answers_that_misbehave_cost_their_own_question_only(graded):
    rows = graded["rows"]
    for name, reason in [
        ("01_infinite_loop", "time limit"),
        ("01_memory_hog", "memory"),
        ("01_exits", "SystemExit"),
    ]:
        results = _results(rows[f"fixtures/{name}.ipynb"])
        assert results["01.q1"].points == 0 and reason in results["01.q1"].message, (name, results["01.q1"])
        assert results["01.q2"].passed and results["01.q3"].passed, name
    assert rows["fixtures/01_floods_output.ipynb"].total == 7  # prints go nowhere near the grader
    syntax = _results(rows["fixtures/01_syntax_error.ipynb"])
    assert syntax["01.q3"].status == "missing" and "syntax error" in syntax["01.q3"].message
    assert syntax["01.q1"].passed


def test_borrowing_coursekit_answers_scores_nothing(graded):
    calls_reference = _results(graded["rows"]["fixtures/01_calls_reference.ipynb"])
    assert calls_reference["01.q2"].points == 0 and "answers this question for you" in calls_reference["01.q2"].message
    assert calls_reference["01.q1"].points == 2
    partial = {r.question: r.points for r in graded["rows"]["fixtures/01_partial.ipynb"].results}
    assert partial == {"01.q1": 2, "01.q2": 0, "01.q3": 0}


@pytest.mark.parametrize(
    ("name", "reason"),
    [("not_json.ipynb", "not valid JSON"), ("not_a_notebook.ipynb", "not a notebook")],
)
def test_files_that_are_not_notebooks_get_a_row_with_the_reason(graded, name, reason):
    assert reason in graded["rows"][f"fixtures/{name}"].error


def test_gradebook_and_feedback_files(graded):
    with (graded["out"] / "grades.csv").open() as file:
        table = list(csv.DictReader(file))
    assert len(table) == len(graded["rows"])
    assert {"file", "student", "exercise", "01.q1", "04.q2", "total", "max", "error", "needs_review"} <= set(table[0])
    feedback = list((graded["out"] / "feedback").glob("*.md"))
    assert len(feedback) == len(graded["rows"])
    partial = next(p for p in feedback if p.name.startswith("01_partial"))
    text = partial.read_text()
    assert "2 / 7 automatic points" in text and "expected dtype" in text
    assert "Likely cause: alpha_bar is float64: cast the ratio to x_s's dtype" in text  # a catalogued mistake, named
    assert "01.q4 (written answer): to be graded by your teacher" in text
    journal = (graded["out"] / "grades.journal.jsonl").read_text().splitlines()
    assert len(journal) == len(graded["rows"]) and all(json.loads(line)["row"]["sha256"] for line in journal)


def test_grade_command_line(tmp_path, capsys):
    shutil.copy(ROOT / "solutions" / "01_forward_process.ipynb", tmp_path / "alice.ipynb")
    assert main(["grade", str(tmp_path / "alice.ipynb"), "--exercise", "01", "--out", str(tmp_path / "g.csv")]) == 0
    assert "graded 1 submissions" in capsys.readouterr().out
    assert ",7,9," in (tmp_path / "g.csv").read_text()
    assert find_submissions([tmp_path]) == [tmp_path / "alice.ipynb"]


def test_grade_command_line_refuses_bad_options(tmp_path, capsys):
    for option in (["--question-timeout", "0"], ["--memory-mb", "-5"], ["--workers", "two"], ["--id-from", "x"]):
        assert main(["grade", str(tmp_path), *option]) == 2, option
    assert main(["grade"]) == 2


def test_student_ids_for_school_systems(tmp_path):
    root = tmp_path / "in"
    (root / "s1234").mkdir(parents=True)
    folder_file = root / "s1234" / "01_forward_process.ipynb"
    folder_file.write_text("{}")
    assert student_id(folder_file, [root], "folder") == "s1234"
    for name, expected in [
        ("u5678_01_forward_process.ipynb", "u5678"),
        ("01_forward_process_u5678.ipynb", "u5678"),
        ("Copy of 01_forward_process - u5678 (1).ipynb", "u5678"),
    ]:
        assert student_id(root / name, [root], "filename") == expected, name
    notebook = json.loads((ROOT / "exercises" / "01_forward_process.ipynb").read_text())
    notebook["metadata"]["coursekit"] = {"student_id": "abc-42"}
    tagged = root / "tagged.ipynb"
    tagged.write_text(json.dumps(notebook))
    assert student_id(tagged, [root], "metadata") == "abc-42"
    with pytest.raises(ValueError, match="id-from"):
        student_id(tagged, [root], "email")
