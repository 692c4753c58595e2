import pytest
import torch
from PIL import Image

from coursekit.losses import drop_labels, loss_by_timestep, noise_prediction_loss
from coursekit.oracle import GaussianOracle
from coursekit.plots import (
    image_grid,
    plot_schedules,
    save_animation,
    save_image_grid,
    show_noising,
)
from coursekit.schedules import make_schedule


def test_the_loss_of_the_perfect_predictor_is_the_irreducible_noise():
    schedule = make_schedule("cosine", 1000)
    std = 0.5
    oracle = GaussianOracle(0.0, std, schedule)
    x0 = oracle.sample_data(400_000, generator=torch.Generator().manual_seed(0))[:, None]
    losses, t = noise_prediction_loss(
        oracle, x0, schedule, per_example=True, generator=torch.Generator().manual_seed(1)
    )
    # With x_t = a x0 + b eps, the best guess of eps leaves Var(eps | x_t) = a^2 s^2 / (a^2 s^2 + b^2).
    alpha_bar = schedule.alpha_bar
    irreducible = (alpha_bar * std**2 / (alpha_bar * std**2 + 1 - alpha_bar)).mean().item()
    assert losses.mean().item() == pytest.approx(irreducible, rel=0.01)
    centres, by_t = loss_by_timestep(losses, t, 1000, num_bins=10)
    assert centres.tolist()[0] == 50.0 and len(by_t) == 10
    assert by_t[0] > by_t[-1]  # little noise is hard to guess; nearly pure noise is easy


def test_loss_is_reproducible_and_checks_the_model_output():
    schedule = make_schedule("linear", 100)
    x0 = torch.randn(8, 1, 4, 4)

    def model(x, t):
        return x * 0.5

    first = noise_prediction_loss(model, x0, schedule, generator=torch.Generator().manual_seed(3))
    second = noise_prediction_loss(model, x0, schedule, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, second) and first.ndim == 0
    with pytest.raises(ValueError, match="predict noise of the input's shape"):
        noise_prediction_loss(lambda x, t: x[:, :1, :2], x0, schedule)


def test_loss_by_timestep_averages_within_bins():
    losses = torch.tensor([1.0, 3.0, 10.0])
    t = torch.tensor([0, 4, 9])
    _, means = loss_by_timestep(losses, t, num_steps=10, num_bins=2)
    assert means.tolist() == [2.0, 10.0]
    _, means = loss_by_timestep(losses, t, num_steps=10, num_bins=10)
    assert torch.isnan(means[1])


def test_image_grid_and_files(tmp_path):
    images = torch.linspace(-1, 1, 6 * 3 * 4 * 4).reshape(6, 3, 4, 4)
    grid = image_grid(images, ncols=3, padding=1)
    assert grid.shape == (3, 2 * 5 + 1, 3 * 5 + 1)
    assert grid.min() >= 0 and grid.max() <= 1
    assert torch.allclose(grid[:, 1:5, 1:5], (images[0] + 1) / 2)
    png = save_image_grid(images[:, :1], tmp_path / "grid.png", scale=2)
    assert Image.open(png).size == (2 * 16, 2 * 11)
    gif = save_animation([images * 0.1, images], tmp_path / "reverse.gif")
    assert Image.open(gif).n_frames == 2


def test_figures_draw_without_a_display():
    schedule = make_schedule("linear", 100)
    figure = show_noising(torch.zeros(1, 8, 8), schedule, [0, 50, 99])
    assert len(figure.axes) == 3
    assert len(plot_schedules([schedule, make_schedule("cosine", 100)]).axes) == 2
    with pytest.raises(ValueError, match=r"one image \(C, H, W\)"):
        show_noising(torch.zeros(2, 1, 8, 8), schedule, [0])


def test_drop_labels_replaces_about_the_given_share_and_nothing_else():
    labels = torch.arange(10).repeat(1000)
    dropped = drop_labels(labels, 0.1, 10, torch.Generator().manual_seed(0))
    hidden = dropped == 10
    assert 0.08 < hidden.double().mean() < 0.12  # 10,000 draws: 0.1 +- 4 standard errors
    assert torch.equal(dropped[~hidden], labels[~hidden]) and dropped.dtype == labels.dtype
    assert torch.equal(drop_labels(labels, 1.0, 10), torch.full_like(labels, 10))
    unchanged = drop_labels(labels, 0.0, 10)
    assert torch.equal(unchanged, labels) and unchanged is not labels
    with pytest.raises(ValueError, match="probability"):
        drop_labels(labels, 1.5, 10)
