"""The checking engine: questions, their cases, comparisons with the reference, and results.

A question names the function (or class) the learner writes, the reference it is compared with, the
cases it is tried on, and a hint. The questions themselves live in the question banks
(``bank_part1``: notebooks 01-04, ``bank_part2``: 05-08). In a notebook::

    from coursekit.checks import check, learner_or_reference
    check("01.q2")                              # prints: passed, not implemented yet, or the first mismatch
    noisy = learner_or_reference("01.q2")       # the learner's function if it passes, else the reference

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


class Mismatch(Exception):
    """The learner's answer differs from the reference; the message says how."""


@dataclass
class Question:
    """One graded question."""

    id: str  # "NN.qK": notebook number and question number
    points: int
    name: str  # the function or class the learner defines
    reference: Callable  # what the answer must agree with (same signature)
    cases: Callable[[], list[dict]]  # grader-chosen inputs, plain tensors and numbers
    call: Callable[[Callable, dict], object]  # how one case is run with an implementation
    hint: str  # what to look at when it fails
    forbidden: set[str] = field(default_factory=set)  # package names that would answer it for you
    compare: Callable[[object, object, dict], None] | None = None  # custom comparison, else tensors


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
    """Raise Mismatch naming the first difference: type, shape, dtype, then values."""
    label = case.get("label", "")
    where = f" ({label})" if label else ""
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


def register(question: Question) -> None:
    QUESTIONS[question.id] = question


def _load_banks() -> None:
    from coursekit.course import bank_part1, bank_part2  # noqa: F401  (they register their questions)


def questions_for(notebook_number: str) -> list[Question]:
    """The questions of one exercise notebook, e.g. ``"01"``."""
    _load_banks()
    return [q for q in QUESTIONS.values() if q.id.startswith(f"{notebook_number}.")]


def get_question(question_id: str) -> Question:
    _load_banks()
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


def score(question: Question, outputs: list, uses_reference: set[str] | None = None) -> Result:
    """Compare an implementation's outputs (or the exceptions it raised) with the reference."""
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
    for case, got, want in zip(cases, outputs, expected):
        if isinstance(got, BaseException) or (isinstance(got, dict) and "error" in got and len(got) == 2):
            name, text = (
                (type(got).__name__, str(got)) if isinstance(got, BaseException) else (got["error"], got["message"])
            )
            if name == "NotImplementedError":
                return Result(
                    question.id,
                    "not implemented",
                    0,
                    question.points,
                    f"not implemented yet: replace `raise NotImplementedError` in {question.name}",
                )
            return Result(
                question.id,
                "failed",
                0,
                question.points,
                f"{question.name} raised {name}: {text} ({case.get('label', '')}). Hint: {question.hint}",
            )
        try:
            (question.compare or compare_tensors)(got, want, case)
        except Mismatch as mismatch:
            return Result(question.id, "failed", 0, question.points, f"{mismatch}. Hint: {question.hint}")
    return Result(
        question.id,
        "passed",
        question.points,
        question.points,
        f"{question.name} agrees with the reference on all {len(cases)} cases",
    )


def run_implementation(question: Question, implementation) -> list:
    """Run every case; an exception becomes the case's output instead of stopping the run."""
    outputs = []
    for case in question.cases():
        try:
            outputs.append(question.call(implementation, case))
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
    if isinstance(output, (tuple, list)):  # e.g. (x_t, t) in 08.q1
        return (tuple if isinstance(output, tuple) else list)(to_plain(value) for value in output)
    if isinstance(output, (int, float, str, bool)) or output is None:
        return output if type(output) in (int, float, str, bool, type(None)) else type(output).__mro__[-2](output)
    return {"error": "TypeError", "message": f"returned a {type(output).__name__}, not a tensor"}


def run_check(question_id: str, namespace: dict) -> Result:
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
    if names is None:
        return Result(
            question.id,
            "missing",
            0,
            question.points,
            f"{question.name} must be your own def or class in a cell of this notebook",
        )
    used = forbidden_names_used(question, names)
    return score(question, run_implementation(question, implementation), used)


def _caller_namespace() -> dict:
    try:
        from IPython import get_ipython

        shell = get_ipython()
        if shell is not None:
            return shell.user_ns
    except ImportError:
        pass
    return inspect.currentframe().f_back.f_back.f_globals


def check(question_id: str) -> Result:
    """Check a question against the learner's code; prints the result, never raises (unless strict)."""
    try:
        result = run_check(question_id, _caller_namespace())
    except ValueError as error:  # an unknown question id
        result = Result(question_id, "failed", 0, 0, str(error))
    if os.environ.get(STRICT_VARIABLE) == "1" and not result.passed:
        raise AssertionError(repr(result))
    return result


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
