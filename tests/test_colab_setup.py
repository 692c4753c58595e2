"""The notebooks' setup cell, run as on Colab: torch is already there, coursekit is not.

1. A fresh virtual environment B sees this environment's packages (torch, torchvision, numpy, ...)
   through a ``.pth`` file and a folder of symlinks, as Colab's preinstalled packages, but not coursekit.
   Nothing is downloaded for torch and nothing is reinstalled.
2. The cell's ``COURSE_REPOSITORY`` points at a git copy of this working tree (uncommitted changes
   included), so ``pip install "coursekit @ git+file://..."`` installs what is here.
3. The first setup cell installs coursekit and leaves torch and torchvision exactly as they were;
   every later setup cell, of any notebook, installs nothing.

Takes 20-40 s on a 2-core CPU; run it alone, times shown, with ``pytest tests/test_colab_setup.py -s``.
"""

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(path for folder in ("notebooks", "exercises") for path in (ROOT / folder).glob("*.ipynb"))
SAME_LOGIC_AS = sorted((ROOT / "solutions").glob("*.ipynb"))  # checked for the same install logic, not run
REPOSITORY_LINE = re.compile(r'^COURSE_REPOSITORY = "[^"\n]*"$', re.MULTILINE)
PIP_ACTIVITY = re.compile(r"Collecting|Downloading|Installing|Successfully installed|Requirement already|pip install")
PROBE = """
import importlib.util, json, sys, sysconfig
import torch, torchvision
spec = importlib.util.find_spec("coursekit")
if spec is not None:
    import coursekit
print(json.dumps({
    "torch": [torch.__version__, torch.__file__],
    "torchvision": [torchvision.__version__, torchvision.__file__],
    "coursekit": None if spec is None else coursekit.__file__,
    "purelib": sysconfig.get_paths()["purelib"],
}))
"""

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(not sys.platform.startswith(("linux", "darwin")), reason="venv layout: Linux and macOS only"),
    pytest.mark.skipif(shutil.which("git") is None, reason="git is missing: pip installs coursekit with git+"),
    pytest.mark.skipif(not (ROOT / ".git").exists(), reason="not a git checkout: no working tree to install from"),
]


def _setup_cell(path):
    cells = json.loads(path.read_text())["cells"]
    source = next(cell["source"] for cell in cells if cell["cell_type"] == "code")
    return "".join(source) if isinstance(source, list) else source


def _install_logic(cell):
    """The cell up to ``QUICK = ...``: the part that decides whether to install, and how."""
    return cell.split("\nQUICK =", 1)[0]


