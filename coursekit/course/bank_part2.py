"""Question bank, part two: the exercises of notebooks 05-11 (fewer steps, flow matching, one step,
control, latents, the text prompt, editing).

As in part one, each exercise asks for a variation on what its notebook shows (a stochastic DDIM step,
the solver written for a noise prediction, a path with a floor of noise, a diffusion sample read as a
flow sample, a distillation target in v with the clean image as an end, two Euler steps folded into
one, conditions dropped whole, two guidance directions at once, CLIP's loss from raw features with a
temperature, cross-attention written with plain matrices, a strength per image), so that the notebook's
worked cells do not answer it. References first, then the cases they are tried on, the mistakes learners
make, and the questions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from coursekit.course.engine import (
    Mismatch,
    Mistake,
    Question,
    Written,
    compare_tensors,
    register,
    seeded,
    seeded_generator,
)
from coursekit.schedules import make_schedule, per_example

# ============================================================================= 05: fewer steps


def reference_ddim_step(x_t, eps, alpha_bar_t, alpha_bar_next, eta, z):
    x0_pred = (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t**0.5  # DDPM Eq. 15
    sigma = eta * ((1 - alpha_bar_next) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_next)) ** 0.5  # DDIM Eq. 16
    direction = max(1 - alpha_bar_next - sigma**2, 0.0) ** 0.5 * eps
    return alpha_bar_next**0.5 * x0_pred + direction + sigma * z  # DDIM Eq. 12


def _half_log_snr(alpha_bar: float) -> float:
    return 0.5 * math.log(alpha_bar / (1 - alpha_bar))  # lambda = log(alpha / sigma)


def reference_dpm_solver_eps_step(x_t, eps, previous_eps, alpha_bar_previous, alpha_bar_t, alpha_bar_next):
    if alpha_bar_next == 1.0:
        return (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t**0.5  # the first-order jump lands on x0
    h = _half_log_snr(alpha_bar_next) - _half_log_snr(alpha_bar_t)
    direction = eps
    if previous_eps is not None:
        r = (_half_log_snr(alpha_bar_t) - _half_log_snr(alpha_bar_previous)) / h
        direction = (1 + 1 / (2 * r)) * eps - 1 / (2 * r) * previous_eps
    # DPM-Solver-2M in the noise-prediction form (Lu et al. 2022, Eqs. 3.7 and 3.10, multistep)
    return (alpha_bar_next / alpha_bar_t) ** 0.5 * x_t - (1 - alpha_bar_next) ** 0.5 * math.expm1(h) * direction


def _ddim_without_noise(x_t, eps, alpha_bar_t, alpha_bar_next, eta, z):
    return reference_ddim_step(x_t, eps, alpha_bar_t, alpha_bar_next, 0.0, z)


def _ddim_keeping_the_full_direction(x_t, eps, alpha_bar_t, alpha_bar_next, eta, z):
    x0_pred = (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t**0.5
    sigma = eta * ((1 - alpha_bar_next) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_next)) ** 0.5
    return alpha_bar_next**0.5 * x0_pred + (1 - alpha_bar_next) ** 0.5 * eps + sigma * z


def _ddim_sigma_with_one_factor(x_t, eps, alpha_bar_t, alpha_bar_next, eta, z):
    x0_pred = (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t**0.5
    sigma = eta * ((1 - alpha_bar_next) / (1 - alpha_bar_t)) ** 0.5
    return alpha_bar_next**0.5 * x0_pred + max(1 - alpha_bar_next - sigma**2, 0.0) ** 0.5 * eps + sigma * z


def _ddim_eta_on_the_variance(x_t, eps, alpha_bar_t, alpha_bar_next, eta, z):
    return reference_ddim_step(x_t, eps, alpha_bar_t, alpha_bar_next, eta**0.5, z)


def _ddim_square_root_misplaced(x_t, eps, alpha_bar_t, alpha_bar_next, eta, z):
    wrong_x0 = (x_t - (1 - alpha_bar_t) * eps) / alpha_bar_t**0.5
    right_x0 = (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t**0.5
    return reference_ddim_step(x_t, eps, alpha_bar_t, alpha_bar_next, eta, z) + alpha_bar_next**0.5 * (
        wrong_x0 - right_x0
    )


def _solver_step_with(lam=_half_log_snr, data_form=False, minus_h=False, r_inverted=False):
    def step(x_t, eps, previous_eps, alpha_bar_previous, alpha_bar_t, alpha_bar_next):
        if alpha_bar_next == 1.0:
            return (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t**0.5
        h = lam(alpha_bar_next) - lam(alpha_bar_t)
        direction = eps
        if previous_eps is not None:
            r = (lam(alpha_bar_t) - lam(alpha_bar_previous)) / h
            r = 1 / r if r_inverted else r
            direction = (1 + 1 / (2 * r)) * eps - 1 / (2 * r) * previous_eps
        if data_form:
            ratio = ((1 - alpha_bar_next) / (1 - alpha_bar_t)) ** 0.5
            return ratio * x_t - alpha_bar_next**0.5 * math.expm1(-h) * direction
        growth = math.expm1(-h) if minus_h else math.expm1(h)
        return (alpha_bar_next / alpha_bar_t) ** 0.5 * x_t - (1 - alpha_bar_next) ** 0.5 * growth * direction

    return step


def _cases_ddim_step() -> list[dict]:
    alpha_bar = make_schedule("cosine", 1000).alpha_bar.tolist()
    generator = seeded_generator(8)
    cases = []
    settings = [
        (999, 949, 0.0, 3, torch.float32),
        (500, 400, 1.0, 3, torch.float32),
        (20, None, 0.5, 3, torch.float32),
        (700, 0, 0.3, 1, torch.float64),
    ]
    for t, following, eta, batch, dtype in settings:
        cases.append(
            {
                "x_t": torch.randn(batch, 1, 4, 4, generator=generator, dtype=dtype),
                "eps": torch.randn(batch, 1, 4, 4, generator=generator, dtype=dtype),
                "alpha_bar_t": alpha_bar[t],
                "alpha_bar_next": alpha_bar[following] if following is not None else 1.0,
                "eta": eta,
                "z": torch.randn(batch, 1, 4, 4, generator=generator, dtype=dtype),
                "label": f"from t = {t} to {'the clean image' if following is None else following}, eta = {eta}"
                + (", a batch of one in float64" if batch == 1 else ""),
            }
        )
    return cases


def _cases_dpm_solver_step() -> list[dict]:
    alpha_bar = make_schedule("cosine", 1000).alpha_bar.tolist()
    generator = seeded_generator(9)
    cases = []
    for previous, t, following in ((None, 999, 899), (999, 899, 700), (600, 450, 300), (200, 100, 0), (100, 0, None)):
        previous_eps = torch.randn(2, 1, 4, 4, generator=generator) if previous is not None else None
        cases.append(
            {
                "x_t": torch.randn(2, 1, 4, 4, generator=generator),
                "eps": torch.randn(2, 1, 4, 4, generator=generator),
                "previous_eps": previous_eps,
                "alpha_bar_previous": alpha_bar[previous] if previous is not None else None,
                "alpha_bar_t": alpha_bar[t],
                "alpha_bar_next": alpha_bar[following] if following is not None else 1.0,
                "label": (
                    "the first step (no previous guess)"
                    if previous is None
                    else ("the last step, to the clean image" if following is None else f"from t = {t} to {following}")
                ),
            }
        )
    return cases


register(
    Question(
        "05.q1",
        3,
        "ddim_step",
        reference_ddim_step,
        _cases_ddim_step,
        lambda f, c: f(c["x_t"], c["eps"], c["alpha_bar_t"], c["alpha_bar_next"], c["eta"], c["z"]),
        "with eta > 0 part of the variance at the next step comes from fresh noise z: the eps term must make "
        "room for it",
        "x0_pred = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t); sigma = eta * sqrt((1 - a_next) / (1 - a_t)) * "
        "sqrt(1 - a_t / a_next); return sqrt(a_next) x0_pred + sqrt(1 - a_next - sigma^2) eps + sigma z",
        mistakes=[
            Mistake("eta > 0 adds fresh noise, sigma * z: your step leaves it out", _ddim_without_noise),
            Mistake(
                "with sigma > 0 the eps term's variance shrinks to 1 - alpha_bar_next - sigma^2",
                _ddim_keeping_the_full_direction,
            ),
            Mistake(
                "sigma has two square-root factors: the factor sqrt(1 - alpha_bar_t / alpha_bar_next) is missing",
                _ddim_sigma_with_one_factor,
            ),
            Mistake("eta scales sigma itself (a standard deviation), not sigma squared", _ddim_eta_on_the_variance),
            Mistake("the square root in x0_pred: subtract sqrt(1 - alpha_bar_t) * eps", _ddim_square_root_misplaced),
        ],
        forbidden={"ddim_steps", "ddim_sample", "predict_x0"},
    )
)
register(
    Question(
        "05.q2",
        3,
        "dpm_solver_eps_step",
        reference_dpm_solver_eps_step,
        _cases_dpm_solver_step,
        lambda f, c: f(
            c["x_t"],
            c["eps"],
            c["previous_eps"],
            c["alpha_bar_previous"],
            c["alpha_bar_t"],
            c["alpha_bar_next"],
        ),
        "the notebook's step is written for a clean-image guess; redo its derivation for a noise guess: which "
        "of x_t's two parts (alpha x0 and sigma eps) does the exponential integrator keep exactly now?",
        "alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar), lambda = log(alpha / sigma), h = lambda_next - "
        "lambda_t; D = eps on the first step, else (1 + 1/(2r)) eps - 1/(2r) previous_eps with r = (lambda_t - "
        "lambda_previous) / h; x_next = (alpha_next / alpha_t) x_t - sigma_next (e^h - 1) D; on the last step "
        "(alpha_bar_next == 1) return (x_t - sigma_t eps) / alpha_t",
        mistakes=[
            Mistake(
                "those are the data-prediction (++) coefficients of notebook 05; with a noise guess, x_t is "
                "scaled by alpha_next / alpha_t",
                _solver_step_with(data_form=True),
            ),
            Mistake(
                "the noise form grows with e^h - 1 (math.expm1(h)); e^-h - 1 belongs to the data form",
                _solver_step_with(minus_h=True),
            ),
            Mistake(
                "lambda is log(alpha / sigma), half the log of the SNR",
                _solver_step_with(lam=lambda a: math.log(a / (1 - a))),
            ),
            Mistake(
                "r is upside down: the previous step's lambda gap over this step's h",
                _solver_step_with(r_inverted=True),
            ),
        ],
        forbidden={"dpm_solver_steps", "dpm_solver_sample", "predict_x0"},
    )
)
register(
    Written(
        "05.q3",
        2,
        "With eta = 0, DDIM turns each starting noise into one fixed image. Name one thing that makes possible "
        "which DDPM's sampler cannot do, and say why.",
    )
)


# ============================================================================= 06: flow matching


def reference_path_and_velocity(x0, noise, s, sigma_min):
    s = per_example(s, x0)
    x_s = (1 - s) * x0 + (sigma_min + (1 - sigma_min) * s) * noise  # Lipman et al. Eq. 20, time reversed
    return x_s, (1 - sigma_min) * noise - x0  # its derivative in s


def _path_ignoring_sigma_min_in_the_velocity(x0, noise, s, sigma_min):
    x_s, _ = reference_path_and_velocity(x0, noise, s, sigma_min)
    return x_s, noise - x0


def _path_without_sigma_min(x0, noise, s, sigma_min):
    return reference_path_and_velocity(x0, noise, s, 0.0)


def _velocity_backwards(x0, noise, s, sigma_min):
    x_s, velocity = reference_path_and_velocity(x0, noise, s, sigma_min)
    return x_s, -velocity


def _path_with_s_unreshaped(x0, noise, s, sigma_min):
    x_s = (1 - s) * x0 + (sigma_min + (1 - sigma_min) * s) * noise  # s (B,) meets x0's last axis
    return x_s, (1 - sigma_min) * noise - x0


def _cases_path_and_velocity() -> list[dict]:
    generator = seeded_generator(60)
    return [
        {
            "x0": torch.randn(5, 2, generator=generator, dtype=torch.float64),
            "noise": torch.randn(5, 2, generator=generator, dtype=torch.float64),
            "s": torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0], dtype=torch.float64),
            "sigma_min": 0.0,
            "label": "5 float64 points, sigma_min = 0 (the course's path), s = 0 and 1 among them",
        },
        {
            "x0": torch.rand(4, 1, 4, 4, generator=generator) * 2 - 1,
            "noise": torch.randn(4, 1, 4, 4, generator=generator),
            "s": torch.tensor([0.1, 0.4, 0.6, 1.0]),
            "sigma_min": 0.01,
            "label": "4 images of 4x4, sigma_min = 0.01",
        },
        {
            "x0": torch.rand(3, 3, 2, 5, generator=generator) * 2 - 1,
            "noise": torch.randn(3, 3, 2, 5, generator=generator),
            "s": torch.tensor([0.0, 0.3, 0.8]),
            "sigma_min": 0.1,
            "label": "3 RGB images of 2x5, sigma_min = 0.1",
        },
    ]


def reference_euler_step(model, x, s, s_next):
    times = torch.full((x.shape[0],), s, dtype=x.dtype)
    return x + (s_next - s) * model(x, times)  # dx/ds = u(x, s), one step of size s_next - s


def _euler_with(sign=1.0, at_next=False, time_scale=1.0, plain_float=False):
    def step(model, x, s, s_next):
        times = torch.full((x.shape[0],), (s_next if at_next else s) * time_scale, dtype=x.dtype)
        return x + sign * (s_next - s) * model(x, s if plain_float else times)

    return step


def _velocity_model(case: dict):
    from coursekit.flow import GaussianVelocityOracle

    oracle = GaussianVelocityOracle(case["data_mean"], case["data_std"])

    def model(x, s):
        if not isinstance(s, torch.Tensor) or tuple(s.shape) != (x.shape[0],):
            shown = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise TypeError(f"the model takes s as a tensor of shape (B,) = ({x.shape[0]},), got {shown}")
        return oracle(x, s)

    return model


def _cases_euler_step() -> list[dict]:
    generator = seeded_generator(61)
    return [
        {
            "data_mean": torch.tensor(0.3, dtype=torch.float64),
            "data_std": torch.tensor(0.5, dtype=torch.float64),
            "x": torch.randn(3, 1, 4, 4, generator=generator),
            "s": 1.0,
            "s_next": 0.75,
            "label": "3 images, the first step back from pure noise (s = 1 to 0.75)",
        },
        {
            "data_mean": torch.tensor([0.5, -1.0], dtype=torch.float64),
            "data_std": torch.tensor([0.3, 1.5], dtype=torch.float64),
            "x": torch.randn(6, 2, generator=generator, dtype=torch.float64),
            "s": 0.2,
            "s_next": 0.5,
            "label": "6 float64 points, a step forwards (s = 0.2 to 0.5), from data towards noise",
        },
        {
            "data_mean": torch.tensor(-0.2, dtype=torch.float64),
            "data_std": torch.tensor(0.8, dtype=torch.float64),
            "x": torch.randn(2, 3, 2, 2, generator=generator),
            "s": 0.125,
            "s_next": 0.0,
            "label": "2 RGB images, the last step (s = 0.125 to 0)",
        },
    ]


def reference_to_flow(x_t, eps, alpha_bar):
    alpha, sigma = (alpha_bar**0.5).to(x_t.dtype), ((1 - alpha_bar) ** 0.5).to(x_t.dtype)
    s = sigma / (alpha + sigma)  # where x_t / (alpha + sigma) sits on the straight path
    x0_pred = (x_t - per_example(sigma, x_t) * eps) / per_example(alpha, x_t)  # DDPM Eq. 15
    return x_t / per_example(alpha + sigma, x_t), s, eps - x0_pred


def _to_flow_with(s_rule=None, rescale=True, velocity=None, keep_float64=False):
    def convert(x_t, eps, alpha_bar):
        dtype = torch.float64 if keep_float64 else x_t.dtype
        alpha, sigma = (alpha_bar**0.5).to(dtype), ((1 - alpha_bar) ** 0.5).to(dtype)
        s = s_rule(alpha_bar).to(dtype) if s_rule else sigma / (alpha + sigma)
        x0_pred = (x_t - per_example(sigma, x_t) * eps) / per_example(alpha, x_t)
        x_s = x_t / per_example(alpha + sigma, x_t) if rescale else x_t
        u = velocity(x_t, eps, x0_pred) if velocity else eps - x0_pred
        return x_s.to(dtype), s, u.to(dtype)

    return convert


def _cases_to_flow() -> list[dict]:
    generator = seeded_generator(62)
    alpha_bar = make_schedule("cosine", 1000).alpha_bar
    return [
        {
            "x_t": torch.randn(3, 1, 4, 4, generator=generator),
            "eps": torch.randn(3, 1, 4, 4, generator=generator),
            "alpha_bar": alpha_bar[torch.tensor([10, 500, 990])],
            "label": "3 float32 images at t = 10, 500 and 990 (alpha_bar in float64)",
        },
        {
            "x_t": torch.randn(4, 2, generator=generator, dtype=torch.float64),
            "eps": torch.randn(4, 2, generator=generator, dtype=torch.float64),
            "alpha_bar": torch.tensor([0.99, 0.5, 0.5, 0.01], dtype=torch.float64),
            "label": "4 float64 points, alpha_bar = 0.99, 0.5, 0.5, 0.01",
        },
        {
            "x_t": torch.randn(2, 3, 2, 2, generator=generator),
            "eps": torch.randn(2, 3, 2, 2, generator=generator),
            "alpha_bar": torch.tensor([0.9, 0.2], dtype=torch.float64),
            "label": "2 RGB images, alpha_bar = 0.9 and 0.2",
        },
    ]


def _compare_parts(*names):
    def compare(got, expected, case) -> None:
        if not isinstance(got, (tuple, list)) or len(got) != len(names):
            raise Mismatch(f"expected a tuple of {len(names)} ({', '.join(names)}), got {type(got).__name__}")
        for part, mine, reference in zip(names, got, expected):
            compare_tensors(mine, reference, {**case, "part": part})

    return compare


register(
    Question(
        "06.q1",
        3,
        "path_and_velocity",
        reference_path_and_velocity,
        _cases_path_and_velocity,
        lambda f, c: f(c["x0"], c["noise"], c["s"], c["sigma_min"]),
        "the velocity is the derivative of the path with respect to s: differentiate each coefficient",
        "s per example, reshaped to (B, 1, ...); x_s = (1 - s) x0 + (sigma_min + (1 - sigma_min) s) noise; "
        "velocity = (1 - sigma_min) noise - x0; return (x_s, velocity)",
        mistakes=[
            Mistake(
                "the noise's coefficient is sigma_min + (1 - sigma_min) s: its derivative is 1 - sigma_min, "
                "so the velocity's noise term is scaled too",
                _path_ignoring_sigma_min_in_the_velocity,
            ),
            Mistake(
                "sigma_min is missing: even at s = 0 the path keeps sigma_min of the noise", _path_without_sigma_min
            ),
            Mistake(
                "the velocity is d x_s / ds, pointing from the data towards the noise as s grows: the sign is "
                "backwards",
                _velocity_backwards,
            ),
            Mistake(
                "s has one value per example, shape (B,): reshape it to (B, 1, ...) before multiplying, or it "
                "meets the last axis",
                _path_with_s_unreshaped,
            ),
        ],
        forbidden={"flow_path", "velocity_target", "per_example"},
        compare=_compare_parts("x_s", "velocity"),
    )
)
register(
    Question(
        "06.q2",
        3,
        "euler_step",
        reference_euler_step,
        _cases_euler_step,
        lambda f, c: f(_velocity_model(c), c["x"], c["s"], c["s_next"]),
        "Euler follows the velocity at the start of the step for the length of the step, signed: the same "
        "line must also run forwards (s_next > s)",
        "times = torch.full((B,), s, dtype=x.dtype); return x + (s_next - s) * model(x, times)",
        mistakes=[
            Mistake(
                "the step is x + (s_next - s) u, in both directions: going back in time (s_next < s) the "
                "signed step already subtracts; your sign is flipped",
                _euler_with(sign=-1.0),
            ),
            Mistake(
                "Euler's method reads the velocity where the step starts, at s, not at s_next",
                _euler_with(at_next=True),
            ),
            Mistake(
                "this model reads s in [0, 1]; the x1000 for the U-Net's timesteps is FlowModel's job",
                _euler_with(time_scale=1000.0),
            ),
            Mistake(
                "the model takes s as a tensor of shape (B,), one time per example: torch.full((B,), s, dtype=x.dtype)",
                _euler_with(plain_float=True),
            ),
        ],
        forbidden={"euler_steps", "euler_sample", "heun_steps", "heun_sample"},
    )
)
register(
    Question(
        "06.q3",
        3,
        "to_flow",
        reference_to_flow,
        _cases_to_flow,
        lambda f, c: f(c["x_t"], c["eps"], c["alpha_bar"]),
        "divide x_t = alpha x0 + sigma eps by alpha + sigma: which s makes it (1 - s) x0 + s eps? And the "
        "velocity is eps minus the clean-image guess",
        "alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar) (in x_t's dtype); s = sigma / (alpha + sigma); "
        "x_s = x_t / (alpha + sigma); x0_pred = (x_t - sigma eps) / alpha; velocity = eps - x0_pred (alpha, sigma "
        "reshaped to (B, 1, ...) against x_t); return (x_s, s, velocity)",
        mistakes=[
            Mistake(
                "s is sigma's share of alpha + sigma, not sigma itself: only then do the path's two weights add "
                "up to 1",
                _to_flow_with(s_rule=lambda a: (1 - a) ** 0.5),
            ),
            Mistake("s is sigma / (alpha + sigma), not 1 - alpha_bar", _to_flow_with(s_rule=lambda a: 1 - a)),
            Mistake(
                "x_t itself is not on the straight path: divide it by alpha + sigma first",
                _to_flow_with(rescale=False),
            ),
            Mistake(
                "the velocity is d x_s / ds = eps - x0, pointing towards the noise: the sign is backwards",
                _to_flow_with(velocity=lambda x_t, eps, x0: x0 - eps),
            ),
            Mistake(
                "the velocity needs the clean-image guess x0 = (x_t - sigma eps) / alpha, not x_t",
                _to_flow_with(velocity=lambda x_t, eps, x0: eps - x_t),
            ),
            Mistake(
                "alpha_bar is float64: convert alpha and sigma to x_t's dtype, so the results keep it",
                _to_flow_with(keep_float64=True),
            ),
        ],
        forbidden={"x0_and_eps", "predict_x0", "read_output", "per_example"},
        compare=_compare_parts("x_s", "s", "velocity"),
    )
)
register(
    Written(
        "06.q4",
        2,
        "Every training path of flow matching is a straight line, yet the learned flow is not perfectly "
        "straight. Say why, and say what your measured table shows about few steps for the straighter paths.",
    )
)


# ============================================================================= 07: one step


def _alpha_sigma_or_clean(alpha_bar, steps, like):
    """alpha and sigma per example, shaped against ``like``; step -1 is the clean image (alpha_bar = 1)."""
    a_bar = torch.where(steps >= 0, alpha_bar[steps.clamp(min=0)], torch.ones((), dtype=alpha_bar.dtype))
    return per_example(a_bar.sqrt().to(like.dtype), like), per_example((1 - a_bar).sqrt().to(like.dtype), like)


def _without_square_roots(alpha_bar, steps, like):
    a_bar = torch.where(steps >= 0, alpha_bar[steps.clamp(min=0)], torch.ones((), dtype=alpha_bar.dtype))
    return per_example(a_bar.to(like.dtype), like), per_example((1 - a_bar).to(like.dtype), like)


def _distillation_target_with(
    rule=_alpha_sigma_or_clean, clean_end=None, both_steps=True, solve=None, output="v", dtype=None
):
    end_rule = clean_end or rule

    def target(teacher, x_t, t, t_mid, t_next, alpha_bar):
        def ddim(x, step, step_next):
            alpha, sigma = rule(alpha_bar, step, x)
            alpha_next, sigma_next = end_rule(alpha_bar, step_next, x)
            eps = teacher(x, step)
            return alpha_next * (x - sigma * eps) / alpha + sigma_next * eps  # DDIM Eq. 12, eta = 0

        x_far = ddim(ddim(x_t, t, t_mid), t_mid, t_next) if both_steps else ddim(x_t, t, t_next)
        (alpha, sigma), (alpha_far, sigma_far) = rule(alpha_bar, t, x_t), end_rule(alpha_bar, t_next, x_t)
        ratio = sigma_far / sigma  # one DDIM step: x_far = ratio x_t + (alpha_far - ratio alpha) x0
        if solve:
            x0 = solve(x_far, x_t, ratio, alpha, alpha_far)
        else:
            x0 = (x_far - ratio * x_t) / (alpha_far - ratio * alpha)
        eps = (x_t - alpha * x0) / sigma
        result = {"v": alpha * eps - sigma * x0, "-v": sigma * x0 - alpha * eps, "x0": x0}[output]
        return result.to(dtype) if dtype else result

    return target


reference_distillation_target = _distillation_target_with()


def _python_index_for_the_clean_image(alpha_bar, steps, like):
    a_bar = alpha_bar[steps]  # -1 picks the LAST timestep, the noisiest, not the clean image
    return per_example(a_bar.sqrt().to(like.dtype), like), per_example((1 - a_bar).sqrt().to(like.dtype), like)


def _cases_distillation_target() -> list[dict]:
    generator = seeded_generator(70)
    return [
        {
            "x_t": torch.randn(4, 1, 4, 4, generator=generator),
            "t": torch.tensor([999, 749, 499, 249]),
            "t_mid": torch.tensor([874, 624, 374, 124]),
            "t_next": torch.tensor([749, 499, 249, -1]),
            "mean": 0.2,
            "std": 0.5,
            "label": "4 images, steps 999->874->749, ..., 249->124->clean (t_next = -1)",
        },
        {
            "x_t": torch.randn(3, 2, generator=generator, dtype=torch.float64),
            "t": torch.tensor([999, 999, 500]),
            "t_mid": torch.tensor([500, 500, 200]),
            "t_next": torch.tensor([-1, -1, -1]),
            "mean": torch.tensor([0.5, -0.5]),
            "std": torch.tensor([0.3, 1.2]),
            "label": "3 float64 points, every step ends on the clean image (the last round: one step)",
        },
        {
            "x_t": torch.randn(2, 3, 2, 2, generator=generator),
            "t": torch.tensor([600, 300]),
            "t_mid": torch.tensor([450, 150]),
            "t_next": torch.tensor([300, 0]),
            "mean": -0.1,
            "std": 0.8,
            "label": "2 RGB images, steps 600->450->300 and 300->150->0 (no clean end)",
        },
    ]


def _call_distillation_target(implementation, case):
    from coursekit.oracle import GaussianOracle

    schedule = make_schedule("cosine", 1000)
    oracle = GaussianOracle(case["mean"], case["std"], schedule)

    def teacher(x, t):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (x.shape[0],):
            shown = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"the teacher takes t as a tensor of shape (B,) = ({x.shape[0]},), got {shown}")
        if bool((t < 0).any()):
            raise ValueError("the teacher was called at t = -1: the clean image is no timestep to ask it about")
        return oracle(x, t)

    return implementation(teacher, case["x_t"], case["t"], case["t_mid"], case["t_next"], schedule.alpha_bar)


def reference_flow_distillation_target(teacher, x, s, s_mid, s_next):
    def velocity(points, time):
        return teacher(points, torch.full((points.shape[0],), time, dtype=points.dtype))

    x_mid = x + (s_mid - s) * velocity(x, s)  # the teacher's first Euler step
    x_far = x_mid + (s_next - s_mid) * velocity(x_mid, s_mid)  # and its second, from where the first ended
    return (x_far - x) / (s_next - s)  # the one velocity that covers both in a single step


def _flow_target_with(second_at_start=False, second_time_first=False, average=False, divide_by=None, point=False):
    def target(teacher, x, s, s_mid, s_next):
        def velocity(points, time):
            return teacher(points, torch.full((points.shape[0],), time, dtype=points.dtype))

        u_first = velocity(x, s)
        x_mid = x + (s_mid - s) * u_first
        u_second = velocity(x if second_at_start else x_mid, s if second_time_first else s_mid)
        if average:
            return (u_first + u_second) / 2
        x_far = x_mid + (s_next - s_mid) * u_second
        if point:
            return x_far
        return (x_far - x) / (divide_by(s, s_mid, s_next) if divide_by else s_next - s)

    return target


def _cases_flow_distillation_target() -> list[dict]:
    generator = seeded_generator(71)
    return [
        {
            "data_mean": torch.tensor(0.3, dtype=torch.float64),
            "data_std": torch.tensor(0.5, dtype=torch.float64),
            "x": torch.randn(3, 1, 4, 4, generator=generator),
            "s": 1.0,
            "s_mid": 0.7,
            "s_next": 0.2,
            "label": "3 images, from pure noise: s = 1 -> 0.7 -> 0.2 (unequal steps)",
        },
        {
            "data_mean": torch.tensor([0.5, -1.0], dtype=torch.float64),
            "data_std": torch.tensor([0.3, 1.5], dtype=torch.float64),
            "x": torch.randn(5, 2, generator=generator, dtype=torch.float64),
            "s": 0.5,
            "s_mid": 0.4,
            "s_next": 0.0,
            "label": "5 float64 points, s = 0.5 -> 0.4 -> 0 (the last step)",
        },
        {
            "data_mean": torch.tensor(-0.2, dtype=torch.float64),
            "data_std": torch.tensor(0.8, dtype=torch.float64),
            "x": torch.randn(2, 3, 2, 2, generator=generator),
            "s": 0.1,
            "s_mid": 0.35,
            "s_next": 0.5,
            "label": "2 RGB images, forwards: s = 0.1 -> 0.35 -> 0.5",
        },
    ]


register(
    Question(
        "07.q1",
        4,
        "distillation_target",
        reference_distillation_target,
        _cases_distillation_target,
        _call_distillation_target,
        "follow the teacher through t_mid to t_next, solve one DDIM step from t for the clean image that lands "
        "there, and turn that clean image (with the noise it implies) into a velocity; step -1 is the clean image",
        "alpha, sigma = sqrt(alpha_bar), sqrt(1 - alpha_bar) per example, (1, 0) where the step is -1; "
        "x_far = two DDIM steps of the teacher (t -> t_mid -> t_next); ratio = sigma_next / sigma; "
        "x0 = (x_far - ratio x_t) / (alpha_next - ratio alpha); eps = (x_t - alpha x0) / sigma; "
        "return alpha eps - sigma x0 (in x_t's dtype)",
        mistakes=[
            Mistake(
                "this is the clean-image target x~; the student predicts v: return alpha eps~ - sigma x~",
                _distillation_target_with(output="x0"),
            ),
            Mistake("v = alpha eps - sigma x0: your sign is backwards", _distillation_target_with(output="-v")),
            Mistake(
                "this target follows ONE teacher step from t to t_next; the student must match the teacher's TWO "
                "steps, through t_mid",
                _distillation_target_with(both_steps=False),
            ),
            Mistake(
                "t_next = -1 means the clean image (alpha = 1, sigma = 0), but alpha_bar[-1] is the LAST timestep, "
                "the noisiest one: treat -1 on its own",
                _distillation_target_with(clean_end=_python_index_for_the_clean_image),
            ),
            Mistake(
                "alpha is the square root of alpha_bar (and sigma the square root of 1 - alpha_bar)",
                _distillation_target_with(rule=_without_square_roots),
            ),
            Mistake(
                "solve x_far = (sigma_next / sigma) x_t + (alpha_next - (sigma_next / sigma) alpha) x~ for x~: the "
                "denominator has both terms",
                _distillation_target_with(
                    solve=lambda x_far, x_t, ratio, alpha, alpha_far: (x_far - ratio * x_t) / alpha_far
                ),
            ),
            Mistake(
                "alpha_bar is float64: convert alpha and sigma to x_t's dtype, so the target keeps it",
                _distillation_target_with(dtype=torch.float64),
            ),
        ],
        forbidden={"two_step_target", "ddim_jump", "distillation_loss", "output_for", "x0_and_eps", "read_output"},
    )
)
register(
    Question(
        "07.q2",
        3,
        "flow_distillation_target",
        reference_flow_distillation_target,
        _cases_flow_distillation_target,
        lambda f, c: f(_velocity_model(c), c["x"], c["s"], c["s_mid"], c["s_next"]),
        "one Euler step of the student from s to s_next must land where the teacher's two Euler steps land: "
        "which velocity does that?",
        "x_mid = x + (s_mid - s) u(x, s); x_far = x_mid + (s_next - s_mid) u(x_mid, s_mid) (times as tensors of "
        "shape (B,)); return (x_far - x) / (s_next - s)",
        mistakes=[
            Mistake(
                "the average of the two velocities is right only when both steps are equally long: weight each by "
                "its step, i.e. (x_far - x) / (s_next - s)",
                _flow_target_with(average=True),
            ),
            Mistake(
                "the teacher's second step starts where its first ended: read u at x_mid, not at x",
                _flow_target_with(second_at_start=True),
            ),
            Mistake("the teacher's second step starts at time s_mid, not s", _flow_target_with(second_time_first=True)),
            Mistake(
                "the student covers the whole step from s to s_next: divide by s_next - s, not by s_mid - s",
                _flow_target_with(divide_by=lambda s, s_mid, s_next: s_mid - s),
            ),
            Mistake(
                "divide by s_next - s, signed: sampling runs backwards (s_next < s) and the velocity points "
                "towards the noise",
                _flow_target_with(divide_by=lambda s, s_mid, s_next: s - s_next),
            ),
            Mistake(
                "this is where the teacher lands; the student learns a velocity: (x_far - x) / (s_next - s)",
                _flow_target_with(point=True),
            ),
        ],
        forbidden={"euler_steps", "euler_sample", "heun_steps", "heun_sample"},
    )
)
register(
    Written(
        "07.q3",
        2,
        "From the same noise, the one-step student does not paint exactly its teacher's digit: in the notebook's "
        "table it lands further from the teacher's 64-step images than the 32-step student does. Give two "
        "reasons, and say which one you would attack first with twice the compute, and how.",
    )
)


# ============================================================================= 08: control


def reference_drop_conditions(conditions, probability, generator):
    drop = torch.rand(conditions.shape[0], generator=generator) < probability  # one draw per example
    drop = drop.reshape(-1, *([1] * (conditions.ndim - 1)))
    return torch.where(drop, torch.zeros_like(conditions), conditions)


def reference_composed_noise(model, x_t, t, labels_a, labels_b, scale_a, scale_b, null_label):
    unconditional = model(x_t, t, class_labels=torch.full_like(labels_a, null_label))
    toward_a = model(x_t, t, class_labels=labels_a) - unconditional
    toward_b = model(x_t, t, class_labels=labels_b) - unconditional
    return unconditional + scale_a * toward_a + scale_b * toward_b  # composed guidance (Liu et al. 2022)


def _drop_each_number(conditions, probability, generator):
    drop = torch.rand(conditions.shape, generator=generator) < probability
    return torch.where(drop, torch.zeros_like(conditions), conditions)


def _drop_in_place(conditions, probability, generator):
    drop = torch.rand(conditions.shape[0], generator=generator) < probability
    conditions[drop] = 0
    return conditions


def _drop_above(conditions, probability, generator):
    drop = torch.rand(conditions.shape[0], generator=generator) > probability
    return torch.where(drop.reshape(-1, *([1] * (conditions.ndim - 1))), torch.zeros_like(conditions), conditions)


def _drop_without_reshaping(conditions, probability, generator):
    keep = torch.rand(conditions.shape[0], generator=generator) >= probability
    return conditions * keep


def _composed_from(base="unconditional", b_from="unconditional", one_scale=False, in_place=False):
    def composed_noise(model, x_t, t, labels_a, labels_b, scale_a, scale_b, null_label):
        if in_place:
            eps_a = model(x_t, t, class_labels=labels_a)
            nulls = labels_a
            nulls[:] = null_label
        else:
            eps_a = model(x_t, t, class_labels=labels_a)
            nulls = torch.full_like(labels_a, null_label)
        eps_u = model(x_t, t, class_labels=nulls)
        eps_b = model(x_t, t, class_labels=labels_b)
        start = eps_u if base == "unconditional" else eps_a
        from_b = eps_u if b_from == "unconditional" else eps_a
        if one_scale:
            return start + scale_a * ((eps_a - eps_u) + (eps_b - eps_u))
        return start + scale_a * (eps_a - eps_u) + scale_b * (eps_b - from_b)

    return composed_noise


class TinyConditionalDenoiser(nn.Module):
    """A small stand-in conditional model: (x_t, t, class_labels) -> eps, with a "no label" index 3."""

    null_label = 3

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 3, padding=1)
        self.label_vectors = nn.Embedding(4, 1)

    def forward(self, x_t, t, class_labels=None):
        labels = torch.full_like(t, self.null_label) if class_labels is None else class_labels
        time_plane = (t.float() / 1000).view(-1, 1, 1, 1).expand_as(x_t)
        return self.conv(torch.cat([x_t, time_plane], dim=1)) + self.label_vectors(labels).view(-1, 1, 1, 1)


def _cases_drop_conditions() -> list[dict]:
    generator = seeded_generator(17)
    return [
        {"conditions": torch.randn(200, 4, generator=generator), "probability": 0.1, "seed": 0,
         "label": "200 conditions of 4 numbers, probability 0.1"},
        {"conditions": torch.randn(50, 3, 5, generator=generator, dtype=torch.float64), "probability": 0.5,
         "seed": 1, "label": "50 float64 token sequences (3 x 5), probability 0.5"},
        {"conditions": torch.randn(8, 4, generator=generator), "probability": 0.0, "seed": 2,
         "label": "probability 0: nothing dropped"},
        {"conditions": torch.randn(1, 6, generator=generator), "probability": 0.9, "seed": 3,
         "label": "a batch of one, probability 0.9"},
    ]  # fmt: skip


def _cases_composed_noise() -> list[dict]:
    generator = seeded_generator(10)
    cases = []
    for scale_a, scale_b in ((0.0, 0.0), (1.0, 0.0), (3.0, 2.0), (7.5, -1.5)):
        cases.append(
            {
                "state": seeded(TinyConditionalDenoiser, 11).state_dict(),
                "x_t": torch.randn(4, 1, 6, 6, generator=generator),
                "t": torch.tensor([999, 500, 10, 0]),
                "labels_a": torch.tensor([0, 1, 2, 1]),
                "labels_b": torch.tensor([2, 2, 0, 0]),
                "scale_a": scale_a,
                "scale_b": scale_b,
                "label": f"scales {scale_a} and {scale_b}",
            }
        )
    return cases


def _call_composed_noise(implementation, case):
    model = TinyConditionalDenoiser()
    model.load_state_dict(case["state"])
    with torch.no_grad():
        return implementation(
            model,
            case["x_t"],
            case["t"],
            case["labels_a"],
            case["labels_b"],
            case["scale_a"],
            case["scale_b"],
            model.null_label,
        )


register(
    Question(
        "08.q1",
        3,
        "drop_conditions",
        reference_drop_conditions,
        _cases_drop_conditions,
        lambda f, c: f(c["conditions"], c["probability"], seeded_generator(c["seed"])),
        "a dropped example loses its whole condition, whatever shape the condition has; and the caller's "
        "tensor must stay as it was",
        "drop = torch.rand(conditions.shape[0], generator=generator) < probability; reshape drop to (B, 1, ..., 1); "
        "return torch.where(drop, torch.zeros_like(conditions), conditions)",
        mistakes=[
            Mistake(
                "draw one number per example (conditions.shape[0] of them), so that a dropped example loses "
                "its whole condition",
                _drop_each_number,
            ),
            Mistake("changed its input `conditions` in place", _drop_in_place),
            Mistake("you drop where the draw is above probability, which drops 1 - probability of them", _drop_above),
            Mistake(
                "the draws have one entry per example: reshape them to (B, 1, ..., 1) so that each covers its "
                "example's whole condition",
                _drop_without_reshaping,
            ),
        ],
        forbidden={"drop_labels", "diffusion_loss"},
    )
)
register(
    Question(
        "08.q2",
        3,
        "composed_noise",
        reference_composed_noise,
        _cases_composed_noise,
        _call_composed_noise,
        "guidance starts from the unconditional guess and adds each condition's own direction, measured from "
        "that same unconditional guess",
        "eps_u = model(x_t, t, class_labels=torch.full_like(labels_a, null_label)); eps_a, eps_b with labels_a "
        "and labels_b; return eps_u + scale_a (eps_a - eps_u) + scale_b (eps_b - eps_u)",
        mistakes=[
            Mistake(
                "the guidance starts from the unconditional guess, not from the first condition's",
                _composed_from(base="conditional"),
            ),
            Mistake(
                "each direction is measured from the unconditional guess: eps_b - eps_u, not eps_b - eps_a",
                _composed_from(b_from="conditional"),
            ),
            Mistake("each direction has its own scale", _composed_from(one_scale=True)),
            Mistake("changed its input `labels_a` in place", _composed_from(in_place=True)),
        ],
        forbidden={"with_guidance", "guided_noise"},
    )
)
register(
    Written(
        "08.q3",
        2,
        "In the figure of the notebook, raise the guidance scale from 1 to 7: what happens to the digits, and "
        "what is the price? Explain it with the formula of guidance.",
    )
)


# ============================================================================= 09: latent diffusion


def reference_reconstruction_loss(autoencoder, images, latent_noise, generator):
    latents = autoencoder.encode(images)
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
    return F.mse_loss(autoencoder.decode(latents + latent_noise * noise), images)


def reference_scale_latents(latents):
    scale = 1 / latents.std().item()  # torch's default: the sample standard deviation (dividing by n - 1)
    return latents * scale, scale


def reference_latents_to_images(autoencoder, latents, scale):
    return autoencoder.decode(latents / scale).clamp(-1, 1)


class TinyAutoencoder(nn.Module):
    """A small stand-in autoencoder: 8x8 images <-> (2, 4, 4) latents."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv2d(1, 2, 4, stride=2, padding=1)
        self.decoder = nn.ConvTranspose2d(2, 1, 4, stride=2, padding=1)

    def encode(self, images):
        return self.encoder(images)

    def decode(self, latents):
        return torch.tanh(self.decoder(latents) * 2)


