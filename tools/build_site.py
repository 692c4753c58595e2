"""Build the course's website into build/site (what ``make site`` runs after installing the ``docs`` extra).

    python tools/build_site.py            # then open build/site/index.html (or serve build/site)

The pages are the committed notebooks and exercises with their stored outputs (nothing is executed) and
the pages in site/. MathJax comes from npm's ``mathjax`` package, unpacked once into build/mathjax, so
the maths renders with no internet; set COURSE_MATHJAX to a folder holding ``tex-chtml.js`` (MathJax 3's
es5 folder) to use a copy you already have.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MATHJAX_VERSION = "3.2.2"


def fail(message: str) -> None:
    print(f"make site: {message}", file=sys.stderr)
    raise SystemExit(1)


def local_mathjax(folder: Path) -> Path:
    """A folder with MathJax 3's tex-chtml.js and its fonts, from npm's package when not there yet."""
    given = os.environ.get("COURSE_MATHJAX")
    if given:
        if not (Path(given) / "tex-chtml.js").is_file():
            fail(f"COURSE_MATHJAX={given} holds no tex-chtml.js; point it at MathJax 3's es5 folder")
        return Path(given)
    if (folder / "tex-chtml.js").is_file():
        return folder
    npm = shutil.which("npm")
    if npm is None:
        fail(
            "the maths needs a local copy of MathJax, taken from npm's mathjax package, and npm is not "
            "installed (Debian: apt-get install npm; or set COURSE_MATHJAX to MathJax 3's es5 folder)"
        )
    with tempfile.TemporaryDirectory() as scratch:
        packed = subprocess.run(
            [npm, "pack", f"mathjax@{MATHJAX_VERSION}", "--pack-destination", scratch, "--silent"],
            capture_output=True,
            text=True,
        )
        if packed.returncode != 0:
            fail(f"npm could not fetch mathjax@{MATHJAX_VERSION} (is the npm registry reachable?): {packed.stderr}")
        archive = next(Path(scratch).glob("mathjax-*.tgz"))
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("package/es5/")]
            try:
                tar.extractall(scratch, members=members, filter="data")
            except TypeError:  # Python before 3.10.12 has no filter (npm's own package: trusted)
                tar.extractall(scratch, members=members)
        if folder.exists():
            shutil.rmtree(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(Path(scratch) / "package" / "es5"), folder)
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "site", help="where the site goes")
    args = parser.parse_args()
    try:
        import myst_nb  # noqa: F401
        import sphinx  # noqa: F401
        import sphinx_book_theme  # noqa: F401
    except ImportError as missing:
        fail(f"{missing.name} is not installed: pip install -e '.[docs]' (make site does it for you)")
    started = time.perf_counter()
    mathjax = local_mathjax(ROOT / "build" / "mathjax")
    environment = dict(os.environ, COURSE_MATHJAX=str(mathjax))
    built = subprocess.run(
        [sys.executable, "-m", "sphinx", "-b", "html", "-q", "-c", str(ROOT / "site"), str(ROOT), str(args.out)],
        env=environment,
    )
    if built.returncode != 0:
        fail("sphinx-build failed (its messages are above)")
    # the front page sits at site/index.html (the pages keep the repository's folders): one step from the top
    (args.out / "index.html").write_text(
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>Diffusion models, built piece by piece</title>\n"
        '<meta http-equiv="refresh" content="0; url=site/index.html"></head>\n'
        '<body><p><a href="site/index.html">Diffusion models, built piece by piece</a></p></body></html>\n',
        encoding="utf-8",
    )
    pages = sorted(args.out.rglob("*.html"))
    pages = [p for p in pages if "_static" not in p.parts and p.parent != args.out]  # the chapters and pages
    print(f"site built in {time.perf_counter() - started:.0f} s: {len(pages)} pages in {args.out}")
    print(f"open {args.out / 'index.html'} in a browser, or: python -m http.server -d {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
