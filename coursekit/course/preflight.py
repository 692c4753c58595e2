"""Is this machine ready for the course? A pre-flight check for workshops (notebook 00, ``coursekit preflight``).

Run it the day before a workshop, on every laptop: it says what is there (Python, torch, the device,
free memory and disk), whether the built-in data and the shipped models load, whether sliders will
render, and how long each notebook should take here, from a short measurement of this machine's speed
scaled against the machine the course's run times were measured on.
"""

from __future__ import annotations

import importlib.util
import math
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from coursekit.device import describe_device, in_colab, pick_device

MIN_PYTHON = (3, 10)
MIN_TORCH = (2, 1)
MIN_FREE_MEMORY_GB = 2.0
MIN_FREE_DISK_GB = 2.0


@dataclass
class Notebook:
    """What a notebook costs on the reference machine, split into what scales with speed and what does not."""

    name: str
    scaled_seconds: float  # everything but training under a time budget, on the reference machine
    training_steps: int = 0  # steps of a training run capped by ``budget_minutes`` (0: none)
    budget_minutes: float = 0.0  # that run's time limit
    step_cost: float = 1.0  # one of its steps against a step of the course U-Net on 16x16 digits
    whole_budget_off_cuda: bool = False  # without CUDA it trains for the whole budget, whatever the steps
    whole_budget: bool = False  # it trains for the whole budget on every device (06, 09: equal minutes, two models)


# Full runs on the reference machine (REFERENCE_MACHINE), `python tools/run_notebooks.py`.
NOTEBOOKS = [
    Notebook("00_intuition", 12),
    Notebook("01_forward_process", 6),
    Notebook("02_unet", 3),
    Notebook("03_training", 50, training_steps=5000, budget_minutes=4, whole_budget_off_cuda=True),
    Notebook("04_reverse_process", 184),
    Notebook("05_fewer_steps", 325),
    Notebook("06_flow_matching", 120, budget_minutes=10, whole_budget=True),
    Notebook("07_one_step", 61, training_steps=2400, budget_minutes=math.inf, step_cost=2.6),  # no time cap
    Notebook("08_control", 76, training_steps=4000, budget_minutes=8),
    Notebook("09_latent_diffusion", 148, budget_minutes=6, whole_budget=True),  # latent and pixels, 3 minutes each
    Notebook("10_text_prompt", 798),  # the three parts train by step counts (800, 1,500, 3,000)
    Notebook("11_editing", 514),
    Notebook("12_road_to_diffusers", 60, training_steps=3000, budget_minutes=4, step_cost=1.5),
]
REFERENCE_MACHINE = "2-core x86_64 CPU (AVX-512), torch 2.14.1, 2026-11-25"
REFERENCE_SECONDS_PER_STEP = 0.104  # one training step of the course U-Net, batch 128, fp32 (measure_speed)
REFERENCE_SECONDS_PER_IMAGE_CALL = 0.00029  # one U-Net call on one image, in batches of 250 (measure_speed)


@dataclass
class Check:
    """One line of the report."""

    name: str
    ok: bool  # False: something to fix before the workshop
    detail: str


@dataclass
class PreflightReport:
    checks: list[Check] = field(default_factory=list)
    estimates: dict[str, float] = field(default_factory=dict)  # notebook -> estimated minutes here
    speed_ratio: float = float("nan")  # this machine's time / the reference machine's time

    @property
    def ready(self) -> bool:
        return all(check.ok for check in self.checks)

    def summary(self) -> str:
        lines = ["Pre-flight check", ""]
        lines += [f"{'ok  ' if c.ok else 'FIX '} {c.name:<14} {c.detail}" for c in self.checks]
        if self.estimates:
            lines += ["", f"Estimated run times here ({self.speed_ratio:.2g}x the reference machine's time):"]
            lines += [f"     {name:<22} ~{minutes:.0f} min" if minutes >= 1 else f"     {name:<22} <1 min"
                      for name, minutes in self.estimates.items()]  # fmt: skip
            lines.append("     (rough estimates, good to a factor of about 2)")
        lines += ["", "Ready for the course." if self.ready else "Fix the lines marked FIX before the workshop."]
        return "\n".join(lines)

    def _repr_pretty_(self, printer, cycle) -> None:  # shown as text in a notebook
        printer.text(self.summary())


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def free_memory_gb() -> float | None:
    """Memory available to new programs, in GB; None where it cannot be read."""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():  # Linux, Colab
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1e6
    try:  # macOS and other Unixes
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9
    except (AttributeError, ValueError, OSError):
        return None


def widgets_check() -> Check:
    """Will the sliders render? They need ipywidgets in the kernel and a widget front end."""
    if importlib.util.find_spec("ipywidgets") is None:
        return Check("widgets", False, "ipywidgets is missing: pip install ipywidgets (sliders show as still images)")
    import ipywidgets

    if in_colab():
        return Check("widgets", True, f"ipywidgets {ipywidgets.__version__}; Colab renders them")
    front_ends = [name for name in ("jupyterlab_widgets", "widgetsnbextension") if importlib.util.find_spec(name)]
    if not front_ends:
        return Check(
            "widgets", False,
            f"ipywidgets {ipywidgets.__version__} but no front end: pip install jupyterlab_widgets "
            "(sliders show as still images until then)",
        )  # fmt: skip
    return Check("widgets", True, f"ipywidgets {ipywidgets.__version__} with {', '.join(front_ends)}")


