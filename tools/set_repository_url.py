"""Rewrite every Colab badge and install line from the repository address in pyproject.toml.

    python tools/set_repository_url.py           # rewrite notebooks and README
    python tools/set_repository_url.py --check   # exit 1 if anything disagrees (the tests run this)

The address lives in one place: ``[project.urls] Repository`` in pyproject.toml. Change it there
(for example when the course is published), then run this.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_FOLDERS = ("notebooks", "exercises", "solutions")
BADGE = re.compile(r"https://colab\.research\.google\.com/github/[^/\s)]+/[^/\s)]+/blob/[^/\s)]+/([^\s)]+\.ipynb)")
INSTALL = re.compile(r'COURSE_REPOSITORY = "[^"]*"')
README_INSTALL = re.compile(r"git\+https://github\.com/[^/\s\"']+/[^\s\"'@]+")


def repository_url() -> str:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    url = project["urls"]["Repository"].rstrip("/")
    if not re.fullmatch(r"https://github\.com/[^/]+/[^/]+", url):
        raise SystemExit(f"[project.urls] Repository must look like https://github.com/OWNER/NAME, got {url}")
    return url


def rewrite_text(text: str, url: str, relative_path: str) -> str:
    owner_and_name = url.removeprefix("https://github.com/")
    text = BADGE.sub(f"https://colab.research.google.com/github/{owner_and_name}/blob/main/{relative_path}", text)
    text = INSTALL.sub(f'COURSE_REPOSITORY = "{url}"', text)
    return README_INSTALL.sub(f"git+{url}", text)


def targets() -> list[Path]:
    files = [path for folder in NOTEBOOK_FOLDERS for path in sorted((ROOT / folder).glob("*.ipynb"))]
    return files + [ROOT / "README.md"]


def updated(path: Path, url: str) -> str:
    original = path.read_text()
    if path.suffix != ".ipynb":
        return rewrite_text(original, url, "")
    notebook = json.loads(original)
    # a solution's badge opens its exercise: exercises are generated from solutions, badge included
    relative = path.relative_to(ROOT).as_posix().replace("solutions/", "exercises/", 1)
    for cell in notebook["cells"]:
        source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        new = rewrite_text(source, url, relative)
        if new != source:
            cell["source"] = new.splitlines(keepends=True)
    text = json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"
    return original if json.loads(text) == json.loads(original) else text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report files that disagree")
    args = parser.parse_args()
    url = repository_url()
    stale = []
    for path in targets():
        new = updated(path, url)
        if new != path.read_text():
            stale.append(path.relative_to(ROOT).as_posix())
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(f"these files disagree with {url}: {', '.join(stale)}; run python tools/set_repository_url.py")
        return 1
    print(
        f"{'checked' if args.check else 'rewrote'} {len(targets())} files against {url}"
        + (f"; changed {len(stale)}" if stale and not args.check else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
