"""Grade one submission: read it, run its answers in a sandbox, compare the outputs here.

The trust boundary runs between this module (the grader's process) and ``worker`` (the sandbox):

1. ``screen.read_answers`` takes the answer cells' definitions and flags code that reaches outside
   them; flagged answers are never run and get 0 automatic points ("needs a human look").
2. ``sandbox`` starts a fresh worker process under OS limits (and in bubblewrap where available) and
   hands it the screened code; the worker sends back each question's outputs as soon as they exist.
3. Here, the outputs are compared with the reference computed in this process (``engine.score``).
   A question that hangs or crashes its worker costs that question only: a new worker takes the rest.

Submissions are only ever read.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import queue
import re
import signal
import struct
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from coursekit.course.authoring import MARKDOWN_PLACEHOLDER, pristine_cells
from coursekit.course.engine import Question, Result, forbidden_names_used, questions_for, score, written_for
from coursekit.course.sandbox import Limits, Sandbox, changed_files, release, snapshot
from coursekit.course.screen import AnswerProgram, read_answers

MESSAGE_LIMIT = 256 * 1024 * 1024  # the largest message a worker may send (bytes)
STARTUP_SECONDS = 60  # importing torch and running the answer cells' definitions, beyond a question's limit
NEEDS_A_LOOK = "needs a human look"


@dataclass
class GradeRow:
    """One line of the gradebook."""

    file: str
    student: str
    exercise: str = ""
    results: list[Result] = field(default_factory=list)
    error: str = ""
    review: list[str] = field(default_factory=list)  # what a teacher should look at (quoted lines)
    seconds: float = 0.0
    sha256: str = ""
    student_id: str = ""
    written: dict[str, str] = field(default_factory=dict)  # written answers, graded by hand: id -> text
    hand: dict[str, str] = field(default_factory=dict)  # the teacher's marks for them, as typed in the gradebook

    @property
    def total(self) -> int:
        """The automatic points."""
        return sum(result.points for result in self.results)

    @property
    def maximum(self) -> int:
        """The automatic points there were to get."""
        return sum(result.max_points for result in self.results)

    def hand_marks(self) -> tuple[float, list[str]]:
        """The teacher's valid marks added up, and what is wrong with the others."""
        points, problems = 0.0, []
        maxima = {question.id: question.points for question in written_for(self.exercise)} if self.exercise else {}
        for question_id, text in self.hand.items():
            if question_id not in maxima or not str(text).strip():
                continue
            try:
                mark = float(text)
            except ValueError:
                mark = float("nan")
            if 0 <= mark <= maxima[question_id]:
                points += mark
            else:
                problems.append(f"{question_id}: {text!r} is not a mark from 0 to {maxima[question_id]}")
        return points, problems

    @property
    def pending(self) -> list[str]:
        """Written answers still waiting for the teacher's mark (an empty answer gets 0 without one)."""
        return [
            question_id
            for question_id, text in self.written.items()
            if text and not str(self.hand.get(question_id, "")).strip()
        ]


def identify_exercise(path: Path, notebook: dict) -> str | None:
    """Which exercise a submission answers: from its file name (NN_...), else from its contents."""
    match = re.search(r"(?:^|\D)(\d\d)_", path.name)
    if match and questions_for(match.group(1)):
        return match.group(1)
    text = json.dumps(notebook.get("cells", []))
    for pattern in (r'check\(\\"(\d\d)\.q\d+', r"Exercise (\d\d)"):
        match = re.search(pattern, text)
        if match and questions_for(match.group(1)):
            return match.group(1)
    return None


def read_notebook(raw: bytes) -> tuple[dict | None, str]:
    """The notebook in ``raw``, or None and what is wrong with it."""
    try:
        notebook = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return None, f"not a notebook: the file is not valid JSON ({error})"[:200]
    if not isinstance(notebook, dict) or not isinstance(notebook.get("cells"), list) or notebook.get("nbformat") != 4:
        return None, "not a notebook: JSON without the cells of a Jupyter notebook (nbformat 4)"
    return notebook, ""


def grade_submission(
    path: Path,
    limits: Limits,
    sandbox: Sandbox,
    exercise: str | None = None,
    student: str | None = None,
    slot: int = 0,
    watch: list[Path] | None = None,
    skip_watch: tuple[str, ...] = (),
) -> GradeRow:
    """Grade one file; whatever goes wrong ends up in the row's error, never as an exception."""
    start = time.perf_counter()
    row = GradeRow(file=str(path), student=student or path.stem)
    try:
        raw = path.read_bytes()
        row.sha256 = hashlib.sha256(raw).hexdigest()
        _grade_into(row, path, raw, limits, sandbox, exercise, slot, watch, skip_watch)
        if path.read_bytes() != raw:  # cannot happen through the sandbox; said loudly if it ever does
            path.write_bytes(raw)
            row.error = "; ".join(filter(None, [row.error, "the submission file changed while it ran; restored"]))
    except Exception as error:  # a submission must cost one row, never the whole run
        row.error = f"the grader could not grade it ({type(error).__name__}: {error})"[:300]
    finally:
        row.seconds = time.perf_counter() - start
    return row


