"""The grader: a folder of submitted notebooks in, a CSV gradebook and feedback files out.

    coursekit grade submissions/ --out grades.csv

Each submission runs in a fresh kernel, on a copy in a temporary folder, with a time limit per cell
and in total and a memory limit. Once its cells have run, the grader calls the learner's functions on
inputs it chooses, and compares the results with the reference **in its own process**: stored
outputs, edited or deleted check cells, and whatever the notebook patched inside its kernel change
nothing. Submissions are only ever read. This runs student code on your machine: grade in an account
without access to anything precious (a container or a throwaway VM is better still).
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from coursekit.checks import (
    Question,
    Result,
    forbidden_names_used,
    questions_for,
    referenced_names,
    run_implementation,
    score,
)

ANSWERS = "answers.pt"
REPORT = "report.json"
VIOLATIONS = ".grading-violations"
COLAB_ONLY = re.compile(r"^\s*([!%]|.*google\.colab|.*drive\.mount)")

# Libraries that build caches or ask the system on first import (matplotlib runs fc-list) load before the guard.
GUARD_CELL = (
    "import matplotlib.font_manager, torch, coursekit\n"
    "import coursekit.grading as _grading\n_grading.install_write_guard()\ndel _grading"
)

PROBE_CELL = """
import coursekit.grading as _grading
_grading.probe(globals(), %r, %r)
"""


@dataclass
class GradeRow:
    """One line of the gradebook."""

    file: str
    student: str
    exercise: str = ""
    results: list[Result] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(result.points for result in self.results)

    @property
    def maximum(self) -> int:
        return sum(result.max_points for result in self.results)


# ----------------------------------------------------------------------------- inside the kernel

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_PATH_EVENTS = {"os.remove", "os.rmdir", "os.mkdir", "os.truncate", "os.chmod", "shutil.rmtree"}
_TWO_PATH_EVENTS = {"os.rename", "shutil.move", "shutil.copyfile", "os.symlink", "os.link"}  # (source, target, ...)
_PROCESS_EVENTS = {"os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.fork", "os.forkpty", "pty.spawn"}


def install_write_guard() -> None:
    """Refuse, from now on in this process, any write outside the current folder (and /dev).

    Runs first in a submission's kernel. An audit hook (PEP 578) cannot be removed once added, so
    nothing the notebook does later can lift it; refused attempts are logged for the grader.
    """
    allowed = os.path.realpath(os.getcwd())
    log = os.open(os.path.join(allowed, VIOLATIONS), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    realpath, write, fsdecode = os.path.realpath, os.write, os.fsdecode

    def guard(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, 0))[:3]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & _WRITE_FLAGS)
        elif event in _PATH_EVENTS:
            path, writing = args[0], True
        elif event in _TWO_PATH_EVENTS:
            for path in args[:2]:  # moving a file away from outside the folder deletes it there
                check_path(event, path)
            return
        elif event in _PROCESS_EVENTS:
            write(log, f"{event} (a new process)\n".encode())
            raise PermissionError("grading: starting other programs is not allowed")
        else:
            return
        if writing:
            check_path(event, path)

    def check_path(event: str, path) -> None:
        if path is None or isinstance(path, int):
            return
        target = realpath(fsdecode(path))
        if target == allowed or target.startswith(allowed + os.sep) or target.startswith("/dev/"):
            return
        write(log, f"{event} {target}\n".encode())
        raise PermissionError(f"grading: writing outside the submission's folder is not allowed: {target}")

    sys.addaudithook(guard)


def probe(namespace: dict, exercise: str, answers_path: str) -> None:
    """Run in the submission's kernel after its cells: call the learner's code on the grader's cases."""
    import torch

    answers = {}
    for question in questions_for(exercise):
        implementation = namespace.get(question.name)
        if implementation is None:
            answers[question.id] = {"missing": True}
            continue
        outputs = run_implementation(question, implementation)
        answers[question.id] = {
            "outputs": [_plain(output) for output in outputs],
            "borrowed": sorted(_borrowed_references(question, implementation)),
        }
    torch.save(answers, answers_path)


def _borrowed_references(question: Question, implementation) -> set[str]:
    """Global names the implementation uses that are bound to coursekit's answer to this question."""
    codes = [getattr(implementation, "__code__", None)]
    if isinstance(implementation, type):
        codes += [getattr(member, "__code__", None) for member in vars(implementation).values()]
    namespace = getattr(implementation, "__globals__", None) or vars(sys.modules.get(implementation.__module__, sys))
    borrowed = set()
    while codes:
        code = codes.pop()
        if code is None:
            continue
        codes.extend(const for const in code.co_consts if hasattr(const, "co_names"))
        for name in code.co_names:
            value = namespace.get(name)
            module = getattr(value, "__module__", "") or ""
            if (
                value is question.reference
                or module == "coursekit.checks"
                or (module.startswith("coursekit") and getattr(value, "__name__", "") in question.forbidden)
            ):
                borrowed.add(name)
    return borrowed


