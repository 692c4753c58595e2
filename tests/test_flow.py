"""Flow matching, the score view and the one place that reads a model's output, against exact oracles.

Gaussian data has closed forms for everything: the optimal noise guess, clean-image guess and
velocity, the score, and the exact flow map. The samplers' orders of convergence are measured
against that map, and the relations between the views (DDIM is Euler's method on the probability-flow
ODE; the straight path is a rescaled diffusion) are checked point by point.
"""

import math

import pytest
import torch

from coursekit.flow import (
    FlowModel,
    GaussianVelocityOracle,
    euler_sample,
    flow_matching_loss,
    flow_path,
    heun_sample,
    time_grid,
    velocity_target,
    x0_and_eps,
)
from coursekit.oracle import GaussianOracle
from coursekit.parameterization import output_for, read_output, score
from coursekit.parameterization import x0_and_eps as read_diffusion_output
from coursekit.samplers import ddim_sample, ddim_steps, dpm_solver_sample
from coursekit.schedules import make_schedule, rescale_zero_terminal_snr

MEAN, STD = torch.tensor([0.5, -1.0, 0.2]), torch.tensor([0.3, 1.5, 0.7])


def _noise(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_the_path_its_velocity_and_their_inverse():
    x0, noise, s = _noise(5, 0), _noise(5, 1), torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0], dtype=torch.float64)
    x_s = flow_path(x0, s, noise)
    assert torch.equal(x_s[0], x0[0]) and torch.equal(x_s[-1], noise[-1])
    x0_back, noise_back = x0_and_eps(velocity_target(x0, noise), x_s, s)
    assert torch.allclose(x0_back, x0) and torch.allclose(noise_back, noise)
    h = 1e-6  # the target is the path's derivative in s
    assert torch.allclose((flow_path(x0, s + h, noise) - flow_path(x0, s - h, noise)) / (2 * h), noise - x0, atol=1e-6)


def test_the_velocity_oracle_is_the_derivative_of_its_exact_flow_map():
    oracle = GaussianVelocityOracle(MEAN, STD)
    x_1 = _noise(64, 2)
    for s in (0.9, 0.5, 0.1):
        x_s = oracle.flow_map(x_1, 1.0, s)
        h = 1e-6
        derivative = (oracle.flow_map(x_1, 1.0, s + h) - oracle.flow_map(x_1, 1.0, s - h)) / (2 * h)
        assert torch.allclose(oracle(x_s, torch.full((64,), s)), derivative, atol=1e-6)
    assert torch.allclose(oracle.flow_map(x_1, 1.0, 0.0), MEAN.double() + STD.double() * x_1)  # data at s = 0


def _orders(sampler, steps=(8, 16, 32, 64)) -> list[float]:
    oracle = GaussianVelocityOracle(MEAN, STD)
    x_1 = _noise(256, 3)
    exact = oracle.flow_map(x_1, 1.0, 0.0)
    errors = [(sampler(oracle, x_1, num_steps=n, clip_x0=False) - exact).abs().max().item() for n in steps]
    return [math.log2(a / b) for a, b in zip(errors, errors[1:])]


def test_euler_converges_with_order_one_and_heun_with_order_two():
    euler, heun = _orders(euler_sample), _orders(heun_sample)
    assert all(0.8 < order < 1.2 for order in euler), euler
    assert all(1.7 < order < 2.3 for order in heun), heun


def test_many_steps_give_the_datas_moments():
    oracle = GaussianVelocityOracle(MEAN, STD)
    samples = heun_sample(oracle, _noise(20_000, 4), num_steps=100, clip_x0=False)
    assert torch.allclose(samples.mean(0), MEAN.double(), atol=0.03)
    assert torch.allclose(samples.std(0), STD.double(), rtol=0.03)


def test_the_straight_path_is_a_rescaled_diffusion_and_its_velocity_is_eps_minus_x0():
    """Gao et al. 2025: x_t / (alpha + sigma) is the flow sample at s = sigma / (alpha + sigma)."""
    schedule = make_schedule("cosine", 1000)
    diffusion, flow = GaussianOracle(MEAN, STD, schedule), GaussianVelocityOracle(MEAN, STD)
    x_t = _noise(32, 5) * 1.3
    for step in (10, 300, 700, 990):
        t = torch.full((32,), step)
        alpha, sigma = schedule.alpha_bar[step].sqrt(), (1 - schedule.alpha_bar[step]).sqrt()
        x0_pred, eps = read_diffusion_output(diffusion(x_t, t), x_t, alpha, sigma, "eps")
        s = torch.full((32,), float(sigma / (alpha + sigma)), dtype=torch.float64)
        assert torch.allclose(flow(x_t / (alpha + sigma), s), eps - x0_pred, atol=1e-9)


