"""Telling a network which timestep it is looking at (notebook 02)."""

from __future__ import annotations

import math

import torch


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Transformer-style sinusoidal features of the timestep, shape (B,) -> (B, dim).

    Half the features are ``sin(t * w_k)``, half ``cos(t * w_k)``, with frequencies
    ``w_k = max_period ** (-k / (dim / 2))`` from 1 down to ``1 / max_period``
    (Vaswani et al. Sec. 3.5, used by DDPM Appendix B). Nearby timesteps get similar vectors.
    """
    if dim < 2 or dim % 2:
        raise ValueError(f"the embedding dimension must be an even number >= 2, got {dim}")
    t = torch.as_tensor(t)
    if t.ndim != 1:
        raise ValueError(f"t must have shape (B,), got {tuple(t.shape)}")
    half = dim // 2
    exponents = torch.arange(half, device=t.device, dtype=torch.float32) / half
    frequencies = torch.exp(-math.log(max_period) * exponents)  # (dim/2,)
    angles = t.float()[:, None] * frequencies[None, :]  # (B, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (B, dim)