def _cases_autoencoder() -> list[dict]:
    generator = seeded_generator(12)
    cases = []
    for latent_noise, batch in ((0.0, 5), (0.1, 5), (0.5, 1)):
        cases.append(
            {
                "state": seeded(TinyAutoencoder, 13).state_dict(),
                "images": torch.rand(batch, 1, 8, 8, generator=generator) * 2 - 1,
                "latents": torch.randn(batch, 2, 4, 4, generator=generator) * 3 + 0.2,
                "scale": 0.25 + latent_noise,
                "latent_noise": latent_noise,
                "seed": 14,
                "label": f"latent noise {latent_noise}, batch of {batch}",
            }
        )
    return cases


def _cases_scale_latents() -> list[dict]:
    generator = seeded_generator(18)
    return [
        {"latents": torch.randn(5, 2, 4, 4, generator=generator) * 3 + 0.2, "label": "5 codes of 2 x 4 x 4"},
        {"latents": torch.randn(1, 4, 2, 2, generator=generator, dtype=torch.float64) * 0.2 + 5,
         "label": "one float64 code, mean 5"},
        {"latents": torch.randn(3, 4, 8, 8, generator=generator) * torch.tensor([1.0, 2.0, 4.0, 8.0]).view(1, 4, 1, 1),
         "label": "4 channels of different spread"},
    ]  # fmt: skip


