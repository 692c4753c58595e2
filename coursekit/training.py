"""The training loop: guess the noise, compare, backpropagate, repeat (notebook 03).

The loop knows nothing about diffusion: it takes a model, data and a ``loss_fn(model, batch,
generator) -> scalar``. Around the four lines that matter it adds what a real run needs: the
device, mixed precision, an EMA of the weights, gradient clipping, learning-rate warm-up, a step
or time budget, a progress bar, atomic checkpoints that resume exactly, and a stop on NaN. Under
``torchrun`` it trains on several GPUs or processes at once (``coursekit.distributed``).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from coursekit import distributed as distributed_training
from coursekit.checkpoints import CheckpointError, load_checkpoint, load_model_weights, save_checkpoint
from coursekit.device import pick_device, supports_native_bf16
from coursekit.progress import progress_bar

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CHECKPOINT_NAME = "checkpoint.pt"

LossFunction = Callable[[nn.Module, tuple, torch.Generator], torch.Tensor]


@dataclass
class TrainConfig:
    """Settings of one training run. Budgets count the whole run, across resumes."""

    max_steps: int | None = 2000  # stop after this many optimizer steps (None: no step limit)
    max_minutes: float | None = None  # stop after this much training time (None: no time limit)
    batch_size: int = 128  # images per step, over all processes when training with torchrun
    micro_batches: int = 1  # split each batch into this many parts, adding up their gradients (less memory)
    learning_rate: float = 2e-3  # AdamW learning rate after warm-up
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 100  # learning rate rises linearly from 0 over this many steps
    grad_clip: float | None = 1.0  # clip the gradient norm to this (None: no clipping)
    ema_decay: float = 0.999  # decay of the exponential moving average of the weights
    precision: str = "auto"  # "auto", "fp32", "bf16" or "fp16" (fp16 needs CUDA)
    device: str = "auto"  # "auto" (cuda, then mps, then cpu), or a device name
    seed: int = 0  # seeds batches, noise and dropout: the same seed gives the same run
    checkpoint_every_steps: int | None = 1000  # also save every this many steps
    checkpoint_every_minutes: float | None = 10.0  # and every this many minutes
    log_every: int = 25  # steps between loss records (and NaN checks)
    callback_every: int | None = None  # steps between callback calls (None: only at the end)
    progress: bool = True  # show a tqdm progress bar

    def __post_init__(self) -> None:
        if self.max_steps is None and self.max_minutes is None:
            raise ValueError("give a budget: max_steps, max_minutes or both")
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {PRECISIONS}")
        if self.batch_size < 1 or self.learning_rate <= 0 or self.log_every < 1 or self.micro_batches < 1:
            raise ValueError("batch_size, micro_batches, learning_rate and log_every must be positive")
        if self.batch_size % self.micro_batches:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of micro_batches {self.micro_batches}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")


@dataclass
class TrainState:
    """What the loop has done so far; handed to the callback."""

    step: int = 0  # optimizer steps taken
    elapsed_seconds: float = 0.0  # training time, across resumes
    loss_history: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss)
    images_per_second: float = 0.0  # throughput over the last log interval
    precision: str = "fp32"  # the precision actually used
    model: nn.Module | None = None  # the model being trained
    ema_model: nn.Module | None = None  # its moving average: use it for sampling


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite."""


