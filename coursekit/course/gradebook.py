"""A folder of submissions in; a gradebook, feedback files and exports for school systems out.

    coursekit grade submissions/ --out grades.csv

Each row is written the moment its submission is graded: to a journal beside the gradebook
(``grades.journal.jsonl``, one JSON line each, flushed to disk), then to the CSV and the feedback
file. A grader stopped half-way keeps every finished row, and running the same command again grades
only the submissions that are new or changed since (by their SHA-256), or whose questions changed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import queue
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from coursekit.course.engine import Result, questions_for, written_for, written_questions
from coursekit.course.runner import GradeRow, grade_submission, read_notebook
from coursekit.course.sandbox import Limits, detect

ID_SOURCES = ("folder", "filename", "metadata")
COLUMNS_BEFORE = ["file", "student", "student_id", "exercise"]
COLUMNS_AFTER = ["total", "max", "to_grade_by_hand", "error", "needs_review", "sha256"]


def find_submissions(paths: list[str | Path]) -> list[Path]:
    """Every notebook under the given folders, plus every file named directly."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
        elif path.exists():
            found.append(path)
        else:
            raise ValueError(f"{path} does not exist")
    return found


def student_name(path: Path, roots: list[str | Path]) -> str:
    """The student's folder when submissions sit in one folder per student, else the file's name."""
    for root in map(Path, roots):
        if root.is_dir() and root in path.parents:
            parts = path.relative_to(root).parts
            return parts[0] if len(parts) > 1 else path.stem
    return path.stem


def student_id(path: Path, roots: list[str | Path], source: str) -> str:
    """The ID a school system knows the student by: from the folder, the file name or the notebook.

    ``filename``: the file name without the exercise's part (``s1234_01_forward_process.ipynb`` -> ``s1234``).
    ``metadata``: the notebook's ``metadata.coursekit.student_id`` (or ``metadata.student_id``).
    """
    if source == "folder":
        for root in map(Path, roots):
            if root.is_dir() and root in path.parents and len(path.relative_to(root).parts) > 1:
                return path.relative_to(root).parts[0]
        return ""
    if source == "filename":
        stem = re.sub(r"\(\d+\)$", "", path.stem).strip()  # "name (1)" from a second download
        words = [word for word in re.split(r"[_\-\s.]+", stem) if word]
        exercise_words = {"copy", "of", "colab", "exercise", "solution", *EXERCISE_WORDS}
        kept = [word for word in words if not re.fullmatch(r"\d\d", word) and word.lower() not in exercise_words]
        return "_".join(kept)
    if source == "metadata":
        notebook, _ = read_notebook(path.read_bytes())
        metadata = (notebook or {}).get("metadata", {})
        value = (metadata.get("coursekit") or {}).get("student_id") or metadata.get("student_id") or ""
        return str(value).strip()
    raise ValueError(f"unknown --id-from {source!r}; choose one of {', '.join(ID_SOURCES)}")


# Words of the exercise notebooks' names (01_forward_process ...), dropped from file names for IDs.
EXERCISE_WORDS = {"forward", "process", "unet", "training", "reverse", "fewer", "steps", "control", "latent"}
EXERCISE_WORDS |= {"diffusion", "editing"}


def grader_fingerprint() -> str:
    """Changes whenever the questions, the screen or the runner change: then every row is graded again."""
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in ("engine.py", "bank_part1.py", "bank_part2.py", "screen.py", "runner.py", "worker.py"):
        digest.update((here / name).read_bytes())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- rows as JSON


def row_to_dict(row: GradeRow) -> dict:
    return {
        "file": row.file,
        "student": row.student,
        "student_id": row.student_id,
        "exercise": row.exercise,
        "results": [vars(result) for result in row.results],
        "error": row.error,
        "review": row.review,
        "seconds": round(row.seconds, 3),
        "sha256": row.sha256,
        "written": row.written,
    }


def row_from_dict(data: dict) -> GradeRow:
    results = [Result(**result) for result in data.get("results", [])]
    fields = {key: data[key] for key in ("file", "student", "student_id", "exercise", "error", "review", "sha256")}
    written = {str(key): str(value) for key, value in (data.get("written") or {}).items()}
    return GradeRow(results=results, seconds=data.get("seconds", 0.0), written=written, **fields)


