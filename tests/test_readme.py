"""The README's code, run as a newcomer would copy it, and its results looked at.

Every ```python block of README.md runs as written, except that in QUICK mode (``COURSEKIT_QUICK=1``,
the test suite's default) every ``range(N)`` loop with N above ``QUICK_LOOP`` runs ``QUICK_LOOP``
times, so the quickstart trains for seconds instead of minutes. ``COURSEKIT_README_FULL=1`` runs the
blocks exactly as written (about 4 minutes on a 2-core CPU):

    COURSEKIT_README_FULL=1 .venv/bin/python -m pytest tests/test_readme.py -s

The quickstart's samples are then checked the way a person would look at them: inside the image
range, not blank, written to a PNG, and scored by the course's yardstick (KID) far better than
noise. The README's command-line examples that take seconds (``--help``, ``preflight``) run too.
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"
QUICK_LOOP = 200  # training steps of the quickstart in QUICK mode
FULL = os.environ.get("COURSEKIT_README_FULL") == "1"


def fenced_blocks(text: str, language: str) -> list[str]:
    """The bodies of the ```language blocks of a Markdown text, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


class _ShortenLoops(ast.NodeTransformer):
    """``range(N)`` with a literal N above ``limit`` becomes ``range(limit)``."""

    def __init__(self, limit: int):
        self.limit = limit
        self.shortened = 0

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        is_range = isinstance(node.func, ast.Name) and node.func.id == "range" and len(node.args) == 1
        if is_range and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, int):
            if node.args[0].value > self.limit:
                node.args[0] = ast.Constant(self.limit)
                self.shortened += 1
        return node


def quick_version(code: str, limit: int = QUICK_LOOP) -> tuple[str, int]:
    """The code with its long ``range`` loops shortened, and how many were."""
    transformer = _ShortenLoops(limit)
    tree = ast.fix_missing_locations(transformer.visit(ast.parse(code)))
    return ast.unparse(tree), transformer.shortened


def test_quick_version_shortens_only_long_literal_loops():
    code, count = quick_version("for i in range(2000):\n    pass\nfor j in range(10):\n    pass\nrange(n)\n", 300)
    assert count == 1
    assert "range(300)" in code and "range(10)" in code and "range(n)" in code


PYTHON_BLOCKS = fenced_blocks(README.read_text(), "python")


def test_the_readme_has_a_quickstart():
    assert PYTHON_BLOCKS, "README.md has no ```python block"
    assert any("ddim_sample" in block for block in PYTHON_BLOCKS)


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    """Every Python block of the README, run in order in one namespace, in a fresh folder."""
    folder = tmp_path_factory.mktemp("readme")
    namespace: dict = {"__name__": "__readme__"}
    previous = Path.cwd()
    os.chdir(folder)
    torch.manual_seed(0)
    try:
        for block in PYTHON_BLOCKS:
            code = block if FULL else quick_version(block)[0]
            exec(compile(code, str(README), "exec"), namespace)
    finally:
        os.chdir(previous)
    return folder, namespace


def test_the_quickstart_paints_images_in_range(quickstart_run):
    folder, namespace = quickstart_run
    samples = namespace["samples"]
    assert samples.shape == (16, 1, 16, 16)
    assert torch.isfinite(samples).all()
    low, high = samples.min().item(), samples.max().item()
    print(f"README samples lie in [{low:.3f}, {high:.3f}], std {samples.std().item():.3f}")
    assert -1 <= low and high <= 1, "the quickstart's samples left the image range [-1, 1]"
    assert samples.std() > 0.3, "the samples are nearly blank"
    assert samples.flatten(1).std(0).mean() > 0.1, "all 16 samples look alike"
    with Image.open(folder / "samples.png") as grid:
        assert grid.size[0] >= 64 and grid.size[1] >= 64


def test_the_quickstart_model_scores_far_better_than_noise(quickstart_run):
    """256 samples drawn as the quickstart draws its 16, scored with the course's yardstick."""
    from coursekit import ddim_sample
    from coursekit.quality import Yardstick

    _, namespace = quickstart_run
    yardstick = Yardstick.for_dataset("digits")
    noise_start = torch.randn(256, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    samples = ddim_sample(namespace["model"].eval(), namespace["schedule"], noise_start, num_steps=50)
    noise = torch.rand(256, 1, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    model_score, noise_score = yardstick.score(samples), yardstick.score(noise)
    print("quickstart model:", model_score.summary())
    print("uniform noise:   ", noise_score.summary())
    assert model_score.kid_high < 0.2 * noise_score.kid_low, "the quickstart's samples score like noise"
    assert model_score.class_coverage >= 0.8, "the samples cover too few of the ten digits"


SHELL_BLOCKS = fenced_blocks(README.read_text(), "bash")


def readme_commands() -> list[list[str]]:
    """The ``coursekit ...`` command lines of the README's shell blocks, comments dropped."""
    commands = []
    for block in SHELL_BLOCKS:
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if "coursekit" in words:
                commands.append(words)
    return commands


def _run(arguments: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "coursekit", *arguments], capture_output=True, text=True, timeout=timeout
    )


def _help(name: str) -> str:
    """``coursekit NAME --help``, in this process (the entry point itself is run once, below)."""
    from coursekit.cli import main

    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        code = main([name, "--help"])
    assert code == 0, f"coursekit {name} --help failed"
    return output.getvalue()


def test_every_readme_command_has_working_help():
    commands = readme_commands()
    subcommands = sorted({words[words.index("coursekit") + 1] for words in commands})
    assert {"train", "sample", "evaluate", "preflight", "demo"} <= set(subcommands), subcommands
    assert _run(["--help"]).returncode == 0  # the real entry point, once
    usages = {name: _help(name) for name in subcommands}
    assert all("usage:" in usage for usage in usages.values())
    # every option the README passes is one the command knows
    for words in commands:
        start = words.index("coursekit") + 1
        name, options = words[start], [w.split("=")[0] for w in words[start + 1 :] if w.startswith("--")]
        for option in options:
            assert option in usages[name], f"README passes {option} to coursekit {name}, which does not know it"


def test_the_readme_preflight_command_runs():
    result = _run(["preflight"], timeout=300)
    assert "Pre-flight check" in result.stdout
    assert result.returncode in (0, 1), result.stderr  # 1: this machine has FIX lines, which it names
    if result.returncode == 1:
        assert "FIX" in result.stdout