def _environment(**extra):
    env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(MPLBACKEND="Agg", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", **extra)
    return env


def _run(args, cwd, env, check=True):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result


def _git_snapshot_of_the_working_tree(destination):
    """Tracked and untracked-but-not-ignored files, committed into a fresh repository."""
    listing = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], ROOT, os.environ)
    for name in filter(None, listing.stdout.split("\0")):
        source = ROOT / name
        if source.is_file():  # tracked files deleted in the working tree are left out
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    git = ["git", "-c", "init.defaultBranch=main", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    _run([*git, "init", "-q"], destination, os.environ)
    _run([*git, "add", "-A"], destination, os.environ)
    _run([*git, "-c", "commit.gpgsign=false", "commit", "-q", "-m", "working tree"], destination, os.environ)


def _entries_owned_by(site, project_names):
    """Top-level names in ``site`` that belong to the given distributions (from their RECORD)."""
    owned = set()
    for dist in importlib.metadata.distributions(path=[str(site)]):
        if re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower() in project_names:
            owned |= {Path(file).parts[0] for file in dist.files or [] if not str(file).startswith("..")}
    return owned


def _copy_this_pip_into(purelib):
    """B's own pip, copied from this environment (Colab too has a recent pip of its own).

    Not ensurepip's: the pip bundled with Python 3.11 (23.2) rejects ``git+file:///...`` requirements
    (its packaging wants a host in every non-file URL), which a real ``git+https://`` address never hits.
    """
    site = Path(importlib.metadata.distribution("pip").locate_file(""))
    for name in sorted(_entries_owned_by(site, {"pip"})):
        shutil.copytree(site / name, purelib / name, ignore=shutil.ignore_patterns("__pycache__"))


def _mirror_preinstalled_packages(site_dirs, mirror_root, own_projects):
    """A folder of symlinks per site dir: every entry except coursekit's and the packages B has itself.

    The folders lie outside B's prefix, so pip in B treats them as foreign: it may read them, but it
    would never uninstall (and so never delete through a symlink) anything found there.
    """
    mirrors = []
    for index, site in enumerate(site_dirs):
        skip = _entries_owned_by(site, {"coursekit"} | own_projects)
        mirror = mirror_root / str(index)
        mirror.mkdir(parents=True)
        for entry in sorted(site.iterdir()):
            for_coursekit = "coursekit" in entry.name.lower() or (
                entry.suffix == ".pth" and "coursekit" in entry.read_text(errors="replace")
            )
            if entry.name not in skip and not for_coursekit:
                (mirror / entry.name).symlink_to(entry)
        mirrors.append(mirror)
    return mirrors


def _site_packages_listing(purelib):
    """Every file under B's site-packages with its size and mtime (bytecode caches left out)."""
    listing = {}
    for folder, subfolders, files in os.walk(purelib):
        subfolders[:] = [name for name in subfolders if name != "__pycache__"]
        for name in files:
            stat = os.stat(os.path.join(folder, name), follow_symlinks=False)
            listing[os.path.relpath(os.path.join(folder, name), purelib)] = (stat.st_size, stat.st_mtime_ns)
    return listing


def _dist_names(purelib):
    return {entry.name.split("-")[0].lower() for entry in Path(purelib).glob("*.dist-info")}


def test_all_setup_cells_share_one_install_logic():
    cells = {path: _setup_cell(path) for path in NOTEBOOKS + SAME_LOGIC_AS}
    logic = {_install_logic(cell) for cell in cells.values()}
    assert len(logic) == 1, "setup cells differ before `QUICK =`: keep one install logic for every notebook"
    (install,) = logic
    assert len(REPOSITORY_LINE.findall(install)) == 1
    assert '"-m", "pip", "install", "--quiet", f"coursekit @ git+{COURSE_REPOSITORY}"' in install


def test_setup_cells_install_coursekit_once_and_never_touch_torch(tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    times = {}

    # 1. Environment B: a fresh venv from the base interpreter, seeing this environment's packages
    start = time.perf_counter()
    venv = tmp_path / "colab"
    base_python = getattr(sys, "_base_executable", None) or sys.executable
    _run([base_python, "-m", "venv", "--without-pip", str(venv)], tmp_path, _environment())
    python = str(venv / "bin" / "python")
    purelib = _run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, _environment()
    )
    purelib = Path(purelib.stdout.strip())
    _copy_this_pip_into(purelib)
    site_dirs = sorted({Path(sysconfig.get_path(name)) for name in ("purelib", "platlib")})
    mirrors = _mirror_preinstalled_packages(site_dirs, tmp_path / "preinstalled", own_projects={"pip"})
    (purelib / "preinstalled.pth").write_text("".join(f"import site; site.addsitedir({str(m)!r})\n" for m in mirrors))
    times["venv creation"] = time.perf_counter() - start

    plain = _environment()
    before = json.loads(_run([python, "-c", PROBE], tmp_path, plain).stdout.splitlines()[-1])
    assert before["coursekit"] is None, "coursekit leaks into the fresh environment: the premise is broken"
    assert Path(before["torch"][1]).is_relative_to(tmp_path / "preinstalled")
    seen_by_pip = _run([python, "-m", "pip", "list", "--format=json"], tmp_path, plain).stdout
    seen_by_pip = {package["name"].lower() for package in json.loads(seen_by_pip)}
    assert {"torch", "torchvision", "numpy", "matplotlib"} <= seen_by_pip and "coursekit" not in seen_by_pip
    dists_before = _dist_names(purelib)

    # 2. The install address: a git repository holding this working tree
    repository = tmp_path / "repository"
    repository.mkdir()
    _git_snapshot_of_the_working_tree(repository)
    cells = {}  # one run per distinct cell text, in notebook order
    for path in NOTEBOOKS:
        cell, count = REPOSITORY_LINE.subn(f'COURSE_REPOSITORY = "file://{repository}"', _setup_cell(path))
        assert count == 1, f"{path.name}: expected one COURSE_REPOSITORY line"
        cells.setdefault(cell, path)
    first_cell, first_path = next(iter(cells.items()))
    runs = [(first_cell, first_path), (first_cell, first_path)] + list(cells.items())[1:]

    # 3. Run the setup cells in B: the first installs coursekit, every later one nothing
    pip_log = tmp_path / "pip.log"
    env = _environment(PIP_LOG=str(pip_log))
    workdir = tmp_path / "work"
    workdir.mkdir()
    listing = None
    for number, (cell, path) in enumerate(runs):
        script = workdir / f"setup_{number}.py"
        script.write_text(cell)
        log_size = pip_log.stat().st_size if pip_log.exists() else 0
        start = time.perf_counter()
        result = _run([python, str(script)], workdir, env, check=False)
        elapsed = time.perf_counter() - start
        output = result.stdout + result.stderr
        name = f"{path.parent.name}/{path.name}"
        assert result.returncode == 0, f"setup cell of {name} (run {number}) failed:\n{output}"
        if number == 0:
            times[f"first setup cell, installing coursekit ({name})"] = elapsed
            log = pip_log.read_text()
            for package in ("torch", "torchvision"):
                pattern = rf"^.*(?:Collecting|Downloading|[Uu]ninstalling) {package}\b.*$"
                touched = re.findall(pattern, log, re.MULTILINE)
                assert touched == [], f"pip touched {package}:\n" + "\n".join(touched)
            new = _dist_names(purelib) - dists_before
            assert new == {"coursekit"}, f"the install put more than coursekit into B: {sorted(new)}"
            listing = _site_packages_listing(purelib)
        else:
            times[f"later setup cell, no-op ({name})"] = elapsed
            assert not PIP_ACTIVITY.search(output), f"pip ran again for {name}:\n{output}"
            assert (pip_log.stat().st_size if pip_log.exists() else 0) == log_size, f"pip ran for {name}"
            assert _site_packages_listing(purelib) == listing, f"{name}'s setup cell changed B's site-packages"

    after = json.loads(_run([python, "-c", PROBE], tmp_path, plain).stdout.splitlines()[-1])
    assert after["torch"] == before["torch"] and after["torchvision"] == before["torchvision"]
    assert not list(purelib.glob("torch*")), "a torch or torchvision distribution landed in B's own site-packages"
    coursekit_file = Path(after["coursekit"])
    assert coursekit_file.is_relative_to(purelib) and not coursekit_file.resolve().is_relative_to(ROOT)

    # 4. Times, shown in the CI log even when pytest captures output
    with capsys.disabled():
        print(f"\ncolab setup: {len(runs)} setup cell runs, torch {before['torch'][0]}")
        for what, seconds in times.items():
            print(f"  {what}: {seconds:.1f} s")
