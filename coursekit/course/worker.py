"""The code that runs inside a submission's sandbox: the learner's answers called on the grader's cases.

    python -m coursekit.course.worker < job.json      (started by the runner, never by hand)

Order matters, and is the point of this module:

1. Before any learner code exists in this process, it keeps the channel to the grader (its standard
   output) for itself and points file descriptors 1 and 2 at /dev/null, so learner prints cannot reach
   the channel; it imports torch and the question bank and builds every case.
2. It runs the screened answer code (see ``screen``) in a namespace of its own, whose builtins have no
   ``open``, ``eval``, ``getattr`` and the like, and whose ``import`` admits only the allowed modules.
3. It calls the learner's functions on the cases, one question at a time, and sends each question's
   outputs down the channel as soon as they exist (so a later crash loses nothing already sent).

The grader compares the outputs with the reference in its own process; nothing sent from here says
whether an answer is right.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import struct
import sys

UNSAFE_BUILTINS = {
    "open", "eval", "exec", "compile", "globals", "locals", "vars", "getattr", "setattr", "delattr",
    "breakpoint", "input", "help", "exit", "quit", "__loader__", "__spec__",
}  # fmt: skip
PREAMBLE = "import math\nimport torch\nimport torch.nn.functional as F\nfrom torch import nn\n"


class CappedText(io.TextIOBase):
    """Where the learner's prints go: the first few kilobytes are kept for the feedback, the rest dropped."""

    def __init__(self, limit: int = 4000):
        self.parts, self.size, self.limit = [], 0, limit

    def write(self, text: str) -> int:
        if self.size < self.limit:
            kept = str(text)[: self.limit - self.size]
            self.parts.append(kept)
            self.size += len(kept)
        return len(text)

    def text(self) -> str:
        return "".join(self.parts)


def _open_channel():
    """Keep standard output as the channel; fds 1 and 2 go to /dev/null from now on."""
    channel = os.fdopen(os.dup(1), "wb", buffering=0)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os.close(null)
    return channel


def main() -> int:
    channel = _open_channel()
    job = json.loads(sys.stdin.read())
    sys.stdin.close()
    printed = CappedText()
    sys.stdout = sys.stderr = printed

    import torch  # noqa: I001  (imported after the channel is set up, before any learner code)

    from coursekit.course.engine import get_question, run_implementation, to_plain

    torch.set_num_threads(1)
    save, pack, write = torch.save, struct.pack, channel.write

    def send(message: dict) -> None:
        buffer = io.BytesIO()
        save(message, buffer)
        data = buffer.getvalue()
        write(pack(">Q", len(data)) + data)

    questions = [get_question(question_id) for question_id in job["questions"]]
    case_counts = {question.id: len(question.cases()) for question in questions}  # before any learner code

    namespace = {"__builtins__": _safe_builtins(), "__name__": "__answers__"}
    exec(compile(PREAMBLE, "<preamble>", "exec"), namespace)
    problems = []
    for cell, code in job["chunks"]:
        try:
            exec(compile(code, f"<answer cell {cell}>", "exec"), namespace)
        except BaseException as error:  # noqa: BLE001  (a broken cell costs its own definitions only)
            problems.append(f"code cell {cell} raised {type(error).__name__}: {error}"[:300])
    send({"kind": "ready", "problems": problems})
    for question in questions:
        send({"kind": "start", "question": question.id})
        implementation = namespace.get(question.name)
        if implementation is None:
            send({"kind": "result", "question": question.id, "missing": True})
            continue
        try:
            outputs = [to_plain(output) for output in run_implementation(question, implementation)]
        except BaseException as error:  # noqa: BLE001  (SystemExit and the like, raised by the answer)
            outputs = [to_plain(error)] * case_counts[question.id]
        send({"kind": "result", "question": question.id, "outputs": outputs})
    send({"kind": "done", "printed": printed.text()})
    channel.close()
    os._exit(0)  # no interpreter shutdown: nothing the learner registered runs after the last message


def _safe_builtins() -> dict:
    from coursekit.course.screen import ALLOWED_IMPORTS, COURSE_MACHINERY

    real_import = builtins.__import__

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level or name.split(".")[0] not in ALLOWED_IMPORTS or name.startswith(COURSE_MACHINERY):
            raise ImportError(f"answers may not import {name}")
        return real_import(name, globals, locals, fromlist, level)

    safe = {name: value for name, value in vars(builtins).items() if name not in UNSAFE_BUILTINS}
    safe["__import__"] = guarded_import
    return safe


if __name__ == "__main__":
    sys.exit(main())