def test_ddim_is_eulers_method_on_the_probability_flow_ode():
    """In x / alpha and sigma / alpha, the probability-flow ODE reads d(x / alpha) = eps d(sigma / alpha)."""
    schedule = make_schedule("linear", 1000)
    oracle = GaussianOracle(MEAN, STD, schedule)
    x = _noise(16, 6)
    for step, following in ((999, 800), (500, 450), (100, 0)):
        eps = oracle(x, torch.full((16,), step))
        a, b = schedule.alpha_bar[step], schedule.alpha_bar[following]
        ratio_now, ratio_next = ((1 - a) / a).sqrt(), ((1 - b) / b).sqrt()  # sigma / alpha
        euler = b.sqrt() * (x / a.sqrt() + (ratio_next - ratio_now) * eps)
        ddim = next(iter(ddim_steps(oracle, schedule, x, timesteps=[step, following], clip_x0=False))).x
        assert torch.allclose(ddim, euler, atol=1e-10)


def test_the_score_and_tweedies_formula_against_the_gaussian_closed_forms():
    schedule = make_schedule("cosine", 1000)
    oracle = GaussianOracle(MEAN, STD, schedule)
    x_t = _noise(32, 7)
    for step in (0, 400, 999):
        t = torch.full((32,), step)
        alpha_bar = schedule.alpha_bar[step]
        alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        variance = alpha**2 * STD.double() ** 2 + sigma**2
        exact_score = -(x_t - alpha * MEAN.double()) / variance  # grad log N(alpha m, alpha^2 d^2 + sigma^2)
        assert torch.allclose(score(oracle(x_t, t), sigma), exact_score, atol=1e-10)
        tweedie = (x_t + sigma**2 * exact_score) / alpha  # Tweedie: E[x0 | x_t]
        posterior_mean = MEAN.double() + alpha * STD.double() ** 2 / variance * (x_t - alpha * MEAN.double())
        assert torch.allclose(tweedie, posterior_mean, atol=1e-9)
        assert torch.allclose(oracle.predict(x_t, t, "x0"), posterior_mean, atol=1e-9)


def test_every_prediction_reads_back_to_the_same_guesses():
    schedule = make_schedule("linear", 1000)
    oracle = GaussianOracle(MEAN, STD, schedule)
    x_t, t = _noise(16, 8), torch.full((16,), 600)
    alpha, sigma = schedule.alpha_bar[600].sqrt(), (1 - schedule.alpha_bar[600]).sqrt()
    guesses = {
        p: read_output(lambda x, steps, p=p: oracle.predict(x, steps, p), x_t, t, schedule, p)
        for p in ("eps", "x0", "v")
    }
    for x0_pred, eps in guesses.values():
        assert torch.allclose(x0_pred, guesses["eps"][0], atol=1e-9) and torch.allclose(
            eps, guesses["eps"][1], atol=1e-9
        )
    x0, noise = _noise(16, 9), _noise(16, 10)
    v = output_for(x0, noise, alpha, sigma, "v")
    assert torch.allclose(read_diffusion_output(v, alpha * x0 + sigma * noise, alpha, sigma, "v")[0], x0)
    diffusers = pytest.importorskip("diffusers")  # the reference library's velocity
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, trained_betas=schedule.betas.numpy())
    theirs = scheduler.get_velocity(x0.float(), noise.float(), torch.full((16,), 600))
    assert torch.allclose(v.float(), theirs, atol=1e-5)


def test_zero_terminal_snr_by_its_definition_and_against_diffusers():
    betas = make_schedule("linear", 1000).betas
    rescaled = make_schedule("linear", 1000, zero_terminal_snr=True)
    old_root, new_root = make_schedule("linear", 1000).alpha_bar.sqrt(), rescaled.alpha_bar.sqrt()
    assert rescaled.alpha_bar[-1] == 0 and torch.isclose(new_root[0], old_root[0]) and rescaled.betas[-1] == 1
    # sqrt(alpha_bar) is an affine function of the old one: shifted to end at 0, scaled to keep its start
    expected = (old_root - old_root[-1]) * old_root[0] / (old_root[0] - old_root[-1])
    assert torch.allclose(new_root, expected, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2 steps"):
        rescale_zero_terminal_snr(betas[:1])
    pytest.importorskip("diffusers")
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as theirs

    assert torch.allclose(rescale_zero_terminal_snr(betas), theirs(betas.clone()).double(), atol=1e-10)


def test_zero_terminal_snr_blows_up_an_eps_model_and_not_a_v_model():
    schedule = make_schedule("linear", 1000, zero_terminal_snr=True)
    oracle = GaussianOracle(MEAN, STD, schedule)
    x_T = _noise(20_000, 11)
    eps_model = ddim_sample(oracle, schedule, x_T, num_steps=50, clip_x0=False)
    assert not torch.isfinite(eps_model).all()  # x0 = (x - sigma eps) / alpha with alpha = 0: 0 / 0

    def v_model(x, t):
        return oracle.predict(x, t, "v")

    samples = ddim_sample(v_model, schedule, x_T, num_steps=200, clip_x0=False, prediction="v")
    assert torch.allclose(samples.mean(0), MEAN.double(), atol=0.03)
    assert torch.allclose(samples.std(0), STD.double(), rtol=0.05)  # DDIM's own error at 200 steps: 3 % low
    solved = dpm_solver_sample(v_model, schedule, x_T, num_steps=200, clip_x0=False, prediction="v")
    assert torch.isfinite(solved).all()  # the first step starts at alpha = 0: lambda = -inf, handled
    assert torch.allclose(solved.mean(0), MEAN.double(), atol=0.03)
    assert torch.allclose(solved.std(0), STD.double(), rtol=0.02)  # measured: 1 % high at 200 steps


def test_the_loss_and_the_unet_wrapper():
    x0 = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(12)) * 2 - 1
    calls = []

    def model(x_s, s):
        calls.append(s)
        return torch.zeros_like(x_s)

    loss = flow_matching_loss(model, x0, torch.Generator().manual_seed(13))
    generator = torch.Generator().manual_seed(13)
    s, noise = torch.rand(8, generator=generator), torch.randn(x0.shape, generator=generator)
    assert torch.allclose(calls[0], s) and torch.isclose(loss, (noise - x0).pow(2).mean())
    from coursekit.unet import UNet

    torch.manual_seed(0)
    net = UNet(base_channels=8)
    wrapped = FlowModel(net)
    times = torch.tensor([0.0, 0.5, 1.0] * 2 + [0.25, 0.75])
    assert torch.equal(wrapped(x0, times), net(x0, times * 1000))
    assert time_grid(4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError, match="decrease"):
        euler_sample(model, x0, times=[0.0, 0.5])


