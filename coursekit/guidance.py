"""Guidance by gradients: steer sampling with the gradient of a property of the noisy image (notebook 11).

Classifier-free guidance (notebook 08) needs a model trained with and without labels. Gradient
guidance needs no retraining of the denoiser: any differentiable *energy* E(x_t, t), low where the
noisy image has the wanted property, bends every step towards it,

    eps_guided = eps(x_t, t) + w * sqrt(1 - alpha_bar_t) * grad_x E(x_t, t).

With E = -log p(y | x_t), the log-probability a noise-aware classifier gives the wanted class, this is
classifier guidance (Dhariwal & Nichol 2021, arXiv:2105.05233, Algorithm 2, written for eps): the
noise guess is a scaled score, eps = -sqrt(1 - alpha_bar) * grad log p(x_t), so adding w times the
classifier's score to the model's score is exactly this line. Self-guidance (coursekit.self_guidance)
uses the same line with energies read from the model's own attention maps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from coursekit.embeddings import sinusoidal_embedding
from coursekit.forward import noise_at_random_steps
from coursekit.schedules import NoiseSchedule
from coursekit.unet import group_norm

Energy = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> (B,) energies


def energy_gradient(energy: Energy, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """grad_x E(x_t, t) for each image of the batch (the energies of different images do not mix)."""
    with torch.enable_grad():
        x = x_t.detach().requires_grad_(True)
        (gradient,) = torch.autograd.grad(energy(x, t).sum(), x)
    return gradient


def gradient_guidance(model: Callable, schedule: NoiseSchedule, energy: Energy, weight: float) -> Callable:
    """A noise predictor ``(x_t, t) -> eps`` that follows ``model`` and descends ``energy``:
    ``eps + weight * sqrt(1 - alpha_bar_t) * grad_x energy`` (see the module's docstring).

    ``weight = 0`` is ``model`` itself. Use it with any sampler (DDIM, DDPM, DPM-Solver++).
    """

    def guided(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = model(x_t, t)
        if weight == 0:
            return eps
        sigma = (1 - schedule.at(schedule.alpha_bar, t, like=x_t)).sqrt()
        return eps + weight * sigma * energy_gradient(energy, x_t, t).to(eps.dtype)

    return guided


# ----------------------------------------------------------------------------- a noise-aware classifier


class NoisyClassifier(nn.Module):
    """Reads the class of a *noisy* image: ``(x_t, t) -> logits``. A plain classifier sees clean images
    only and says nothing useful about x_t at high noise, so classifier guidance needs one trained on
    images noised to every timestep (Dhariwal & Nichol, Sec. 4)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, time_dim: int = 64):
        super().__init__()
        self.time_dim = time_dim
        self.time = nn.Sequential(nn.Linear(time_dim, 2 * width), nn.SiLU())
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), group_norm(width), nn.SiLU(),
                                  nn.Conv2d(width, 2 * width, 3, stride=2, padding=1))  # fmt: skip
        self.body = nn.Sequential(
            group_norm(2 * width), nn.SiLU(), nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
            group_norm(2 * width), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes),
        )  # fmt: skip

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        features = self.stem(x_t)
        features = features + self.time(sinusoidal_embedding(t, self.time_dim))[:, :, None, None]  # when, not just what
        return self.body(features)


def noisy_classifier_loss(schedule: NoiseSchedule):
    """The ``loss_fn(model, batch, generator)`` for :func:`coursekit.training.train`: noise each image to a
    random timestep, then the cross-entropy of its label; batches are (images, labels)."""

    def loss_fn(model: NoisyClassifier, batch: tuple, generator: torch.Generator | None = None) -> torch.Tensor:
        images, labels = batch[0], batch[1]
        x_t, t, _ = noise_at_random_steps(images, schedule, generator)
        return F.cross_entropy(model(x_t, t).float(), labels)

    return loss_fn


def classifier_energy(classifier: NoisyClassifier, labels: torch.Tensor) -> Energy:
    """E(x_t, t) = -log p(label | x_t): low where the classifier sees the wanted class."""

    def energy(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        log_probabilities = classifier(x_t, t).float().log_softmax(dim=-1)
        return -log_probabilities.gather(1, labels.to(x_t.device)[:, None]).squeeze(1)

    return energy
