"""Run notebooks top to bottom and store their outputs, cleaned, in place.

    python tools/run_notebooks.py                      # full settings: the outputs we commit
    python tools/run_notebooks.py --quick notebooks/01_forward_process.ipynb

After running, each notebook is cleaned: widget state and any metadata beyond the kernel's name are
removed, so a committed notebook carries only outputs that teach. The run time of each is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
KEPT_METADATA = {"kernelspec", "language_info"}


def clean(notebook) -> None:
    """Drop widget state and personal or tool metadata; keep outputs."""
    notebook.metadata = {key: value for key, value in notebook.metadata.items() if key in KEPT_METADATA}
    notebook.metadata["language_info"] = {"name": "python"}
    for cell in notebook.cells:
        cell.metadata = {key: value for key, value in cell.metadata.items() if key == "tags"}


def run(path: Path, quick: bool, timeout: int) -> float:
    notebook = nbformat.read(path, as_version=4)
    environment = dict(os.environ, COURSEKIT_QUICK="1" if quick else "0")
    start = time.perf_counter()
    previous = dict(os.environ)
    os.environ.update(environment)  # the kernel inherits this process's environment
    try:
        client = NotebookClient(
            notebook,
            timeout=timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(path.parent)}},
            store_widget_state=False,
        )
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(previous)
    seconds = time.perf_counter() - start
    clean(notebook)
    nbformat.write(notebook, path)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--quick", action="store_true", help="QUICK mode (the tests' tiny settings)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = parser.parse_args()
    paths = args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    for path in paths:
        seconds = run(path, args.quick, args.timeout)
        print(f"{path.name}: {seconds:.0f} s ({'quick' if args.quick else 'full'})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
