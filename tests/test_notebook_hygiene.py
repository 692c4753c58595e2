"""Committed notebooks: small, clean, pointing at the right address, and truly checked by nbval."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import run_notebooks  # noqa: E402  (the tool that cleans what a run stores)

NOTEBOOKS = sorted(
    path for folder in ("notebooks", "solutions", "exercises") for path in (ROOT / folder).glob("*.ipynb")
)
SIZE_BUDGET = 600_000  # bytes per notebook, figures included
TOTAL_BUDGET = 4_000_000  # thirteen notebooks and eleven solutions with their figures


def _cells(path):
    return json.loads(path.read_text())["cells"]


def _source(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def test_there_are_notebooks():
    assert len(list((ROOT / "notebooks").glob("*.ipynb"))) >= 5


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_small_and_clean(path):
    assert path.stat().st_size < SIZE_BUDGET, f"{path.name} is over {SIZE_BUDGET} bytes: keep fewer, smaller figures"
    notebook = json.loads(path.read_text())
    assert set(notebook["metadata"]) <= {"kernelspec", "language_info"}, "personal or widget metadata"
    for cell in notebook["cells"]:
        assert set(cell.get("metadata", {})) <= run_notebooks.KEPT_CELL_METADATA, (
            f"cell metadata {set(cell['metadata'])}"
        )
        if cell["cell_type"] == "code" and cell.get("outputs"):
            # nbval fails a cell that stores outputs without an execution count ("unrun reference cell")
            assert cell.get("execution_count") is not None, f"{path.name}: a cell with outputs has no execution_count"
        frozen = [output for output in cell.get("outputs", []) if run_notebooks.is_progress_bar(output)]
        assert not frozen, (
            f"{path.name} stores a progress bar frozen mid-run ({frozen[0]}); "
            "python tools/run_notebooks.py --tidy-only removes it"
        )


def test_notebooks_together_stay_within_budget():
    assert sum(path.stat().st_size for path in NOTEBOOKS) < TOTAL_BUDGET


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_checked_cells_carry_their_expected_output(path):
    # nbval silently turns a check into a run-only test when the stored output is missing
    if path.parent.name == "exercises":
        return  # exercises are stored without outputs, and check nothing against stored text
    for cell in _cells(path):
        if cell["cell_type"] == "code" and "# NBVAL_CHECK_OUTPUT" in _source(cell):
            assert cell["execution_count"] is not None and cell["outputs"], _source(cell)[:80]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_opens_with_badge_and_a_setup_cell_that_never_installs_torch(path):
    cells = _cells(path)
    assert "colab.research.google.com/github/" in _source(cells[0]) and path.name in _source(cells[0])
    setup = next(_source(c) for c in cells if c["cell_type"] == "code")
    assert "COURSE_REPOSITORY" in setup and "QUICK" in setup
    assert "--upgrade" not in setup and "pip install torch" not in setup
    assert 'find_spec("coursekit") is None' in setup  # installs only when missing


def test_badges_and_install_lines_agree_with_the_repository_address():
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "set_repository_url.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_sources_hold_no_control_characters(path):
    # "\bar" in a plain (not raw) Python string is a backspace and "ar": LaTeX that renders as junk
    for cell in _cells(path):
        bad = re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f]", _source(cell))
        assert bad is None, f"control character {bad.group()!r} in: {_source(cell)[:80]!r}"
