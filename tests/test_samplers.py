"""Samplers tested with no training: for Gaussian data the best noise predictor is known exactly."""

import pytest
import torch

from coursekit.oracle import GaussianOracle
from coursekit.samplers import (
    ddim_sample,
    ddim_steps,
    ddim_timesteps,
    ddpm_sample,
    ddpm_steps,
    dpm_solver_sample,
    dpm_solver_steps,
    get_sampler,
    with_guidance,
)
from coursekit.schedules import make_schedule

MEAN = torch.tensor([0.5, -1.0, 0.0], dtype=torch.float64)
STD = torch.tensor([0.3, 1.5, 1.0], dtype=torch.float64)


@pytest.mark.parametrize(("name", "variance"), [("linear", "posterior"), ("linear", "beta"), ("cosine", "posterior")])
def test_ddpm_with_the_oracle_reproduces_the_data_distribution(name, variance):
    schedule = make_schedule(name, 1000)
    oracle = GaussianOracle(MEAN, STD, schedule)
    generator = torch.Generator().manual_seed(0)
    x_T = torch.randn(100_000, 3, dtype=torch.float64, generator=generator)
    samples = ddpm_sample(oracle, schedule, x_T, generator=generator, variance=variance, clip_x0=False)
    mean_error = (samples.mean(0) - MEAN).abs().max().item()
    std_error = ((samples.std(0) - STD) / STD).abs().max().item()
    print(f"DDPM {name}/{variance}: mean error {mean_error:.4f}, relative std error {std_error:.4f}")
    assert mean_error < 0.025
    assert std_error < 0.02


def _affine_moments(sampler, schedule, **options):
    """With the oracle, deterministic DDIM is affine per coordinate: x_0 = A x_T + c.

    Pushing x_T = 0 and x_T = 1 through it gives c and A exactly, so the output distribution for
    x_T ~ N(0, 1) is N(c, A^2): exact moments, no sampling error.
    """
    oracle = GaussianOracle(MEAN, STD, schedule)
    x_T = torch.stack([torch.zeros(3), torch.ones(3)]).double()
    out = sampler(oracle, schedule, x_T, **options, clip_x0=False)
    return out[0], (out[1] - out[0]).abs()


@pytest.mark.parametrize(
    ("name", "num_steps", "tolerance"),
    [
        ("linear", 200, 0.025),
        ("linear", 1000, 0.006),
        ("cosine", 200, 0.015),
        ("cosine", 1000, 0.004),
    ],
)
def test_ddim_with_the_oracle_reproduces_the_data_distribution(name, num_steps, tolerance):
    schedule = make_schedule(name, 1000)
    mean, std = _affine_moments(ddim_sample, schedule, num_steps=num_steps)
    mean_error = (mean - MEAN).abs().max().item()
    std_error = ((std - STD) / STD).abs().max().item()
    print(f"DDIM {name}/{num_steps}: mean error {mean_error:.2e}, relative std error {std_error:.4f}")
    # The linear schedule ends at alpha_bar = 4e-5, not 0: starting from N(0, I) shifts the mean
    # by about 0.01; the cosine schedule ends much closer to pure noise.
    assert mean_error < (0.012 if name == "linear" else 1e-3)
    assert std_error < tolerance


def test_fewer_ddim_steps_are_less_exact():
    schedule = make_schedule("cosine", 1000)
    errors = []
    for num_steps in (20, 50, 200, 1000):
        _, std = _affine_moments(ddim_sample, schedule, num_steps=num_steps)
        errors.append(((std - STD) / STD).abs().max().item())
    assert errors == sorted(errors, reverse=True)


def test_ddim_with_eta_one_on_every_step_is_the_ddpm_posterior_step():
    schedule = make_schedule("linear", 1000)
    oracle = GaussianOracle(MEAN, STD, schedule)
    x_T = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ddpm = ddpm_sample(oracle, schedule, x_T, generator=torch.Generator().manual_seed(4), clip_x0=False)
    ddim = ddim_sample(
        oracle, schedule, x_T, generator=torch.Generator().manual_seed(4), num_steps=1000, eta=1.0, clip_x0=False
    )
    assert torch.allclose(ddpm, ddim, atol=1e-9)


def test_ddim_with_eta_zero_is_deterministic_and_ddpm_is_not():
    schedule = make_schedule("cosine", 100)
    oracle = GaussianOracle(MEAN, STD, schedule)
    x_T = torch.randn(16, 3, dtype=torch.float64)
    first = ddim_sample(oracle, schedule, x_T, num_steps=10, generator=torch.Generator().manual_seed(0), clip_x0=False)
    second = ddim_sample(oracle, schedule, x_T, num_steps=10, generator=torch.Generator().manual_seed(1), clip_x0=False)
    assert torch.equal(first, second)
    first = ddpm_sample(oracle, schedule, x_T, generator=torch.Generator().manual_seed(0), clip_x0=False)
    second = ddpm_sample(oracle, schedule, x_T, generator=torch.Generator().manual_seed(1), clip_x0=False)
    assert not torch.allclose(first, second)


