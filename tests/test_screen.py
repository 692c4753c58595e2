"""The screen: what the grader takes from a submission, and the answers it refuses to run.

A catalogue of ways an answer can reach outside itself (each must be flagged with its line) beside
ordinary answer code (none of which may be flagged); then the worker's second layer, its builtins and
its import, proven on code that the screen never saw.
"""

import json
from pathlib import Path

import pytest

from coursekit.course.engine import questions_for
from coursekit.course.runner import run_answers
from coursekit.course.sandbox import Limits, detect
from coursekit.course.screen import AnswerProgram, read_answers

ROOT = Path(__file__).resolve().parents[1]


def notebook(*cells: str) -> dict:
    return {"cells": [{"cell_type": "code", "source": cell, "metadata": {}, "outputs": []} for cell in cells]}


def answer(body: str, header: str = "") -> AnswerProgram:
    indented = "".join(f"    {line}\n" for line in body.splitlines())
    return read_answers(notebook(f"{header}def noisy_image(x0, t, alpha_bar, noise):\n{indented}"), {"noisy_image"})


REACHING_OUT = [
    "import sys\nreturn sys.modules['coursekit.course.bank_part1'].reference_noisy_image(x0, t, alpha_bar, noise)",
    "return __import__('sys').modules",
    "import importlib\nreturn importlib.import_module('coursekit.checks')",
    "import builtins\nreturn builtins.__dict__",
    "return getattr(torch, 'sa' + 've')",
    "torch.save(x0, 'answers.pt')",
    "return torch.load('answers.pt')",
    "import gc\nreturn gc.get_objects()",
    "import inspect\nreturn inspect.currentframe().f_back.f_globals",
    "return (lambda: 0).__globals__",
    "return noisy_image.__code__",
    "return ().__class__.__bases__[0].__subclasses__()",
    "return type(x0).__mro__",
    "return torch._C",
    "import numpy as np\nreturn np.ctypeslib",
    "import ctypes\nreturn ctypes.CDLL(None)",
    "open('/tmp/x', 'w').write('x')",
    "return eval('x0')",
    "exec('y = 1')",
    "return compile('1', 'x', 'eval')",
    "return globals()",
    "return vars()",
    "return torch.os.system('true')",
    "return torch.sys.modules",
    "import os\nos.kill(1, 9)",
    "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)",
    "import subprocess\nsubprocess.run(['true'])",
    "torch.allclose = lambda *a, **k: True",
    "torch.Tensor.clone = lambda self: self",
    "setattr(torch, 'allclose', None)",
    "breakpoint()",
    "from coursekit.course.bank_part1 import reference_noisy_image\nreturn reference_noisy_image(x0, t, 0, 0)",
    "import coursekit.checks\nreturn coursekit.checks",
    "import coursekit\nreturn coursekit.course.engine.QUESTIONS",
    "from . import secrets",
    "global QUESTIONS\nQUESTIONS = {}",
    "return torch.utils.cpp_extension.load_inline('x', '')",
    "return torch.ops.load_library('x.so')",
    "return torch.hub.load('x', 'y')",
    "return torch.jit.load('x.pt')",
    "return x0.numpy().tofile('x.bin')",
    "return torch.from_file('x.bin')",
    "import threading\nthreading.Thread(target=print).start()",
    "return torch.multiprocessing",
    "import sys\nreturn sys._getframe(1)",
    "import operator\nreturn operator.attrgetter('__globals__')(noisy_image)",
    "gen = (i for i in range(3))\nreturn gen.gi_frame",
    "import pathlib\nreturn pathlib.Path('/etc/passwd').read_text()",
    "import socket\nreturn socket.socket()",
    "import pickle\nreturn pickle.loads(b'')",
    "return 'coursekit.course.engine'",
    "import types\nreturn types.FunctionType",
    "import io\nreturn io.open('x')",
]


@pytest.mark.parametrize("body", REACHING_OUT)
def test_every_way_out_is_flagged_with_its_line(body):
    program = answer(body)
    flags = program.flags_for("noisy_image")
    assert flags, body
    assert all(flag.cell == 1 and flag.text.strip() for flag in flags)
    assert "noisy_image" not in dict(program.chunks).get(1, "")  # a flagged answer is not run at all


@pytest.mark.parametrize(
    "header",
    ["import sys\n\n\n", "import os\n\n\n", "torch_save = __import__('torch').save\n\n\n", "from gc import *\n\n\n"],
)
def test_reaching_out_beside_the_answer_flags_the_answers_of_that_cell(header):
    assert answer("return x0", header).flags_for("noisy_image")


def test_a_helper_that_reaches_out_flags_every_answer_that_uses_it():
    program = read_answers(
        notebook(
            "def noisy_image(x0, t, alpha_bar, noise):\n    helper()\n    return x0\n",
            "def helper():\n    import os\n    return os.getpid()\n\n\n"
            "def signal_to_noise(alpha_bar):\n    return alpha_bar / (1 - alpha_bar)\n",
        ),
        {"noisy_image", "signal_to_noise"},
    )
    assert program.flags_for("noisy_image") and not program.flags_for("signal_to_noise")


