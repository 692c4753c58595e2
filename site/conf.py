"""Sphinx configuration of the course's website (``make site``; built into build/site).

The source is the repository itself: the pages in site/, the notebooks and the exercises, shown with the
outputs they were committed with (nothing is executed at build time). Maths is typeset by a local copy
of MathJax (``make site`` puts it in build/mathjax), so the site works in a room without Wi-Fi.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "_ext"))

project = "Diffusion models, built piece by piece"
author = "the course's authors"
copyright = "2026, the course's authors"

extensions = ["myst_nb", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "course_links"]
root_doc = "site/index"
include_patterns = ["site/*.md", "notebooks/*.ipynb", "exercises/*.ipynb"]
exclude_patterns = ["build", ".venv", "**/.ipynb_checkpoints", "**/runs"]

# The notebooks are shown as committed: with the outputs of their full run, never executed here.
nb_execution_mode = "off"
# A stored slider has no kernel behind it on a web page: show its static picture instead of the widget.
nb_mime_priority_overrides = [
    ("html", "application/vnd.jupyter.widget-view+json", None),
    ("html", "application/vnd.jupyter.widget-state+json", None),
]
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3
suppress_warnings = ["mystnb.unknown_mime_type"]

# MathJax from the local copy, never from a CDN.
MATHJAX = Path(os.environ.get("COURSE_MATHJAX", ROOT / "build" / "mathjax"))
html_static_path = ["_static"] + ([str(MATHJAX)] if MATHJAX.is_dir() else [])
mathjax_path = "tex-chtml.js"

html_theme = "sphinx_book_theme"
html_title = "Diffusion models, built piece by piece"
html_theme_options = {
    # the one place the address lives: pyproject.toml's [project.urls] Repository
    "repository_url": tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"],
    "use_repository_button": True,
    "show_toc_level": 2,
    "navigation_with_keys": False,
}
html_last_updated_fmt = None
html_context = {"default_mode": "auto"}  # light or dark, as the reader's system prefers
html_copy_source = True  # the theme's download button offers each page's notebook

autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "undoc-members": False}
autodoc_typehints = "description"
