"""What the grader takes from a submission, and what it refuses to run (read here, never executed).

The grader never runs a submitted notebook as it stands. From its code cells it takes only the
**answer cells**, those that define a function or class the exercise asks for, and from those only
imports, definitions and plain assignments; prints, test calls and every other cell are left out.
Everything it takes is read first: code that reaches for the machinery around it (modules, frames,
the garbage collector, native code, files, other programs, coursekit's own answers) is not run at
all, and its question gets 0 automatic points marked "needs a human look", with the line quoted.

Nothing here imports torch: the screen is plain ``ast`` and runs in the grader's own process.
"""

from __future__ import annotations

import ast
import hashlib
import re
from dataclasses import dataclass, field

# Lines that only make sense in Colab or a terminal (``!pip install``, ``%matplotlib``, drive.mount).
SHELL_OR_COLAB = re.compile(r"^\s*([!%]|.*google\.colab|.*drive\.mount)")

# What an answer may import: the maths it needs, and the diffusion pipeline (never the course machinery).
ALLOWED_IMPORTS = {
    "__future__",
    "math",
    "cmath",
    "numbers",
    "random",
    "statistics",
    "functools",
    "itertools",
    "collections",
    "dataclasses",
    "typing",
    "numpy",
    "torch",
    "torchvision",
    "coursekit",
}
COURSE_MACHINERY = ("coursekit.course", "coursekit.checks", "coursekit.grading", "coursekit.cli")

# Names and attributes that reach outside the answer: the interpreter, the operating system, files,
# native code, other processes, and the grader's own questions and references.
REACHES_OUT = {
    # the interpreter and its introspection
    "sys", "builtins", "importlib", "__import__", "gc", "inspect", "types", "weakref", "traceback",
    "eval", "exec", "compile", "globals", "locals", "vars", "getattr", "setattr", "delattr", "breakpoint",
    "input", "exit", "quit", "help", "code", "codeop", "runpy", "pkgutil", "zipimport", "site", "sysconfig",
    "modules", "_getframe", "f_back", "f_globals", "f_locals", "f_builtins", "f_code", "tb_frame", "tb_next",
    "gi_frame", "cr_frame", "ag_frame", "atexit", "faulthandler", "operator", "attrgetter", "methodcaller",
    # the operating system, files, processes, the network, native code
    "os", "posix", "nt", "subprocess", "signal", "socket", "shutil", "pathlib", "Path", "tempfile", "io",
    "open", "threading", "_thread", "multiprocessing", "concurrent", "asyncio", "resource", "pty", "fcntl",
    "mmap", "ctypes", "cffi", "ctypeslib", "pickle", "marshal", "shelve", "dill", "environ", "getenv",
    "system", "popen", "spawn", "fork", "kill", "killpg", "urllib", "http", "requests",
    # torch and numpy doors to files, native code and other processes
    "save", "savez", "savetxt", "load", "loadtxt", "genfromtxt", "fromfile", "tofile", "memmap",
    "from_file", "serialization", "hub", "jit", "ops", "library", "classes", "cpp_extension", "utils",
    "distributed", "package", "DataSource",
    # the course machinery: the grader's questions and references
    "checks", "grading", "course", "engine", "QUESTIONS", "get_question", "expected_outputs",
    "run_check", "run_implementation", "bank_part1", "bank_part2",
}  # fmt: skip
SAFE_DUNDERS = {"__init__", "__call__", "__future__"}


@dataclass
class Flag:
    """One line the grader will not run, and why."""

    cell: int  # code cell number in the submission, from 1
    line: int  # line within that cell, from 1
    text: str  # the line itself
    reason: str

    def __str__(self) -> str:
        return f"code cell {self.cell}, line {self.line}: `{self.text.strip()[:120]}` ({self.reason})"


@dataclass
class Definition:
    name: str
    cell: int
    source: str  # the definition as it will run
    names: set[str]  # names it takes from outside itself
    flags: list[Flag]