def _plain(output):
    """Only tensors, numbers, strings and containers of them travel back (weights_only loading)."""
    import torch

    if isinstance(output, BaseException):
        return {"error": type(output).__name__, "message": str(output)[:300]}
    if isinstance(output, torch.Tensor):
        return output.detach().cpu().clone() if type(output) is torch.Tensor else torch.Tensor(output.cpu())
    if isinstance(output, dict):
        return {str(key): _plain(value) for key, value in output.items()}
    if isinstance(output, (tuple, list)):  # e.g. (x_t, t) in 08.q1
        return type(output)(_plain(value) for value in output)
    if isinstance(output, (int, float, str, bool)) or output is None:
        return output
    return {"error": "TypeError", "message": f"returned a {type(output).__name__}, not a tensor"}


# ----------------------------------------------------------------------------- one submission, own process


def _kernel_pid(client) -> int | None:
    manager = getattr(client, "km", None)
    provisioner = getattr(manager, "provisioner", None)
    process = getattr(provisioner, "process", None) or getattr(manager, "kernel", None)
    return getattr(process, "pid", None)


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_submission(notebook_path: Path, exercise: str, cell_timeout: int, memory_mb: int) -> dict:
    """Execute the prepared notebook in its folder; write what happened to report.json."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import DeadKernelError

    folder = notebook_path.parent
    notebook = nbformat.read(notebook_path, as_version=4)
    notebook.cells.insert(0, nbformat.v4.new_code_cell(GUARD_CELL))
    notebook.cells.append(nbformat.v4.new_code_cell(PROBE_CELL % (exercise, str(folder / ANSWERS))))
    client = NotebookClient(
        notebook,
        timeout=cell_timeout,
        kernel_name="python3",
        allow_errors=True,
        interrupt_on_timeout=True,
        store_widget_state=False,
        record_timing=False,
        resources={"metadata": {"path": str(folder)}},
    )
    report = {"status": "ran", "cell_errors": []}
    over_memory = threading.Event()
    finished = threading.Event()

    def watch_memory() -> None:
        while not finished.wait(0.5):
            pid = _kernel_pid(client)
            if pid and _rss_mb(pid) > memory_mb:
                over_memory.set()
                os.kill(pid, signal.SIGKILL)
                return

    watcher = threading.Thread(target=watch_memory, daemon=True)
    watcher.start()
    try:
        client.execute()
    except DeadKernelError:
        report["status"] = "memory" if over_memory.is_set() else "dead"
    except Exception as error:  # nbclient's own failures (a kernel that cannot start, ...)
        report["status"] = "memory" if over_memory.is_set() else "dead"
        report["detail"] = f"{type(error).__name__}: {error}"[:300]
    finally:
        finished.set()
    for index, cell in enumerate(notebook.cells[1:-1], start=1):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                report["cell_errors"].append(
                    {"cell": index, "ename": output["ename"], "evalue": output["evalue"][:200]}
                )
    (folder / REPORT).write_text(json.dumps(report))
    return report


# ----------------------------------------------------------------------------- in the grader's process


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


def _code_cells(notebook: dict) -> list[str]:
    cells = []
    for cell in notebook.get("cells", []):
        if isinstance(cell, dict) and cell.get("cell_type") == "code":
            source = cell.get("source", "")
            cells.append("".join(map(str, source)) if isinstance(source, list) else str(source))
    return cells


def _without_colab_lines(source: str) -> str:
    return "\n".join(
        f"pass  # skipped by the grader: {line.strip()}" if COLAB_ONLY.match(line) else line
        for line in source.splitlines()
    )


def definition_names(notebook: dict, name: str) -> set[str] | None:
    """Names used by the submission's last top-level ``def``/``class`` of ``name`` (from the file); None if none."""
    found = None
    for source in _code_cells(notebook):
        try:
            tree = ast.parse(_without_colab_lines(source))
        except (SyntaxError, ValueError):
            continue
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
                found = node
    return None if found is None else referenced_names(found)


def _syntax_errors(notebook: dict) -> list[str]:
    errors = []
    for index, source in enumerate(_code_cells(notebook), start=1):
        try:
            ast.parse(_without_colab_lines(source))
        except SyntaxError as error:
            errors.append(f"syntax error in code cell {index}, line {error.lineno}: {error.msg}")
        except ValueError as error:  # e.g. a null byte (Python 3.10)
            errors.append(f"syntax error in code cell {index}: {error}")
    return errors


