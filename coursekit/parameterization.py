"""One place that reads a model's output: a noise guess, a clean-image guess, or a velocity.

A diffusion model sees ``x_t = alpha_t x0 + sigma_t eps`` (``alpha_t = sqrt(alpha_bar_t)``,
``sigma_t = sqrt(1 - alpha_bar_t)``) and may be trained to predict any of three things. Each one,
with ``x_t``, gives the other two:

    "eps" (DDPM)              x0 = (x_t - sigma eps) / alpha                  DDPM Eq. 15
    "x0"                      eps = (x_t - alpha x0) / sigma
    "v" (Salimans & Ho 2022)  v = alpha eps - sigma x0;  x0 = alpha x_t - sigma v;  eps = sigma x_t + alpha v

(the last pair because alpha^2 + sigma^2 = 1). The score, the gradient of the log density of x_t,
is ``-eps / sigma`` (Song et al. 2021), and Tweedie's formula ``E[x0 | x_t] = (x_t + sigma^2 score) /
alpha`` is the "eps" line again. A flow-matching model (``flow``) predicts yet another thing, the
velocity of the straight path, ``eps - x0`` (``flow.velocity_target`` of the two guesses).

Samplers call :func:`read_output` once per step instead of repeating these lines.
"""

from __future__ import annotations

import torch

from coursekit.schedules import NoiseSchedule

PREDICTIONS = ("eps", "x0", "v")


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
    return prediction


def x0_and_eps(output: torch.Tensor, x_t: torch.Tensor, alpha, sigma, prediction: str = "eps"):
    """The clean-image guess and the noise guess that a model's ``output`` stands for."""
    check_prediction(prediction)
    if prediction == "eps":
        return (x_t - sigma * output) / alpha, output  # DDPM Eq. 15
    if prediction == "x0":
        return output, (x_t - alpha * output) / sigma
    return alpha * x_t - sigma * output, sigma * x_t + alpha * output  # v-prediction, Salimans & Ho Sec. 4


def output_for(x0: torch.Tensor, eps: torch.Tensor, alpha, sigma, prediction: str = "eps") -> torch.Tensor:
    """What a model trained for ``prediction`` should output for this clean image and noise (its target)."""
    check_prediction(prediction)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    return alpha * eps - sigma * x0  # v


def score(eps: torch.Tensor, sigma) -> torch.Tensor:
    """The score of x_t's distribution, from a noise guess: ``grad log p(x_t) = -eps / sigma``."""
    return -eps / sigma


def alpha_sigma(schedule: NoiseSchedule, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``alpha_t`` and ``sigma_t`` for a batch of timesteps, shaped (B, 1, ...) like ``like``."""
    alpha_bar = schedule.at(schedule.alpha_bar, t, like=like)
    return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()


def read_output(
    model,
    x_t: torch.Tensor,
    t: torch.Tensor,
    schedule: NoiseSchedule,
    prediction: str = "eps",
    clip_x0: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Call ``model(x_t, t)`` and return ``(x0_pred, eps)``: the guess of the clean image (clipped to
    [-1, 1] when ``clip_x0``) and the noise the model's output implies (never clipped)."""
    with torch.no_grad():
        output = model(x_t, t)
    alpha, sigma = alpha_sigma(schedule, t, like=x_t)
    x0_pred, eps = x0_and_eps(output, x_t, alpha, sigma, prediction)
    return (x0_pred.clamp(-1, 1) if clip_x0 else x0_pred), eps