def test_the_v_loss_targets_alpha_eps_minus_sigma_x0():
    from coursekit.losses import noise_prediction_loss

    schedule = make_schedule("cosine", 100)
    x0 = torch.rand(6, 2, generator=torch.Generator().manual_seed(20)) * 2 - 1
    seen = {}

    def model(x_t, t):
        seen["x_t"], seen["t"] = x_t, t
        return torch.zeros_like(x_t)

    losses, t = noise_prediction_loss(
        model, x0, schedule, generator=torch.Generator().manual_seed(21), per_example=True, prediction="v"
    )
    alpha, sigma = schedule.alpha_bar[t].sqrt()[:, None], (1 - schedule.alpha_bar[t]).sqrt()[:, None]
    eps = (seen["x_t"] - alpha * x0) / sigma  # the noise the loss drew, read back from x_t
    v = alpha * eps - sigma * x0  # Salimans & Ho, Sec. 4, by hand
    assert torch.allclose(losses.double(), v.double().pow(2).mean(1), atol=1e-5)
    with pytest.raises(ValueError, match="unknown prediction"):
        noise_prediction_loss(model, x0, schedule, prediction="velocity")


def test_a_flow_run_trains_saves_loads_and_samples_only_with_flow_samplers(tmp_path):
    from coursekit.data import load_dataset
    from coursekit.runs import generate, load_run, train_diffusion
    from coursekit.training import TrainConfig
    from coursekit.unet import UNetConfig

    digits = load_dataset("digits")
    config = TrainConfig(max_steps=3, batch_size=8, precision="fp32", progress=False)
    train_diffusion(digits, tmp_path / "flow", UNetConfig(base_channels=8), train_config=config, objective="flow")
    run = load_run(tmp_path / "flow")
    assert run.objective == "flow" and isinstance(run.model, FlowModel)
    x_T = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    images, frames = generate(run.model, run.schedule, (1, 16, 16), 3, sampler="heun", num_steps=4, frames=4)
    assert torch.equal(images, heun_sample(run.model, x_T, num_steps=4).clamp(-1, 1))
    assert len(frames) == 5  # the start and one after each of the 4 steps
    with pytest.raises(ValueError, match="flow-matching velocity: sample it with euler or heun"):
        generate(run.model, run.schedule, (1, 16, 16), 2, sampler="ddim")
    with pytest.raises(ValueError, match="unknown objective"):
        train_diffusion(digits, tmp_path / "x", train_config=config, objective="score")
    train_diffusion(digits, tmp_path / "eps", UNetConfig(base_channels=8), train_config=config)
    eps_run = load_run(tmp_path / "eps")
    assert eps_run.objective == "eps"
    with pytest.raises(ValueError, match="samples flow-matching models; this one predicts noise"):
        generate(eps_run.model, eps_run.schedule, (1, 16, 16), 2, sampler="euler")


def test_the_command_line_trains_and_samples_a_flow_run(tmp_path, capsys):
    from coursekit.cli import main

    run = str(tmp_path / "run")
    arguments = ["train", "--run", run, "--steps", "2", "--base-channels", "8", "--precision", "fp32"]
    assert main([*arguments, "--objective", "flow"]) == 0
    assert main(["sample", "--run", run, "--count", "2", "--steps", "3"]) == 0  # euler by default
    assert (tmp_path / "run" / "samples.png").exists()
    capsys.readouterr()
    assert main(["sample", "--run", run, "--count", "2", "--sampler", "dpm++2m"]) == 2
    assert "sample it with euler or heun" in capsys.readouterr().err
