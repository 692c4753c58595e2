"""The checking engine: questions, their cases, comparisons with the reference, and results.

A question names the function (or class) the learner writes, the reference it is compared with, the
cases it is tried on (edge cases included), two hints (a nudge, then the formula) and a catalogue of
common mistakes. The questions themselves live in the question banks (``bank_part1``: notebooks
01-04, ``bank_part2``: 05-11). In a notebook::

    from coursekit.checks import check, hint, learner_or_reference
    check("01.q2")                              # prints: passed, not implemented yet, or what went wrong
    hint("01.q2")                               # the formula, on request
    noisy = learner_or_reference("01.q2")       # the learner's function if it passes, else the reference

When an answer fails, the message names the case that failed. If the answer's output on that case is
what one of the catalogued mistakes produces, the message names that mistake instead of giving a
hint; if the answer changed one of its inputs in place, it says so. Otherwise it gives the nudge,
and the formula only after the same question has failed ``FORMULA_AFTER`` times (or on request).

Written answers (``Written``) are graded by hand: the grader collects them for the teacher and leaves
their points blank.

``check`` never raises, unless the environment variable ``COURSEKIT_STRICT=1`` is set (CI uses it
so that a broken solution fails the build). The grader uses the same questions, but runs the
learner's code in a separate, sandboxed process and compares in its own (``runner``).
"""

from __future__ import annotations

import ast
import html
import inspect
import os
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from coursekit.course.screen import referenced_names

STRICT_VARIABLE = "COURSEKIT_STRICT"


FORMULA_AFTER = 3  # failures of the same question before its hint gives the formula


class Mismatch(Exception):
    """The learner's answer differs from the reference; the message says how."""


class ChangedInput(Exception):
    """The learner's function changed one of the tensors it was given, in place."""


@dataclass
class Mistake:
    """A wrong answer learners really write, and what to tell someone whose output matches it."""

    diagnosis: str  # names the mistake, without handing over the whole answer
    implementation: Callable  # the wrong answer itself (same signature as the reference)
    caught_by: str = ""  # for a mistake with random output: the words of the check's own message that catch it


@dataclass
class Question:
    """One automatically graded question."""

    id: str  # "NN.qK": notebook number and question number
    points: int
    name: str  # the function or class the learner defines
    reference: Callable  # what the answer must agree with (same signature)
    cases: Callable[[], list[dict]]  # grader-chosen inputs, plain tensors and numbers, each with a "label"
    call: Callable[[Callable, dict], object]  # how one case is run with an implementation
    nudge: str  # the first hint: where to look, not the answer
    formula: str  # the full hint, after repeated failures or on request
    mistakes: list[Mistake] = field(default_factory=list)  # the catalogue of common wrong answers
    forbidden: set[str] = field(default_factory=set)  # package names that would answer it for you
    compare: Callable[[object, object, dict], None] | None = None  # custom comparison, else tensors

    def hint(self, failures: int = 1) -> str:
        if failures >= FORMULA_AFTER:
            return f"{self.formula} (the formula, after {failures} tries)"
        return f'{self.nudge} (stuck? hint("{self.id}") shows the formula)'


@dataclass
class Written:
    """A short written answer, graded by hand: its cell is tagged ``answer:NN.qK`` in the notebook."""

    id: str
    points: int
    prompt: str  # the question, as the teacher's collection of answers shows it

    @property
    def tag(self) -> str:
        return f"answer:{self.id}"


@dataclass
class Result:
    """The outcome of one check, printable in a notebook."""

    question: str
    status: str  # "passed", "not implemented", "missing", "failed", "uses the reference"
    points: int
    max_points: int
    message: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def __repr__(self) -> str:
        mark = {"passed": "✅", "not implemented": "🚧", "missing": "❓"}.get(self.status, "❌")
        return f"{mark} {self.question} ({self.points}/{self.max_points} points): {self.message}"

    def _repr_html_(self) -> str:
        colour = "#1b7f3b" if self.passed else ("#8a6d00" if self.status == "not implemented" else "#b3261e")
        return f'<pre style="color:{colour}; white-space:pre-wrap">{html.escape(repr(self))}</pre>'


