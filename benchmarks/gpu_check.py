"""The GPU paths, checked in one command: precisions, exact resume, sampling speed, pre-flight, NCCL.

    python benchmarks/gpu_check.py                 # on the accelerator it finds (CUDA, then MPS, else CPU)
    python benchmarks/gpu_check.py --quick         # a few seconds: what CI runs to prove the script works
    python benchmarks/gpu_check.py --out DIR       # where gpu_check.md and gpu_check.json go (gpu-check/)

It needs torch, scikit-learn (the built-in digits), tqdm and matplotlib, and no install of coursekit:
run it from the repository's root and it imports the working tree's coursekit. It never downloads.

Checks (each one passed, failed or skipped with a reason; the exit code is 1 if any failed):

1. ``precision``: the course U-Net trained for the same steps in fp32, fp16 with the gradient scaler
   (CUDA only: what a Colab T4 uses) and bf16 (where the device supports it): images per second, and
   the mean loss of the last quarter of the steps, which must agree with fp32's within
   ``LOSS_TOLERANCE`` (relative).
2. ``resume``: a run stopped half-way and resumed from its checkpoint against an uninterrupted one,
   per precision. Bit-exact where the backend repeats itself; where two uninterrupted runs already
   differ (non-deterministic GPU kernels), the resumed run may differ by no more than they do.
3. ``sampling``: milliseconds per image of DDPM (1000 steps), DDIM (50) and DPM-Solver++(2M) (10)
   with the shipped model.
4. ``preflight``: the pre-flight estimate of notebook 03's training and 04's sampling against the
   same work timed here (notebook 03's training run at its full settings, and 04's sampling calls:
   the part of the notebooks that depends on the device). Passes within a factor of 2, the accuracy
   the pre-flight report states.
5. ``nccl``: with two or more GPUs, a two-process torchrun (NCCL) against one process with two
   micro-batches, which must end on the same weights up to float rounding. On a CPU (``--quick``)
   the same check runs with gloo, so that the code path is proven before a GPU machine runs it.

The Markdown table is what goes into docs/benchmarks.md; the JSON holds every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the working tree's coursekit, installed or not

import torch  # noqa: E402

from coursekit.course.preflight import NOTEBOOKS, REFERENCE_SECONDS_PER_STEP, estimate_minutes, measure_speed  # noqa: E402
from coursekit.data import load_dataset  # noqa: E402
from coursekit.device import pick_device, supports_native_bf16  # noqa: E402
from coursekit.losses import diffusion_loss  # noqa: E402
from coursekit.runs import generate, load_shipped_model  # noqa: E402
from coursekit.schedules import make_schedule  # noqa: E402
from coursekit.training import CHECKPOINT_NAME, TrainConfig, train  # noqa: E402
from coursekit.unet import UNet  # noqa: E402

LOSS_TOLERANCE = 0.10  # relative difference of a precision's late loss from fp32's
PREFLIGHT_FACTOR = 2.0  # the pre-flight report's stated accuracy
DDP_TOLERANCE = 1e-4  # largest weight difference, relative to the largest weight, two processes vs one


@dataclass
class Sizes:
    """How much work each check does: full on an accelerator, tiny with --quick."""

    train_steps: int  # per precision
    batch_size: int
    sample_images: int  # per sampler
    notebook03_steps: int  # notebook 03's training run (its full setting: 5000 steps on CUDA)
    notebook04_calls: int  # one-image U-Net calls timed for notebook 04's sampling
    ddp_steps: int


FULL = Sizes(train_steps=400, batch_size=128, sample_images=256, notebook03_steps=5000,
             notebook04_calls=256_000, ddp_steps=20)  # fmt: skip
QUICK = Sizes(train_steps=8, batch_size=16, sample_images=4, notebook03_steps=6, notebook04_calls=2_000, ddp_steps=4)


@dataclass
class Check:
    name: str
    status: str  # "passed", "failed" or "skipped"
    summary: str  # one line for the table
    figures: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- the checks


def _config(steps: int, sizes: Sizes, precision: str, device: str, **overrides) -> TrainConfig:
    settings = {"log_every": max(1, steps // 4), "checkpoint_every_steps": None, "checkpoint_every_minutes": None}
    settings |= overrides
    return TrainConfig(
        max_steps=steps,
        batch_size=sizes.batch_size,
        precision=precision,
        device=device,
        seed=0,
        progress=False,
        **settings,
    )


def _train(data, steps: int, sizes: Sizes, precision: str, device: str, run_dir=None, **overrides):
    """Train the course U-Net with the package's defaults; returns (state, seconds)."""
    torch.manual_seed(0)
    model = UNet(in_channels=1)
    loss_fn = diffusion_loss(make_schedule("cosine", 1000))
    config = _config(steps, sizes, precision, device, **overrides)
    _synchronize(device)
    start = time.perf_counter()
    state = train(model, data, loss_fn, config, run_dir=run_dir)
    _synchronize(device)
    return state, time.perf_counter() - start