def _autoencoder(case) -> TinyAutoencoder:
    autoencoder = TinyAutoencoder()
    autoencoder.load_state_dict(case["state"])
    return autoencoder


def _call_reconstruction_loss(implementation, case):
    with torch.no_grad():
        return implementation(_autoencoder(case), case["images"], case["latent_noise"], seeded_generator(case["seed"]))


def _call_latents_to_images(implementation, case):
    with torch.no_grad():
        return implementation(_autoencoder(case), case["latents"], case["scale"])


def _compare_scaled_latents(got, expected, case) -> None:
    if not isinstance(got, tuple) or len(got) != 2:
        raise Mismatch("return two things: (scaled latents, scale)")
    if type(got[1]) is not type(expected[1]):
        raise Mismatch(f"expected the scale as a Python float (.item()), got a {type(got[1]).__name__}")
    compare_tensors(got[0], expected[0], {"part": "the scaled latents"})
    if abs(got[1] - expected[1]) > 1e-5 * abs(expected[1]):
        raise Mismatch(f"expected the scale {expected[1]:.6g}, got {got[1]!r}")


def _loss_with_unscaled_noise(autoencoder, images, latent_noise, generator):
    latents = autoencoder.encode(images)
    return F.mse_loss(autoencoder.decode(latents + torch.randn(latents.shape, generator=generator)), images)