def grade_submission(
    path: Path,
    cell_timeout: int = 60,
    total_timeout: int = 600,
    memory_mb: int = 4096,
    exercise: str | None = None,
    student: str | None = None,
) -> GradeRow:
    """Grade one file; whatever goes wrong ends up in the row's error, never as an exception."""
    start = time.perf_counter()
    row = GradeRow(file=str(path), student=student or path.stem)
    try:
        _grade_into(row, path, cell_timeout, total_timeout, memory_mb, exercise)
    except Exception as error:  # a submission must cost one row, never the whole run
        row.error = f"the grader could not grade it ({type(error).__name__}: {error})"[:300]
    finally:
        row.seconds = time.perf_counter() - start
    return row


def _grade_into(row, path, cell_timeout, total_timeout, memory_mb, exercise) -> None:
    raw = path.read_bytes()
    try:
        notebook = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        row.error = f"not a notebook: the file is not valid JSON ({error})"[:200]
        return
    if not isinstance(notebook, dict) or not isinstance(notebook.get("cells"), list) or notebook.get("nbformat") != 4:
        row.error = "not a notebook: JSON without the cells of a Jupyter notebook (nbformat 4)"
        return
    row.exercise = exercise or identify_exercise(path, notebook) or ""
    if not row.exercise:
        row.error = "could not tell which exercise this is: name the file NN_... or pass --exercise NN"
        return
    questions = questions_for(row.exercise)
    problems = _syntax_errors(notebook)
    with tempfile.TemporaryDirectory(prefix="coursekit-grade-") as temporary:
        folder = Path(temporary) / "submission"
        folder.mkdir()
        prepared = dict(notebook)
        prepared["cells"] = [
            dict(
                cell,
                source=_without_colab_lines(
                    "".join(cell.get("source", ""))
                    if isinstance(cell.get("source"), list)
                    else str(cell.get("source", ""))
                ),
            )
            if cell.get("cell_type") == "code"
            else cell
            for cell in notebook["cells"]
        ]
        prepared.setdefault("metadata", {})["kernelspec"] = {
            "name": "python3",
            "display_name": "Python 3",
            "language": "python",
        }
        (folder / "submission.ipynb").write_text(json.dumps(prepared))
        status = _execute(folder, row.exercise, cell_timeout, total_timeout, memory_mb)
        if status:
            problems.append(status)
        violations = (folder / VIOLATIONS).read_text().split("\n") if (folder / VIOLATIONS).exists() else []
        violations = [line for line in violations if line]
        if any(line.endswith("(a new process)") for line in violations):
            problems.append("tried to start another program")
        writes = [line for line in violations if not line.endswith("(a new process)")]
        if writes:
            problems.append(f"tried to write outside its folder: {writes[0].split(' ', 1)[-1]}")
        answers = _load_answers(folder / ANSWERS)
        report = json.loads((folder / REPORT).read_text()) if (folder / REPORT).exists() else {}
    if path.read_bytes() != raw:  # a hostile notebook got around the guard: put the file back
        path.write_bytes(raw)
        problems.append("the submission file changed while it ran; it was restored")
    for error in report.get("cell_errors", []):
        if error["ename"] == "KeyboardInterrupt":
            problems.append(
                f"code cell {error['cell']} ran past the {cell_timeout} s cell time limit and was interrupted"
            )
        elif error["ename"] != "NotImplementedError":
            problems.append(f"code cell {error['cell']} raised {error['ename']}: {error['evalue']}")
        else:
            continue
        break
    for question in questions:
        row.results.append(_score_answer(question, answers, notebook))
    row.error = "; ".join(problems)[:300]