ORDINARY = [
    "a = alpha_bar[t].to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))\nreturn a.sqrt() * x0 + (1 - a).sqrt() * noise",
    "import math\nreturn x0 * math.sqrt(2)",
    "import numpy as np\nreturn torch.from_numpy(np.sqrt(x0.numpy()))",
    "from torch import nn\nlayer = nn.Linear(2, 2)\nreturn layer(x0)",
    "import torch.nn.functional as F\nreturn F.silu(x0)",
    "for _ in range(3):\n    x0 = x0.clone()\nreturn x0.add_(1)",
    "model = torch.nn.Linear(2, 2)\nfor p in model.parameters():\n    p.grad = None\nreturn x0",
    "with torch.no_grad():\n    noise.data = noise.data * 2\nreturn noise",
    "def inner(y):\n    return y * 2\nreturn inner(x0)",
    "shape = (x0.shape[0],) + (1,) * (x0.dim() - 1)\nreturn alpha_bar.gather(0, t).view(shape)",
    "out = torch.where(t > 0, x0, noise)\nreturn out.to(dtype=x0.dtype)",
    "return torch.stack([x0, noise]).mean(0)",
    "print(f'shape {x0.shape}')\nreturn x0",
    "try:\n    y = x0 / 0\nexcept ZeroDivisionError:\n    y = x0\nreturn y",
    "values = {'a': 1}\nvalues['b'] = 2\nreturn x0 * len(values)",
]


@pytest.mark.parametrize("body", ORDINARY)
def test_ordinary_answer_code_is_not_flagged(body):
    program = answer(body)
    assert program.flags_for("noisy_image") == [], [str(flag) for flag in program.flags_for("noisy_image")]
    assert "def noisy_image" in dict(program.chunks)[1]


def test_classes_with_private_attributes_of_their_own_are_ordinary():
    program = read_answers(
        notebook(
            "import torch\nfrom torch import nn\n\n\nclass MyResidualBlock(nn.Module):\n"
            "    def __init__(self, a, b, c):\n        super().__init__()\n        self._scale = 2.0\n"
            "        self.conv = nn.Conv2d(a, b, 3, padding=1)\n\n"
            "    @torch.no_grad()\n    def forward(self, x, emb):\n        return self.conv(x) * self._scale\n"
        ),
        {"MyResidualBlock"},
    )
    assert program.flags_for("MyResidualBlock") == []


def test_only_answer_cells_and_only_definitions_are_taken():
    program = read_answers(
        notebook(
            "import os\nos.system('true')",  # not an answer cell: left out, noted
            "import torch\nx = torch.ones(2)\nprint(x)\nnoisy_image(1, 2, 3, 4)\n"
            "def noisy_image(x0, t, alpha_bar, noise):\n    return x0\n",
            "!pip install something\n%matplotlib inline\nSCALE = 2.0\n"
            "def signal_to_noise(alpha_bar):\n    return SCALE * alpha_bar\n",
        ),
        {"noisy_image", "signal_to_noise"},
    )
    code = "\n".join(chunk for _, chunk in program.chunks)
    assert "print" not in code and "noisy_image(1" not in code and "pip" not in code and "os.system" not in code
    assert "x = torch.ones(2)" in code and "SCALE = 2.0" in code
    assert program.left_out_cells == 1
    assert any("os" in flag.reason for flag in program.notes)


def test_the_exercises_as_handed_out_have_nothing_to_note():
    from coursekit.course.authoring import pristine_cells

    for path in sorted((ROOT / "exercises").glob("*.ipynb")):
        exercise = path.name[:2]
        names = {question.name for question in questions_for(exercise)}
        program = read_answers(json.loads(path.read_text()), names, pristine_cells(exercise))
        assert program.notes == [] and all(program.flags_for(name) == [] for name in names), path.name


def test_the_worker_refuses_files_and_imports_even_for_code_the_screen_never_saw():
    """The second layer: the worker's builtins have no open, and its import admits allowed modules only."""
    program = AnswerProgram(
        chunks=[
            (
                1,
                "def betas_from_alpha_bar(alpha_bar):\n    return open('/etc/hostname').read()\n\n"
                "def noise_further(x_s, s, t, alpha_bar, noise):\n    import os\n    return os.getpid()\n\n"
                "def signal_to_noise(alpha_bar):\n    from coursekit.course import engine\n    return engine\n",
            )
        ]
    )
    questions = questions_for("01")
    answers, problems = run_answers(program, questions, Limits(question_seconds=30, total_seconds=120), detect())
    messages = {key: value["outputs"][0] for key, value in answers.items()}
    assert messages["01.q1"]["error"] == "NameError" and "open" in messages["01.q1"]["message"]
    assert messages["01.q2"]["error"] == "ImportError" and "os" in messages["01.q2"]["message"]
    assert messages["01.q3"]["error"] == "ImportError" and "coursekit.course" in messages["01.q3"]["message"]