class EMA:
    """An exponential moving average of a model's weights: ``ema = d * ema + (1 - d) * weights``.

    The decay warms up as ``min(decay, (1 + step) / (10 + step))`` so that short runs are not
    dominated by the random initial weights.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for average, current in zip(self.model.parameters(), model.parameters()):
            average.lerp_(current.detach(), 1 - decay)
        for average, current in zip(self.model.buffers(), model.buffers()):
            average.copy_(current)


class TensorBatches:
    """Random batches from tensors kept as one block: on the device when they fit, else on the CPU.

    With ``share=(k, n)`` it draws the same batch of ``batch_size`` indices as every other process
    (their generators are seeded alike) and returns its k-th of n equal parts.
    """

    def __init__(
        self,
        tensors: tuple[torch.Tensor, ...],
        batch_size: int,
        device: torch.device,
        generator: torch.Generator,
        share: tuple[int, int] = (0, 1),
    ):
        if not tensors or any(len(t) != len(tensors[0]) for t in tensors):
            raise ValueError("training data must be tensors of equal length")
        if len(tensors[0]) == 0:
            raise ValueError("the training data is empty")
        self.device, self.batch_size, self.generator = device, batch_size, generator
        self.share_index, self.shares = share
        fits = device.type == "cpu" or _fits_on_device(tensors, device)
        self.tensors = tuple(t.to(device if fits else "cpu") for t in tensors)

    def __next__(self) -> tuple[torch.Tensor, ...]:
        count = len(self.tensors[0])
        indices = torch.randint(count, (self.batch_size,), generator=self.generator, device=self.generator.device)
        size = self.batch_size // self.shares
        indices = indices[self.share_index * size : (self.share_index + 1) * size].to(self.tensors[0].device)
        return tuple(t[indices].to(self.device, non_blocking=True) for t in self.tensors)


def _fits_on_device(tensors: tuple[torch.Tensor, ...], device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return sum(t.numel() * t.element_size() for t in tensors) < 0.25 * free


def as_tensors(data) -> tuple[torch.Tensor, ...]:
    """Training data as a tuple of tensors: an ImageDataset gives (images, labels)."""
    if isinstance(data, torch.Tensor):
        return (data,)
    if hasattr(data, "images") and hasattr(data, "labels"):
        return (data.images, data.labels)
    if isinstance(data, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in data):
        return tuple(data)
    raise ValueError(f"data must be a tensor, a tuple of tensors, or an ImageDataset; got {type(data).__name__}")


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator on the training device (the CPU for MPS), seeded."""
    generator_device = device if device.type == "cuda" else torch.device("cpu")
    return torch.Generator(device=generator_device).manual_seed(seed)


def resolve_precision(requested: str, device: torch.device, measure: Callable[[], bool] | None = None) -> str:
    """The precision to train in. ``"auto"``: bf16 on GPUs that have it natively, fp16 (with a
    gradient scaler) on older GPUs such as Colab's T4, fp32 on MPS, and on a CPU bf16 only where
    ``measure()`` finds it faster (CPUs with native bf16 units), else fp32."""
    if requested == "fp16" and device.type != "cuda":
        raise ValueError("precision 'fp16' needs a CUDA GPU; use 'bf16' or 'fp32' here")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if supports_native_bf16(device) else "fp16"
    if device.type == "cpu" and measure is not None and measure():
        return "bf16"
    return "fp32"


def _grad_scaler(device: torch.device, enabled: bool):
    """A gradient scaler for fp16 (a no-op when disabled); torch.amp's where it exists (torch 2.3+)."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device.type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)


def precision_context(device: torch.device, precision: str):
    """Autocast for bf16/fp16; nothing at all for fp32 (older torch has no autocast on MPS)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


BF16_TRIAL_BATCH = 16  # examples per trial step: enough to compare the two, cheap where bf16 is slow
_BF16_DECISIONS: dict[tuple, bool] = {}  # one measurement per kind of model and batch in a process