@dataclass
class AnswerProgram:
    """The part of a submission the grader runs, and what it learned while reading it."""

    chunks: list[tuple[int, str]] = field(default_factory=list)  # (cell, code) in notebook order, screened
    definitions: dict[str, Definition] = field(default_factory=dict)  # the last definition of each name
    cell_flags: dict[int, list[Flag]] = field(default_factory=dict)  # flagged imports/assignments per cell
    syntax_errors: dict[str, str] = field(default_factory=dict)  # question name -> message
    notes: list[Flag] = field(default_factory=list)  # reaching-out code outside the answers (not run)
    left_out_cells: int = 0  # code cells that are not answer cells

    def flags_for(self, name: str) -> list[Flag]:
        """Every flagged line the answer ``name`` depends on: its own, its helpers', its cells'."""
        flags, seen, pending = [], set(), [name]
        while pending:
            current = pending.pop()
            definition = self.definitions.get(current)
            if current in seen or definition is None:
                continue
            seen.add(current)
            flags += definition.flags + self.cell_flags.get(definition.cell, [])
            pending += [other for other in definition.names if other in self.definitions]
        return merge_by_line(flags)

    def names_for(self, name: str) -> set[str] | None:
        """The names ``name`` uses, its helpers' included; None when there is no such definition."""
        if name not in self.definitions:
            return None
        names, seen, pending = set(), set(), [name]
        while pending:
            current = pending.pop()
            if current in seen or current not in self.definitions:
                continue
            seen.add(current)
            names |= self.definitions[current].names
            pending += list(self.definitions[current].names)
        return names


def cell_sources(notebook: dict) -> list[str]:
    """The source of every code cell, as one string each."""
    sources = []
    for cell in notebook.get("cells", []):
        if isinstance(cell, dict) and cell.get("cell_type") == "code":
            source = cell.get("source", "")
            sources.append("".join(map(str, source)) if isinstance(source, list) else str(source))
    return sources


def without_shell_lines(source: str) -> str:
    """Blank out shell escapes, magics and Colab-only lines, keeping line numbers."""
    return "\n".join("" if SHELL_OR_COLAB.match(line) else line for line in source.splitlines())


def referenced_names(definition: ast.AST) -> set[str]:
    """Names a definition takes from outside itself: free variables, attributes and imported modules.

    A local variable that happens to share a name (``snr = ...``) does not count.
    """
    local = _local_names(definition)
    names = set()
    for node in ast.walk(definition):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in local:
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.update(alias.name for alias in node.names)
            names.add((node.module or "").split(".")[0])
    return names


def _local_names(definition: ast.AST) -> set[str]:
    local = set()
    for node in ast.walk(definition):
        if isinstance(node, ast.arg):
            local.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            local.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)) and node is not definition:
            local.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return local


def reaching_out(tree: ast.AST, lines: list[str], cell: int) -> list[Flag]:
    """Every line of ``tree`` that reaches outside the answer (see REACHES_OUT), with the reason."""
    flags = []

    def flag(node: ast.AST, reason: str) -> None:
        line = getattr(node, "lineno", 1)
        flags.append(Flag(cell, line, lines[line - 1] if 0 < line <= len(lines) else "", reason))

    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            _check_name(node.id, node, flag)
        elif isinstance(node, ast.Attribute):
            _check_attribute(node, flag)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            _check_import(node, flag)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            flag(node, f"{type(node).__name__.lower()} changes names outside the function")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "coursekit" in node.value:
            flag(node, "names coursekit in a string")
    _check_attribute_stores(tree, set(), flag)
    return merge_by_line(flags)


def merge_by_line(flags: list[Flag]) -> list[Flag]:
    """One flag per line, its reasons joined."""
    merged: dict[tuple[int, int], Flag] = {}
    for flag in flags:
        key = (flag.cell, flag.line)
        if key not in merged:
            merged[key] = Flag(flag.cell, flag.line, flag.text, flag.reason)
        elif flag.reason not in merged[key].reason.split("; "):
            merged[key].reason += f"; {flag.reason}"
    return sorted(merged.values(), key=lambda flag: (flag.cell, flag.line))


