"""Run notebooks top to bottom and store their outputs, cleaned, in place.

    python tools/run_notebooks.py                      # full settings: the outputs we commit
    python tools/run_notebooks.py --quick notebooks/01_forward_process.ipynb
    python tools/run_notebooks.py --tidy-only notebooks/*.ipynb solutions/*.ipynb   # clean stored outputs, no run

After running, each notebook is cleaned: widget state and any metadata beyond the kernel's name are
removed, and so are progress bars (a stored bar is a picture of one moment mid-run, "0%" or "87%", and a
web page shows it frozen), so a committed notebook carries only outputs that teach; each figure is stored
with at most 256 colours (plots and grey digits look the same, at about a third of the bytes). The run
time of each is printed.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
KEPT_METADATA = {"kernelspec", "language_info"}
# tags (nbval, the website's hide-input), and the setup cell's collapsed view in Colab and JupyterLab
KEPT_CELL_METADATA = {"tags", "cellView", "jupyter"}
WIDGET = "application/vnd.jupyter.widget-view+json"
PROGRESS = re.compile(r"\|[ #\d]*\| *\d+/\d+ \[|: *\d+[a-z_/]+ \[\d")  # "| 87/100 [" or ": 151step [00"


def is_progress_bar(output) -> bool:
    """A tqdm bar as a notebook stores it: a widget with no picture, or text on stderr with a bar in it."""
    data = output.get("data", {})
    if WIDGET in data and "image/png" not in data:
        return bool(PROGRESS.search(data.get("text/plain", "")))
    return (
        output.get("output_type") == "stream"
        and output.get("name") == "stderr"
        and bool(PROGRESS.search(output["text"]))
    )


def clean(notebook) -> None:
    """Drop widget state, progress bars and personal or tool metadata; keep the outputs that teach."""
    notebook.metadata = {key: value for key, value in notebook.metadata.items() if key in KEPT_METADATA}
    notebook.metadata["language_info"] = {"name": "python"}
    for cell in notebook.cells:
        cell.metadata = {key: value for key, value in cell.metadata.items() if key in KEPT_CELL_METADATA}
        if cell.cell_type == "code":
            cell.outputs = [output for output in cell.outputs if not is_progress_bar(output)]


def shrink_figures(notebook) -> int:
    """Re-encode each stored PNG with a palette of at most 256 colours where that is smaller; returns bytes saved."""
    from PIL import Image

    saved = 0
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "image/png" not in data:
                continue
            raw = base64.b64decode(data["image/png"])
            image = Image.open(io.BytesIO(raw))
            if image.mode == "P":
                continue  # already a palette image
            buffer = io.BytesIO()
            image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(
                buffer, "PNG", optimize=True
            )
            if len(buffer.getvalue()) < len(raw):
                data["image/png"] = base64.b64encode(buffer.getvalue()).decode("ascii")
                saved += len(raw) - len(buffer.getvalue())
    return saved


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
    shrink_figures(notebook)
    nbformat.write(notebook, path)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--quick", action="store_true", help="QUICK mode (the tests' tiny settings)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    parser.add_argument(
        "--tidy-only", action="store_true", help="only clean the stored outputs and re-encode the figures; run nothing"
    )
    args = parser.parse_args()
    paths = args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    if args.tidy_only:
        for path in paths:
            notebook = nbformat.read(path, as_version=4)
            clean(notebook)
            saved = shrink_figures(notebook)
            nbformat.write(notebook, path)
            print(f"{path.name}: {saved / 1000:.0f} kB smaller", flush=True)
        return 0
    for path in paths:
        seconds = run(path, args.quick, args.timeout)
        print(f"{path.name}: {seconds:.0f} s ({'quick' if args.quick else 'full'})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
