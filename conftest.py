"""Settings for the whole test run, notebooks included (their kernels inherit the environment)."""

import os

os.environ["COURSEKIT_QUICK"] = "1"  # notebooks run their tiny settings under test
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # quiet a debugger warning in kernels
os.environ["COURSEKIT_STRICT"] = "1"  # a failing check() in a solution notebook fails the build