def test_samplers_yield_every_intermediate_state():
    schedule = make_schedule("linear", 50)
    oracle = GaussianOracle(MEAN, STD, schedule)
    x_T = torch.randn(4, 3, dtype=torch.float64)
    steps = list(ddpm_steps(oracle, schedule, x_T, clip_x0=False))
    assert [s.t for s in steps] == list(range(49, -1, -1))
    assert all(s.x.shape == x_T.shape and s.x0_pred.shape == x_T.shape for s in steps)
    steps = list(ddim_steps(oracle, schedule, x_T, timesteps=[40, 20, 5], clip_x0=False))
    assert [s.t for s in steps] == [40, 20, 5]


def test_ddim_timesteps_cover_both_ends_evenly():
    assert ddim_timesteps(1000, 5) == [999, 749, 500, 250, 0]
    assert ddim_timesteps(1000, 1000) == list(range(999, -1, -1))
    assert ddim_timesteps(10, 1) == [9]
    with pytest.raises(ValueError, match=r"\[1, 1000\]"):
        ddim_timesteps(1000, 1001)


def test_classifier_free_guidance_combines_the_two_predictions():
    calls = []

    def model(x_t, t, class_labels):
        calls.append(class_labels.clone())
        return x_t * 0 + class_labels[:, None].double()  # eps = the label, to see the mixture

    labels = torch.tensor([2, 5])
    x = torch.zeros(2, 3, dtype=torch.float64)
    t = torch.zeros(2, dtype=torch.long)
    guided = with_guidance(model, labels, guidance_scale=3.0, null_label=10)
    # eps = eps_u + w (eps_c - eps_u) = 10 + 3 * (label - 10)
    assert torch.equal(guided(x, t), torch.tensor([[-14.0] * 3, [-5.0] * 3], dtype=torch.float64))
    assert torch.equal(calls[-1], torch.tensor([2, 5, 10, 10]))
    plain = with_guidance(model, labels, guidance_scale=1.0, null_label=10)
    assert torch.equal(plain(x, t)[:, 0], torch.tensor([2.0, 5.0], dtype=torch.float64))
    assert len(calls[-1]) == 2  # w = 1 needs one call, not two


def test_bad_sampler_input_raises_clear_errors():
    schedule = make_schedule("linear", 10)
    oracle = GaussianOracle(0.0, 1.0, schedule)
    with pytest.raises(ValueError, match="choose one of"):
        get_sampler("euler")
    with pytest.raises(ValueError, match="variance"):
        ddpm_sample(oracle, schedule, torch.zeros(2, 2), variance="large")
    with pytest.raises(ValueError, match="strictly decreasing"):
        ddim_sample(oracle, schedule, torch.zeros(2, 2), timesteps=[3, 5])
    with pytest.raises(ValueError, match="x_T"):
        ddim_sample(oracle, schedule, torch.zeros(2))
    with pytest.raises(ValueError, match="null_label"):
        with_guidance(lambda x, t, class_labels: x, torch.tensor([1]), 2.0)


def test_ddpm_can_start_part_way_from_a_noised_sample():
    schedule = make_schedule("linear", 1000)
    oracle = GaussianOracle(MEAN, STD, schedule)
    generator = torch.Generator().manual_seed(5)
    x0 = oracle.sample_data(50_000, generator=generator)
    from coursekit.forward import add_noise

    x_t, _ = add_noise(x0, torch.full((len(x0),), 300), schedule, generator=generator)
    steps = list(ddpm_steps(oracle, schedule, x_t, generator=generator, start_t=300, clip_x0=False))
    assert [s.t for s in steps][:2] == [300, 299] and steps[-1].t == 0
    samples = steps[-1].x
    assert (samples.mean(0) - MEAN).abs().max() < 0.03
    assert ((samples.std(0) - STD) / STD).abs().max() < 0.03
    with pytest.raises(ValueError, match="start_t"):
        ddpm_sample(oracle, schedule, x_t[:2], start_t=1000)


# ----------------------------------------------------------------------------- DPM-Solver++(2M)


def _exact_flow_map(schedule, x_T):
    """Where the probability-flow ODE takes x_T (at t = T-1) for Gaussian data: an exact, independent answer.

    x_t ~ N(alpha m, alpha^2 s^2 + sigma^2) per coordinate, and the flow keeps each sample's standard
    score, so x_0 = m + s (x_T - alpha m) / sqrt(alpha^2 s^2 + sigma^2).
    """
    alpha_bar = float(schedule.alpha_bar[-1])
    alpha, sigma = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
    return MEAN + STD * (x_T - alpha * MEAN) / (alpha**2 * STD**2 + sigma**2).sqrt()


