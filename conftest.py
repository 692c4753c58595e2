"""Settings for the whole test run, notebooks included (their kernels inherit the environment)."""

import os

os.environ["COURSEKIT_QUICK"] = "1"  # notebooks run their tiny settings under test
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # quiet a debugger warning in kernels
os.environ["COURSEKIT_STRICT"] = "1"  # a failing check() in a solution notebook fails the build

# One yardstick classifier for the whole run (it takes about 12 s to train on 2 cores): every test and
# notebook that does not name a cache of its own shares it. Tests of the cache pass their own folder.
if "COURSEKIT_YARDSTICK_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _yardstick_cache = tempfile.mkdtemp(prefix="coursekit-yardstick-")
    os.environ["COURSEKIT_YARDSTICK_CACHE"] = _yardstick_cache
    atexit.register(shutil.rmtree, _yardstick_cache, ignore_errors=True)
