"""The training objective: guess the noise, compare (DDPM Algorithm 1, notebook 03)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from coursekit.forward import noise_at_random_steps
from coursekit.parameterization import alpha_sigma, check_prediction, output_for
from coursekit.schedules import NoiseSchedule

NoisePredictor = Callable[..., torch.Tensor]


def noise_prediction_loss(
    model: NoisePredictor,
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    class_labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    per_example: bool = False,
    prediction: str = "eps",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The simplified loss ``L_simple = E_{t, x0, eps} || eps - eps_theta(x_t, t) ||^2`` (DDPM Eq. 14).

    1. draw one timestep per image, uniformly (Algorithm 1, line 3);
    2. draw the noise and jump to x_t in closed form (line 4);
    3. ask the model for the noise and take the mean squared error (line 5).
    With ``per_example=True`` it returns ``(per-example losses (B,), t (B,))`` for plots.
    ``prediction="v"`` (or ``"x0"``) trains the model to output ``v = alpha eps - sigma x0``
    (Salimans & Ho 2022) or the clean image instead; ``parameterization.output_for`` gives the target.
    """
    check_prediction(prediction)
    x_t, t, noise = noise_at_random_steps(x0, schedule, generator)  # Algorithm 1, lines 3-4
    if class_labels is None:
        eps_pred = model(x_t, t)
    else:
        eps_pred = model(x_t, t, class_labels=class_labels)
    if eps_pred.shape != noise.shape:
        raise ValueError(
            f"the model must predict noise of the input's shape {tuple(noise.shape)}, got {tuple(eps_pred.shape)}"
        )
    target = noise
    if prediction != "eps":
        alpha, sigma = alpha_sigma(schedule, t, like=x0)
        target = output_for(x0, noise, alpha, sigma, prediction)
    per_example_loss = F.mse_loss(eps_pred.float(), target.float(), reduction="none")
    per_example_loss = per_example_loss.flatten(1).mean(dim=1)  # (B,)
    if per_example:
        return per_example_loss, t
    return per_example_loss.mean()


def loss_by_timestep(
    losses: torch.Tensor, t: torch.Tensor, num_steps: int, num_bins: int = 20
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average per-example losses over ``num_bins`` equal ranges of t, for a loss-vs-t plot.

    Returns ``(bin_centres (num_bins,), mean_loss (num_bins,))``; empty bins hold NaN.
    """
    if losses.shape != t.shape or losses.ndim != 1:
        raise ValueError(f"losses and t must both have shape (B,), got {tuple(losses.shape)} and {tuple(t.shape)}")
    if not 1 <= num_bins <= num_steps:
        raise ValueError(f"num_bins must lie in [1, {num_steps}], got {num_bins}")
    bins = (t.long().cpu() * num_bins) // num_steps
    sums = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, bins, losses.detach().double().cpu())
    counts = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, bins, torch.ones_like(sums[bins]))
    means = sums / counts  # NaN where a bin is empty
    centres = (torch.arange(num_bins, dtype=torch.float64) + 0.5) * num_steps / num_bins
    return centres, means


def diffusion_loss(
    schedule: NoiseSchedule,
    conditional: bool = False,
    label_dropout: float = 0.0,
    null_label: int | None = None,
    prediction: str = "eps",
) -> Callable[[NoisePredictor, tuple, torch.Generator | None], torch.Tensor]:
    """The ``loss_fn(model, batch, generator)`` that :func:`coursekit.training.train` expects.

    ``batch`` is ``(images,)`` or ``(images, labels)``. With ``conditional=True`` the labels go to
    the model, and a share ``label_dropout`` of them is replaced by ``null_label`` ("no label"),
    so that one model learns both the conditional and the unconditional prediction that
    classifier-free guidance mixes (Ho & Salimans 2022, Algorithm 1). ``prediction`` chooses what the
    model outputs: the noise ("eps"), the clean image ("x0") or the velocity ("v").
    """
    check_prediction(prediction)
    labels_of = training_labels(conditional, label_dropout, null_label)

    def loss_fn(model: NoisePredictor, batch: tuple, generator: torch.Generator | None = None) -> torch.Tensor:
        labels = labels_of(batch, generator)
        return noise_prediction_loss(
            model, batch[0], schedule, class_labels=labels, generator=generator, prediction=prediction
        )

    return loss_fn


def training_labels(conditional: bool, label_dropout: float, null_label: int | None):
    """``labels_of(batch, generator)``: a batch's labels with a share ``label_dropout`` set to ``null_label``
    (None when ``conditional`` is False). Checks the settings once, for every training objective."""
    if not 0 <= label_dropout < 1:
        raise ValueError(f"label_dropout must lie in [0, 1), got {label_dropout}")
    if conditional and label_dropout > 0 and null_label is None:
        raise ValueError("label dropout needs the model's null_label (the 'no label' class index)")

    def labels_of(batch: tuple, generator: torch.Generator | None = None) -> torch.Tensor | None:
        if not conditional:
            return None
        if len(batch) < 2:
            raise ValueError("conditional training needs (images, labels) batches")
        return drop_labels(batch[1], label_dropout, null_label, generator)

    return labels_of


def drop_labels(
    labels: torch.Tensor, probability: float, null_label: int | None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace each label by ``null_label`` ("no label") with the given probability (notebook 08).

    Classifier-free guidance training (Ho & Salimans 2022, Algorithm 1, line 3): one model then learns
    both the conditional and the unconditional noise prediction. The draw is
    ``torch.rand(labels.shape, generator=generator) < probability``, made on the generator's device.
    """
    if not 0 <= probability <= 1:
        raise ValueError(f"probability must lie in [0, 1], got {probability}")
    if probability == 0:
        return labels.clone()
    draw_device = generator.device if generator is not None else labels.device
    drop = torch.rand(labels.shape, generator=generator, device=draw_device) < probability
    return torch.where(drop.to(labels.device), torch.full_like(labels, null_label), labels)