def _loss_noising_the_images(autoencoder, images, latent_noise, generator):
    noisy = images + latent_noise * torch.randn(images.shape, generator=generator)
    return F.mse_loss(autoencoder.decode(autoencoder.encode(noisy)), images)


def _loss_with_squared_noise(autoencoder, images, latent_noise, generator):
    return reference_reconstruction_loss(autoencoder, images, latent_noise**2, generator)


def _loss_summed(autoencoder, images, latent_noise, generator):
    return reference_reconstruction_loss(autoencoder, images, latent_noise, generator) * images.numel()


def _scale_with_population_std(latents):
    scale = 1 / latents.std(correction=0).item()
    return latents * scale, scale


def _scale_per_channel(latents):
    std = latents.transpose(0, 1).reshape(latents.shape[1], -1).std(dim=1)
    return latents / std.view(1, -1, *([1] * (latents.ndim - 2))), (1 / std).mean().item()


def _scale_by_the_std(latents):
    scale = latents.std().item()
    return latents * scale, scale


def _scale_as_a_tensor(latents):
    scale = 1 / latents.std()
    return latents * scale, scale


register(
    Question(
        "09.q1",
        3,
        "reconstruction_loss",
        reference_reconstruction_loss,
        _cases_autoencoder,
        _call_reconstruction_loss,
        "the noise goes on the codes, after encoding, with latent_noise as its standard deviation; the loss "
        "compares with the images",
        "latents = autoencoder.encode(images); noise = torch.randn(latents.shape, generator=generator); "
        "F.mse_loss(autoencoder.decode(latents + latent_noise * noise), images)",
        mistakes=[
            Mistake("the noise is multiplied by latent_noise before it is added", _loss_with_unscaled_noise),
            Mistake("the noise goes on the codes, after encoding, not on the images", _loss_noising_the_images),
            Mistake(
                "latent_noise is the noise's standard deviation: multiply by it, do not square it",
                _loss_with_squared_noise,
            ),
            Mistake("the loss is the mean over every number (F.mse_loss's default), not the sum", _loss_summed),
        ],
        forbidden={"autoencoder_loss"},
    )
)
register(
    Question(
        "09.q2",
        2,
        "scale_latents",
        reference_scale_latents,
        _cases_scale_latents,
        lambda f, c: f(c["latents"]),
        "one number for the whole tensor, and the standard deviation the question names (torch's default)",
        "scale = 1 / latents.std().item() (a Python float); return (latents * scale, scale)",
        mistakes=[
            Mistake(
                "that is the population standard deviation (dividing by n); the question asks for torch's "
                "default, the sample standard deviation (dividing by n - 1)",
                _scale_with_population_std,
            ),
            Mistake("one scale for the whole tensor, not one per channel", _scale_per_channel),
            Mistake("the scale is one over the standard deviation", _scale_by_the_std),
            Mistake("return the scale as a Python float (.item()), not a tensor", _scale_as_a_tensor),
        ],
        forbidden={"encode_dataset"},
        compare=_compare_scaled_latents,
    )
)
register(
    Question(
        "09.q3",
        2,
        "latents_to_images",
        reference_latents_to_images,
        _cases_autoencoder,
        _call_latents_to_images,
        "undo what scale_latents did before decoding, and clamp what comes out",
        "autoencoder.decode(latents / scale).clamp(-1, 1)",
        mistakes=[
            Mistake(
                "undo the scaling by dividing by scale, not multiplying",
                lambda autoencoder, latents, scale: autoencoder.decode(latents * scale).clamp(-1, 1),
            ),
            Mistake(
                "the codes must be unscaled before decoding",
                lambda autoencoder, latents, scale: autoencoder.decode(latents).clamp(-1, 1),
            ),
            Mistake(
                "clamp the decoded images, not the codes",
                lambda autoencoder, latents, scale: autoencoder.decode((latents / scale).clamp(-1, 1)),
            ),
            Mistake(
                "clamp the images to [-1, 1] at the end",
                lambda autoencoder, latents, scale: autoencoder.decode(latents / scale).clamp(0, 1),
            ),
        ],
        forbidden={"decode_latents"},
    )
)
register(
    Written(
        "09.q4",
        2,
        "Diffusion on the autoencoder's codes is faster than on the pixels. Where does the time go, and what "
        "do the generated images lose in exchange?",
    )
)