def precisions_for(device: torch.device) -> list[str]:
    chosen = ["fp32"]
    if device.type == "cuda":
        chosen.append("fp16")
    if supports_native_bf16(device) or device.type == "cpu":
        chosen.append("bf16")
    return chosen


def check_precision(data, sizes: Sizes, device: torch.device) -> Check:
    figures, losses = {}, {}
    for precision in precisions_for(device):
        _train(data, 2, sizes, precision, str(device))  # warm-up: kernels, allocator
        state, seconds = _train(data, sizes.train_steps, sizes, precision, str(device))
        late = [loss for step, loss in state.loss_history if step > 0.75 * sizes.train_steps] or [
            state.loss_history[-1][1]
        ]
        losses[precision] = sum(late) / len(late)
        figures[precision] = {
            "images_per_second": sizes.train_steps * sizes.batch_size / seconds,
            "late_loss": losses[precision],
            "finite": all(math.isfinite(loss) for _, loss in state.loss_history),
        }
    reference = losses["fp32"]
    differences = {p: abs(loss - reference) / reference for p, loss in losses.items()}
    finite = all(f["finite"] for f in figures.values())
    ok = finite and all(d <= LOSS_TOLERANCE for d in differences.values())
    speeds = ", ".join(f"{p} {figures[p]['images_per_second']:.0f} img/s" for p in figures)
    agreement = ", ".join(f"{p} {differences[p]:+.1%}" for p in differences if p != "fp32")
    summary = f"{speeds}; late loss fp32 {reference:.4f}, others vs fp32: {agreement or 'none'}"
    if not finite:
        summary += "; a loss was not finite"
    for precision, difference in differences.items():
        figures[precision]["loss_difference"] = difference
    return Check("precision", "passed" if ok else "failed", summary, figures)


def _weights(run_dir: Path) -> dict:
    payload = torch.load(run_dir / CHECKPOINT_NAME, map_location="cpu", weights_only=False)
    return payload["model"]


def _largest_difference(a: dict, b: dict) -> float:
    return max((a[name].double() - b[name].double()).abs().max().item() for name in a)