def _bf16_is_faster_on_cpu(model, batches, loss_fn, repeats: int = 2) -> bool:
    """Time a few training steps of a copy of the model in fp32 and in bf16 (weights unchanged).

    On a CPU without fast bf16 units, a full batch in bf16 takes seconds per step, so the trial uses
    a small batch; the answer is remembered for the rest of the process (the same model class, size,
    batch shape and loss), since every run after the first would measure the same thing.
    """
    batch = tuple(
        t[: min(batches.batch_size, BF16_TRIAL_BATCH)] for t in batches.tensors
    )  # no draw from the run's generator
    key = (
        type(model).__qualname__,
        sum(parameter.numel() for parameter in model.parameters()),
        tuple((tuple(t.shape[1:]), t.dtype) for t in batch),
        getattr(loss_fn, "__qualname__", repr(loss_fn)),
    )
    if key in _BF16_DECISIONS:
        return _BF16_DECISIONS[key]
    trial = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(12345)
    rng_state = torch.get_rng_state()
    timings = {}
    for precision in ("fp32", "bf16", "fp32", "bf16"):  # twice each; keep the faster
        start = time.perf_counter()
        for _ in range(repeats):
            with precision_context(torch.device("cpu"), precision):
                loss = loss_fn(trial, batch, generator)
            loss.backward()
        timings[precision] = min(timings.get(precision, math.inf), time.perf_counter() - start)
    torch.set_rng_state(rng_state)
    _BF16_DECISIONS[key] = timings["bf16"] < 0.8 * timings["fp32"]
    return _BF16_DECISIONS[key]


