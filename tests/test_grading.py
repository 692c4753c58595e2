"""The grader on the solutions, on untouched exercises, and on broken and hostile submissions."""

import csv
import hashlib
import shutil
from pathlib import Path

import pytest

from coursekit.cli import main
from coursekit.grading import find_submissions, grade

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "submissions"
OPTIONS = dict(cell_timeout=20, total_timeout=120, memory_mb=1500, progress=False)


def _digests(folder):
    return {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    out = tmp_path_factory.mktemp("grades")
    submissions = out / "in"
    shutil.copytree(FIXTURES, submissions / "fixtures")
    shutil.copytree(ROOT / "solutions", submissions / "solutions")
    shutil.copytree(ROOT / "exercises", submissions / "exercises")
    before = _digests(submissions)
    rows = grade([submissions], out=out / "grades.csv", **OPTIONS)
    return {
        "rows": {Path(row.file).relative_to(submissions).as_posix(): row for row in rows},
        "out": out,
        "before": before,
        "after": _digests(submissions),
    }


def test_no_submission_is_modified(graded):
    assert graded["before"] == graded["after"]
    for escaped in ("coursekit-escaped-absolute.txt", "coursekit-escaped-subprocess.txt"):
        assert not (Path("/tmp") / escaped).exists()


def test_students_are_named_by_their_folder_or_their_file(graded):
    from coursekit.grading import student_name

    assert graded["rows"]["solutions/01_forward_process.ipynb"].student == "solutions"
    assert student_name(Path("/in/alice_01.ipynb"), [Path("/in")]) == "alice_01"


EXERCISES = sorted(path.stem for path in (ROOT / "solutions").glob("*.ipynb"))


def test_solutions_get_full_marks(graded):
    assert len(EXERCISES) == 8
    for name in EXERCISES:
        row = graded["rows"][f"solutions/{name}.ipynb"]
        assert row.total == row.maximum > 0 and row.error == "", (name, row.error, row.results)


def test_untouched_exercises_run_through_and_get_zero(graded):
    for name in EXERCISES:
        row = graded["rows"][f"exercises/{name}.ipynb"]
        assert row.total == 0 and row.maximum > 0 and row.error == "", (name, row.error)
        assert all(result.status == "not implemented" for result in row.results)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("not_json.ipynb", "not valid JSON"),
        ("not_a_notebook.ipynb", "not a notebook"),
        ("01_syntax_error.ipynb", "syntax error in code cell"),
        ("01_infinite_loop.ipynb", "cell time limit"),
        ("01_kills_kernel.ipynb", "kernel died"),
        ("01_memory_hog.ipynb", "more than 1500 MB"),
        ("01_writes_outside.ipynb", "tried to write outside its folder"),
        ("01_runs_programs.ipynb", "tried to start another program"),
        ("01_moves_files.ipynb", "tried to write outside its folder"),
    ],
)
def test_broken_and_hostile_submissions_get_a_row_with_the_reason(graded, name, reason):
    row = graded["rows"][f"fixtures/{name}"]
    assert reason in row.error, row.error


def test_grades_come_from_the_graders_own_comparison(graded):
    rows = graded["rows"]
    assert rows["fixtures/01_patches_allclose.ipynb"].total == 0  # patched allclose and check change nothing
    calls_reference = {r.question: r for r in rows["fixtures/01_calls_reference.ipynb"].results}
    assert calls_reference["01.q2"].points == 0 and "answers this question for you" in calls_reference["01.q2"].message
    assert calls_reference["01.q1"].points == 2
    assert rows["fixtures/01_deleted_checks.ipynb"].total == 7  # deleting check cells changes nothing
    assert rows["fixtures/Copy of 01_forward_process (colab).ipynb"].total == 7  # Colab-only cells skipped
    partial = {r.question: r.points for r in rows["fixtures/01_partial.ipynb"].results}
    assert partial == {"01.q1": 2, "01.q2": 0, "01.q3": 0}
    infinite = rows["fixtures/01_infinite_loop.ipynb"]
    assert infinite.total == 7  # interrupted after its time limit; the rest still counts


def test_gradebook_and_feedback_files(graded):
    with (graded["out"] / "grades.csv").open() as file:
        table = list(csv.DictReader(file))
    assert len(table) == len(graded["rows"])
    assert {"file", "student", "exercise", "01.q1", "04.q2", "total", "max", "error"} <= set(table[0])
    feedback = list((graded["out"] / "feedback").glob("*.md"))
    assert len(feedback) == len(graded["rows"])
    partial = next(p for p in feedback if p.name.startswith("01_partial"))
    text = partial.read_text()
    assert "2 / 7 points" in text and "expected dtype" in text


def test_grade_command_line(tmp_path, capsys):
    shutil.copy(ROOT / "solutions" / "01_forward_process.ipynb", tmp_path / "alice.ipynb")
    assert main(["grade", str(tmp_path / "alice.ipynb"), "--exercise", "01", "--out", str(tmp_path / "g.csv")]) == 0
    assert "graded 1 submissions" in capsys.readouterr().out
    assert "7,7," in (tmp_path / "g.csv").read_text()
    assert find_submissions([tmp_path]) == [tmp_path / "alice.ipynb"]