# ============================================================================= 10: the text prompt


def reference_clip_loss(image_features, text_features, temperature):
    image = F.normalize(image_features, dim=-1)  # unit length: the dot product is the cosine similarity
    text = F.normalize(text_features, dim=-1)
    logits = image @ text.T / temperature  # logits[i, j]: image i against caption j
    targets = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def reference_cross_attention(pixels, tokens, mask, w_query, w_key, w_value):
    queries = pixels @ w_query  # (B, N, d): what each position looks for
    keys = tokens @ w_key  # (B, L, d): what each word offers
    values = tokens @ w_value  # (B, L, d): what each word hands over
    scores = queries @ keys.transpose(1, 2) / math.sqrt(queries.shape[-1])  # (B, N, L)
    scores = scores.masked_fill(~mask[:, None, :], float("-inf"))  # padding gets no attention
    return scores.softmax(dim=-1) @ values


def _cases_clip_loss() -> list[dict]:
    generator = seeded_generator(31)
    cases = []
    for batch, width, temperature, closeness, dtype in ((6, 8, 0.07, 1.5, torch.float32),
                                                        (3, 5, 1.0, 1.0, torch.float64),
                                                        (10, 16, 0.5, 0.1, torch.float32)):  # fmt: skip
        image = torch.randn(batch, width, generator=generator, dtype=dtype) * 3
        text = 0.5 * image + closeness * torch.randn(batch, width, generator=generator, dtype=dtype)
        text[0] *= 4  # lengths differ: only the directions may count
        cases.append({"image_features": image, "text_features": text, "temperature": temperature,
                      "label": f"{batch} pairs of width {width}, temperature {temperature}"})  # fmt: skip
    return cases