def _grade_into(row, path, raw, limits, sandbox, exercise, slot, watch, skip_watch) -> None:
    notebook, problem = read_notebook(raw)
    if notebook is None:
        row.error = problem
        return
    row.exercise = exercise or identify_exercise(path, notebook) or ""
    if not row.exercise:
        row.error = "could not tell which exercise this is: name the file NN_... or pass --exercise NN"
        return
    questions = questions_for(row.exercise)
    program = read_answers(notebook, {question.name for question in questions}, pristine_cells(row.exercise))
    decided = {question.id: _decide_before_running(question, program) for question in questions}
    to_run = [question for question in questions if decided[question.id] is None]
    problems, answers = [], {}
    if to_run:
        before = snapshot(watch, skip_watch) if watch else None
        answers, problems = run_answers(program, to_run, limits, sandbox, slot)
        if before is not None:
            outside = changed_files(before, snapshot(watch, skip_watch))
            if outside:
                problems.append(f"a file outside its folder changed while it ran: {outside[0]}")
                row.review.append(f"files outside its folder changed while it ran: {', '.join(outside[:5])}")
    for question in questions:
        row.results.append(decided[question.id] or _score_answer(question, answers.get(question.id)))
    for question in questions:
        for flag in program.flags_for(question.name):
            row.review.append(f"{question.id}: {flag}")
    row.review += [f"not run (outside the answer cells): {note}" for note in program.notes[:10]]
    row.written = read_written_answers(notebook, row.exercise)
    row.error = "; ".join(dict.fromkeys(problems))[:300]


WRITTEN_LIMIT = 4000  # characters of one written answer kept for the teacher


def read_written_answers(notebook: dict, exercise: str) -> dict[str, str]:
    """Each written question's answer: the Markdown cell tagged ``answer:NN.qK`` ("" when left empty).

    Where an editor lost the tag, the Markdown cell right after the question's heading is taken.
    """
    cells = [cell for cell in notebook.get("cells", []) if isinstance(cell, dict)]
    texts = [_cell_text(cell) for cell in cells]
    answers = {}
    for question in written_for(exercise):
        found = None
        for index, cell in enumerate(cells):
            metadata = cell.get("metadata") if isinstance(cell.get("metadata"), dict) else {}
            tags = metadata.get("tags") if isinstance(metadata.get("tags"), list) else []
            if question.tag in tags:
                found = index
                break
        if found is None:
            heading = f"Question {question.id.split('.q')[-1]} ("
            for index, text in enumerate(texts[:-1]):
                if heading in text and "graded by hand" in text and cells[index + 1].get("cell_type") == "markdown":
                    found = index + 1
                    break
        text = texts[found] if found is not None else ""
        answers[question.id] = text.replace(MARKDOWN_PLACEHOLDER, "").strip()[:WRITTEN_LIMIT]
    return answers


def _cell_text(cell: dict) -> str:
    source = cell.get("source", "")
    if isinstance(source, list):
        return "".join(part for part in source if isinstance(part, str))
    return source if isinstance(source, str) else ""


def _decide_before_running(question: Question, program: AnswerProgram) -> Result | None:
    """The result of a question that will not run: missing, a syntax error, flagged, or borrowed."""
    if question.name in program.syntax_errors:
        return Result(question.id, "missing", 0, question.points, program.syntax_errors[question.name])
    if question.name not in program.definitions:
        return Result(
            question.id,
            "missing",
            0,
            question.points,
            f"no def or class {question.name} of your own was found in the notebook",
        )
    flags = program.flags_for(question.name)
    if flags:
        return Result(
            question.id,
            NEEDS_A_LOOK,
            0,
            question.points,
            f"not run: {'; '.join(map(str, flags[:3]))}{' ...' if len(flags) > 3 else ''}. Answers may not "
            "reach outside their own code; a teacher will look at it",
        )
    borrowed = forbidden_names_used(question, program.names_for(question.name) or set())
    if borrowed:
        return score(question, [], borrowed)
    return None


def _score_answer(question: Question, answer: dict | None) -> Result:
    if answer is None or "failure" in answer:
        reason = answer["failure"] if answer else "it was not run (see the error column)"
        return Result(question.id, "failed", 0, question.points, f"{question.name}: {reason}")
    if answer.get("missing"):
        return Result(question.id, "missing", 0, question.points, f"{question.name} is not defined")
    return score(question, answer.get("outputs"))


