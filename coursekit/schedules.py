"""Noise schedules: how much noise the forward process adds at each step (notebook 01).

Timestep convention, stated once for the whole package
------------------------------------------------------
A schedule with ``T`` steps has integer timesteps ``t = 0, 1, ..., T-1``. Index ``t`` is the
DDPM paper's step ``t + 1`` (the paper counts 1..T): ``t = 0`` is the first, smallest dose of
noise, ``t = T-1`` is (almost) pure noise. ``alpha_bar[t] = prod_{s <= t} alpha[s]``, and the
clean image ``x_0`` of the paper sits "before" index 0, where we define ``alpha_bar = 1``.

This is exactly the convention of diffusers' ``DDPMScheduler``: its ``timesteps`` run 999..0
and ``scheduler.alphas_cumprod[t]`` equals our ``schedule.alpha_bar[t]`` for the same integer
``t``, so a model trained here is called with the same ``t`` values as a diffusers model.

All quantities are computed in float64 and cast where they are used (``schedule.at``).
Equation numbers refer to DDPM (Ho et al., arXiv:2006.11239v2) and Improved DDPM
(Nichol & Dhariwal, arXiv:2102.09672v1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """The DDPM schedule: betas rising linearly from ``beta_start`` to ``beta_end`` (DDPM Sec. 4).

    The paper's values assume ``num_steps = 1000``; for other step counts the ends are rescaled
    by ``1000 / num_steps`` so that the total amount of noise stays comparable (as in Improved
    DDPM's code), and capped at 0.999 for very short schedules.
    """
    _check_num_steps(num_steps)
    scale = 1000 / num_steps
    betas = torch.linspace(beta_start * scale, beta_end * scale, num_steps, dtype=torch.float64)
    return betas.clamp(max=0.999)


def cosine_alpha_bar(t: torch.Tensor, num_steps: int, offset: float = 0.008) -> torch.Tensor:
    """Improved DDPM Eq. 17: ``alpha_bar(t) = f(t) / f(0)``, ``f(t) = cos^2((t/T + s)/(1 + s) * pi/2)``.

    ``t`` is continuous here, in the paper's units (0 = clean data, T = the last step).
    """

    def f(u: torch.Tensor) -> torch.Tensor:
        return torch.cos((u / num_steps + offset) / (1 + offset) * math.pi / 2) ** 2

    t = torch.as_tensor(t, dtype=torch.float64)
    return f(t) / f(torch.zeros((), dtype=torch.float64))


def cosine_betas(num_steps: int, offset: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """The Improved DDPM cosine schedule as betas: ``beta_t = 1 - alpha_bar(t+1) / alpha_bar(t)``.

    Betas are clipped at ``max_beta`` to avoid a singularity at the very end (Improved DDPM Sec. 3.2).
    """
    _check_num_steps(num_steps)
    paper_t = torch.arange(num_steps + 1, dtype=torch.float64)  # paper steps 0..T
    alpha_bar = cosine_alpha_bar(paper_t, num_steps, offset)
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(max=max_beta)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """The same schedule, shifted so that the last step is pure noise (Lin et al., arXiv:2305.08891v4).

    Common schedules end with a little signal left (the linear one: alpha_bar = 4e-5 at T-1), so a
    model never sees pure noise in training, yet sampling starts from it. Algorithm 1 of the paper
    shifts sqrt(alpha_bar) so that it ends at exactly 0 and scales it so that it still starts at its old
    value: ``sqrt(alpha_bar_t) -> (sqrt(alpha_bar_t) - sqrt(alpha_bar_last)) * sqrt(alpha_bar_0) /
    (sqrt(alpha_bar_0) - sqrt(alpha_bar_last))``. The last beta becomes 1; at that step the noise
    guess says nothing about x0 (the SNR is 0), so such a schedule needs a model that predicts v or
    x0 (Sec. 3.2), not eps.
    """
    betas = torch.as_tensor(betas, dtype=torch.float64)
    if betas.ndim != 1 or len(betas) < 2:
        raise ValueError(f"zero terminal SNR needs a schedule of at least 2 steps, got shape {tuple(betas.shape)}")
    root = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)  # Algorithm 1: shift to 0 at the end, keep the start
    alpha_bar = root**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


@dataclass(frozen=True)
class NoiseSchedule:
    """Every per-timestep number the forward and reverse processes need, in float64.

    Build one with :func:`make_schedule`. Index with an integer timestep ``t`` (see the module
    docstring for the convention).
    """

    betas: torch.Tensor  # (T,) variance of the noise added at step t
    alphas: torch.Tensor  # (T,) 1 - beta_t
    alpha_bar: torch.Tensor  # (T,) product of alphas up to and including t
    alpha_bar_prev: torch.Tensor  # (T,) alpha_bar at t-1, with 1.0 before the first step
    name: str = "custom"

    @classmethod
    def from_betas(cls, betas: torch.Tensor, name: str = "custom") -> NoiseSchedule:
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()) and not (
            bool(((betas[:-1] > 0) & (betas[:-1] < 1)).all()) and betas[-1] == 1
        ):
            raise ValueError("every beta must lie strictly between 0 and 1 (the last one may be 1: pure noise)")
        alphas = 1 - betas
        alpha_bar = torch.cumprod(alphas, dim=0)  # DDPM Eq. 4: alpha_bar_t = prod_s alpha_s
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        return cls(betas, alphas, alpha_bar, alpha_bar_prev, name)

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    def snr(self) -> torch.Tensor:
        """Signal-to-noise ratio of x_t: ``alpha_bar / (1 - alpha_bar)`` (Kingma et al. 2021)."""
        return self.alpha_bar / (1 - self.alpha_bar)

    def posterior_variance(self) -> torch.Tensor:
        """DDPM Eq. 7: ``beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t``."""
        return (1 - self.alpha_bar_prev) / (1 - self.alpha_bar) * self.betas

    def at(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``values[t]`` cast to ``like``'s dtype and device, shaped to broadcast over a batch.

        ``t`` has shape (B,); the result has shape (B, 1, 1, ...) with as many dims as ``like``.
        """
        t = check_timesteps(t, self.num_steps)
        # index and cast on the CPU first: MPS has no float64, and the table stays off the GPU
        return per_example(values[t.cpu()], like)


def per_example(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """One number per example, shape (B,), as (B, 1, ..., 1) in ``like``'s dtype and device, so that it
    scales whole examples of any shape: images (B, C, H, W) or points (B, D)."""
    values = torch.as_tensor(values).to(dtype=like.dtype).to(like.device)
    return values.reshape(-1, *([1] * (like.ndim - 1)))


SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas}


def make_schedule(name: str = "linear", num_steps: int = 1000, zero_terminal_snr: bool = False) -> NoiseSchedule:
    """Build a schedule by name: ``"linear"`` (DDPM) or ``"cosine"`` (Improved DDPM).

    ``zero_terminal_snr`` rescales it so that its last step is pure noise (:func:`rescale_zero_terminal_snr`).
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    betas = SCHEDULES[name](num_steps)
    if zero_terminal_snr:
        return NoiseSchedule.from_betas(rescale_zero_terminal_snr(betas), name=f"{name}, zero terminal SNR")
    return NoiseSchedule.from_betas(betas, name=name)


def check_timesteps(t: torch.Tensor | int, num_steps: int) -> torch.Tensor:
    """Return ``t`` as a 1-D long tensor, or raise a ValueError naming the valid range."""
    t = torch.as_tensor(t)
    if t.ndim == 0:
        t = t.reshape(1)
    if t.ndim != 1:
        raise ValueError(f"timesteps must be a scalar or a 1-D tensor (B,), got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"timesteps must be integers in [0, {num_steps - 1}], got dtype {t.dtype}")
    if len(t) and (int(t.min()) < 0 or int(t.max()) >= num_steps):
        raise ValueError(
            f"timesteps must lie in [0, {num_steps - 1}] for a {num_steps}-step schedule, "
            f"got values from {int(t.min())} to {int(t.max())}"
        )
    return t.long()


def _check_num_steps(num_steps: int) -> None:
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
