"""Flow matching: draw a straight line from each image to its noise, and learn the line's velocity.

The path (Lipman et al., arXiv:2210.02747; Liu et al., rectified flow, arXiv:2209.03003), with a
continuous time ``s`` from 0 (the data) to 1 (pure noise)::

    x_s = (1 - s) x0 + s eps                  the straight line from x0 to eps
    d x_s / ds = eps - x0                     its velocity: the training target

A model ``u(x_s, s)`` trained with the mean squared error against ``eps - x0`` learns the average
velocity through each point, ``E[eps - x0 | x_s]``. Following that field backwards, from ``s = 1`` to
``s = 0`` (``dx/ds = u(x, s)``), carries noise to images: :func:`euler_steps` and :func:`heun_steps`.

The straight path is a diffusion model in disguise (Gao et al., "Diffusion Meets Flow Matching",
2025): a diffusion sample ``x_t = alpha x0 + sigma eps`` divided by ``alpha + sigma`` is the flow
sample at ``s = sigma / (alpha + sigma)``, and the velocity is ``eps - x0`` of the diffusion model's
guesses (tests/test_flow.py checks this with the Gaussian oracles).

Models are called as ``model(x_s, s)`` with ``s`` a float tensor of shape (B,) in [0, 1];
:class:`FlowModel` lets a U-Net built for integer timesteps 0..999 read ``s`` as ``1000 s``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from coursekit.samplers import _check_start, final_state, resolve_clip
from coursekit.schedules import per_example


def flow_path(x0: torch.Tensor, s: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``x_s = (1 - s) x0 + s eps`` for a batch; ``s`` has shape (B,)."""
    s = per_example(s, x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The straight path's velocity, ``d x_s / ds = eps - x0``: what a flow-matching model learns."""
    return noise - x0


def x0_and_eps(velocity: torch.Tensor, x_s: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean image and the noise a velocity stands for at ``x_s``: ``x0 = x_s - s u``, ``eps = x_s + (1 - s) u``."""
    s = per_example(s, x_s)
    return x_s - s * velocity, x_s + (1 - s) * velocity


def flow_matching_loss(
    model,
    x0: torch.Tensor,
    generator: torch.Generator | None = None,
    class_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Conditional flow matching (Lipman et al. Eq. 23 with the straight path): s ~ U(0, 1), eps ~ N(0, I),
    and the mean squared error between the model's velocity at ``x_s`` and ``eps - x0``."""
    draw_device = generator.device if generator is not None else x0.device  # a seed gives the same draws anywhere
    s = torch.rand(x0.shape[0], generator=generator, device=draw_device).to(x0.device, x0.dtype)
    noise = torch.randn(x0.shape, generator=generator, device=draw_device).to(x0.device, x0.dtype)
    conditions = {} if class_labels is None else {"class_labels": class_labels}
    velocity = model(flow_path(x0, s, noise), s, **conditions)
    if velocity.shape != x0.shape:
        raise ValueError(
            f"the model must output a velocity of the input's shape {tuple(x0.shape)}, got {tuple(velocity.shape)}"
        )
    return F.mse_loss(velocity.float(), velocity_target(x0, noise).float())


def flow_loss(conditional: bool = False, label_dropout: float = 0.0, null_label: int | None = None):
    """The ``loss_fn(model, batch, generator)`` that :func:`coursekit.training.train` expects, for flow
    matching; labels and label dropout as in :func:`coursekit.losses.diffusion_loss`."""
    from coursekit.losses import training_labels

    labels_of = training_labels(conditional, label_dropout, null_label)

    def loss_fn(model, batch: tuple, generator: torch.Generator | None = None) -> torch.Tensor:
        return flow_matching_loss(model, batch[0], generator, class_labels=labels_of(batch, generator))

    return loss_fn


class FlowModel(nn.Module):
    """A network built for integer timesteps 0..T-1 (the course's U-Net), called with ``s`` in [0, 1]."""

    def __init__(self, net: nn.Module, time_scale: float = 1000.0):
        super().__init__()
        self.net, self.time_scale = net, time_scale

    @property
    def config(self):
        """The wrapped network's settings (a U-Net's ``UNetConfig``), or None."""
        return getattr(self.net, "config", None)

    def forward(self, x_s: torch.Tensor, s: torch.Tensor, **conditions) -> torch.Tensor:
        return self.net(x_s, s * self.time_scale, **conditions)


@dataclass
class FlowStep:
    """The state after one step of a flow sampler."""

    s: float  # the time the step started from
    x: torch.Tensor  # the sample after the step (at the next time)
    x0_pred: torch.Tensor  # the model's guess of the clean image at ``s``


def time_grid(num_steps: int) -> list[float]:
    """``num_steps + 1`` evenly spaced times from 1 (noise) down to 0 (data)."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    return torch.linspace(1, 0, num_steps + 1, dtype=torch.float64).tolist()


def _velocity(model, x, s: float, clip_x0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    times = torch.full((x.shape[0],), s, dtype=x.dtype, device=x.device)
    with torch.no_grad():
        velocity = model(x, times)
    x0_pred = x - s * velocity
    if clip_x0 and s > 0:
        x0_pred = x0_pred.clamp(-1, 1)
        velocity = (x - x0_pred) / s  # the velocity that points at the clipped guess
    return velocity, x0_pred


def euler_steps(
    model,
    x_T: torch.Tensor,
    *,
    num_steps: int = 50,
    times: list[float] | None = None,
    generator: torch.Generator | None = None,
    clip_x0: bool | None = None,
) -> Iterator[FlowStep]:
    """Euler's method on ``dx/ds = u(x, s)`` from s = 1 to 0: ``x_next = x + (s_next - s) u(x, s)``.

    One model call per step; its error shrinks in proportion to the step size (order 1).
    ``generator`` is unused (the sampler is deterministic), accepted so samplers share one signature.
    """
    x = _check_start(x_T)
    clip_x0 = resolve_clip(clip_x0, x)
    grid = _check_times(times if times is not None else time_grid(num_steps))
    for s, s_next in zip(grid[:-1], grid[1:]):
        velocity, x0_pred = _velocity(model, x, s, clip_x0)
        x = x + (s_next - s) * velocity
        yield FlowStep(s, x, x0_pred)


def heun_steps(
    model,
    x_T: torch.Tensor,
    *,
    num_steps: int = 25,
    times: list[float] | None = None,
    generator: torch.Generator | None = None,
    clip_x0: bool | None = None,
) -> Iterator[FlowStep]:
    """Heun's method (EDM, Karras et al. 2022, Algorithm 1): an Euler step, then the average of the
    velocities at both ends. Two model calls per step (one on the last, which ends at s = 0 with a plain
    Euler step, as in EDM); its error shrinks with the square of the step size (order 2).
    """
    x = _check_start(x_T)
    clip_x0 = resolve_clip(clip_x0, x)
    grid = _check_times(times if times is not None else time_grid(num_steps))
    for s, s_next in zip(grid[:-1], grid[1:]):
        velocity, x0_pred = _velocity(model, x, s, clip_x0)
        x_euler = x + (s_next - s) * velocity
        if s_next > 0:
            velocity_next, _ = _velocity(model, x_euler, s_next, clip_x0)
            x = x + (s_next - s) * (velocity + velocity_next) / 2  # the trapezoid rule
        else:
            x = x_euler
        yield FlowStep(s, x, x0_pred)


def euler_sample(model, x_T: torch.Tensor, **options) -> torch.Tensor:
    """:func:`euler_steps`, returning only the final images."""
    return final_state(euler_steps(model, x_T, **options))


def heun_sample(model, x_T: torch.Tensor, **options) -> torch.Tensor:
    """:func:`heun_steps`, returning only the final images."""
    return final_state(heun_steps(model, x_T, **options))


FLOW_SAMPLERS = {"euler": euler_steps, "heun": heun_steps}
FLOW_DEFAULT_NUM_STEPS = {"euler": 50, "heun": 25}  # without num_steps or times: 50 model calls (Heun: 2 a step)


class GaussianVelocityOracle:
    """The optimal velocity field for data with per-coordinate ``mean`` m and ``std`` d.

    ``x_s`` is Gaussian with mean ``(1 - s) m`` and variance ``V(s) = (1 - s)^2 d^2 + s^2``, and
    ``eps - x0`` is jointly Gaussian with it, so ``E[eps - x0 | x_s] = -m + (s - (1 - s) d^2) / V(s) *
    (x_s - (1 - s) m)``. Following this field keeps each point's standard score
    ``(x_s - (1 - s) m) / sqrt(V(s))``, which gives the exact flow map (:meth:`flow_map`).
    """

    def __init__(self, mean: torch.Tensor | float, std: torch.Tensor | float):
        self.mean = torch.as_tensor(mean, dtype=torch.float64)
        self.std = torch.as_tensor(std, dtype=torch.float64)
        if bool((self.std <= 0).any()):
            raise ValueError("std must be positive")

    def _variance(self, s: torch.Tensor) -> torch.Tensor:
        return (1 - s) ** 2 * self.std**2 + s**2

    def __call__(self, x_s: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        s = per_example(torch.as_tensor(s, dtype=torch.float64), x_s.double())
        gain = (s - (1 - s) * self.std**2) / self._variance(s)
        return (-self.mean + gain * (x_s.double() - (1 - s) * self.mean)).to(x_s.dtype)

    def flow_map(self, x: torch.Tensor, s_from: float, s_to: float) -> torch.Tensor:
        """Where the exact flow carries ``x`` from time ``s_from`` to time ``s_to``."""
        s_from, s_to = torch.tensor(s_from, dtype=torch.float64), torch.tensor(s_to, dtype=torch.float64)
        score = (x.double() - (1 - s_from) * self.mean) / self._variance(s_from).sqrt()
        return ((1 - s_to) * self.mean + self._variance(s_to).sqrt() * score).to(x.dtype)


def _check_times(times: list[float]) -> list[float]:
    times = [float(s) for s in times]
    if len(times) < 2 or times[0] > 1 or times[-1] != 0 or any(b >= a for a, b in zip(times, times[1:])):
        raise ValueError(f"times must decrease strictly from at most 1 down to 0, got {times[:3]}...{times[-2:]}")
    return times
