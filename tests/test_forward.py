import pytest
import torch

from coursekit.forward import add_noise, noising_step, posterior_mean_variance, predict_x0
from coursekit.schedules import make_schedule

SCHEDULE = make_schedule("linear", 1000)


def test_add_noise_has_the_closed_form_mean_and_variance():
    x0 = torch.tensor([[0.7, -0.4]], dtype=torch.float64).expand(200_000, 2)
    for step in (0, 100, 500, 999):
        t = torch.full((len(x0),), step)
        x_t, _ = add_noise(x0, t, SCHEDULE, generator=torch.Generator().manual_seed(step))
        alpha_bar = SCHEDULE.alpha_bar[step]
        assert torch.allclose(x_t.mean(0), alpha_bar.sqrt() * x0[0], atol=0.01)
        assert torch.allclose(x_t.var(0), (1 - alpha_bar).expand(2), rtol=0.02)


def test_single_steps_reach_the_same_distribution_as_the_jump():
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 3, dtype=torch.float64, generator=generator).repeat(50_000, 1)  # 2 points
    target = 299
    x = x0
    for step in range(target + 1):  # q(x_t | x_{t-1}), applied t+1 times: paper steps 1..t+1
        x = noising_step(x, torch.full((len(x),), step), SCHEDULE, generator=generator)
    jumped, _ = add_noise(x0, torch.full((len(x0),), target), SCHEDULE, generator=generator)
    stepped_points, jumped_points = x.reshape(-1, 2, 3), jumped.reshape(-1, 2, 3)
    assert torch.allclose(stepped_points.mean(0), jumped_points.mean(0), atol=0.015)
    assert torch.allclose(stepped_points.std(0), jumped_points.std(0), rtol=0.02)


def test_predict_x0_inverts_add_noise():
    x0 = torch.randn(8, 1, 4, 4, dtype=torch.float64)
    t = torch.randint(0, 1000, (8,))
    x_t, eps = add_noise(x0, t, SCHEDULE)
    assert torch.allclose(predict_x0(x_t, t, eps, SCHEDULE), x0, atol=1e-8)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_posterior_matches_bayes_rule_derived_independently(name):
    schedule = make_schedule(name, 1000)
    generator = torch.Generator().manual_seed(2)
    x0 = torch.randn(6, 5, dtype=torch.float64, generator=generator)
    x_t = torch.randn(6, 5, dtype=torch.float64, generator=generator)
    t = torch.tensor([1, 2, 10, 400, 800, 999])
    mean, variance = posterior_mean_variance(x0, x_t, t, schedule)
    # Bayes: q(x_{t-1} | x_t, x0) is proportional to q(x_t | x_{t-1}) q(x_{t-1} | x0), both Gaussian
    # in x_{t-1}: N(x_t; sqrt(a_t) x_{t-1}, b_t) and N(x_{t-1}; sqrt(ab_{t-1}) x0, 1 - ab_{t-1}).
    # Adding precisions and precision-weighted means:
    betas = torch.tensor(
        [1 - (schedule.alpha_bar[s] / schedule.alpha_bar[s - 1]).item() for s in t.tolist()],
        dtype=torch.float64,
    )[:, None]
    ab_prev = torch.stack([schedule.alpha_bar[s - 1] for s in t.tolist()])[:, None]
    precision = (1 - betas) / betas + 1 / (1 - ab_prev)
    expected_mean = ((1 - betas).sqrt() / betas * x_t + ab_prev.sqrt() / (1 - ab_prev) * x0) / precision
    assert torch.allclose(variance, 1 / precision, rtol=1e-9)
    assert torch.allclose(mean, expected_mean, rtol=1e-9, atol=1e-12)


def test_posterior_at_the_first_step_returns_x0_with_no_variance():
    x0, x_t = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    mean, variance = posterior_mean_variance(x0, x_t, torch.zeros(3, dtype=torch.long), SCHEDULE)
    assert torch.allclose(mean, x0) and bool((variance == 0).all())


def test_bad_input_raises_value_errors_that_say_what_was_expected():
    x0 = torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"one timestep per example, shape \(4,\)"):
        add_noise(x0, torch.zeros(3, dtype=torch.long), SCHEDULE)
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        add_noise(x0, torch.full((4,), 1000), SCHEDULE)
    with pytest.raises(ValueError, match="shape of x0"):
        add_noise(x0, torch.zeros(4, dtype=torch.long), SCHEDULE, noise=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="batch tensor"):
        add_noise(torch.zeros(4), torch.zeros(4, dtype=torch.long), SCHEDULE)
    with pytest.raises(ValueError, match="shape of x_t"):
        predict_x0(x0, torch.zeros(4, dtype=torch.long), torch.zeros(4, 1), SCHEDULE)


def test_add_noise_is_reproducible_with_a_generator():
    x0, t = torch.zeros(3, 1, 4, 4), torch.tensor([0, 5, 9])
    first, _ = add_noise(x0, t, SCHEDULE, generator=torch.Generator().manual_seed(7))
    second, _ = add_noise(x0, t, SCHEDULE, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, second)