def _cases_cross_attention() -> list[dict]:
    generator = seeded_generator(32)
    cases = []
    for batch, positions, channels, length, token_width, width, real, dtype in (
        (2, 16, 6, 5, 4, 3, (5, 5), torch.float32),  # no padding yet
        (1, 4, 5, 3, 7, 2, (1,), torch.float32),
        (3, 9, 8, 6, 4, 8, (6, 2, 4), torch.float64),
    ):
        tokens = torch.randn(batch, length, token_width, generator=generator, dtype=dtype)
        mask = torch.arange(length)[None, :] < torch.tensor(real)[:, None]
        tokens[~mask] = 5.0  # padding vectors are loud: they must still get no attention
        cases.append({
            "pixels": torch.randn(batch, positions, channels, generator=generator, dtype=dtype),
            "tokens": tokens,
            "mask": mask,
            "w_query": torch.randn(channels, width, generator=generator, dtype=dtype),
            "w_key": torch.randn(token_width, width, generator=generator, dtype=dtype),
            "w_value": torch.randn(token_width, width, generator=generator, dtype=dtype),
            "label": f"{batch} image(s) of {positions} positions, {length} tokens ({', '.join(map(str, real))} real)",
        })  # fmt: skip
    return cases


def _call_cross_attention(implementation, case):
    keys = ("pixels", "tokens", "mask", "w_query", "w_key", "w_value")
    return implementation(*(case[key] for key in keys))