def measure_speed(device: torch.device, steps: int = 3) -> tuple[float, float]:
    """Seconds per training step (batch 128, fp32) and per one-image U-Net call, measured here."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state as it was
        return _measure_speed(device, steps)


def _measure_speed(device: torch.device, steps: int) -> tuple[float, float]:
    from coursekit.losses import noise_prediction_loss
    from coursekit.schedules import make_schedule
    from coursekit.unet import UNet

    torch.manual_seed(0)
    model = UNet(in_channels=1).to(device)
    schedule = make_schedule("cosine", 1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.rand(128, 1, 16, 16, device=device) * 2 - 1

    def train_step():
        loss = noise_prediction_loss(model, images, schedule)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def sample_call():
        with torch.no_grad():
            model(torch.randn(250, 1, 16, 16, device=device), torch.full((250,), 500, device=device))

    return _seconds(train_step, steps, device), _seconds(sample_call, steps, device) / 250


def _seconds(function, repeats: int, device: torch.device) -> float:
    function()  # warm-up
    timings = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        function()
        _synchronize(device)  # GPUs run asynchronously: wait for the work, not just its launch
        timings.append(time.perf_counter() - start)
    return min(timings)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def estimate_minutes(
    seconds_per_step: float, seconds_per_image_call: float, device_type: str = "cpu"
) -> tuple[dict[str, float], float]:
    """Each notebook's minutes here, and this machine's speed ratio to the reference machine."""
    ratio = math.sqrt(
        seconds_per_step / REFERENCE_SECONDS_PER_STEP * seconds_per_image_call / REFERENCE_SECONDS_PER_IMAGE_CALL
    )
    estimates = {}
    for notebook in NOTEBOOKS:
        steps_seconds = notebook.training_steps * notebook.step_cost * seconds_per_step
        training = min(60 * notebook.budget_minutes, steps_seconds)
        if notebook.whole_budget_off_cuda:  # notebook 03: a time budget on CPUs and Macs, a step count on CUDA
            training = steps_seconds if device_type == "cuda" else 60 * notebook.budget_minutes
        if notebook.whole_budget:
            training = 60 * notebook.budget_minutes
        estimates[notebook.name] = (notebook.scaled_seconds * ratio + training) / 60
    return estimates, ratio


def run_preflight(device: str | torch.device | None = None, measure: bool = True) -> PreflightReport:
    """Check this machine; ``measure=False`` skips the speed measurement (a few seconds).

    Building models to load and to time draws random numbers: the caller's random state is restored.
    """
    with torch.random.fork_rng(devices=[]):
        return _run_preflight(device, measure)


def _run_preflight(device: str | torch.device | None, measure: bool) -> PreflightReport:
    report = PreflightReport()
    python_ok = sys.version_info[:2] >= MIN_PYTHON
    report.checks.append(Check("python", python_ok, f"{platform.python_version()} (3.10 or newer needed)"))
    torch_ok = _version_tuple(torch.__version__) >= MIN_TORCH
    report.checks.append(Check("torch", torch_ok, f"{torch.__version__} (2.1 or newer needed)"))
    chosen = pick_device(device)
    hint = ""
    if chosen.type == "cpu" and in_colab():
        hint = "; for a GPU: Runtime > Change runtime type > T4 GPU"
    report.checks.append(Check("device", True, describe_device(chosen) + hint))
    memory = free_memory_gb()
    if memory is None:
        report.checks.append(Check("memory", True, "free memory unknown on this system"))
    else:
        report.checks.append(
            Check("memory", memory >= MIN_FREE_MEMORY_GB, f"{memory:.1f} GB free ({MIN_FREE_MEMORY_GB:.0f} GB needed)")
        )
    disk = shutil.disk_usage(Path.cwd()).free / 1e9
    report.checks.append(
        Check("disk", disk >= MIN_FREE_DISK_GB, f"{disk:.1f} GB free here ({MIN_FREE_DISK_GB:.0f} GB needed)")
    )
    report.checks.append(_data_check())
    report.checks.append(_shipped_models_check())
    report.checks.append(widgets_check())
    report.checks.append(_diffusers_check())
    if measure:
        seconds_per_step, seconds_per_image_call = measure_speed(chosen)
        report.estimates, report.speed_ratio = estimate_minutes(seconds_per_step, seconds_per_image_call, chosen.type)
    return report


def _data_check() -> Check:
    from coursekit.data import load_dataset
    from coursekit.glyphs import make_glyphs

    try:
        digits = load_dataset("digits")
    except Exception as error:  # anything that stops the built-in data is worth a FIX line
        return Check("data", False, f"the built-in digits do not load ({error}); reinstall scikit-learn")
    try:
        make_glyphs(4)
    except Exception as error:  # the glyphs are drawn with matplotlib's own fonts
        return Check("data", False, f"the built-in glyphs cannot be drawn ({error}); reinstall matplotlib")
    return Check("data", True, f"built-in digits ({len(digits)} images) and glyphs load offline")


def _shipped_models_check() -> Check:
    from coursekit.attributes import load_attribute_reader
    from coursekit.runs import load_shipped_model
    from coursekit.text_to_image import SHIPPED_NAME, load_text_to_image

    try:
        for options in ({}, {"conditional": True}, {"one_step": True}):
            load_shipped_model(device="cpu", **options)
        load_text_to_image(SHIPPED_NAME, device="cpu")
        load_attribute_reader()
    except Exception as error:  # a damaged install
        return Check("models", False, f"a shipped model does not load ({error}); reinstall coursekit")
    return Check("models", True, "the five shipped models load (for skipping the training)")


def _diffusers_check() -> Check:
    """Only the closing notebook 12 needs diffusers: its absence is a note, not a FIX."""
    if importlib.util.find_spec("diffusers") is None:
        return Check("diffusers", True, "not installed; only notebook 12 needs it: pip install diffusers")
    import diffusers

    return Check("diffusers", True, f"{diffusers.__version__} (for notebook 12)")