def train(
    model: nn.Module,
    data,
    loss_fn: LossFunction,
    config: TrainConfig | None = None,
    run_dir: str | Path | None = None,
    callback: Callable[[TrainState], None] | None = None,
    metadata: dict | None = None,
) -> TrainState:
    """Train ``model`` on ``data`` by minimising ``loss_fn``; returns the final :class:`TrainState`.

    With a ``run_dir``, checkpoints go to ``run_dir/checkpoint.pt`` (with ``metadata``, e.g. the
    model's configuration), and a run folder that already holds one is resumed from it exactly.
    """
    config = config or TrainConfig()
    distributed = distributed_training.from_environment()  # a single process unless run by torchrun
    device = distributed_training.device_for(distributed, pick_device(config.device))
    shards = distributed.world_size * config.micro_batches  # parts each batch is split into
    if config.batch_size % shards:
        raise ValueError(
            f"batch_size {config.batch_size} must split evenly over {distributed.world_size} process(es) "
            f"x {config.micro_batches} micro-batch(es)"
        )
    model.to(device).train()
    torch.manual_seed(config.seed)  # dropout and any other use of the global generator
    generator = make_generator(device, config.seed)  # seeded alike in every process
    batches = TensorBatches(
        as_tensors(data), config.batch_size, device, generator, share=(distributed.rank, distributed.world_size)
    )
    checkpoint_path = Path(run_dir) / CHECKPOINT_NAME if run_dir is not None else None
    resume = checkpoint_path is not None and checkpoint_path.exists()

    payload = load_checkpoint(checkpoint_path, map_location=device) if resume else None
    if payload is not None:
        _check_same_run(payload.get("metadata") or {}, metadata or {}, checkpoint_path)
        precision = payload.get("precision", "fp32")
        if config.precision not in ("auto", precision):  # asked for explicitly, e.g. after a NaN
            warnings.warn(
                f"resuming a {precision} run in {config.precision}, as asked: the result will not be "
                "bit-identical to an uninterrupted run",
                stacklevel=2,
            )
            precision = resolve_precision(config.precision, device)
    else:
        measure = None  # several processes could measure differently: they use fp32 on CPUs
        if device.type == "cpu" and not distributed.enabled:
            measure = lambda: _bf16_is_faster_on_cpu(model, batches, loss_fn)  # noqa: E731
        precision = resolve_precision(config.precision, device, measure)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scaler = _grad_scaler(device, enabled=(precision == "fp16"))
    ema = EMA(model, config.ema_decay)
    state = TrainState(precision=precision, model=model, ema_model=ema.model)
    if payload is not None:
        _restore(payload, checkpoint_path, model, ema, optimizer, scaler, generator, state)
    # Several processes: DistributedDataParallel averages the gradients during backward()
    parallel_model = model
    if distributed.enabled:
        device_ids = [device.index] if device.type == "cuda" else None
        parallel_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)  # rank 0's weights
        if payload is None:
            ema.model.load_state_dict(model.state_dict())  # the average starts from those weights everywhere

    def save() -> None:
        if checkpoint_path is not None and distributed.is_main:  # one writer
            save_checkpoint(
                _payload(model, ema, optimizer, scaler, generator, state, config, metadata), checkpoint_path
            )

    def budget_left() -> bool:
        steps_left = config.max_steps is None or state.step < config.max_steps
        time_left = config.max_minutes is None or state.elapsed_seconds < 60 * config.max_minutes
        return steps_left and time_left

    bar = progress_bar(
        total=config.max_steps,
        initial=state.step,
        disable=not (config.progress and distributed.is_main),
        desc="training",
        unit="step",
        dynamic_ncols=True,
    )
    running_loss, interval_steps = torch.zeros((), device=device), 0
    interval_start = last_save = time.perf_counter()
    elapsed_before = state.elapsed_seconds
    run_start = time.perf_counter()
    finished = not budget_left()  # the processes' clocks differ: they decide together (below)
    if distributed.enabled:
        finished = distributed.any(finished, device)
    try:
        while not finished:
            # 1. Warm-up: the learning rate rises linearly over the first steps
            for group in optimizer.param_groups:
                group["lr"] = config.learning_rate * min(1.0, (state.step + 1) / max(1, config.warmup_steps))
            # 2. Guess the noise and compare; 3. backpropagate (scaled for fp16), part by part
            optimizer.zero_grad(set_to_none=True)
            batch = next(batches)  # this process's share of the batch
            loss = _forward_backward(
                parallel_model, batch, loss_fn, generator, config, distributed, scaler, precision, state.step
            )
            # 4. Clip, and update the weights and their average
            if config.grad_clip is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            ema.update(model, state.step)
            state.step += 1
            state.elapsed_seconds = elapsed_before + time.perf_counter() - run_start
            running_loss += loss.detach().float()
            interval_steps += 1
            bar.update(1)
            # 5. Now and then: record the loss, check it, save, call back
            due_by_time = (
                config.checkpoint_every_minutes is not None
                and time.perf_counter() - last_save > 60 * config.checkpoint_every_minutes
            )
            finished, due_by_time = not budget_left(), due_by_time
            if distributed.enabled and (config.max_minutes is not None or config.checkpoint_every_minutes is not None):
                finished, due_by_time = distributed.any_of([finished, due_by_time], device)  # one decision for all
            if state.step % config.log_every == 0 or finished:
                mean_loss = distributed.mean(running_loss / interval_steps).item()  # one device sync per interval
                _check_finite(mean_loss, state.step, config, checkpoint_path)
                now = time.perf_counter()
                state.images_per_second = interval_steps * config.batch_size / max(now - interval_start, 1e-9)
                state.loss_history.append((state.step, mean_loss))
                bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{state.images_per_second:.0f}", refresh=False)
                running_loss.zero_()
                interval_steps, interval_start = 0, now
            due_by_steps = config.checkpoint_every_steps and state.step % config.checkpoint_every_steps == 0
            if (due_by_steps or due_by_time) and not finished:
                if interval_steps:  # never save weights that a NaN in any process's share has reached
                    recent_loss = distributed.mean(running_loss / interval_steps).item()
                    _check_finite(recent_loss, state.step, config, checkpoint_path)
                save()
                last_save = time.perf_counter()
            if (
                callback is not None
                and distributed.is_main
                and config.callback_every
                and state.step % config.callback_every == 0
            ):
                callback(state)
    finally:
        bar.close()
    save()
    distributed.barrier()  # the checkpoint exists for every process from here on
    if callback is not None and distributed.is_main:
        callback(state)
    return state