def _clip_loss_with(one_way=False, raw=False, times=False, summed=False, normalise_dim=-1):
    def loss(image_features, text_features, temperature):
        image, text = image_features, text_features
        if not raw:
            image, text = F.normalize(image, dim=normalise_dim), F.normalize(text, dim=normalise_dim)
        logits = image @ text.T * temperature if times else image @ text.T / temperature
        targets = torch.arange(len(logits))
        if one_way:
            return F.cross_entropy(logits, targets)
        total = F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)
        return total if summed else total / 2

    return loss


def _attention_with(mask="before", dim=-1, scale="sqrt d", swap=False):
    def attention(pixels, tokens, mask_, w_query, w_key, w_value):
        queries = pixels @ w_query
        keys, values = (tokens @ w_value, tokens @ w_key) if swap else (tokens @ w_key, tokens @ w_value)
        divisor = {"sqrt d": math.sqrt(queries.shape[-1]), "none": 1.0, "d": queries.shape[-1],
                   "sqrt C": math.sqrt(pixels.shape[-1])}[scale]  # fmt: skip
        scores = queries @ keys.transpose(1, 2) / divisor
        if mask == "before":
            scores = scores.masked_fill(~mask_[:, None, :], float("-inf"))
        weights = scores.softmax(dim=dim)
        if mask == "after":
            weights = weights * mask_[:, None, :]
        return weights @ values

    return attention


register(
    Question(
        "10.q1",
        3,
        "clip_loss",
        reference_clip_loss,
        _cases_clip_loss,
        lambda f, c: f(c["image_features"], c["text_features"], c["temperature"]),
        "unit-length features first, the similarities divided by the temperature, and the loss taken both ways "
        "(each image picks its caption, each caption its image), averaged",
        "normalise both (F.normalize(..., dim=-1)); logits = image @ text.T / temperature; "
        "targets = torch.arange(B); (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2",
        mistakes=[
            Mistake(
                "only one direction: captions must also pick their images (use logits.T too)",
                _clip_loss_with(one_way=True),
            ),
            Mistake(
                "the features are not normalised: CLIP compares directions (cosine similarity), not lengths",
                _clip_loss_with(raw=True),
            ),
            Mistake("divide the similarities by the temperature, do not multiply", _clip_loss_with(times=True)),
            Mistake("average the two directions, do not add them", _clip_loss_with(summed=True)),
            Mistake(
                "normalise each feature vector (dim=-1), not each feature across the batch (dim=0)",
                _clip_loss_with(normalise_dim=0),
            ),
        ],  # fmt: skip
        forbidden={"contrastive_loss", "MiniCLIP"},
    )
)
register(
    Question(
        "10.q2",
        3,
        "cross_attention",
        reference_cross_attention,
        _cases_cross_attention,
        _call_cross_attention,
        "queries from the pixels, keys and values from the tokens; scores divided by the square root of the "
        "query width; padding set to minus infinity before the softmax over the tokens",
        "q = pixels @ w_query; k = tokens @ w_key; v = tokens @ w_value; scores = q @ k.transpose(1, 2) / "
        "sqrt(d); scores.masked_fill(~mask[:, None, :], -inf).softmax(dim=-1) @ v",
        mistakes=[
            Mistake("the padding tokens were attended to: mask them out", _attention_with(mask="none")),
            Mistake(
                "mask before the softmax (minus infinity), so that the real tokens' weights still add up to 1",
                _attention_with(mask="after"),
            ),
            Mistake(
                "the softmax runs over the tokens (the last dimension): each position shares out its attention",
                _attention_with(dim=1),
            ),
            Mistake(
                "the scores are divided by sqrt(d), the width of the queries and keys", _attention_with(scale="none")
            ),
            Mistake("divide by the square root of d, not by d", _attention_with(scale="d")),
            Mistake(
                "d is the width of the queries and keys (w_query's columns), not the pixels' channels",
                _attention_with(scale="sqrt C"),
            ),
            Mistake("keys come from w_key and values from w_value", _attention_with(swap=True)),
        ],  # fmt: skip
        forbidden={"CrossAttention", "scaled_dot_product_attention"},
    )
)
register(
    Written(
        "10.q3",
        2,
        "In the notebook's adherence table, prompts with a colour and character never seen together in training "
        "come out almost as well as seen ones, yet prompts with two characters often swap their colours or "
        "characters. Explain both with what cross-attention lets each position of the image read.",
    )
)


# ============================================================================= 11: editing


def reference_edit_start(images, strengths, alpha_bar, noise):
    t = torch.round(strengths * (len(alpha_bar) - 1)).long()  # one step per image
    a = per_example(alpha_bar[t], images)
    return a.sqrt() * images + (1 - a).sqrt() * noise, t


def reference_merge_known(x_generated, images, mask, alpha_bar_t, noise):
    a = per_example(alpha_bar_t, images)
    known = a.sqrt() * images + (1 - a).sqrt() * noise  # the kept pixels, noised to each image's step
    return mask * known + (1 - mask) * x_generated  # RePaint Algorithm 1, line 8


def _cases_edit_start() -> list[dict]:
    alpha_bar = make_schedule("cosine", 100).alpha_bar.float()
    generator = seeded_generator(15)
    cases = []
    for strengths, dtype in (([0.0, 0.3, 0.55, 1.0], torch.float32), ([0.2, 0.2, 0.9], torch.float32),
                             ([0.5], torch.float64)):  # fmt: skip
        batch = len(strengths)
        cases.append(
            {
                "images": (torch.rand(batch, 1, 4, 4, generator=generator) * 2 - 1).to(dtype),
                "strengths": torch.tensor(strengths),
                "alpha_bar": alpha_bar,
                "noise": torch.randn(batch, 1, 4, 4, generator=generator).to(dtype),
                "label": f"strengths {strengths}" + (", float64 images" if dtype == torch.float64 else ""),
            }
        )
    return cases


def _cases_merge_known() -> list[dict]:
    alpha_bar = make_schedule("cosine", 1000).alpha_bar
    generator = seeded_generator(16)
    left_half = torch.zeros(1, 1, 4, 4)
    left_half[..., :2] = 1
    settings = [
        (torch.tensor([999, 500, 10, 0]), left_half, "4 images at steps 999, 500, 10, 0; keep the left half"),
        (torch.tensor([300, 300, 700]), torch.rand(3, 1, 4, 4, generator=generator).round(), "3 images, a mask each"),
        (None, left_half, "2 clean images (alpha_bar 1)"),
    ]
    cases = []
    for steps, mask, label in settings:
        alpha_bar_t = alpha_bar[steps] if steps is not None else torch.ones(2, dtype=torch.float64)
        batch = len(alpha_bar_t)
        cases.append(
            {
                "x_generated": torch.randn(batch, 1, 4, 4, generator=generator),
                "images": torch.rand(batch, 1, 4, 4, generator=generator) * 2 - 1,
                "mask": mask,
                "alpha_bar_t": alpha_bar_t,
                "noise": torch.randn(batch, 1, 4, 4, generator=generator),
                "label": label,
            }
        )
    return cases


def _compare_edit_start(got, expected, case) -> None:
    if not isinstance(got, tuple) or len(got) != 2:
        raise Mismatch("return two things: (x_t, t)")
    compare_tensors(got[1], expected[1], {"part": "t"})
    compare_tensors(got[0], expected[0], case)


def _start_rounding_down(images, strengths, alpha_bar, noise):
    t = (strengths * (len(alpha_bar) - 1)).long()
    a = per_example(alpha_bar[t], images)
    return a.sqrt() * images + (1 - a).sqrt() * noise, t


def _start_from_T(images, strengths, alpha_bar, noise):
    t = torch.round(strengths * len(alpha_bar)).long()
    a = per_example(alpha_bar[t], images)
    return a.sqrt() * images + (1 - a).sqrt() * noise, t


def _start_without_reshaping(images, strengths, alpha_bar, noise):
    t = torch.round(strengths * (len(alpha_bar) - 1)).long()
    return alpha_bar[t].sqrt() * images + (1 - alpha_bar[t]).sqrt() * noise, t


def _start_without_square_roots(images, strengths, alpha_bar, noise):
    t = torch.round(strengths * (len(alpha_bar) - 1)).long()
    a = per_example(alpha_bar[t], images)
    return a * images + (1 - a) * noise, t


def _merge_inverted(x_generated, images, mask, alpha_bar_t, noise):
    return reference_merge_known(x_generated, images, 1 - mask, alpha_bar_t, noise)


def _merge_clean(x_generated, images, mask, alpha_bar_t, noise):
    return mask * images + (1 - mask) * x_generated


