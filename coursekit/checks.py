"""Instant feedback in an exercise notebook: ``check("01.q2")``, ``hint("01.q2")`` and ``learner_or_reference``.

The exercise machinery lives in ``coursekit.course``; this module keeps the import that every exercise
notebook (including those already handed out) starts with::

    from coursekit.checks import check, hint, learner_or_reference
"""

from coursekit.course.engine import (
    QUESTIONS,
    WRITTEN,
    Mismatch,
    Mistake,
    Question,
    Result,
    _load_banks,
    check,
    get_question,
    hint,
    learner_or_reference,
    questions_for,
    run_check,
    run_implementation,
    score,
    written_for,
)

_load_banks()  # the questions of every exercise, registered

__all__ = [
    "QUESTIONS",
    "WRITTEN",
    "Mismatch",
    "Mistake",
    "Question",
    "Result",
    "check",
    "get_question",
    "hint",
    "learner_or_reference",
    "questions_for",
    "run_check",
    "run_implementation",
    "score",
    "written_for",
]