def _flow_error(sampler, schedule, num_steps):
    oracle = GaussianOracle(MEAN, STD, schedule)
    x_T = torch.linspace(-3, 3, 7, dtype=torch.float64)[:, None].expand(7, 3).clone()
    return (
        (sampler(oracle, schedule, x_T, num_steps=num_steps, clip_x0=False) - _exact_flow_map(schedule, x_T))
        .abs()
        .max()
        .item()
    )


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_dpm_solver_converges_at_second_order_and_ddim_at_first(name):
    schedule = make_schedule(name, 1000)
    dpm = {n: _flow_error(dpm_solver_sample, schedule, n) for n in (50, 100)}
    ddim = {n: _flow_error(ddim_sample, schedule, n) for n in (50, 100)}
    print(f"{name}: DDIM errors {ddim}, DPM-Solver++(2M) errors {dpm}")
    # Doubling the steps divides the error by about 2**order (measured: DDIM 2.0; DPM 3.5 linear, 4.0 cosine).
    assert 1.8 < ddim[50] / ddim[100] < 2.2
    assert dpm[50] / dpm[100] > 3.2
    assert dpm[100] < 0.5 * ddim[100]


@pytest.mark.parametrize(("name", "tolerance"), [("linear", 0.035), ("cosine", 0.012)])
def test_dpm_solver_with_the_oracle_reproduces_the_data_distribution(name, tolerance):
    schedule = make_schedule(name, 1000)
    mean, std = _affine_moments(dpm_solver_sample, schedule, num_steps=100)
    _, ddim_std = _affine_moments(ddim_sample, schedule, num_steps=100)
    std_error, ddim_std_error = ((std - STD) / STD).abs().max(), ((ddim_std - STD) / STD).abs().max()
    print(f"{name}, 100 steps: relative std error DPM-Solver++(2M) {std_error:.4f}, DDIM {ddim_std_error:.4f}")
    assert (mean - MEAN).abs().max() < tolerance  # linear: alpha_bar_T = 4e-5 is not 0, a floor of ~0.0095
    assert std_error < tolerance
    assert std_error < ddim_std_error


def test_dpm_solver_with_two_steps_is_ddim():
    # Both steps are first order (no previous guess, then the jump to the clean image): DDIM's update.
    schedule = make_schedule("cosine", 1000)
    oracle = GaussianOracle(MEAN, STD, schedule)
    x_T = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(
        dpm_solver_sample(oracle, schedule, x_T, num_steps=2, clip_x0=False),
        ddim_sample(oracle, schedule, x_T, num_steps=2, clip_x0=False),
    )
    first_dpm = next(dpm_solver_steps(oracle, schedule, x_T, num_steps=20, clip_x0=False))
    first_ddim = next(ddim_steps(oracle, schedule, x_T, num_steps=20, clip_x0=False))
    assert torch.allclose(first_dpm.x, first_ddim.x, atol=1e-12)


def test_dpm_solver_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    schedule = make_schedule("linear", 1000)
    oracle = GaussianOracle(MEAN, STD, schedule)
    x_T = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for num_steps in (5, 20):
        timesteps = ddim_timesteps(1000, num_steps)
        scheduler = diffusers.DPMSolverMultistepScheduler(
            num_train_timesteps=1000,
            trained_betas=schedule.betas.numpy(),
            algorithm_type="dpmsolver++",
            solver_order=2,
            final_sigmas_type="zero",
        )
        scheduler.set_timesteps(timesteps=timesteps)
        x = x_T.clone()
        for t in scheduler.timesteps:
            x = scheduler.step(oracle(x, torch.full((16,), int(t))), t, x).prev_sample
        # diffusers keeps its schedule in float32; ours is float64, hence the tolerance
        assert torch.allclose(
            dpm_solver_sample(oracle, schedule, x_T, timesteps=timesteps, clip_x0=False), x, atol=1e-5
        )


def test_dpm_solver_is_registered_and_deterministic():
    schedule = make_schedule("cosine", 100)
    oracle = GaussianOracle(MEAN, STD, schedule)
    x_T = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert get_sampler("dpm++2m") is dpm_solver_steps
    steps = list(dpm_solver_steps(oracle, schedule, x_T, num_steps=10, clip_x0=False))
    assert [step.t for step in steps] == ddim_timesteps(100, 10)
    assert torch.equal(steps[-1].x, dpm_solver_sample(oracle, schedule, x_T, num_steps=10, clip_x0=False))
    with pytest.raises(ValueError, match="strictly decreasing"):
        dpm_solver_sample(oracle, schedule, x_T, timesteps=[10, 20])