class Journal:
    """Finished rows, one JSON line each, on disk the moment they exist."""

    def __init__(self, path: Path, fingerprint: str):
        self.path, self.fingerprint, self.lock = path, fingerprint, threading.Lock()

    def finished(self) -> dict[tuple[str, str], GradeRow]:
        """Rows graded earlier by this same grader, by (file, sha256); a torn last line is ignored."""
        rows = {}
        if self.path.exists():
            for line in self.path.read_text(errors="replace").splitlines():
                try:
                    data = json.loads(line)
                    if data.get("grader") == self.fingerprint:
                        row = row_from_dict(data["row"])
                        rows[(row.file, row.sha256)] = row
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
        return rows

    def add(self, row: GradeRow) -> None:
        line = json.dumps({"grader": self.fingerprint, "row": row_to_dict(row)}) + "\n"
        with self.lock, self.path.open("a") as file:
            file.write(line)
            file.flush()
            os.fsync(file.fileno())


# ----------------------------------------------------------------------------- the whole folder


def grade(
    paths: list[str | Path],
    out: str | Path = "grades.csv",
    feedback_dir: str | Path | None = None,
    limits: Limits | None = None,
    workers: int | None = None,
    exercise: str | None = None,
    progress: bool = True,
    isolation: bool = True,
    id_from: str = "folder",
    lms: str | Path | None = None,
    id_column: str = "SIS User ID",
    announce=print,
) -> list[GradeRow]:
    """Grade every submission under ``paths``; rows reach the disk as each one finishes."""
    if id_from not in ID_SOURCES:
        raise ValueError(f"unknown --id-from {id_from!r}; choose one of {', '.join(ID_SOURCES)}")
    submissions = find_submissions(paths)
    if not submissions:
        raise ValueError(f"no notebooks found in {', '.join(map(str, paths))}")
    limits = limits or Limits()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    feedback_dir = Path(feedback_dir) if feedback_dir else out.parent / "feedback"
    journal = Journal(out.with_suffix(".journal.jsonl"), grader_fingerprint())
    sandbox = detect(isolation)
    announce(sandbox.describe())
    if sandbox.isolated:
        workers = workers or max(1, min(os.cpu_count() or 1, len(submissions)))
        watch, skip = None, ()
    else:  # look for writes outside the folders afterwards; one at a time, so each change has one author
        workers = workers or 1
        watch = sorted({*(Path(p).resolve() for p in paths if Path(p).is_dir()), out.parent.resolve()})
        watch += [Path(p) for p in {os.path.realpath(_temporary()), str(Path.home()), os.getcwd()}]
        skip = (str(out.resolve()), str(journal.path.resolve()), str(feedback_dir.resolve()), *_own_temporary())

    earlier = journal.finished()
    rows: dict[Path, GradeRow] = {}
    to_grade = []
    for path in submissions:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        row = earlier.get((str(path), digest))
        if row is not None:
            rows[path] = row
        else:
            to_grade.append(path)
    if rows:
        announce(f"{len(rows)} submission(s) unchanged since they were graded: kept; grading {len(to_grade)}")
        write_feedback(list(rows.values()), feedback_dir)  # the new rows get theirs as they finish

    from coursekit.progress import progress_bar

    bar = progress_bar(total=len(to_grade), desc="grading", unit="notebook", disable=not progress, file=sys.stderr)
    slots: queue.Queue = queue.Queue()
    for slot in range(workers):
        slots.put(slot)
    write_lock = threading.Lock()

    def one(path: Path) -> None:
        slot = slots.get()
        try:
            row = grade_submission(path, limits, sandbox, exercise, student_name(path, paths), slot, watch, skip)
        finally:
            slots.put(slot)
        try:
            row.student_id = student_id(path, paths, id_from)
        except (OSError, ValueError):
            row.student_id = ""
        journal.add(row)
        with write_lock:
            rows[path] = row
            write_feedback([row], feedback_dir)
            write_gradebook([rows[p] for p in submissions if p in rows], out)
            bar.update(1)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, to_grade))
    bar.close()
    ordered = [rows[path] for path in submissions]
    write_gradebook(ordered, out)  # also when every row was kept, or a file left the folder
    if any(row.written for row in ordered):
        answers = write_written_answers(ordered, out.with_name(f"{out.stem}.written.md"))
        announce(f"written answers to grade by hand, question by question: {answers}")
        write_feedback(ordered, feedback_dir)  # with the teacher's marks, where there are some
    if lms:
        write_lms_gradebook(ordered, lms, id_column, announce)
    return ordered


