"""Helpers shared by the benchmarks: timing and a one-line description of the machine."""

from __future__ import annotations

import platform
import statistics
import time

import torch


def machine() -> str:
    from coursekit.device import describe_device

    return (
        f"{platform.processor() or platform.machine()}, {describe_device()}, torch {torch.__version__}, "
        f"python {platform.python_version()}"
    )


def median_seconds(function, repeats: int = 5, warmup: int = 2) -> float:
    """Median wall time of ``function()`` over ``repeats`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        function()
    timings = []
    for _ in range(repeats):
        _synchronize()
        start = time.perf_counter()
        function()
        _synchronize()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