def _merge_without_square_roots(x_generated, images, mask, alpha_bar_t, noise):
    a = per_example(alpha_bar_t, images)
    return mask * (a * images + (1 - a) * noise) + (1 - mask) * x_generated


def _merge_without_reshaping(x_generated, images, mask, alpha_bar_t, noise):
    known = alpha_bar_t.sqrt() * images + (1 - alpha_bar_t).sqrt() * noise
    return mask * known + (1 - mask) * x_generated


register(
    Question(
        "11.q1",
        2,
        "edit_start",
        reference_edit_start,
        _cases_edit_start,
        lambda f, c: f(c["images"], c["strengths"], c["alpha_bar"], c["noise"]),
        "each image has its own strength, so its own step: round to the nearest step, and let each image's "
        "alpha_bar scale that image only",
        "t = torch.round(strengths * (len(alpha_bar) - 1)).long(); a = alpha_bar[t] cast to images' dtype, "
        "reshaped to (B, 1, 1, 1); x_t = sqrt(a) images + sqrt(1 - a) noise; return (x_t, t)",
        mistakes=[
            Mistake(
                "the step rounds to the nearest one (torch.round), .long() alone rounds down", _start_rounding_down
            ),
            Mistake("strength 1 is the last step, T - 1: scale by len(alpha_bar) - 1", _start_from_T),
            Mistake(
                "alpha_bar[t] holds one number per image: reshape it to (B, 1, 1, 1), or it scales columns "
                "of pixels instead of whole images",
                _start_without_reshaping,
            ),
            Mistake(
                "alpha_bar is a variance: the image and the noise are scaled by square roots",
                _start_without_square_roots,
            ),
        ],
        forbidden={"edit", "add_noise", "edit_strength_to_timestep"},
        compare=_compare_edit_start,
    )
)
register(
    Question(
        "11.q2",
        3,
        "merge_known",
        reference_merge_known,
        _cases_merge_known,
        lambda f, c: f(c["x_generated"], c["images"], c["mask"], c["alpha_bar_t"], c["noise"]),
        "the kept pixels must carry the same amount of noise as the generated ones, image by image",
        "a = alpha_bar_t cast to images' dtype and reshaped to (B, 1, 1, 1); known = sqrt(a) images + "
        "sqrt(1 - a) noise; return mask * known + (1 - mask) * x_generated",
        mistakes=[
            Mistake("the mask is 1 where a pixel is kept: keep the known pixels there", _merge_inverted),
            Mistake("the kept pixels must be noised to the generated ones' step first", _merge_clean),
            Mistake(
                "alpha_bar is a variance: the image and the noise are scaled by square roots",
                _merge_without_square_roots,
            ),
            Mistake(
                "alpha_bar_t holds one number per image: cast it to the images' dtype and reshape it to (B, 1, 1, 1)",
                _merge_without_reshaping,
            ),
        ],
        forbidden={"inpaint", "inpaint_steps", "add_noise"},
    )
)
register(
    Written(
        "11.q3",
        2,
        "An edit of strength 0.2 and one of strength 0.8 start from the same photo. Which keeps more of it, "
        "which gives the model more freedom, and why?",
    )
)


# ----------------------------------------------------------------------------- 11, part two: guidance by gradients


def reference_attention_centroid(maps):
    height, width = maps.shape[-2:]
    ys = (torch.arange(height, dtype=maps.dtype) + 0.5) / height  # pixel centres, in [0, 1]
    xs = (torch.arange(width, dtype=maps.dtype) + 0.5) / width
    weights = maps / maps.sum(dim=(1, 2), keepdim=True)
    return torch.stack([(weights.sum(dim=1) * xs).sum(dim=1), (weights.sum(dim=2) * ys).sum(dim=1)], dim=1)


def reference_guided_noise(eps, gradient, alpha_bar_t, weight):
    sigma = (1 - alpha_bar_t).sqrt().to(eps.dtype).view(-1, *([1] * (eps.ndim - 1)))  # sqrt(1 - alpha_bar_t)
    return eps + weight * sigma * gradient


def _cases_attention_centroid() -> list[dict]:
    generator = seeded_generator(41)
    corner = torch.zeros(1, 4, 6)
    corner[0, 0, 5] = 2.0  # one bright position: the top right corner's centre
    return [
        {"maps": torch.rand(3, 8, 8, generator=generator) ** 4, "label": "3 random maps of 8 x 8"},
        {"maps": corner, "label": "one bright position in a 4 x 6 map"},
        {"maps": torch.rand(2, 5, 7, generator=generator, dtype=torch.float64) * 3,
         "label": "float64, 5 x 7, not summing to 1"},
    ]  # fmt: skip


def _cases_guided_noise() -> list[dict]:
    generator = seeded_generator(42)
    cases = []
    for shape, alpha_bars, weight, dtype in (((3, 1, 4, 4), (0.9, 0.5, 0.01), 2.0, torch.float32),
                                             ((1, 2, 3, 3), (0.3,), 0.5, torch.float32),
                                             ((2, 4, 2, 2), (1.0, 0.0004), 3.0, torch.float64)):  # fmt: skip
        cases.append({
            "eps": torch.randn(shape, generator=generator, dtype=dtype),
            "gradient": torch.randn(shape, generator=generator, dtype=dtype) * 2,
            "alpha_bar_t": torch.tensor(alpha_bars, dtype=torch.float64),
            "weight": weight,
            "label": f"{shape[0]} image(s) at alpha_bar {alpha_bars}, weight {weight}",
        })  # fmt: skip
    return cases


def _centroid_with(centres=True, swap=False, unnormalised=False, last_index=False):
    def centroid(maps):
        height, width = maps.shape[-2:]
        if last_index:
            ys = torch.arange(height, dtype=maps.dtype) / (height - 1)
            xs = torch.arange(width, dtype=maps.dtype) / (width - 1)
        else:
            offset = 0.5 if centres else 0.0
            ys = (torch.arange(height, dtype=maps.dtype) + offset) / height
            xs = (torch.arange(width, dtype=maps.dtype) + offset) / width
        weights = maps if unnormalised else maps / maps.sum(dim=(1, 2), keepdim=True)
        x, y = (weights.sum(dim=1) * xs).sum(dim=1), (weights.sum(dim=2) * ys).sum(dim=1)
        return torch.stack([y, x] if swap else [x, y], dim=1)

    return centroid


def _guided_with(sign=1.0, root_of="one minus", square_root=True):
    def guided(eps, gradient, alpha_bar_t, weight):
        a = alpha_bar_t.to(eps.dtype).view(-1, *([1] * (eps.ndim - 1)))
        scale = 1 - a if root_of == "one minus" else a
        return eps + sign * weight * (scale.sqrt() if square_root else scale) * gradient

    return guided


register(
    Question(
        "11.q4",
        2,
        "attention_centroid",
        reference_attention_centroid,
        _cases_attention_centroid,
        lambda f, c: f(c["maps"]),
        "each map is first made to sum to 1; a position counts with the coordinates of its centre, x along "
        "the width first, then y",
        "xs = (arange(W) + 0.5) / W, ys = (arange(H) + 0.5) / H; weights = maps / maps.sum((1, 2), keepdim=True); "
        "x = (weights.sum(1) * xs).sum(1), y = (weights.sum(2) * ys).sum(1); stack([x, y], dim=1)",
        mistakes=[
            Mistake("a position's coordinate is its centre: (index + 0.5) / size", _centroid_with(centres=False)),
            Mistake("x (along the width) comes first, then y", _centroid_with(swap=True)),
            Mistake(
                "normalise each map to sum to 1 before weighting the coordinates", _centroid_with(unnormalised=True)
            ),
            Mistake("divide (index + 0.5) by the size, not the index by size - 1", _centroid_with(last_index=True)),
        ],  # fmt: skip
        forbidden={"centroid"},
    )
)
register(
    Question(
        "11.q5",
        2,
        "guided_noise",
        reference_guided_noise,
        _cases_guided_noise,
        lambda f, c: f(c["eps"], c["gradient"], c["alpha_bar_t"], c["weight"]),
        "the energy's gradient is added (the guided noise points up the energy, so the sampler goes down it), "
        "scaled by the noise level sqrt(1 - alpha_bar_t), one per image",
        "sigma = sqrt(1 - alpha_bar_t) cast to eps' dtype and reshaped to (B, 1, 1, 1); return eps + weight * "
        "sigma * gradient",
        mistakes=[
            Mistake(
                "add the gradient of the energy: the sampler subtracts the noise, so it descends the energy",
                _guided_with(sign=-1.0),
            ),
            Mistake(
                "the scale is the noise's standard deviation, sqrt(1 - alpha_bar_t), not sqrt(alpha_bar_t)",
                _guided_with(root_of="alpha"),
            ),
            Mistake("1 - alpha_bar_t is a variance: take its square root", _guided_with(square_root=False)),
        ],  # fmt: skip
        forbidden={"gradient_guidance", "energy_gradient"},
    )
)
