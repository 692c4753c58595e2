"""The project's own files must agree with each other."""

import re

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"torch": "pytorch"}  # pip name -> conda-forge name, where they differ


def _runtime_requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [re.split(r"[<>=!~ \[;]", req, maxsplit=1)[0].lower() for req in project["dependencies"]]


def test_environment_yml_names_every_runtime_dependency():
    listed = set()
    for line in (ROOT / "environment.yml").read_text().splitlines():
        match = re.match(r"\s*-\s*([A-Za-z0-9_.-]+)", line)
        if match:
            listed.add(match.group(1).lower())
    missing = [name for name in _runtime_requirements() if CONDA_NAMES.get(name, name) not in listed]
    assert missing == [], f"environment.yml lacks {missing}"
    assert '-e ".[dev]"' in (ROOT / "environment.yml").read_text()


def test_torch_has_lower_bounds_only():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        if requirement.startswith(("torch", "torchvision")):
            assert ">=" in requirement and "<" not in requirement and "==" not in requirement


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make demo" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
