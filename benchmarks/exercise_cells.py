"""How long each exercise's cells take: QUICK mode (alone, and on a busy machine) and full settings.

    python benchmarks/exercise_cells.py                  # QUICK mode, alone
    python benchmarks/exercise_cells.py --busy 2         # QUICK mode, with 2 busy processes beside it
    python benchmarks/exercise_cells.py --full           # full settings (the times each exercise states)

It runs the solution notebooks (an exercise with every answer filled in, so every cell runs its real
work) top to bottom in a fresh kernel each, and prints per notebook the slowest cell, the *Use it* cell
and the total. ``--busy N`` starts N processes that spin on the CPU for the whole run, the state of a
learner's laptop that is also running a browser and a video call; the exercises promise every cell
within 30 s in QUICK mode even then.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _spin(stop) -> None:
    while not stop.is_set():
        sum(range(10_000))


def cell_seconds(path: Path, quick: bool) -> tuple[list[float], float]:
    """Seconds per code cell (from the kernel's own timestamps), and the whole run's."""
    import nbformat
    from nbclient import NotebookClient

    os.environ["COURSEKIT_QUICK"] = "1" if quick else "0"
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    start = time.perf_counter()
    client.execute()
    total = time.perf_counter() - start
    seconds = []
    for cell in notebook.cells:
        timing = cell.get("metadata", {}).get("execution", {})
        if "iopub.execute_input" in timing and "shell.execute_reply" in timing:
            began, ended = (datetime.fromisoformat(timing[key].replace("Z", "+00:00"))
                            for key in ("iopub.execute_input", "shell.execute_reply"))  # fmt: skip
            seconds.append((ended - began).total_seconds())
    return seconds, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="full settings instead of QUICK mode")
    parser.add_argument("--busy", type=int, default=0, help="busy processes to run beside the notebooks")
    parser.add_argument("notebooks", nargs="*", help="solution notebooks (default: all)")
    arguments = parser.parse_args()
    paths = [Path(p) for p in arguments.notebooks] or sorted((ROOT / "solutions").glob("*.ipynb"))
    stop = multiprocessing.Event()
    spinners = [multiprocessing.Process(target=_spin, args=(stop,), daemon=True) for _ in range(arguments.busy)]
    for spinner in spinners:
        spinner.start()
    mode = "full settings" if arguments.full else "QUICK mode"
    print(f"{mode}, {arguments.busy} busy process(es) beside, {os.cpu_count()} CPU(s)")
    print(f"{'notebook':28} {'slowest cell':>13} {'Use it cell':>12} {'total':>8}")
    try:
        for path in paths:
            seconds, total = cell_seconds(path, quick=not arguments.full)
            print(f"{path.name:28} {max(seconds):12.1f}s {seconds[-1]:11.1f}s {total:7.1f}s", flush=True)
    finally:
        stop.set()
        for spinner in spinners:
            spinner.join()


if __name__ == "__main__":
    main()