def _check_attribute_stores(node: ast.AST, local: set[str], flag) -> None:
    """Flag ``torch.allclose = ...`` and the like: attribute stores on anything but a local or self."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        local = local | _local_names(node)
    targets = []
    if isinstance(node, (ast.Assign, ast.Delete)):
        targets = node.targets
    elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
        targets = [node.target]
    for target in targets:
        root = _attribute_root(target)
        if root is not None and root not in local and root != "self":
            flag(node, f"changes {root}'s attributes from outside (patching a module or class)")
    for child in ast.iter_child_nodes(node):
        _check_attribute_stores(child, local, flag)


def _check_name(name: str, node: ast.AST, flag) -> None:
    if name in REACHES_OUT:
        flag(node, f"uses {name}")
    elif name.startswith("reference_"):
        flag(node, "uses coursekit's reference answer")
    elif name.startswith("__") and name.endswith("__") and name not in SAFE_DUNDERS:
        flag(node, f"uses {name}")


def _check_attribute(node: ast.Attribute, flag) -> None:
    attr = node.attr
    if attr in REACHES_OUT:
        flag(node, f"uses .{attr}")
    elif attr.startswith("reference"):
        flag(node, "uses coursekit's reference answer")
    elif attr.startswith("__") and attr.endswith("__"):
        if attr not in SAFE_DUNDERS:
            flag(node, f"uses .{attr}")
    elif attr.startswith("_") and not (isinstance(node.value, ast.Name) and node.value.id == "self"):
        flag(node, f"uses the private attribute .{attr}")


def _check_import(node: ast.Import | ast.ImportFrom, flag) -> None:
    modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
    if isinstance(node, ast.ImportFrom) and node.level:
        flag(node, "a relative import")
        return
    for module in modules:
        root = module.split(".")[0]
        if root not in ALLOWED_IMPORTS or any(part in REACHES_OUT for part in module.split(".")[1:]):
            flag(node, f"imports {module}, which answers may not use")
        elif module.startswith(COURSE_MACHINERY):
            flag(node, f"imports {module}, the course's own answers")
    if isinstance(node, ast.ImportFrom):
        for alias in node.names:
            _check_name(alias.name, node, flag)


def _attribute_root(target: ast.AST) -> str | None:
    """``torch`` for ``torch.Tensor.clone = ...``; None when the target is not an attribute."""
    if not isinstance(target, ast.Attribute):
        if isinstance(target, (ast.Tuple, ast.List)):
            roots = [_attribute_root(element) for element in target.elts]
            return next((root for root in roots if root is not None), None)
        return None
    value = target.value
    while isinstance(value, (ast.Attribute, ast.Subscript)):
        value = value.value
    return value.id if isinstance(value, ast.Name) else "an expression"


def _definition_start(node: ast.AST) -> int:
    return min([node.lineno] + [decorator.lineno for decorator in getattr(node, "decorator_list", [])])


def _keeps(node: ast.stmt) -> bool:
    """Imports, definitions and plain ``name = value`` assignments; nothing else runs."""
    if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return True
    if isinstance(node, ast.Assign):
        return all(isinstance(target, ast.Name) for target in node.targets)
    return isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None


def cell_digest(source: str) -> str:
    """A fingerprint of a code cell's text, blind to trailing spaces and line endings."""
    lines = source.replace("\r\n", "\n").strip().splitlines()
    text = "\n".join(line.rstrip() for line in lines if not line.strip().startswith("# NBVAL_"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_answers(notebook: dict, answer_names: set[str], pristine: set[str] = frozenset()) -> AnswerProgram:
    """Take the answer cells of ``notebook`` (those defining one of ``answer_names``) and screen them.

    ``pristine`` holds the digests of the handed-out exercise's cells: those are not worth a note.
    """
    program = AnswerProgram()
    for cell, raw in enumerate(cell_sources(notebook), start=1):
        source = without_shell_lines(raw)
        lines = source.splitlines()
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError) as error:
            named = {name for name in answer_names if re.search(rf"^\s*(def|class)\s+{re.escape(name)}\b", raw, re.M)}
            line = getattr(error, "lineno", None)
            for name in named:
                program.syntax_errors[name] = (
                    f"code cell {cell} has a syntax error{f' on line {line}' if line else ''}: "
                    f"{getattr(error, 'msg', error)}"
                )
            program.left_out_cells += not named
            continue
        defined_here = {
            node.name
            for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name in answer_names
        }
        if not defined_here:
            program.left_out_cells += 1
            if cell_digest(raw) not in pristine:
                program.notes += reaching_out(tree, lines, cell)
            continue
        for name in defined_here:
            program.syntax_errors.pop(name, None)
        kept = []
        for node in tree.body:
            if not _keeps(node):
                program.notes += reaching_out(node, lines, cell)
                continue
            flags = reaching_out(node, lines, cell)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                program.definitions[node.name] = Definition(
                    node.name, cell, ast.unparse(node), referenced_names(node), flags
                )
                if not flags:
                    kept.append(node)
            elif flags:  # an import or assignment that reaches out: its cell's answers need a look
                program.cell_flags.setdefault(cell, []).extend(flags)
            else:
                kept.append(node)
                if isinstance(node, (ast.Assign, ast.AnnAssign)):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    for target in targets:
                        program.definitions[target.id] = Definition(
                            target.id, cell, ast.unparse(node), referenced_names(node.value), []
                        )
        if kept:
            program.chunks.append((cell, "\n\n".join(ast.unparse(node) for node in kept)))
    return program