# ----------------------------------------------------------------------------- comparisons


def compare_tensors(got, expected, case: dict, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """Raise Mismatch naming the first difference: type, shape, dtype, then values.

    ``case["part"]``, when there, names which part of an answer this is ("the returned loss").
    """
    part = case.get("part", "")
    where = f" ({part})" if part else ""
    if not isinstance(got, torch.Tensor):
        raise Mismatch(f"expected a tensor{where}, got {type(got).__name__}")
    if tuple(got.shape) != tuple(expected.shape):
        raise Mismatch(f"expected shape {tuple(expected.shape)}{where}, got {tuple(got.shape)}")
    if got.dtype != expected.dtype:
        raise Mismatch(f"expected dtype {expected.dtype}{where}, got {got.dtype}")
    got_cpu, expected_cpu = got.detach().cpu(), expected.detach().cpu()
    if not torch.isfinite(got_cpu).all() and torch.isfinite(expected_cpu).all():
        raise Mismatch(f"your result contains NaN or inf{where}")
    if not torch.allclose(got_cpu, expected_cpu, atol=atol, rtol=rtol):
        index = (got_cpu - expected_cpu).abs().flatten().argmax().item()
        raise Mismatch(
            f"values differ{where}: at flat index {index} expected "
            f"{expected_cpu.flatten()[index].item():.6g}, got {got_cpu.flatten()[index].item():.6g}"
        )


def seeded_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def seeded(module_class: type[nn.Module], seed: int) -> nn.Module:
    """A module with weights from ``seed``, leaving the learner's global random state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return module_class()


QUESTIONS: dict[str, Question] = {}
WRITTEN: dict[str, Written] = {}


def register(question: Question | Written) -> None:
    (WRITTEN if isinstance(question, Written) else QUESTIONS)[question.id] = question


def _load_banks() -> None:
    from coursekit.course import bank_part1, bank_part2  # noqa: F401  (they register their questions)


def written_questions() -> dict[str, Written]:
    """Every hand-graded question by id, with the banks loaded (a gradebook that only reads back earlier
    results has imported no bank)."""
    _load_banks()
    return WRITTEN


def questions_for(notebook_number: str) -> list[Question]:
    """The questions of one exercise notebook, e.g. ``"01"``."""
    _load_banks()
    return [q for q in QUESTIONS.values() if q.id.startswith(f"{notebook_number}.")]


def written_for(notebook_number: str) -> list[Written]:
    """The hand-graded questions of one exercise notebook."""
    _load_banks()
    return [q for q in WRITTEN.values() if q.id.startswith(f"{notebook_number}.")]


def get_question(question_id: str) -> Question:
    _load_banks()
    if question_id in WRITTEN:
        raise ValueError(f"{question_id} is a written answer, graded by hand: there is nothing to check")
    if question_id not in QUESTIONS:
        raise ValueError(f"unknown question {question_id!r}; the questions are {sorted(QUESTIONS)}")
    return QUESTIONS[question_id]


def expected_outputs(question: Question) -> list:
    """The reference's answers to every case (computed where the grader runs)."""
    return [question.call(question.reference, case) for case in question.cases()]


ALWAYS_FORBIDDEN = {"coursekit", "learner_or_reference"}  # and any name starting with "reference_"


def forbidden_names_used(question: Question, names: set[str]) -> set[str]:
    """The names among ``names`` that would let the package answer ``question``."""
    forbidden = (question.forbidden | ALWAYS_FORBIDDEN) - {question.name}
    return {name for name in names if name in forbidden or name.startswith("reference_")}


def names_used(implementation) -> set[str] | None:
    """The names an implementation takes from outside itself, from its source; None without source.

    A class defined in a notebook has no retrievable source of its own, but its methods do.
    """
    parts = [implementation]
    if inspect.isclass(implementation):
        parts = [member for member in vars(implementation).values() if inspect.isfunction(member)]
    names: set[str] = set()
    for part in parts:
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(part)))
        except (OSError, TypeError, SyntaxError):
            return None
        definitions = [node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
        if not definitions:
            return None
        names |= referenced_names(definitions[0])
    return names if parts else None


def _error_of(output) -> tuple[str, str] | None:
    """(name, message) when a case's output is an exception (or one turned into plain data)."""
    if isinstance(output, BaseException):
        return type(output).__name__, str(output)
    if isinstance(output, dict) and set(output) == {"error", "message"}:
        return str(output["error"]), str(output["message"])
    return None


def _same_output(question: Question, got, other, case: dict) -> bool:
    """Whether ``got`` is what ``other`` (a catalogued mistake's output) is, on this case."""
    got_error, other_error = _error_of(got), _error_of(other)
    if got_error or other_error:
        return got_error == other_error
    try:
        (question.compare or compare_tensors)(got, other, case)
    except Mismatch:
        return False
    except Exception:  # noqa: BLE001  (an output the comparison cannot even read matches nothing)
        return False
    return True


def diagnose(question: Question, index: int, got) -> str | None:
    """The diagnosis of the first catalogued mistake whose output on case ``index`` is ``got``."""
    for mistake in question.mistakes:
        case = question.cases()[index]
        try:
            theirs = run_case(question, mistake.implementation, case)
        except Exception as error:  # noqa: BLE001
            theirs = error
        if _same_output(question, got, theirs, case):
            return mistake.diagnosis
    return None


def score(question: Question, outputs: list, uses_reference: set[str] | None = None, failures: int = 1) -> Result:
    """Compare an implementation's outputs (or the exceptions it raised) with the reference.

    ``failures`` counts this question's failed checks so far, this one included: it decides how much
    the hint gives away.
    """
    if uses_reference:
        return Result(
            question.id,
            "uses the reference",
            0,
            question.points,
            f"{question.name} calls coursekit's own {', '.join(sorted(uses_reference))}, which answers "
            "this question for you: write the computation yourself (no points for this one)",
        )
    cases = question.cases()
    expected = expected_outputs(question)
    if not isinstance(outputs, list) or len(outputs) != len(cases):
        return Result(question.id, "failed", 0, question.points, "the answers to check are incomplete")

    def failed(index: int, what: str, got) -> Result:
        where = f"case {index + 1} of {len(cases)} ({cases[index].get('label', '')})"
        diagnosis = diagnose(question, index, got)
        advice = f"Likely cause: {diagnosis}." if diagnosis else f"Hint: {question.hint(failures)}"
        return Result(question.id, "failed", 0, question.points, f"{where}: {what}. {advice}")

    for index, (got, want) in enumerate(zip(outputs, expected)):
        error = _error_of(got)
        if error and error[0] == "NotImplementedError":
            return Result(
                question.id,
                "not implemented",
                0,
                question.points,
                f"not implemented yet: replace `raise NotImplementedError` in {question.name}",
            )
        if error and error[0] == "ChangedInput":
            return failed(index, error[1], got)
        if error:
            return failed(index, f"{question.name} raised {error[0]}: {error[1]}", got)
        try:
            (question.compare or compare_tensors)(got, want, cases[index])
        except Mismatch as mismatch:
            return failed(index, str(mismatch), got)
    return Result(
        question.id,
        "passed",
        question.points,
        question.points,
        f"{question.name} agrees with the reference on all {len(cases)} cases",
    )


def run_case(question: Question, implementation, case: dict):
    """Run one case; raise ChangedInput if the implementation changed a tensor it was given."""
    before = {key: value.clone() for key, value in case.items() if isinstance(value, torch.Tensor)}
    output = question.call(implementation, case)
    changed = [key for key, value in before.items() if not _unchanged(case[key], value)]
    if changed:
        names = ", ".join(f"`{key}`" for key in changed)
        raise ChangedInput(
            f"{question.name} changed its input {names} in place, so the caller's tensor now holds other "
            "values: build a new tensor instead (for example from a .clone(), or with torch.where)"
        )
    return output


def _unchanged(now, before: torch.Tensor) -> bool:
    if not isinstance(now, torch.Tensor) or now.shape != before.shape or now.dtype != before.dtype:
        return False
    return bool(torch.equal(now, before) or (now.isnan() & before.isnan() | (now == before)).all())


def run_implementation(question: Question, implementation) -> list:
    """Run every case; an exception becomes the case's output instead of stopping the run."""
    outputs = []
    for case in question.cases():
        try:
            outputs.append(run_case(question, implementation, case))
        except Exception as error:  # the learner's code may raise anything
            outputs.append(error)
    return outputs


def to_plain(output):
    """What may travel from a sandbox to the grader: tensors, numbers, strings and containers of them.

    Exceptions become ``{"error": name, "message": text}``; anything else is refused the same way, so
    the grader can load the message with ``weights_only=True``.
    """
    if isinstance(output, BaseException):
        return {"error": type(output).__name__, "message": str(output)[:300]}
    if isinstance(output, torch.Tensor):
        return output.detach().cpu().clone() if type(output) is torch.Tensor else torch.Tensor(output.cpu())
    if isinstance(output, dict):
        return {str(key): to_plain(value) for key, value in output.items()}
    if isinstance(output, (tuple, list)):  # e.g. (x_t, t) in 11.q1
        return (tuple if isinstance(output, tuple) else list)(to_plain(value) for value in output)
    if isinstance(output, (int, float, str, bool)) or output is None:
        return output if type(output) in (int, float, str, bool, type(None)) else type(output).__mro__[-2](output)
    return {"error": "TypeError", "message": f"returned a {type(output).__name__}, not a tensor"}


def run_check(question_id: str, namespace: dict, failures: int = 1) -> Result:
    """Check the learner's definition of a question's function found in ``namespace``."""
    question = get_question(question_id)
    implementation = namespace.get(question.name)
    if implementation is None:
        return Result(
            question.id,
            "missing",
            0,
            question.points,
            f"define {question.name} first (run the cells above), then check again",
        )
    names = names_used(implementation)
    if names is None or str(getattr(implementation, "__module__", "")).startswith("coursekit"):
        return Result(
            question.id,
            "missing",
            0,
            question.points,
            f"{question.name} must be your own def or class in a cell of this notebook",
        )
    used = forbidden_names_used(question, names)
    return score(question, run_implementation(question, implementation), used, failures)


def _caller_namespace() -> dict:
    try:
        from IPython import get_ipython

        shell = get_ipython()
        if shell is not None:
            return shell.user_ns
    except ImportError:
        pass
    return inspect.currentframe().f_back.f_back.f_globals


FAILURES: dict[str, int] = {}  # failed checks per question in this session: how much the hint may say


def check(question_id: str) -> Result:
    """Check a question against the learner's code; prints the result, never raises (unless strict)."""
    try:
        result = run_check(question_id, _caller_namespace(), FAILURES.get(question_id, 0) + 1)
        if result.status == "failed":
            FAILURES[question_id] = FAILURES.get(question_id, 0) + 1
        elif result.passed:
            FAILURES.pop(question_id, None)
    except ValueError as error:  # an unknown question id
        result = Result(question_id, "failed", 0, 0, str(error))
    if os.environ.get(STRICT_VARIABLE) == "1" and not result.passed:
        raise AssertionError(repr(result))
    return result


class Hint(str):
    """A hint that shows as plain text in a notebook."""

    def __repr__(self) -> str:
        return f"💡 {self}"


def hint(question_id: str) -> Hint:
    """The full hint (the formula) of a question, on request."""
    question = get_question(question_id)
    return Hint(f"{question.id}: {question.formula}")


def learner_or_reference(question_id: str):
    """The learner's function if it passes its check, else the reference, saying so visibly.

    Cells after an exercise use this, so that a learner who is stuck can still run the rest of the
    notebook and see it teach.
    """
    question = get_question(question_id)
    namespace = _caller_namespace()
    result = run_check(question_id, namespace)
    if result.passed:
        return namespace[question.name]
    print(
        f"⚠️ {question_id}: using coursekit's reference {question.name} here, because yours "
        f"{'is not finished yet' if result.status in ('not implemented', 'missing') else 'does not pass yet'}. "
        "The rest of the notebook carries on."
    )
    return question.reference
