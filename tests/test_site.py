"""The course's website, built from a clean state and opened page by page in a real browser.

Builds the site with ``tools/build_site.py`` (what ``make site`` runs), serves it on a free localhost
port and opens every page in headless Debian Chromium through Playwright for Python (never a browser
Playwright downloads). On every page: no console error and no uncaught exception; no request leaves
localhost (the site must work in a room without Wi-Fi; such requests are refused and reported); every
image has loaded; where the page has maths, MathJax has typeset it without an error; every internal link
leads to a page of the site, and to an element with the linked id where it names one. The search page
finds a word of the course. Skips where the docs extra, npm (for MathJax) or Chromium is missing.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import pytest
from chromium import chromium_context

ROOT = Path(__file__).resolve().parents[1]

# In the page: what a reader would see missing.
BROKEN_IMAGES = """() => [...document.images]
    .filter((image) => !image.complete || image.naturalWidth === 0)
    .map((image) => image.getAttribute('src'))"""
LINKS = """() => [...document.querySelectorAll('a[href]')].map((a) => a.getAttribute('href'))"""
MATHS = """async () => {
    const maths = document.querySelectorAll('.math, .MathJax_Preview, mjx-container');
    if (maths.length === 0) return {maths: 0};
    for (let i = 0; i < 100 && !(window.MathJax && window.MathJax.startup && window.MathJax.startup.promise); i++) {
        await new Promise((resolve) => setTimeout(resolve, 100));
    }
    if (!(window.MathJax && window.MathJax.startup)) return {maths: maths.length, loaded: false};
    await window.MathJax.startup.promise;
    return {
        maths: maths.length,
        loaded: true,
        typeset: document.querySelectorAll('mjx-container').length,
        errors: document.querySelectorAll('mjx-merror').length,
    };
}"""


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    for module in ("sphinx", "myst_nb", "sphinx_book_theme"):
        pytest.importorskip(module, reason=f"{module} is not installed: pip install -e '.[docs]' (make site)")
    if shutil.which("npm") is None and not os.environ.get("COURSE_MATHJAX"):
        pytest.skip("npm is not installed: the site's MathJax comes from npm's mathjax package")
    out = tmp_path_factory.mktemp("site")
    built = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "build_site.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert built.returncode == 0, f"the site did not build:\n{built.stdout[-3000:]}\n{built.stderr[-6000:]}"
    print(built.stdout)
    return out


@pytest.fixture(scope="module")
def server(site):
    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # one line per request would bury the test's own report
            pass

    handler = functools.partial(QuietHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with chromium_context(tmp_path_factory.mktemp("chromium-profile")) as context:
        yield context


def _pages(site: Path) -> list[str]:
    """Every page but the top-level index.html, which only sends the browser on to site/index.html."""
    pages = (str(path.relative_to(site)) for path in site.rglob("*.html") if "_static" not in path.parts)
    return sorted(page for page in pages if page != "index.html")


def _ids(html_file: Path) -> set[str]:
    return set(re.findall(r'\bid="([^"]+)"', html_file.read_text(encoding="utf-8")))


def test_the_site_has_every_chapter_exercise_and_page(site):
    pages = set(_pages(site)) | {"index.html"}
    chapters = {f"notebooks/{p.stem}.html" for p in (ROOT / "notebooks").glob("*.ipynb")}
    exercises = {f"exercises/{p.stem}.html" for p in (ROOT / "exercises").glob("*.ipynb")}
    names = ("index", "start", "part_one", "part_two", "exercises", "teachers", "reference")
    others = {f"site/{name}.html" for name in names}
    assert chapters | exercises | others <= pages, f"missing: {sorted((chapters | exercises | others) - pages)}"
    assert (site / "index.html").is_file(), "the site's front page (index.html) is missing"
    notebook = (site / "notebooks" / "01_forward_process.html").read_text(encoding="utf-8")
    assert "colab.research.google.com/github/" in notebook, "the chapter page lost its Colab link"
    assert "../exercises/01_forward_process.html" in notebook, "the chapter page does not link to its exercise"
    assert "cdn.jsdelivr" not in notebook and "mathjax@" not in notebook, "MathJax must come from the site itself"


def test_every_page_loads_offline_with_its_images_maths_and_links(site, server, browser):
    page = browser.new_page()
    page.set_default_timeout(60_000)
    outside: list[str] = []

    def only_localhost(route):
        if route.request.url.startswith(server):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_localhost)
    problems: list[str] = []
    current = {"page": ""}
    page.on("console", lambda m: m.type == "error" and problems.append(f"{current['page']}: console: {m.text}"))
    page.on("pageerror", lambda e: problems.append(f"{current['page']}: uncaught: {e}"))
    typeset_pages = 0
    ids: dict[Path, set[str]] = {}
    for relative in _pages(site):
        current["page"] = relative
        outside.clear()
        response = page.goto(server + relative, wait_until="load")
        assert response is not None and response.ok, f"{relative} did not load: {response and response.status}"
        broken = page.evaluate(BROKEN_IMAGES)
        problems += [f"{relative}: image did not load: {src}" for src in broken]
        maths = page.evaluate(MATHS)
        if maths["maths"]:
            if not maths.get("loaded"):
                problems.append(f"{relative}: {maths['maths']} formulas but MathJax did not load")
            elif maths["typeset"] == 0 or maths["errors"]:
                typeset, errors = maths["typeset"], maths["errors"]
                problems.append(f"{relative}: MathJax typeset {typeset} formulas with {errors} errors")
            else:
                typeset_pages += 1
        problems += [f"{relative}: asked the internet for {url}" for url in outside]
        for href in page.evaluate(LINKS):
            target = urlsplit(urljoin(server + relative, href))
            if f"{target.scheme}://{target.netloc}/" != server:
                continue  # a link out of the site (Colab, GitHub, papers): not ours to check offline
            path = site / unquote(target.path.lstrip("/"))
            if path.is_dir():
                path = path / "index.html"
            if not path.is_file():
                problems.append(f"{relative}: link to a missing page: {href}")
            elif target.fragment and path.suffix == ".html":
                if path not in ids:
                    ids[path] = _ids(path)
                if unquote(target.fragment) not in ids[path]:
                    problems.append(f"{relative}: link to a missing anchor: {href}")
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:60])
    assert typeset_pages >= 8, f"only {typeset_pages} pages had typeset maths; expected most chapters"


def test_the_top_of_the_site_leads_to_the_front_page(site, server, browser):
    page = browser.new_page()
    page.goto(server, wait_until="load")
    page.wait_for_url("**/site/index.html", timeout=30_000)
    assert "built piece by piece" in page.title()


def test_the_search_box_finds_the_course(site, server, browser):
    page = browser.new_page()
    page.set_default_timeout(60_000)
    page.goto(server + "search.html?q=cross-attention", wait_until="load")
    page.wait_for_selector("#search-results li", timeout=30_000)
    found = page.locator("#search-results li a").evaluate_all("(links) => links.map((a) => a.getAttribute('href'))")
    assert any("10_text_prompt" in href for href in found), f"searching 'cross-attention' found {found}"
