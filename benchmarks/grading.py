"""Time to grade a class: 40 submissions (five copies of each of the eight solutions, one folder per
student), one of which tries to kill every process it can see.

python benchmarks/grading.py [--copies 5] [--workers N] [--no-isolation]

Measure alone: on a 2-core machine anything else running distorts the figures badly.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from coursekit.course.gradebook import grade
from coursekit.course.sandbox import detect

from common import machine

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = ROOT / "tests" / "fixtures" / "submissions" / "01_kills_the_grader.ipynb"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=5)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--no-isolation", action="store_true")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(detect(not args.no_isolation).describe())
    with tempfile.TemporaryDirectory() as folder:
        submissions = Path(folder) / "submissions"
        for solution in sorted((ROOT / "solutions").glob("*.ipynb")):
            for copy in range(args.copies):
                student = submissions / f"student{copy:02d}"
                student.mkdir(parents=True, exist_ok=True)
                shutil.copy(solution, student / solution.name)
        shutil.copy(HOSTILE, submissions / "student00" / "01_forward_process.ipynb")
        count = len(list(submissions.rglob("*.ipynb")))
        start = time.perf_counter()
        rows = grade(
            [submissions],
            out=Path(folder) / "grades.csv",
            workers=args.workers,
            progress=False,
            isolation=not args.no_isolation,
            announce=lambda message: None,
        )
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        again = grade([submissions], out=Path(folder) / "grades.csv", progress=False, announce=lambda message: None)
        rerun = time.perf_counter() - start
    full = sum(row.total == row.maximum for row in rows)
    per_exercise = {}
    for row in rows:
        per_exercise.setdefault(row.exercise, []).append(row.seconds)
    print(f"graded {count} submissions in {seconds:.0f} s ({seconds / count:.1f} s each); {full} with full marks")
    print(
        "seconds per submission, by exercise: "
        + ", ".join(f"{e} {sum(s) / len(s):.1f}" for e, s in per_exercise.items())
    )
    print(f"the same command again (nothing changed): {rerun:.1f} s for {len(again)} rows")


if __name__ == "__main__":
    main()
