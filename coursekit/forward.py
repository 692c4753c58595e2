"""The forward (noising) process: milk poured into the coffee (notebook 01).

``add_noise`` jumps straight from a clean ``x0`` to any timestep ``t`` in closed form, so
training never has to run the noising chain step by step.
"""

from __future__ import annotations

import torch

from coursekit.parameterization import x0_and_eps
from coursekit.schedules import NoiseSchedule


def add_noise(
    x0: torch.Tensor,
    t: torch.Tensor,
    schedule: NoiseSchedule,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``x_t ~ q(x_t | x_0)`` and return ``(x_t, noise)``.

    DDPM Eq. 4: ``x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * eps``, eps ~ N(0, I).
    ``t`` has one timestep per example, shape (B,). Pass ``noise`` to choose eps yourself,
    or a ``generator`` to make the draw reproducible.
    """
    _check_batch(x0, t)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    elif noise.shape != x0.shape:
        raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
    alpha_bar_t = schedule.at(schedule.alpha_bar, t, like=x0)
    x_t = alpha_bar_t.sqrt() * x0 + (1 - alpha_bar_t).sqrt() * noise
    return x_t, noise


def noise_at_random_steps(
    x0: torch.Tensor, schedule: NoiseSchedule, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One uniformly drawn timestep per example and the jump to it: ``(x_t, t, noise)`` (DDPM Algorithm 1,
    lines 3-4). The draws happen on the generator's device (the CPU for a CPU generator), so that a seed
    gives the same draws on every machine, and then move to the data's device."""
    draw_device = generator.device if generator is not None else x0.device
    t = torch.randint(0, schedule.num_steps, (x0.shape[0],), generator=generator, device=draw_device)
    noise = torch.randn(x0.shape, generator=generator, device=draw_device)
    t, noise = t.to(x0.device), noise.to(x0.device, x0.dtype)
    x_t, noise = add_noise(x0, t, schedule, noise=noise)
    return x_t, t, noise


def noising_step(
    x_prev: torch.Tensor,
    t: torch.Tensor,
    schedule: NoiseSchedule,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One step of the chain, ``x_t ~ q(x_t | x_{t-1})`` (DDPM Eq. 2).

    ``x_t = sqrt(1 - beta_t) * x_{t-1} + sqrt(beta_t) * eps``. Taking this step ``t+1`` times
    gives the same distribution as one ``add_noise`` jump to ``t``; the tests check that.
    """
    _check_batch(x_prev, t)
    beta_t = schedule.at(schedule.betas, t, like=x_prev)
    noise = torch.randn(x_prev.shape, generator=generator, device=x_prev.device, dtype=x_prev.dtype)
    return (1 - beta_t).sqrt() * x_prev + beta_t.sqrt() * noise


def predict_x0(x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """Undo Eq. 4 with a (predicted) noise: ``x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)``.

    This is DDPM Eq. 15 and the "predicted clean image" shown while training.
    """
    _check_batch(x_t, t)
    if eps.shape != x_t.shape:
        raise ValueError(f"eps must have the shape of x_t {tuple(x_t.shape)}, got {tuple(eps.shape)}")
    alpha_bar_t = schedule.at(schedule.alpha_bar, t, like=x_t)
    return x0_and_eps(eps, x_t, alpha_bar_t.sqrt(), (1 - alpha_bar_t).sqrt(), "eps")[0]


def posterior_mean_variance(
    x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of the true posterior ``q(x_{t-1} | x_t, x_0)`` (DDPM Eqs. 6-7).

    mean = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) * x0
         + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * x_t
    variance = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t
    At t = 0 the variance is 0 and the mean is x0. The variance has shape (B, 1, ..., 1).
    """
    _check_batch(x_t, t)
    if x0.shape != x_t.shape:
        raise ValueError(f"x0 and x_t must have one shape, got {tuple(x0.shape)} and {tuple(x_t.shape)}")
    beta_t = schedule.at(schedule.betas, t, like=x_t)
    alpha_t = schedule.at(schedule.alphas, t, like=x_t)
    alpha_bar_t = schedule.at(schedule.alpha_bar, t, like=x_t)
    alpha_bar_prev = schedule.at(schedule.alpha_bar_prev, t, like=x_t)
    x0_coef = alpha_bar_prev.sqrt() * beta_t / (1 - alpha_bar_t)
    x_t_coef = alpha_t.sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
    mean = x0_coef * x0 + x_t_coef * x_t
    variance = schedule.at(schedule.posterior_variance(), t, like=x_t)
    return mean, variance


def _check_batch(x: torch.Tensor, t: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected a batch tensor of shape (B, ...), got {shape}")
    t = torch.as_tensor(t)
    if t.ndim != 1 or len(t) != x.shape[0]:
        raise ValueError(f"t must hold one timestep per example, shape ({x.shape[0]},), got {tuple(t.shape)}")