def _execute(folder: Path, exercise: str, cell_timeout: int, total_timeout: int, memory_mb: int) -> str:
    """Run the submission in its own process group; returns a problem description, or ""."""
    (folder / ".tmp").mkdir(exist_ok=True)
    environment = dict(
        os.environ,
        HOME=str(folder),
        TMPDIR=str(folder / ".tmp"),  # torch and others keep caches in the temporary folder
        TORCHINDUCTOR_CACHE_DIR=str(folder / ".tmp" / "inductor"),
        IPYTHONDIR=str(folder / ".ipython"),
        MPLCONFIGDIR=str(folder / ".matplotlib"),
        MPLBACKEND="Agg",
        COURSEKIT_QUICK="1",
        COURSEKIT_GRADING="1",
        OMP_NUM_THREADS="1",
        PYTHONDONTWRITEBYTECODE="1",
    )
    environment.pop("COURSEKIT_STRICT", None)
    command = [
        sys.executable,
        "-m",
        "coursekit.grading",
        "--run-one",
        str(folder / "submission.ipynb"),
        exercise,
        str(cell_timeout),
        str(memory_mb),
    ]
    process = subprocess.Popen(
        command,
        cwd=folder,
        env=environment,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _, stderr = process.communicate(timeout=total_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return f"ran longer than the total time limit of {total_timeout} s"
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the kernel too, whatever it left running
        except ProcessLookupError:
            pass
    report_path = folder / REPORT
    if not report_path.exists():
        return f"the grader could not run it ({stderr.decode(errors='replace').strip().splitlines()[-1:]})"
    status = json.loads(report_path.read_text())["status"]
    if status == "memory":
        return f"used more than {memory_mb} MB of memory, so its kernel was stopped"
    if status == "dead":
        return "its kernel died while running (a crash, or it killed itself)"
    return ""


def _load_answers(path: Path) -> dict:
    import torch

    if not path.exists():
        return {}
    try:
        answers = torch.load(path, weights_only=True)
        return answers if isinstance(answers, dict) else {}
    except Exception:  # a file the submission tampered with counts as no answers
        return {}


def _score_answer(question: Question, answers: dict, notebook: dict) -> Result:
    answer = answers.get(question.id)
    names = definition_names(notebook, question.name)
    if answer is None:
        return Result(
            question.id,
            "missing",
            0,
            question.points,
            "the notebook did not run far enough to be checked (see the error column)",
        )
    if not isinstance(answer, dict) or answer.get("missing"):
        return Result(question.id, "missing", 0, question.points, f"{question.name} is not defined")
    if names is None:
        return Result(
            question.id,
            "missing",
            0,
            question.points,
            f"no def or class {question.name} of your own was found in the notebook",
        )
    borrowed = {name for name in answer.get("borrowed", []) if isinstance(name, str)}
    return score(question, answer.get("outputs"), forbidden_names_used(question, names) | borrowed)


# ----------------------------------------------------------------------------- the gradebook


def grade(
    paths: list[str | Path],
    out: str | Path = "grades.csv",
    feedback_dir: str | Path | None = None,
    cell_timeout: int = 60,
    total_timeout: int = 600,
    memory_mb: int = 4096,
    workers: int | None = None,
    exercise: str | None = None,
    progress: bool = True,
) -> list[GradeRow]:
    """Grade every submission under ``paths`` into a CSV and one Markdown feedback file each."""
    submissions = find_submissions(paths)
    if not submissions:
        raise ValueError(f"no notebooks found in {', '.join(map(str, paths))}")
    workers = workers or max(1, min(os.cpu_count() or 1, len(submissions)))
    from tqdm.auto import tqdm

    bar = tqdm(total=len(submissions), desc="grading", unit="notebook", disable=not progress)

    def one(path: Path) -> GradeRow:
        row = grade_submission(path, cell_timeout, total_timeout, memory_mb, exercise, student_name(path, paths))
        bar.update(1)
        return row

    with ThreadPoolExecutor(max_workers=workers) as pool:
        rows = list(pool.map(one, submissions))
    bar.close()
    write_gradebook(rows, out)
    feedback_dir = Path(feedback_dir) if feedback_dir else Path(out).with_suffix("").parent / "feedback"
    write_feedback(rows, feedback_dir)
    return rows


def write_gradebook(rows: list[GradeRow], out: str | Path) -> Path:
    question_ids = sorted(
        {result.question for row in rows for result in row.results}
        | {q for row in rows if row.exercise for q in (x.id for x in questions_for(row.exercise))}
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["file", "student", "exercise", *question_ids, "total", "max", "error"])
        for row in rows:
            points = {result.question: result.points for result in row.results}
            maximum = row.maximum or sum(q.points for q in questions_for(row.exercise)) if row.exercise else 0
            writer.writerow(
                [
                    row.file,
                    row.student,
                    row.exercise,
                    *[points.get(q, "" if not q.startswith(row.exercise + ".") else 0) for q in question_ids],
                    row.total,
                    maximum,
                    row.error,
                ]
            )
    return out


def feedback_name(row: GradeRow) -> str:
    digest = hashlib.sha1(row.file.encode()).hexdigest()[:6]
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', Path(row.file).stem)}-{digest}.md"


def write_feedback(rows: list[GradeRow], folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for row in rows:
        lines = [
            f"# Feedback: {Path(row.file).name}",
            "",
            f"Exercise {row.exercise or '?'}: **{row.total} / {row.maximum} points**",
            "",
        ]
        if row.error:
            lines += [f"Problem: {row.error}", ""]
        lines += [f"- {result!r}" for result in row.results]
        (folder / feedback_name(row)).write_text("\n".join(lines) + "\n")
    return folder


def main_run_one(argv: list[str]) -> int:
    notebook_path, exercise, cell_timeout, memory_mb = argv
    run_submission(Path(notebook_path), exercise, int(cell_timeout), int(memory_mb))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--run-one":
        sys.exit(main_run_one(sys.argv[2:]))
    print("use: coursekit grade PATHS... --out grades.csv", file=sys.stderr)
    sys.exit(2)
