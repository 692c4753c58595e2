"""Progress bars that suit where they are shown: live in a terminal or a notebook, sparse in a log.

A bar redraws ten times a second in a terminal; written to a file (``make demo > log``, CI) each redraw
would be one more line, thousands over a run. There it redraws at most every ``LOG_INTERVAL`` seconds.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

LOG_INTERVAL = 10.0  # seconds between two progress lines when the output is not a terminal


def is_interactive(stream=None) -> bool:
    """True in a terminal or a Jupyter kernel (where tqdm draws a widget), False for a file or a pipe."""
    if "ipykernel" in sys.modules and type(sys.stdout).__module__.startswith("ipykernel"):
        return True
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or unusual stream
        return False


def progress_bar(total: int | None = None, desc: str = "", unit: str = "it", disable: bool = False, **options):
    """A tqdm bar (see module docstring); ``options`` go to tqdm (initial, file, dynamic_ncols, ...)."""
    interactive = is_interactive(options.get("file"))
    options.setdefault("mininterval", 0.1 if interactive else LOG_INTERVAL)
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, **options)
