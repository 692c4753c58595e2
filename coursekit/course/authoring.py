"""Exercise notebooks generated from solution notebooks: one source, no drift.

A solution notebook (``solutions/NN_*.ipynb``) marks the learner's part of a code cell with
nbgrader-style markers::

    def noisy_image(x0, t, alpha_bar, noise):
        ### BEGIN SOLUTION
        ...
        ### END SOLUTION

``make_exercise`` replaces each region with ``raise NotImplementedError`` and a "your code here"
mark (keeping the indentation), drops ``### BEGIN HIDDEN TESTS`` / ``### END HIDDEN TESTS`` regions and
cells tagged ``solution-only``, and clears outputs. Running it twice changes no byte:
``coursekit make-exercises`` writes ``exercises/``, and ``--check`` reports drift (the tests run it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
HIDDEN_BEGIN, HIDDEN_END = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"
PLACEHOLDER = 'raise NotImplementedError("your code here")  # YOUR CODE HERE'
MARKDOWN_PLACEHOLDER = "*YOUR ANSWER HERE*"


def strip_solutions(source: str, markdown: bool = False) -> str:
    """Replace every solution region by the placeholder, and drop hidden-test regions."""
    lines, result, inside = source.split("\n"), [], None
    for number, line in enumerate(lines, start=1):
        marker = line.strip()
        if marker in (BEGIN, HIDDEN_BEGIN):
            if inside:
                raise ValueError(f"line {number}: {marker!r} inside an open {inside!r} region")
            inside = marker
            if marker == BEGIN:
                indent = line[: len(line) - len(line.lstrip())]
                result.append(MARKDOWN_PLACEHOLDER if markdown else indent + PLACEHOLDER)
        elif marker in (END, HIDDEN_END):
            expected = BEGIN if marker == END else HIDDEN_BEGIN
            if inside != expected:
                raise ValueError(f"line {number}: {marker!r} without a matching {expected!r}")
            inside = None
        elif inside is None:
            result.append(line)
    if inside:
        raise ValueError(f"a {inside!r} region is never closed")
    return "\n".join(result)


def make_exercise(solution: dict) -> dict:
    """The student version of a solution notebook (a JSON dict in, a JSON dict out)."""
    cells = []
    for cell in solution["cells"]:
        if "solution-only" in cell.get("metadata", {}).get("tags", []):
            continue
        source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        new = {"cell_type": cell["cell_type"], "id": cell.get("id"), "metadata": {}}
        if cell["cell_type"] == "code":
            new["source"] = strip_solutions(source).replace("# NBVAL_CHECK_OUTPUT\n", "")
            new["execution_count"] = None
            new["outputs"] = []
        else:
            new["source"] = strip_solutions(source, markdown=True)
        if new["id"] is None:
            del new["id"]
        tags = [tag for tag in cell.get("metadata", {}).get("tags", []) if tag != "solution-only"]
        if tags:
            new["metadata"]["tags"] = tags
        cells.append(new)
    metadata = {
        key: solution.get("metadata", {})[key]
        for key in ("kernelspec", "language_info")
        if key in solution.get("metadata", {})
    }
    return {
        "cells": cells,
        "metadata": metadata,
        "nbformat": 4,
        "nbformat_minor": solution.get("nbformat_minor", 5),
    }


def render(notebook: dict) -> str:
    """The canonical text of a notebook, so that regenerating changes no byte."""
    for cell in notebook["cells"]:
        source = cell["source"]
        cell["source"] = source.splitlines(keepends=True) if isinstance(source, str) else source
    return json.dumps(notebook, indent=1, ensure_ascii=False, sort_keys=True) + "\n"


PRISTINE_CELLS = Path(__file__).parent / "exercise_cells.json"


def pristine_cells(exercise: str) -> set[str]:
    """Digests of the code cells of exercise ``exercise`` as handed out (the grader's notes skip them)."""
    if not PRISTINE_CELLS.exists():
        return set()
    return set(json.loads(PRISTINE_CELLS.read_text()).get(exercise, []))


def _cell_digests(exercise: dict) -> list[str]:
    from coursekit.course.screen import cell_digest, cell_sources

    return sorted({cell_digest(source) for source in cell_sources(exercise)})


def make_exercises(solutions_dir: str | Path, exercises_dir: str | Path, check: bool = False) -> list[Path]:
    """Write (or with ``check``, compare) every exercise and the digests of its cells; returns stale files."""
    solutions_dir, exercises_dir = Path(solutions_dir), Path(exercises_dir)
    solutions = sorted(solutions_dir.glob("*.ipynb"))
    if not solutions:
        raise ValueError(f"no solution notebooks in {solutions_dir}")
    stale, digests = [], {}
    for solution_path in solutions:
        if not re.match(r"\d\d_", solution_path.name):
            raise ValueError(f"{solution_path.name}: solution notebooks are named NN_topic.ipynb")
        exercise = make_exercise(json.loads(solution_path.read_text()))
        digests[solution_path.name[:2]] = _cell_digests(exercise)
        text = render(exercise)
        target = exercises_dir / solution_path.name
        if not target.exists() or target.read_text() != text:
            stale.append(target)
            if not check:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text)
    digest_text = json.dumps(digests, indent=1, sort_keys=True) + "\n"
    if not PRISTINE_CELLS.exists() or PRISTINE_CELLS.read_text() != digest_text:
        stale.append(PRISTINE_CELLS)
        if not check:
            PRISTINE_CELLS.write_text(digest_text)
    return stale
