"""Time to grade a folder of submissions: 20 notebooks (five copies of each solution).

python benchmarks/grading.py [--copies 5] [--workers N]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from coursekit.grading import grade

from common import machine

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=5)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as folder:
        submissions = Path(folder) / "submissions"
        for solution in sorted((ROOT / "solutions").glob("*.ipynb")):
            for copy in range(args.copies):
                student = submissions / f"student{copy:02d}"
                student.mkdir(parents=True, exist_ok=True)
                shutil.copy(solution, student / solution.name)
        count = len(list(submissions.rglob("*.ipynb")))
        start = time.perf_counter()
        rows = grade([submissions], out=Path(folder) / "grades.csv", workers=args.workers, progress=False)
        seconds = time.perf_counter() - start
    full = sum(row.total == row.maximum for row in rows)
    print(f"graded {count} submissions in {seconds:.0f} s ({seconds / count:.1f} s each); {full} with full marks")


if __name__ == "__main__":
    main()