def _temporary() -> str:
    import tempfile

    return tempfile.gettempdir()


def _own_temporary() -> tuple[str, ...]:
    """The grader's own temporary folders (a submission's folder and the isolation probe)."""
    return tuple(
        os.path.join(os.path.realpath(_temporary()), name) for name in ("coursekit-grade-", "coursekit-probe-")
    )


# ----------------------------------------------------------------------------- files


def _atomic_write(path: Path, write) -> Path:
    """Write through a temporary file in the same folder, then rename: never a half-written gradebook."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial")
    with temporary.open("w", newline="") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    return path


def question_columns(rows: list[GradeRow]) -> list[str]:
    return sorted(
        {result.question for row in rows for result in row.results}
        | {q.id for row in rows if row.exercise for q in questions_for(row.exercise) + written_for(row.exercise)}
    )


def exercise_maximum(exercise: str) -> int:
    """Every point of an exercise: the automatic ones and those for written answers."""
    return sum(question.points for question in questions_for(exercise) + written_for(exercise))


def read_hand_marks(path: str | Path) -> dict[tuple[str, str], dict[str, str]]:
    """The marks a teacher typed into an earlier gradebook's written-answer columns, by (file, sha256)."""
    path = Path(path)
    if not path.exists():
        return {}
    marks = {}
    with path.open(newline="", errors="replace") as file:
        for record in csv.DictReader(file):
            typed = {
                question_id: value.strip()
                for question_id, value in record.items()
                if question_id in written_questions() and isinstance(value, str) and value.strip()
            }
            if typed and record.get("file") is not None:
                marks[(record["file"], record.get("sha256") or "")] = typed
    return marks


def keep_hand_marks(rows: list[GradeRow], path: str | Path) -> None:
    """Carry the teacher's marks over from the gradebook at ``path`` into the rows of the same files.

    A mark stays with the submission it was given to: when the file changed since (another SHA-256),
    or the answer is now empty, it is not carried over.
    """
    marks = read_hand_marks(path)
    for row in rows:
        typed = marks.get((row.file, row.sha256), {})
        row.hand = {question_id: value for question_id, value in typed.items() if row.written.get(question_id)}


def grand_total(row: GradeRow) -> float | int:
    points = row.total + row.hand_marks()[0]
    return int(points) if float(points).is_integer() else round(points, 2)


def write_gradebook(rows: list[GradeRow], out: str | Path) -> Path:
    """One row per submission, one column per question; the written answers' columns are the teacher's.

    A written answer's cell stays blank until the teacher types a mark into it (0 when it was left
    empty); marks typed into an earlier gradebook at ``out`` are kept, and counted in the total.
    """
    question_ids = question_columns(rows)
    keep_hand_marks(rows, out)

    def write(file) -> None:
        writer = csv.writer(file)
        writer.writerow([*COLUMNS_BEFORE, *question_ids, *COLUMNS_AFTER])
        for row in rows:
            points = {result.question: result.points for result in row.results}
            points.update({question_id: 0 for question_id, text in row.written.items() if not text})
            points.update(row.hand)
            cells = [points.get(q, "" if not q.startswith(row.exercise + ".") or q in row.written else 0)
                     for q in question_ids]  # fmt: skip
            maximum = exercise_maximum(row.exercise) if row.exercise else 0
            pending = [f"{q} ({written_questions()[q].points} points)" for q in row.pending] + row.hand_marks()[1]
            review = " | ".join(row.review)[:500]
            writer.writerow(
                [row.file, row.student, row.student_id, row.exercise, *cells]
                + [grand_total(row), maximum, "; ".join(pending), row.error, review, row.sha256]
            )

    return _atomic_write(Path(out), write)