def check_resume(data, sizes: Sizes, device: torch.device, workdir: Path) -> Check:
    figures, ok, parts = {}, True, []
    steps = max(4, sizes.train_steps // 4)
    logging = {"log_every": max(1, steps // 4)}  # the same in both halves of the resumed run
    for precision in precisions_for(device):
        runs = {name: workdir / f"resume-{precision}-{name}" for name in ("first", "second", "resumed")}
        for name in ("first", "second"):
            _train(data, steps, sizes, precision, str(device), run_dir=runs[name], **logging)
        _train(data, steps // 2, sizes, precision, str(device), run_dir=runs["resumed"], **logging)  # stopped ...
        _train(data, steps, sizes, precision, str(device), run_dir=runs["resumed"], **logging)  # ... and resumed
        first = _weights(runs["first"])
        repeat = _largest_difference(first, _weights(runs["second"]))
        resumed = _largest_difference(first, _weights(runs["resumed"]))
        passed = resumed <= repeat if repeat > 0 else resumed == 0
        ok = ok and passed
        figures[precision] = {"steps": steps, "repeat_difference": repeat, "resumed_difference": resumed}
        exact = "bit-exact" if resumed == 0 else f"differs by {resumed:.2e} (two fresh runs: {repeat:.2e})"
        parts.append(f"{precision} {exact}")
    return Check(
        "resume",
        "passed" if ok else "failed",
        f"stopped at {steps // 2} of {steps} steps: " + "; ".join(parts),
        figures,
    )


def check_sampling(sizes: Sizes, device: torch.device) -> Check:
    run = load_shipped_model(device=device)
    figures = {}
    for sampler, steps in (("ddpm", 1000), ("ddim", 50), ("dpm++2m", 10)):
        generate(
            run.model,
            run.schedule,
            (1, 16, 16),
            min(2, sizes.sample_images),
            sampler=sampler,
            num_steps=steps,
            progress=False,
        )
        _synchronize(str(device))
        start = time.perf_counter()
        images, _ = generate(
            run.model,
            run.schedule,
            (1, 16, 16),
            sizes.sample_images,
            sampler=sampler,
            num_steps=steps,
            batch_size=sizes.sample_images,
            progress=False,
        )
        _synchronize(str(device))
        seconds = time.perf_counter() - start
        in_range = bool(images.abs().max() <= 1)
        figures[sampler] = {"steps": steps, "ms_per_image": 1000 * seconds / sizes.sample_images, "in_range": in_range}
    ok = all(f["in_range"] for f in figures.values())
    summary = ", ".join(f"{s} {figures[s]['ms_per_image']:.2f} ms/img" for s in figures)
    return Check("sampling", "passed" if ok else "failed", f"{summary} (batches of {sizes.sample_images})", figures)


def check_preflight(data, sizes: Sizes, device: torch.device, judged: bool) -> Check:
    seconds_per_step, seconds_per_call = measure_speed(device)
    estimates, ratio = estimate_minutes(seconds_per_step, seconds_per_call, device.type)
    notebook03 = next(n for n in NOTEBOOKS if n.name == "03_training")
    # 03: the estimate of its training part, for the steps timed here
    steps = sizes.notebook03_steps
    estimated_training = min(60 * notebook03.budget_minutes, steps * seconds_per_step)
    if notebook03.whole_budget_off_cuda and device.type != "cuda":
        estimated_training = steps * seconds_per_step  # timed here for a step count, not the time budget
    _, measured_training = _train(data, steps, sizes, "auto", str(device))
    # 04: its reverse-process calls, as one-image U-Net calls in batches of 250
    run = load_shipped_model(device=device)
    calls = sizes.notebook04_calls
    batch = min(250, calls)
    x = torch.randn(batch, 1, 16, 16, device=device)
    t = torch.full((batch,), 500, device=device)
    _synchronize(str(device))
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(max(1, calls // batch)):
            run.model(x, t)
    _synchronize(str(device))
    measured_calls = time.perf_counter() - start
    estimated_calls = max(1, calls // batch) * batch * seconds_per_call
    factors = {"03_training": measured_training / estimated_training, "04_sampling": measured_calls / estimated_calls}
    within = all(1 / PREFLIGHT_FACTOR <= f <= PREFLIGHT_FACTOR for f in factors.values())
    ok = within or not judged  # QUICK sizes are too small to judge an estimate made for full runs
    figures = {
        "seconds_per_step": seconds_per_step,
        "seconds_per_image_call": seconds_per_call,
        "speed_ratio_to_reference": ratio,
        "reference_seconds_per_step": REFERENCE_SECONDS_PER_STEP,
        "estimated_minutes": estimates,
        "notebook03": {"steps": steps, "estimated_s": estimated_training, "measured_s": measured_training},
        "notebook04": {"calls": calls, "estimated_s": estimated_calls, "measured_s": measured_calls},
        "measured_over_estimated": factors,
    }
    summary = (
        f"03 training ({steps} steps) {measured_training:.1f} s measured vs {estimated_training:.1f} s estimated; "
        f"04 sampling ({calls:,} image calls) {measured_calls:.1f} s vs {estimated_calls:.1f} s; "
        f"speed {ratio:.3g}x the reference machine's time"
    )
    if not judged:
        summary += " (QUICK sizes: reported, not judged)"
    elif not within:
        summary += f"; outside a factor of {PREFLIGHT_FACTOR:g}: update coursekit/preflight.py's reference figures"

    return Check("preflight", "passed" if ok else "failed", summary, figures)


def check_nccl(sizes: Sizes, device: torch.device, workdir: Path) -> Check:
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and gpus < 2:
        return Check("nccl", "skipped", f"{gpus} GPU: a two-process NCCL run needs two")
    if device.type == "mps":
        return Check("nccl", "skipped", "MPS has one device")
    backend = "nccl" if device.type == "cuda" else "gloo"
    run_dir = workdir / "ddp-two"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        __file__,
        "--ddp-worker",
        str(run_dir),
        str(sizes.ddp_steps),
        str(sizes.batch_size),
        device.type,
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    if result.returncode != 0:
        return Check("nccl", "failed", f"torchrun exited {result.returncode}: {result.stderr.strip()[-300:]}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process has: the same order of float sums on the CPU
    try:
        one = workdir / "ddp-one"
        _ddp_run(one, sizes.ddp_steps, sizes.batch_size, device.type, micro_batches=2)
    finally:
        torch.set_num_threads(threads)
    two_weights, one_weights = _weights(run_dir), _weights(one)
    scale = max(w.abs().max().item() for w in one_weights.values())
    difference = _largest_difference(two_weights, one_weights) / scale
    ok = difference <= DDP_TOLERANCE
    summary = (
        f"{backend}, 2 processes vs 1 process with 2 micro-batches after {sizes.ddp_steps} steps: "
        f"weights differ by {difference:.2e} of the largest weight (limit {DDP_TOLERANCE:.0e})"
    )
    return Check("nccl", "passed" if ok else "failed", summary, {"backend": backend, "relative_difference": difference})


def _ddp_run(run_dir: Path, steps: int, batch_size: int, device_type: str, micro_batches: int = 1) -> None:
    """Shared by the torchrun workers and the one-process comparison: digits, fp32, dropout 0."""
    data = load_dataset("digits")
    torch.manual_seed(0)
    model = UNet(in_channels=1)
    config = TrainConfig(
        max_steps=steps,
        batch_size=batch_size,
        micro_batches=micro_batches,
        precision="fp32",
        device=device_type,
        log_every=max(1, steps // 2),
        checkpoint_every_steps=None,
        checkpoint_every_minutes=None,
        progress=False,
    )
    train(model, data, diffusion_loss(make_schedule("cosine", 1000)), config, run_dir=run_dir)


# ----------------------------------------------------------------------------- the report


def _synchronize(device: str) -> None:
    kind = torch.device(device).type if device != "auto" else pick_device().type
    if kind == "cuda":
        torch.cuda.synchronize()
    elif kind == "mps":
        torch.mps.synchronize()


def describe(device: torch.device) -> dict:
    info = {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info |= {
            "gpu": properties.name,
            "gpu_memory_gb": round(properties.total_memory / 2**30, 1),
            "gpus": torch.cuda.device_count(),
            "cuda": torch.version.cuda,
            "bf16": supports_native_bf16(device),
        }
    return info


def markdown(checks: list[Check], info: dict, quick: bool, seconds: float) -> str:
    where = info.get("gpu", info["device"])
    lines = [
        f"### GPU check on {where} ({'QUICK sizes' if quick else 'full sizes'})",
        "",
        f"torch {info['torch']}, Python {info['python']}, {info.get('gpus', 0)} GPU(s); "
        f"{seconds / 60:.1f} minutes in all. Command: `python benchmarks/gpu_check.py{' --quick' if quick else ''}`.",
        "",
        "| check | result | figures |",
        "|---|---|---|",
    ]
    lines += [f"| {c.name} | {c.status} | {c.summary.replace('|', '/')} |" for c in checks]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a device name")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: seconds, to prove the script works")
    parser.add_argument("--out", default="gpu-check", help="folder for gpu_check.md and gpu_check.json")
    parser.add_argument("--budget-minutes", type=float, default=8.0, help="checks not started by then are skipped")
    parser.add_argument("--ddp-worker", nargs=4, metavar=("RUN", "STEPS", "BATCH", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ddp_worker:  # one process of the nccl check, started by torchrun
        run_dir, steps, batch, device_type = args.ddp_worker
        _ddp_run(Path(run_dir), int(steps), int(batch), device_type)
        return 0
    if args.budget_minutes <= 0:
        parser.error(f"--budget-minutes must be positive, got {args.budget_minutes}")

    device = pick_device(args.device)
    sizes = QUICK if args.quick else FULL
    if not args.quick and device.type == "cpu":
        print("no accelerator found: running the full sizes on the CPU takes long; --quick is the CPU check")
    info = describe(device)
    print(f"GPU check on {info.get('gpu', device)} ({'quick' if args.quick else 'full'} sizes)", flush=True)
    data = load_dataset("digits")
    started = time.perf_counter()
    checks: list[Check] = []
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        plan = [
            ("precision", lambda: check_precision(data, sizes, device)),
            ("resume", lambda: check_resume(data, sizes, device, workdir)),
            ("sampling", lambda: check_sampling(sizes, device)),
            ("preflight", lambda: check_preflight(data, sizes, device, judged=not args.quick)),
            ("nccl", lambda: check_nccl(sizes, device, workdir)),
        ]
        for name, run_check in plan:
            if time.perf_counter() - started > 60 * args.budget_minutes:
                checks.append(Check(name, "skipped", f"the {args.budget_minutes:g}-minute budget was spent"))
                continue
            check_started = time.perf_counter()
            try:
                check = run_check()
            except Exception as error:  # one broken check must not hide the others' figures
                check = Check(name, "failed", f"{type(error).__name__}: {error}")
            check.figures["seconds"] = time.perf_counter() - check_started
            checks.append(check)
            print(f"{check.status:>7}  {check.name}: {check.summary}", flush=True)
    seconds = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"machine": info, "quick": args.quick, "seconds": seconds, "checks": [asdict(c) for c in checks]}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (out / "gpu_check.md").write_text(markdown(checks, info, args.quick, seconds))
    failed = [c.name for c in checks if c.status == "failed"]
    print(
        f"\nwrote {out / 'gpu_check.md'} and {out / 'gpu_check.json'}; "
        + (f"FAILED: {', '.join(failed)}" if failed else "no check failed")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
