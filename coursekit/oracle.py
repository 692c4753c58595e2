"""An exact noise predictor for Gaussian data: a perfect "model" that needs no training.

If every coordinate of x0 is drawn from N(mean, std^2), then x_t = a x0 + b eps with
a = sqrt(alpha_bar_t), b = sqrt(1 - alpha_bar_t) is Gaussian too, and the best possible
prediction of the noise (the one minimising the training loss) is the conditional mean

    E[eps | x_t] = Cov(eps, x_t) / Var(x_t) * (x_t - E[x_t]) = b / (a^2 std^2 + b^2) * (x_t - a mean).

A sampler given this predictor must turn pure noise into samples with the data's mean and
standard deviation, so samplers can be tested (and compared in notebook 05) with no training.
"""

from __future__ import annotations

import torch

from coursekit.schedules import NoiseSchedule


class GaussianOracle:
    """The optimal noise predictor for data with per-coordinate ``mean`` and ``std``.

    ``mean`` and ``std`` broadcast against one example (e.g. shape (D,) for (B, D) data).
    Call it like a model: ``oracle(x_t, t) -> eps``.
    """

    def __init__(self, mean: torch.Tensor | float, std: torch.Tensor | float, schedule: NoiseSchedule):
        self.mean = torch.as_tensor(mean, dtype=torch.float64)
        self.std = torch.as_tensor(std, dtype=torch.float64)
        if bool((self.std <= 0).any()):
            raise ValueError("std must be positive")
        self.schedule = schedule

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha_bar_t = self.schedule.at(self.schedule.alpha_bar, t, like=x_t.double())
        signal, noise_scale = alpha_bar_t.sqrt(), (1 - alpha_bar_t).sqrt()
        mean, std = self.mean.to(x_t.device), self.std.to(x_t.device)
        variance_x_t = signal**2 * std**2 + noise_scale**2
        eps = noise_scale / variance_x_t * (x_t.double() - signal * mean)
        return eps.to(x_t.dtype)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, prediction: str = "eps") -> torch.Tensor:
        """The optimal guess of ``"eps"``, ``"x0"`` or ``"v"``, each from its own closed form.

        ``E[x0 | x_t] = m + alpha d^2 / (alpha^2 d^2 + sigma^2) (x_t - alpha m)`` stays finite where
        alpha_bar = 0 (a zero-terminal-SNR schedule's last step), where x0 from eps would be 0 / 0.
        """
        if prediction == "eps":
            return self(x_t, t)
        alpha_bar_t = self.schedule.at(self.schedule.alpha_bar, t, like=x_t.double())
        alpha, sigma = alpha_bar_t.sqrt(), (1 - alpha_bar_t).sqrt()
        mean, std = self.mean.to(x_t.device), self.std.to(x_t.device)
        x0 = mean + alpha * std**2 / (alpha**2 * std**2 + sigma**2) * (x_t.double() - alpha * mean)
        if prediction == "x0":
            return x0.to(x_t.dtype)
        if prediction == "v":
            return (alpha * self(x_t, t).double() - sigma * x0).to(x_t.dtype)  # v = alpha eps - sigma x0
        raise ValueError(f"unknown prediction {prediction!r}; choose one of ('eps', 'x0', 'v')")

    def sample_data(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``count`` draws of x0, shape (count, *mean.shape broadcast with std.shape)."""
        shape = torch.broadcast_shapes(self.mean.shape, self.std.shape)
        noise = torch.randn((count, *shape), generator=generator, dtype=torch.float64)
        return self.mean + self.std * noise