# ----------------------------------------------------------------------------- talking to the worker


def run_answers(
    program: AnswerProgram, questions: list[Question], limits: Limits, sandbox: Sandbox, slot: int = 0
) -> tuple[dict[str, dict], list[str]]:
    """Each question's message from the worker (or its failure), and the problems met on the way."""
    answers, problems = {}, []
    remaining = [question.id for question in questions]
    deadline = time.monotonic() + limits.total_seconds
    while remaining:
        if time.monotonic() >= deadline:
            for question_id in remaining:
                answers[question_id] = {"failure": f"not reached within the {limits.total_seconds} s time limit"}
            problems.append(f"ran longer than the total time limit of {limits.total_seconds} s")
            break
        answered = len(answers)
        _one_worker(program, remaining, limits, sandbox, slot, deadline, answers, problems)
        remaining = [question_id for question_id in remaining if question_id not in answers]
        if remaining and len(answers) == answered:
            for question_id in remaining:  # the worker stopped before any question: do not loop
                answers[question_id] = {"failure": "its code could not be run (see the error column)"}
            break
    return answers, problems


def _one_worker(program, question_ids, limits, sandbox, slot, deadline, answers, problems) -> bool:
    """Run one worker over ``question_ids``; True when it got to the end."""
    job = json.dumps({"questions": question_ids, "chunks": program.chunks}).encode()
    with tempfile.TemporaryDirectory(prefix="coursekit-grade-") as temporary:
        folder = Path(temporary) / "submission"
        folder.mkdir()
        process = sandbox.start(folder, limits, slot)
        messages: queue.Queue = queue.Queue()
        reader = threading.Thread(target=_read_messages, args=(process.stdout, messages), daemon=True)
        reader.start()
        try:
            process.stdin.write(job)
            process.stdin.close()
        except OSError:
            pass
        # until the worker is ready, the answer cells' top-level code runs: one question's time, plus imports
        current, finished, killed = None, False, ""
        question_deadline = time.monotonic() + limits.question_seconds + STARTUP_SECONDS
        while True:
            wait = min(question_deadline, deadline) - time.monotonic()
            try:
                message = messages.get(timeout=max(wait, 0.01))
            except queue.Empty:
                over_total = time.monotonic() >= deadline
                killed = (
                    f"ran longer than the total time limit of {limits.total_seconds} s"
                    if over_total
                    else f"ran past the time limit of {limits.question_seconds} s for one question"
                )
                break
            if message is None:  # the worker ended (or sent something that is not a message)
                break
            kind = message.get("kind")
            if kind == "ready":
                problems += [str(problem) for problem in message.get("problems", [])]
                question_deadline = deadline
            elif kind == "start" and message.get("question") in question_ids:
                current, question_deadline = message["question"], time.monotonic() + limits.question_seconds
            elif kind == "result" and message.get("question") in question_ids:
                answers[message["question"]] = message
                current, question_deadline = None, deadline
            elif kind == "done":
                finished = True
                break
        _stop(process)
        stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
        if killed:
            problems.append(killed)
            if current:
                answers[current] = {"failure": killed}
        elif not finished:
            reason = _why_it_ended(process.returncode, stderr)
            problems.append(reason)
            if current:
                answers[current] = {"failure": reason}
        return finished


def _read_messages(stream, messages: queue.Queue) -> None:
    """Frames of (8-byte length, torch.save bytes), loaded with weights_only=True; None at the end."""
    import torch

    try:
        while True:
            header = stream.read(8)
            if len(header) < 8:
                break
            (size,) = struct.unpack(">Q", header)
            if size > MESSAGE_LIMIT:
                break
            data = stream.read(size)
            if len(data) < size:
                break
            message = torch.load(io.BytesIO(data), weights_only=True)
            if not isinstance(message, dict):
                break
            messages.put(message)
    except Exception:  # noqa: BLE001  (anything malformed ends the conversation)
        pass
    messages.put(None)


def _stop(process) -> None:
    """The worker and everything it started: its process group, and (bubblewrap) its PID namespace."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        process.wait(timeout=30)
    except Exception:  # noqa: BLE001
        process.kill()
    release(process)


def _why_it_ended(returncode: int | None, stderr: str) -> str:
    if returncode is not None and returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.Signals._value2member_map_ else returncode
        if returncode in (-signal.SIGKILL, -getattr(signal, "SIGXCPU", 24)):
            return f"its process was stopped ({name}): it used up its CPU time or memory, or killed itself"
        return f"its process died ({name})"
    last = stderr.strip().splitlines()[-1:] or [f"exit code {returncode}"]
    return f"its process ended early ({last[0][:200]})"
