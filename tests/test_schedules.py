import math

import pytest
import torch

from coursekit.schedules import (
    check_timesteps,
    cosine_alpha_bar,
    cosine_betas,
    linear_betas,
    make_schedule,
)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_alpha_bar_decreases_from_near_one_to_near_zero_in_float64(name):
    schedule = make_schedule(name, 1000)
    for values in (schedule.betas, schedule.alphas, schedule.alpha_bar, schedule.alpha_bar_prev):
        assert values.dtype == torch.float64 and values.shape == (1000,)
    assert bool((schedule.alpha_bar[1:] < schedule.alpha_bar[:-1]).all())
    assert schedule.alpha_bar[0] > 0.999
    assert schedule.alpha_bar[-1] < 1e-4
    assert bool((schedule.snr()[1:] < schedule.snr()[:-1]).all())


def test_linear_schedule_matches_the_ddpm_paper_endpoints():
    betas = linear_betas(1000)
    assert betas[0].item() == pytest.approx(1e-4)
    assert betas[-1].item() == pytest.approx(0.02)
    # Hand-derived: log alpha_bar_T = sum log(1 - beta) ~ -sum(beta) - sum(beta^2)/2 - sum(beta^3)/3,
    # summed term by term over the ramp (four terms of the series are exact to 1e-9 here).
    ramp = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    log_alpha_bar = -sum(b + b**2 / 2 + b**3 / 3 + b**4 / 4 for b in ramp)
    assert make_schedule("linear").alpha_bar[-1].item() == pytest.approx(math.exp(log_alpha_bar), rel=1e-6)


def test_timestep_convention_index_zero_is_the_papers_first_step():
    schedule = make_schedule("linear", 1000)
    # alpha_bar[t] = prod_{s <= t} alpha_s, so index 0 already holds one step of noise,
    # and "before" index 0 (the clean image) alpha_bar is 1: this is diffusers' alphas_cumprod.
    assert schedule.alpha_bar[0].item() == pytest.approx(1 - 1e-4, abs=0)
    assert schedule.alpha_bar_prev[0].item() == 1.0
    assert torch.equal(schedule.alpha_bar_prev[1:], schedule.alpha_bar[:-1])
    assert torch.allclose(schedule.alpha_bar, torch.cumprod(1 - schedule.betas, 0))
    assert schedule.posterior_variance()[0].item() == 0.0


def test_cosine_schedule_follows_its_defining_formula():
    steps = 1000
    schedule = make_schedule("cosine", steps)
    offset = 0.008
    paper_t = torch.arange(1, steps + 1, dtype=torch.float64)  # our index t is paper step t+1
    f = torch.cos((paper_t / steps + offset) / (1 + offset) * math.pi / 2) ** 2
    f0 = math.cos(offset / (1 + offset) * math.pi / 2) ** 2
    expected = f / f0
    unclipped = cosine_betas(steps, max_beta=1.0) < 0.999
    assert torch.allclose(schedule.alpha_bar[unclipped], expected[unclipped], rtol=1e-12)
    assert cosine_alpha_bar(torch.tensor(0.0), steps).item() == pytest.approx(1.0)
    assert schedule.betas.max().item() <= 0.999


def test_unknown_schedule_and_bad_timesteps_raise_clear_errors():
    with pytest.raises(ValueError, match="choose one of"):
        make_schedule("quadratic")
    with pytest.raises(ValueError, match="positive integer"):
        make_schedule("linear", 0)
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        check_timesteps(torch.tensor([3, 10]), 10)
    with pytest.raises(ValueError, match="integers"):
        check_timesteps(torch.tensor([0.5]), 10)
    with pytest.raises(ValueError, match="1-D"):
        check_timesteps(torch.zeros(2, 2, dtype=torch.long), 10)
