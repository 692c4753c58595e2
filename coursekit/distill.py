"""Progressive distillation: a student learns to take one step where its teacher takes two.

Salimans & Ho 2022 (arXiv:2202.00512), Algorithm 2. The teacher samples with DDIM on a grid of
timesteps; the student, a copy of the teacher, is trained so that ONE DDIM step of its own lands
where TWO of the teacher's land. Then the student becomes the teacher and the steps halve again:
64, 32, ..., 1. For one student step from ``t`` to ``t''`` (the teacher's steps: ``t -> t' -> t''``):

    x''  = DDIM(teacher, DDIM(teacher, x_t, t -> t'), t' -> t'')        two teacher steps
    x~   = (x'' - (sigma'' / sigma) x_t) / (alpha'' - (sigma'' / sigma) alpha)
                                      the clean-image guess whose one DDIM step from t lands on x''

and the student is trained on that guess (as its own kind of output: with ``student_prediction="v"``
the target is ``v = alpha eps~ - sigma x~``, ``eps~ = (x_t - alpha x~) / sigma``, which weights the
error by SNR + 1, Sec. 4). A noise-predicting student cannot learn one step: at the first step
alpha is almost 0 and ``x0 = (x_t - sigma eps) / alpha`` multiplies its errors by thousands; a
velocity-predicting one can, so students predict v.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from coursekit.forward import add_noise
from coursekit.parameterization import alpha_sigma, check_prediction, output_for, x0_and_eps
from coursekit.samplers import ddim_timesteps
from coursekit.schedules import NoiseSchedule
from coursekit.training import TrainConfig, TrainState, train


def halving_grids(num_train_steps: int, teacher_steps: int) -> list[list[int]]:
    """The teacher's DDIM timesteps and each halving down to one step: ``[grid_64, grid_32, ..., grid_1]``.

    Each grid keeps every other timestep of the one before, so one student step covers exactly two
    teacher steps; after a grid's last timestep the sampler jumps to the clean image.
    """
    if teacher_steps < 1 or teacher_steps & (teacher_steps - 1):
        raise ValueError(f"teacher_steps must be a power of two (64, 128, ...), got {teacher_steps}")
    grids = [ddim_timesteps(num_train_steps, teacher_steps)]
    while len(grids[-1]) > 1:
        grids.append(grids[-1][::2])
    return grids


def _alpha_sigma(schedule: NoiseSchedule, t: torch.Tensor, like: torch.Tensor):
    """:func:`coursekit.parameterization.alpha_sigma`, where ``t = -1`` stands for the clean image (1, 0)."""
    alpha, sigma = alpha_sigma(schedule, t.clamp(min=0), like)
    clean = (t < 0).view(alpha.shape).to(alpha.device)
    return torch.where(clean, torch.ones_like(alpha), alpha), torch.where(clean, torch.zeros_like(sigma), sigma)


@torch.no_grad()
def ddim_jump(
    model,
    x: torch.Tensor,
    t: torch.Tensor,
    t_next: torch.Tensor,
    schedule: NoiseSchedule,
    prediction: str = "eps",
    clip_x0: bool = False,
) -> torch.Tensor:
    """One DDIM step (eta = 0) per example from ``t`` to ``t_next`` (-1: the clean image): DDIM Eq. 12."""
    alpha, sigma = _alpha_sigma(schedule, t, x)
    alpha_next, sigma_next = _alpha_sigma(schedule, t_next, x)
    x0_pred, eps = x0_and_eps(model(x, t), x, alpha, sigma, prediction)
    if clip_x0:
        x0_pred = x0_pred.clamp(-1, 1)
    return alpha_next * x0_pred + sigma_next * eps


def two_step_target(
    teacher,
    x_t: torch.Tensor,
    t: torch.Tensor,
    t_mid: torch.Tensor,
    t_next: torch.Tensor,
    schedule: NoiseSchedule,
    prediction: str = "eps",
    clip_x0: bool = False,
) -> torch.Tensor:
    """The clean-image guess that makes one DDIM step from ``t`` land where the teacher's two steps
    ``t -> t_mid -> t_next`` land (Salimans & Ho, Algorithm 2)."""
    x_far = ddim_jump(
        teacher,
        ddim_jump(teacher, x_t, t, t_mid, schedule, prediction, clip_x0),
        t_mid,
        t_next,
        schedule,
        prediction,
        clip_x0,
    )
    alpha, sigma = _alpha_sigma(schedule, t, x_t)
    alpha_far, sigma_far = _alpha_sigma(schedule, t_next, x_t)
    ratio = sigma_far / sigma
    return (x_far - ratio * x_t) / (alpha_far - ratio * alpha)  # solve x_far = alpha'' x~ + sigma'' eps~ for x~


def distillation_loss(
    teacher,
    schedule: NoiseSchedule,
    teacher_grid: list[int],
    teacher_prediction: str = "eps",
    student_prediction: str = "v",
    clip_x0: bool = False,
):
    """The ``loss_fn(student, batch, generator)`` for :func:`coursekit.training.train`: each image gets a
    random student step (every other timestep of ``teacher_grid``), is noised to its start, and the
    student's output is compared with the target of :func:`two_step_target`, in the student's kind of output."""
    check_prediction(teacher_prediction)
    check_prediction(student_prediction)
    if len(teacher_grid) < 2 or len(teacher_grid) % 2:
        raise ValueError(f"the teacher's grid must have an even number of steps, got {len(teacher_grid)}")
    starts = torch.tensor(teacher_grid[0::2])  # the student's timesteps
    middles = torch.tensor(teacher_grid[1::2])  # where the teacher stops in between
    ends = torch.tensor(teacher_grid[2::2] + [-1])  # where the student's step ends (-1: the clean image)

    def loss_fn(student, batch: tuple, generator: torch.Generator | None = None) -> torch.Tensor:
        x0 = batch[0]
        draw_device = generator.device if generator is not None else x0.device
        pick = torch.randint(0, len(starts), (x0.shape[0],), generator=generator, device=draw_device).cpu()
        noise = torch.randn(x0.shape, generator=generator, device=draw_device).to(x0.device, x0.dtype)
        t, t_mid, t_next = (index[pick].to(x0.device) for index in (starts, middles, ends))
        x_t, _ = add_noise(x0, t, schedule, noise=noise)
        target_x0 = two_step_target(teacher, x_t, t, t_mid, t_next, schedule, teacher_prediction, clip_x0)
        alpha, sigma = _alpha_sigma(schedule, t, x_t)
        target_eps = (x_t - alpha * target_x0) / sigma
        target = output_for(target_x0, target_eps, alpha, sigma, student_prediction)
        return F.mse_loss(student(x_t, t).float(), target.float())

    return loss_fn


@dataclass
class Round:
    """One round of progressive distillation: a student that samples in ``num_steps`` DDIM steps."""

    num_steps: int
    timesteps: list[int]  # the student's DDIM timesteps (then the clean image)
    student: nn.Module  # its EMA weights, in eval mode
    state: TrainState  # the training run behind it (steps, minutes, losses)


def progressive_distillation(
    teacher: nn.Module,
    data,
    schedule: NoiseSchedule,
    teacher_steps: int = 64,
    final_steps: int = 1,
    train_config: TrainConfig | None = None,
    teacher_prediction: str = "eps",
    student_prediction: str = "v",
    clip_x0: bool = False,
    first_student: nn.Module | None = None,
    run_dir: str | Path | None = None,
    metadata: dict | None = None,
) -> Iterator[Round]:
    """Halve the teacher's DDIM steps again and again down to ``final_steps``, one :class:`Round` each.

    Each student starts as a copy of the model before it (the first as a copy of ``teacher``, or
    ``first_student`` when the teacher is no trainable network, e.g. an oracle) and trains with
    ``train_config`` (the same budget every round); after its round it is the teacher.
    With ``run_dir``, each round is a run folder ``run_dir/NN-steps`` (``metadata`` and the student's
    prediction and timesteps in its checkpoint, so :func:`coursekit.runs.load_run` reads it back), and
    distilling again resumes: finished rounds are read, not trained again.
    """
    grids = halving_grids(schedule.num_steps, teacher_steps)
    current, prediction = teacher, teacher_prediction
    for index, (teacher_grid, student_grid) in enumerate(zip(grids, grids[1:])):
        if len(teacher_grid) <= final_steps:
            break
        if isinstance(current, nn.Module):
            current.eval()
        student = copy.deepcopy(first_student if index == 0 and first_student is not None else current)
        student.train().requires_grad_(True)  # a copy of the EMA weights, which are not trained directly
        loss_fn = distillation_loss(current, schedule, teacher_grid, prediction, student_prediction, clip_x0)
        round_dir = Path(run_dir) / f"{len(student_grid):02d}-steps" if run_dir is not None else None
        round_metadata = {
            **(metadata or {}),
            "prediction": student_prediction,
            "sampling_timesteps": student_grid,
            "distilled_from_steps": len(teacher_grid),
        }
        config = train_config or TrainConfig(progress=False)
        state = train(student, data, loss_fn, config, run_dir=round_dir, metadata=round_metadata)
        current, prediction = state.ema_model.eval(), student_prediction
        yield Round(len(student_grid), student_grid, current, state)
