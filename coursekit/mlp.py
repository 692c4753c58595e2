"""A tiny denoiser for 2-D points: the milk-in-coffee model of notebook 00."""

from __future__ import annotations

import torch
from torch import nn

from coursekit.embeddings import sinusoidal_embedding


class MLPDenoiser(nn.Module):
    """Predicts the noise in a batch of noisy points ``x_t`` (B, D) at timesteps ``t`` (B,).

    The point and a sinusoidal embedding of ``t`` are concatenated and passed through a few
    fully connected layers with SiLU activations.
    """

    def __init__(self, data_dim: int = 2, hidden: int = 128, depth: int = 3, time_dim: int = 32):
        super().__init__()
        if data_dim < 1 or hidden < 1 or depth < 1:
            raise ValueError("data_dim, hidden and depth must all be positive")
        self.data_dim = data_dim
        self.time_dim = time_dim
        layers: list[nn.Module] = [nn.Linear(data_dim + time_dim, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, data_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x_t.ndim != 2 or x_t.shape[1] != self.data_dim:
            raise ValueError(f"MLPDenoiser expects points of shape (B, {self.data_dim}), got {tuple(x_t.shape)}")
        t = torch.as_tensor(t, device=x_t.device)
        if t.shape != (x_t.shape[0],):
            raise ValueError(f"t must have shape ({x_t.shape[0]},), got {tuple(t.shape)}")
        time_features = sinusoidal_embedding(t, self.time_dim).to(x_t.dtype)  # (B, time_dim)
        return self.net(torch.cat([x_t, time_features], dim=1))  # (B, D)
