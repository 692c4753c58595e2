"""Gradescope: an autograder bundle that grades one submission into Gradescope's ``results.json``.

    coursekit grade --gradescope autograder/ --exercise 01     # writes the bundle and autograder.zip

Upload ``autograder.zip`` as a Gradescope "Programming Assignment" autograder. Gradescope runs
``setup.sh`` once when it builds the image, then ``run_autograder`` for every submission: the
submitted notebook is in ``/autograder/submission``, and ``/autograder/results/results.json`` must
hold the result. Each question becomes one test with ``score``, ``max_score``, ``name``, ``output``
and ``visibility``; the top level holds the total ``score``, ``execution_time``, ``output`` and
``visibility``. ``run_autograder`` also runs outside Gradescope, for a check beforehand:
``AUTOGRADER_ROOT=/some/folder COURSEKIT_PYTHON=python ./run_autograder``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import zipfile
from importlib import metadata
from pathlib import Path

from coursekit.course.engine import questions_for
from coursekit.course.runner import GradeRow, grade_submission
from coursekit.course.sandbox import Limits, detect

TEST_FIELDS = {"score", "max_score", "name", "output", "visibility"}
VISIBILITIES = {"hidden", "after_due_date", "after_published", "visible"}

SETUP = """#!/usr/bin/env bash
# Gradescope runs this once, as root, when it builds the autograder image.
set -euo pipefail
apt-get update
DEBIAN_FRONTEND=noninteractive apt-get install -y python3 python3-venv python3-pip bubblewrap
python3 -m venv /autograder/venv
/autograder/venv/bin/pip install --upgrade pip
/autograder/venv/bin/pip install /autograder/source/coursekit-src
"""

RUN_AUTOGRADER = """#!/usr/bin/env bash
# Gradescope runs this for every submission. Outside Gradescope, set AUTOGRADER_ROOT (a folder with
# submission/ in it) and COURSEKIT_PYTHON (a Python with coursekit installed) to try it.
set -uo pipefail
ROOT="${AUTOGRADER_ROOT:-/autograder}"
PYTHON="${COURSEKIT_PYTHON:-$ROOT/venv/bin/python}"
mkdir -p "$ROOT/results"
exec "$PYTHON" -m coursekit.course.gradescope --submission "$ROOT/submission" \\
    --results "$ROOT/results/results.json" %(exercise)s
"""


def results_json(row: GradeRow | None, problem: str = "", seconds: float = 0.0) -> dict:
    """Gradescope's results.json for one graded submission (or for one that could not be graded)."""
    tests = []
    for result in row.results if row else []:
        question = next((q for q in questions_for(row.exercise) if q.id == result.question), None)
        tests.append(
            {
                "name": f"{result.question} {question.name if question else ''}".strip(),
                "number": result.question,
                "score": result.points,
                "max_score": result.max_points,
                "status": "passed" if result.passed else "failed",
                "output": repr(result),
                "visibility": "visible",
            }
        )
    summary = problem or (row.error if row else "") or "graded by coursekit"
    if row and row.review:
        summary += "\nFor your teacher to look at:\n" + "\n".join(row.review)
    return {
        "score": row.total if row else 0,
        "execution_time": round(seconds),
        "output": summary,
        "visibility": "visible",
        "stdout_visibility": "hidden",
        "tests": tests,
    }


def validate_results(results: dict) -> list[str]:
    """What is wrong with a results.json, by Gradescope's documented fields (empty: nothing)."""
    problems = []
    if "score" not in results and not all("score" in test for test in results.get("tests", [])):
        problems.append("neither a top-level score nor a score for every test")
    if not isinstance(results.get("tests", []), list):
        problems.append("tests is not a list")
    for index, test in enumerate(results.get("tests", [])):
        missing = TEST_FIELDS - set(test)
        if missing:
            problems.append(f"test {index} lacks {sorted(missing)}")
        for key in ("score", "max_score"):
            if key in test and not isinstance(test[key], (int, float)):
                problems.append(f"test {index}: {key} is not a number")
        if test.get("visibility", "visible") not in VISIBILITIES:
            problems.append(f"test {index}: visibility {test.get('visibility')!r} is not one of {sorted(VISIBILITIES)}")
    for key in ("visibility", "stdout_visibility"):
        if key in results and results[key] not in VISIBILITIES:
            problems.append(f"{key} {results[key]!r} is not one of {sorted(VISIBILITIES)}")
    if "score" in results and not isinstance(results["score"], (int, float)):
        problems.append("score is not a number")
    return problems


def write_bundle(folder: str | Path, exercise: str | None = None) -> Path:
    """The autograder folder (setup.sh, run_autograder, coursekit's source) and autograder.zip inside it."""
    if exercise is not None and not questions_for(exercise):
        raise ValueError(f"no exercise {exercise!r}; the exercises are 01 to 11")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "setup.sh").write_text(SETUP)
    (folder / "run_autograder").write_text(RUN_AUTOGRADER % {"exercise": f"--exercise {exercise}" if exercise else ""})
    for name in ("setup.sh", "run_autograder"):
        (folder / name).chmod(0o755)
    source = folder / "coursekit-src"
    if source.exists():
        shutil.rmtree(source)
    package = Path(__file__).resolve().parents[1]
    shutil.copytree(package, source / "coursekit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (source / "pyproject.toml").write_text(_pyproject())
    with zipfile.ZipFile(folder / "autograder.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.name != "autograder.zip":
                info = zipfile.ZipInfo.from_file(path, path.relative_to(folder).as_posix())
                archive.writestr(info, path.read_bytes())
    return folder / "autograder.zip"


def _pyproject() -> str:
    """A minimal pyproject.toml for the copied package: its runtime dependencies, lower bounds only."""
    try:
        version = metadata.version("coursekit")
        requires = [r for r in metadata.requires("coursekit") or [] if "extra ==" not in r]
    except metadata.PackageNotFoundError:
        version, requires = "0.0.0", ["torch>=2.1", "torchvision>=0.16", "numpy", "scikit-learn", "tqdm"]
    dependencies = ", ".join(json.dumps(requirement) for requirement in requires)
    return (
        '[build-system]\nrequires = ["setuptools>=77"]\nbuild-backend = "setuptools.build_meta"\n\n'
        f'[project]\nname = "coursekit"\nversion = "{version}"\nrequires-python = ">=3.10"\n'
        f"dependencies = [{dependencies}]\n\n"
        '[tool.setuptools.packages.find]\ninclude = ["coursekit*"]\n\n'
        '[tool.setuptools.package-data]\ncoursekit = ["assets/*"]\n"coursekit.course" = ["exercise_cells.json"]\n'
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="grade one Gradescope submission into results.json")
    parser.add_argument("--submission", required=True, help="the folder Gradescope put the submission in")
    parser.add_argument("--results", required=True, help="where results.json goes")
    parser.add_argument("--exercise", default=None, help="NN, when the file name does not say")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    notebooks = sorted(Path(args.submission).rglob("*.ipynb")) if Path(args.submission).is_dir() else []
    notebooks = [path for path in notebooks if ".ipynb_checkpoints" not in path.parts]
    if len(notebooks) != 1:
        found = ", ".join(path.name for path in notebooks) or "none"
        results = results_json(None, f"expected exactly one .ipynb notebook in the submission, found {found}")
    else:
        row = grade_submission(notebooks[0], Limits(), detect(), args.exercise)
        results = results_json(row, seconds=time.perf_counter() - start)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