def _forward_backward(model, batch, loss_fn, generator, config, distributed, scaler, precision, step) -> torch.Tensor:
    """The loss of one batch, its gradients added into ``.grad``; returns the loss (a mean over the batch).

    With several parts (micro-batches, processes, or both), part k of the global batch draws its
    noise from its own generator, seeded from (seed, step, k); so the same run split into 2
    processes or into 2 micro-batches computes the same gradients (up to rounding).
    """
    parts = [tuple(t.chunk(config.micro_batches)[index] for t in batch) for index in range(config.micro_batches)]
    shards = distributed.world_size * config.micro_batches
    device = batch[0].device
    total = torch.zeros((), device=device)
    for index, part in enumerate(parts):
        part_generator = generator
        if shards > 1:
            shard = distributed.rank * config.micro_batches + index
            part_generator = make_generator(device, (config.seed * 1_000_000_007 + step) * 1024 + shard)
        last = index == len(parts) - 1
        # Between processes, the gradients are averaged once, after the last part
        sync = contextlib.nullcontext() if last or not distributed.enabled else model.no_sync()
        with sync:
            with precision_context(device, precision):
                loss = loss_fn(model, part, part_generator) / config.micro_batches
            scaler.scale(loss).backward()
        total += loss.detach()
    return total


def _check_same_run(saved: dict, given: dict, path: Path) -> None:
    """Refuse to resume a run with other settings (schedule, dataset, ...) than it was started with."""
    differing = {key: (saved[key], given[key]) for key in saved.keys() & given.keys() if saved[key] != given[key]}
    if differing:
        details = "; ".join(f"{key}: {old!r} in the checkpoint, {new!r} now" for key, (old, new) in differing.items())
        raise CheckpointError(
            f"{path} belongs to a run with other settings ({details}). Use the same settings "
            "to resume it, or a new run folder."
        )


def _check_finite(loss: float, step: int, config: TrainConfig, checkpoint_path: Path | None) -> None:
    if math.isfinite(loss):
        return
    where = f" The last good checkpoint is {checkpoint_path}." if checkpoint_path and checkpoint_path.exists() else ""
    raise TrainingDivergedError(
        f"the loss became {loss} by step {step}, so training stopped. Try a lower learning_rate "
        f"(now {config.learning_rate}), gradient clipping (grad_clip=1.0, now {config.grad_clip}), "
        f"or precision='fp32' (now {config.precision}); check that the images lie in [-1, 1].{where}"
    )


def _payload(model, ema, optimizer, scaler, generator, state, config, metadata) -> dict:
    return {
        "model": model.state_dict(),
        "ema": ema.model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "step": state.step,
        "elapsed_seconds": state.elapsed_seconds,
        "precision": state.precision,
        "loss_history": [list(item) for item in state.loss_history],
        "rng": {
            "generator": generator.get_state(),
            "generator_device": str(generator.device),
            "torch": torch.get_rng_state(),
            # this process's GPU only: a run from 4 GPUs must resume on 1 (Colab) too
            "cuda": [torch.cuda.get_rng_state(generator.device)] if generator.device.type == "cuda" else [],
        },
        "train_config": asdict(config),
        "metadata": metadata or {},
    }


def _restore(payload, path, model, ema, optimizer, scaler, generator, state) -> None:
    try:
        load_model_weights(model, payload["model"], path)
        load_model_weights(ema.model, payload["ema"], path)
        optimizer.load_state_dict(payload["optimizer"])
        if payload["scaler"] and scaler.is_enabled():
            scaler.load_state_dict(payload["scaler"])
        rng = payload["rng"]
        if torch.device(rng["generator_device"]).type == generator.device.type:  # cuda:0 -> cuda:1 is fine
            generator.set_state(rng["generator"].cpu())
        else:  # e.g. trained on a Colab GPU, resumed on a laptop: carry on, but not bit for bit
            warnings.warn(
                f"{path} was trained on {rng['generator_device']} and resumes on {generator.device}: "
                "training continues, but the random draws differ from an uninterrupted run",
                stacklevel=3,
            )
            generator.manual_seed(generator.initial_seed() + int(payload["step"]))
        torch.set_rng_state(rng["torch"].cpu())
        if rng["cuda"] and generator.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"][0].cpu(), generator.device)
        state.step = int(payload["step"])
        state.elapsed_seconds = float(payload["elapsed_seconds"])
        state.loss_history = [(int(s), float(v)) for s, v in payload["loss_history"]]
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(
            f"{path} is incomplete or from another version ({error!r}); start a new run folder"
        ) from error
