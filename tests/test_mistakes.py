"""Checks that recognise the mistakes learners make, and questions that copying cannot answer.

Every question keeps a catalogue of realistic wrong answers beside it (``Question.mistakes`` in the
question banks). Here each of them must fail its check, and the message must name the mistake. The
course notebooks' worked cells, pasted under the asked name, must not pass either.
"""

import ast
import json
import math
from pathlib import Path

import pytest
import torch

from coursekit.checks import QUESTIONS, WRITTEN, check, hint, run_check, run_implementation, score
from coursekit.course import engine

ROOT = Path(__file__).resolve().parents[1]
CATALOGUE = [
    (question_id, index) for question_id in sorted(QUESTIONS) for index in range(len(QUESTIONS[question_id].mistakes))
]


def test_every_question_has_three_cases_and_three_catalogued_mistakes():
    for question in QUESTIONS.values():
        labels = [case["label"] for case in question.cases()]
        assert len(labels) >= 3, f"{question.id} tries only {len(labels)} case(s)"
        assert len(set(labels)) == len(labels), f"{question.id}: every case needs its own label"
        assert len(question.mistakes) >= 3, f"{question.id} catalogues only {len(question.mistakes)} mistake(s)"
        assert question.formula not in question.hint(1) and question.nudge in question.hint(1)


@pytest.mark.parametrize("question_id, index", CATALOGUE)
def test_every_catalogued_mistake_fails_and_is_named(question_id, index):
    question = QUESTIONS[question_id]
    mistake = question.mistakes[index]
    result = score(question, run_implementation(question, mistake.implementation))
    assert not result.passed and result.points == 0, f"{question_id}: {mistake.diagnosis!r} passes its check"
    assert result.message.startswith("case "), result.message  # the failing case is named
    assert (mistake.caught_by or mistake.diagnosis) in result.message, result.message
    assert question.formula not in result.message  # a first failure does not hand over the answer


def test_a_wrong_answer_outside_the_catalogue_gets_the_nudge_then_the_formula(monkeypatch):
    def signal_to_noise(alpha_bar):
        return alpha_bar / (1 - alpha_bar) + 0.01  # wrong, and like no catalogued mistake

    namespace = {"signal_to_noise": signal_to_noise}
    monkeypatch.delenv("COURSEKIT_STRICT", raising=False)
    monkeypatch.setattr(engine, "_caller_namespace", lambda: namespace)
    monkeypatch.setattr(engine, "FAILURES", {})
    question = QUESTIONS["01.q3"]
    messages = [check("01.q3").message for _ in range(engine.FORMULA_AFTER)]
    assert all("Likely cause" not in message for message in messages)
    assert question.nudge in messages[0] and question.formula not in messages[0]
    assert question.formula not in messages[engine.FORMULA_AFTER - 2]
    assert question.formula in messages[-1]
    assert question.formula in hint("01.q3") and "💡" in repr(hint("01.q3"))

    def signal_to_noise(alpha_bar):  # noqa: F811  (now right: the count starts again)
        return alpha_bar / (1 - alpha_bar)

    namespace["signal_to_noise"] = signal_to_noise
    assert check("01.q3").passed and "01.q3" not in engine.FAILURES


def test_an_answer_that_changes_its_input_is_told_so_even_when_its_output_is_right():
    def signal_to_noise(alpha_bar):
        snr = alpha_bar / (1 - alpha_bar)
        alpha_bar.zero_()
        return snr

    result = run_check("01.q3", {"signal_to_noise": signal_to_noise})
    assert result.status == "failed" and "changed its input `alpha_bar` in place" in result.message


def test_written_questions_are_not_checked_automatically():
    assert WRITTEN and all(question.points > 0 for question in WRITTEN.values())
    with pytest.raises(ValueError, match="graded by hand"):
        engine.get_question(sorted(WRITTEN)[0])


# ----------------------------------------------------------------------------- transfer


def _definitions_of(notebook: Path) -> dict:
    namespace = {"torch": torch, "math": math, "nn": torch.nn, "F": torch.nn.functional, "__name__": "course"}
    defined = []
    for cell in json.loads(notebook.read_text())["cells"]:
        if cell["cell_type"] != "code":
            continue
        lines = [line for line in "".join(cell["source"]).splitlines() if not line.lstrip().startswith(("!", "%"))]
        try:
            tree = ast.parse("\n".join(lines))
        except SyntaxError:
            continue
        kept = [
            node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef))
        ]
        defined += [node.name for node in kept if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
        exec(compile(ast.Module(body=kept, type_ignores=[]), str(notebook), "exec"), namespace)  # noqa: S102
    return {name: namespace[name] for name in defined}


@pytest.mark.parametrize("notebook", sorted(path.name for path in (ROOT / "exercises").glob("*.ipynb")))
def test_the_course_notebooks_worked_cells_do_not_answer_the_exercise(notebook):
    """Paste any function or class the course notebook defines under the asked name: it must not pass."""
    definitions = _definitions_of(ROOT / "notebooks" / notebook)
    questions = [question for question in QUESTIONS.values() if question.id.startswith(notebook[:2] + ".")]
    assert questions
    passing = []
    for name, definition in definitions.items():
        for question in questions:
            if score(question, run_implementation(question, definition)).passed:
                passing.append(f"{notebook}'s {name} answers {question.id} ({question.name})")
    assert passing == []
