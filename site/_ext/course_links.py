"""Sphinx extension for the course's website: each notebook page links to its exercise and back, and
the Colab badges show a local picture (a page must not need the internet to show its images)."""

from __future__ import annotations

from docutils import nodes
from sphinx import addnodes

COLAB_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
LOCAL_BADGE = "../site/_static/open-in-colab.svg"  # from notebooks/ and exercises/


def _link(target: str, text: str) -> addnodes.pending_xref:
    reference = addnodes.pending_xref("", refdomain="std", reftype="doc", reftarget="/" + target, refexplicit=True)
    reference += nodes.inline(text, text)
    return reference


def local_badge(app, docname: str, source: list[str]) -> None:
    """The same badge, drawn by us and served by the site (the link still goes to Colab)."""
    if docname.startswith(("notebooks/", "exercises/")):
        source[0] = source[0].replace(COLAB_BADGE, LOCAL_BADGE)


def add_course_links(app, doctree) -> None:
    docname = app.env.docname
    folder, _, name = docname.partition("/")
    if folder not in ("notebooks", "exercises"):
        return
    other = "exercises" if folder == "notebooks" else "notebooks"
    if f"{other}/{name}" not in app.env.found_docs:
        return
    text = f"The exercise for this notebook: {name}" if folder == "notebooks" else f"The notebook it goes with: {name}"
    paragraph = nodes.paragraph(classes=["course-link"])
    paragraph += _link(f"{other}/{name}", text)
    sections = list(doctree.findall(nodes.section))
    if sections:
        title = sections[0].next_node(nodes.title)
        sections[0].insert(sections[0].index(title) + 1, paragraph)


def setup(app):
    app.connect("source-read", local_badge)
    app.connect("doctree-read", add_course_links)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