def write_written_answers(rows: list[GradeRow], out: str | Path) -> Path:
    """Every written answer, question by question, for a teacher to read side by side."""
    lines = ["# Written answers", "", "Type each mark into its column of the gradebook; the next run keeps it.", ""]
    for question_id in sorted({question_id for row in rows for question_id in row.written}):
        question = written_questions()[question_id]
        lines += [f"## {question_id} ({question.points} points)", "", f"> {question.prompt}", ""]
        for row in rows:
            if question_id in row.written:
                answer = row.written[question_id] or "*(no answer: 0 points)*"
                mark = row.hand.get(question_id, "")
                lines += [f"### {row.student} ({Path(row.file).name}){f': {mark}' if mark else ''}", "", answer, ""]
    text = "\n".join(lines) + "\n"
    return _atomic_write(Path(out), lambda file: file.write(text))


def write_lms_gradebook(rows: list[GradeRow], out: str | Path, id_column: str = "SIS User ID", announce=print) -> Path:
    """One row per student, one column per exercise (its total), keyed by ``id_column``.

    Canvas: Grades > Import, the ID column named ``SIS User ID`` (or ``SIS Login ID``); each exercise
    column becomes (or matches) an assignment. Moodle: Grades > Import > CSV file, map the ID column to
    "ID number" (or "username"/"email"), and each exercise column to a grade item.
    """
    exercises = sorted({row.exercise for row in rows if row.exercise})
    students: dict[str, dict] = {}
    missing = [row.file for row in rows if not row.student_id]
    for row in rows:
        if not row.student_id or not row.exercise:
            continue
        record = students.setdefault(row.student_id, {"Student": row.student})
        record[exercise_column(row.exercise)] = max(grand_total(row), record.get(exercise_column(row.exercise), 0))
    if missing:
        announce(f"{len(missing)} submission(s) without a student ID left out of {out}: {', '.join(missing[:3])}")
    waiting = [row for row in rows if row.pending]
    if waiting:
        announce(
            f"{len(waiting)} submission(s) have written answers still to grade by hand: their totals in {out} leave "
            "those out (type the marks into the gradebook and run the command again)"
        )

    def write(file) -> None:
        writer = csv.writer(file)
        writer.writerow(["Student", id_column, *map(exercise_column, exercises)])
        for identifier in sorted(students):
            record = students[identifier]
            writer.writerow([record["Student"], identifier, *(record.get(exercise_column(e), "") for e in exercises)])

    return _atomic_write(Path(out), write)


def exercise_column(exercise: str) -> str:
    return f"Exercise {exercise} ({exercise_maximum(exercise)} points)"


def feedback_name(row: GradeRow) -> str:
    digest = hashlib.sha1(row.file.encode()).hexdigest()[:6]
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', Path(row.file).stem)}-{digest}.md"


def write_feedback(rows: list[GradeRow], folder: str | Path) -> Path:
    """One Markdown file per submission, ready to send back to the student."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for row in rows:
        lines = [
            f"# Feedback: {Path(row.file).name}",
            "",
            f"Exercise {row.exercise or '?'}: **{row.total} / {row.maximum} automatic points**"
            + (f", and {len(row.written)} written answer(s) graded by hand" if row.written else ""),
            "",
        ]
        if row.error:
            lines += [f"Problem: {row.error}", ""]
        lines += [f"- {result!r}" for result in row.results]
        for question_id, text in row.written.items():
            mark, points = row.hand.get(question_id, ""), written_questions()[question_id].points
            state = (
                f"{mark} / {points} points, marked by your teacher"
                if mark
                else (f"to be graded by your teacher ({points} points)" if text else "no answer")
            )
            lines.append(f"- ✍️ {question_id} (written answer): {state}")
        if row.review:
            lines += ["", "For your teacher to look at:", ""] + [f"- {item}" for item in row.review]
        text = "\n".join(lines) + "\n"
        _atomic_write(folder / feedback_name(row), lambda file, text=text: file.write(text))
    return folder
