"""The reverse process: painting by removing noise (notebooks 04 and 05).

Every sampler is a free function with one signature::

    sampler_steps(model, schedule, x_T, *, generator=None, num_steps=None, timesteps=None, start_t=None,
                  clip_x0=None, prediction="eps", <its own options>) -> iterator of SamplerStep

(``tests/test_sampler_contract.py`` holds every registered sampler to it.)

It starts from the pure-noise image ``x_T``, calls ``model(x_t, t)`` and reads its output as a
noise guess (``prediction="eps"``, the default), a clean-image guess (``"x0"``) or a velocity
(``"v"``) with ``parameterization.read_output``, and yields a :class:`SamplerStep` after every
step, so a notebook can animate the trajectory. ``ddpm_sample`` / ``ddim_sample`` run the same loop
and return only the final image. To condition on labels or use classifier-free guidance, wrap the
model with :func:`with_guidance`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from coursekit.forward import posterior_mean_variance
from coursekit.parameterization import check_prediction, read_output
from coursekit.schedules import NoiseSchedule

NoisePredictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

VARIANCES = ("posterior", "beta")


@dataclass
class SamplerStep:
    """The state after one reverse step."""

    t: int  # the timestep that was just denoised
    x: torch.Tensor  # the sample after the step, x_{t-1} (x_0 after the last step)
    x0_pred: torch.Tensor  # the model's guess of the clean image at this step


def ddpm_steps(
    model: NoisePredictor,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    num_steps: int | None = None,
    timesteps: list[int] | None = None,
    start_t: int | None = None,
    clip_x0: bool | None = None,
    prediction: str = "eps",
    variance: str = "posterior",
) -> Iterator[SamplerStep]:
    """Ancestral sampling, DDPM Algorithm 2, over every timestep T-1, ..., 0 by default.

    Each step reads the model's output as a guess of x0 (Eq. 15 for a noise guess) and samples
    ``x_{t-1} ~ N(mu, sigma_t^2)`` with the true posterior's mean for that guess (Eqs. 6-7; the
    same as Eq. 11 when nothing is clipped). ``variance`` chooses sigma_t^2: ``"posterior"``
    (beta_tilde_t, the "fixed small" choice) or ``"beta"`` (beta_t, "fixed large"); the paper
    found both similar at 1000 steps. ``clip_x0`` clips the x0 guess to the image range [-1, 1]; by
    default it does so for image batches (B, C, H, W), see :func:`resolve_clip`.
    ``start_t`` starts part-way: ``x_T`` is then a partly noised ``x_{start_t}`` (for example from
    ``add_noise``), and the loop runs start_t, ..., 0 (notebook 04's experiments, and editing).
    ``num_steps`` or ``timesteps`` visit fewer steps (respacing, Improved DDPM Sec. 4): each jump from
    t to the next visited step t' samples the same posterior with alpha_bar_t / alpha_bar_t' as its
    alpha, which is DDIM with eta = 1 (DDIM Sec. 4.1).
    """
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; choose one of {VARIANCES}")
    x = _check_start(x_T)
    check_prediction(prediction)
    grid = planned_timesteps("ddpm", schedule, num_steps, timesteps, start_t)
    variances = schedule.posterior_variance() if variance == "posterior" else schedule.betas
    clip_x0 = resolve_clip(clip_x0, x)
    for index, step in enumerate(grid):
        following = grid[index + 1] if index + 1 < len(grid) else -1  # -1: the clean image
        t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        x0_pred, eps = read_output(model, x, t, schedule, prediction, clip_x0)
        if following == step - 1:  # consecutive steps: the schedule's own tables
            mean, _ = posterior_mean_variance(x0_pred, x, t, schedule)
            if step > 0:  # Algorithm 2, line 3: no noise is added on the last step
                sigma = schedule.at(variances, t, like=x).sqrt()
                x = mean + sigma * _randn_like(x, generator)
            else:
                x = mean
        else:  # a respaced jump from step to following
            mean, beta, posterior_variance = jump_posterior(x0_pred, x, schedule, step, following)
            if following >= 0:
                spread = posterior_variance if variance == "posterior" else beta
                x = mean + spread**0.5 * _randn_like(x, generator)
            else:
                x = mean
        yield SamplerStep(step, x, x0_pred)


def jump_posterior(
    x0_pred: torch.Tensor, x: torch.Tensor, schedule: NoiseSchedule, step: int, following: int
) -> tuple[torch.Tensor, float, float]:
    """The true posterior of a jump from ``step`` down to ``following`` (-1: the clean image), for respacing:
    DDPM Eq. 7 with alpha = alpha_bar_t / alpha_bar_t' as the jump's own alpha. Returns its mean, the jump's
    beta = 1 - alpha, and the posterior variance (1 - alpha_bar_t') / (1 - alpha_bar_t) * beta."""
    alpha_bar_t = float(schedule.alpha_bar[step])
    alpha_bar_next = float(schedule.alpha_bar[following]) if following >= 0 else 1.0
    alpha = alpha_bar_t / alpha_bar_next
    beta = 1 - alpha
    mean = (alpha_bar_next**0.5 * beta / (1 - alpha_bar_t)) * x0_pred + (
        alpha**0.5 * (1 - alpha_bar_next) / (1 - alpha_bar_t)
    ) * x
    return mean, beta, (1 - alpha_bar_next) / (1 - alpha_bar_t) * beta


def planned_timesteps(
    name: str,
    schedule: NoiseSchedule,
    num_steps: int | None = None,
    timesteps: list[int] | None = None,
    start_t: int | None = None,
) -> list[int]:
    """The timesteps sampler ``name`` visits with these options, its own default step count included."""
    default = DEFAULT_NUM_STEPS[name]
    if num_steps is None and timesteps is None and default is not None:
        num_steps = min(default, schedule.num_steps if start_t is None else int(start_t) + 1)
    return sampling_timesteps(schedule, num_steps, timesteps, start_t)


def sampling_timesteps(
    schedule: NoiseSchedule,
    num_steps: int | None = None,
    timesteps: list[int] | None = None,
    start_t: int | None = None,
) -> list[int]:
    """The decreasing timesteps a sampler visits: ``timesteps`` as given; or ``num_steps`` of them,
    evenly spaced from ``start_t`` (T-1 by default) down to 0; or, without either, every step."""
    if timesteps is not None:
        if num_steps is not None or start_t is not None:
            raise ValueError("give either timesteps, or num_steps and start_t; not both")
        return _check_timesteps(timesteps, schedule)
    top = schedule.num_steps - 1 if start_t is None else int(start_t)
    if not 0 <= top < schedule.num_steps:
        raise ValueError(f"start_t must lie in [0, {schedule.num_steps - 1}], got {start_t}")
    if num_steps is None:
        return list(range(top, -1, -1))
    return ddim_timesteps(top + 1, num_steps)


def ddim_timesteps(num_train_steps: int, num_sampling_steps: int) -> list[int]:
    """Evenly spaced timesteps from T-1 down to 0, ``num_sampling_steps`` of them (DDIM Sec. 4.2).

    Both ends are always included, so the last step lands on a clean image.
    """
    if not 1 <= num_sampling_steps <= num_train_steps:
        raise ValueError(f"num_sampling_steps must lie in [1, {num_train_steps}], got {num_sampling_steps}")
    if num_sampling_steps == 1:
        return [num_train_steps - 1]
    positions = torch.linspace(num_train_steps - 1, 0, num_sampling_steps, dtype=torch.float64)
    return [int(p) for p in positions.round()]


def ddim_steps(
    model: NoisePredictor,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    num_steps: int | None = None,
    timesteps: list[int] | None = None,
    start_t: int | None = None,
    clip_x0: bool | None = None,
    prediction: str = "eps",
    eta: float = 0.0,
) -> Iterator[SamplerStep]:
    """DDIM sampling (Song et al., arXiv:2010.02502v4, Eq. 12) over a subset of timesteps.

    x_prev = sqrt(alpha_bar_prev) * x0_pred                      "predicted x0"
           + sqrt(1 - alpha_bar_prev - sigma^2) * eps            "direction pointing to x_t"
           + sigma * z                                           "random noise"
    with sigma = eta * sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) * sqrt(1 - alpha_bar_t / alpha_bar_prev)
    (Eq. 16). ``eta = 0`` is deterministic; ``eta = 1`` over every timestep is the DDPM step with
    the posterior variance. Pass ``timesteps`` (decreasing) to choose the subset yourself.
    ``clip_x0`` as in :func:`ddpm_steps` (on by default for image batches).
    """
    x = _check_start(x_T)
    check_prediction(prediction)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    timesteps = planned_timesteps("ddim", schedule, num_steps, timesteps, start_t)
    clip_x0 = resolve_clip(clip_x0, x)
    for index, step in enumerate(timesteps):
        previous = timesteps[index + 1] if index + 1 < len(timesteps) else -1
        t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        x0_pred, eps = read_output(model, x, t, schedule, prediction, clip_x0)
        alpha_bar_t = float(schedule.alpha_bar[step])
        alpha_bar_prev = float(schedule.alpha_bar[previous]) if previous >= 0 else 1.0
        sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)) ** 0.5
        direction = max(1 - alpha_bar_prev - sigma**2, 0.0) ** 0.5 * eps
        x = alpha_bar_prev**0.5 * x0_pred + direction
        if sigma > 0:
            x = x + sigma * _randn_like(x, generator)
        yield SamplerStep(step, x, x0_pred)


def dpm_solver_steps(
    model: NoisePredictor,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    num_steps: int | None = None,
    timesteps: list[int] | None = None,
    start_t: int | None = None,
    clip_x0: bool | None = None,
    prediction: str = "eps",
) -> Iterator[SamplerStep]:
    """DPM-Solver++(2M) (Lu et al., arXiv:2211.01095v2, Algorithm 2): a second-order multistep solver.

    In ``lambda = log(alpha / sigma)`` (``alpha = sqrt(alpha_bar)``, ``sigma = sqrt(1 - alpha_bar)``,
    half the log signal-to-noise ratio), DDIM is the first-order solver of the probability-flow ODE:
    like Euler's method, it holds the x0 guess fixed over the step (DPM-Solver++ Eq. 9).
    DPM-Solver++(2M) keeps the x0 guess of the previous step too, and uses the difference of the two
    guesses to follow the curve to second order, at no extra model call:

    x_next = (sigma_next / sigma) * x - alpha_next * (exp(-h) - 1) * D,   h = lambda_next - lambda
    D = (1 + 1/(2r)) x0_pred - 1/(2r) x0_pred_previous,                    r = h_previous / h

    The first step has no previous guess and the last one jumps to the clean image (sigma = 0, h
    infinite), so both use ``D = x0_pred``: the first-order update, which is exactly DDIM with eta = 0.
    On a zero-terminal-SNR schedule the first step starts at alpha = 0 (h infinite): first order too,
    and so is the step after it, whose previous step has no finite length.
    ``num_steps`` model calls over the same timesteps as :func:`ddim_steps`; ``generator`` is unused
    (the solver is deterministic) and accepted so that every sampler has one signature.
    ``clip_x0`` as in :func:`ddpm_steps` (on by default for image batches).
    """
    x = _check_start(x_T)
    check_prediction(prediction)
    timesteps = planned_timesteps("dpm++2m", schedule, num_steps, timesteps, start_t)
    clip_x0 = resolve_clip(clip_x0, x)
    previous_x0_pred, previous_h = None, None
    for index, step in enumerate(timesteps):
        following = timesteps[index + 1] if index + 1 < len(timesteps) else -1  # -1: the clean image
        t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        x0_pred, eps = read_output(model, x, t, schedule, prediction, clip_x0)
        alpha, sigma = _alpha_sigma(schedule, step)
        if following < 0:
            x = x0_pred  # sigma_next = 0: the first-order update lands on the x0 guess
        else:
            alpha_next, sigma_next = _alpha_sigma(schedule, following)
            # lambda_next - lambda; infinite from a zero-terminal-SNR start (alpha = 0), where e^-h = 0
            h = math.log(alpha_next / sigma_next) - math.log(alpha / sigma) if alpha > 0 else math.inf
            if previous_x0_pred is None or math.isinf(previous_h):
                direction = x0_pred  # first order (DPM-Solver++ Eq. 9): the DDIM step
            else:
                r = previous_h / h
                direction = (1 + 1 / (2 * r)) * x0_pred - 1 / (2 * r) * previous_x0_pred  # Algorithm 2, line 6
            x = (sigma_next / sigma) * x - alpha_next * math.expm1(-h) * direction  # Algorithm 2, line 7
            previous_h = h
        previous_x0_pred = x0_pred
        yield SamplerStep(step, x, x0_pred)


def _alpha_sigma(schedule: NoiseSchedule, step: int) -> tuple[float, float]:
    """``alpha_t = sqrt(alpha_bar_t)`` and ``sigma_t = sqrt(1 - alpha_bar_t)`` as Python floats (float64)."""
    alpha_bar = float(schedule.alpha_bar[step])
    return alpha_bar**0.5, (1 - alpha_bar) ** 0.5


def ddpm_sample(model: NoisePredictor, schedule: NoiseSchedule, x_T: torch.Tensor, **options) -> torch.Tensor:
    """Run :func:`ddpm_steps` to the end and return the final images."""
    return final_state(ddpm_steps(model, schedule, x_T, **options))


def ddim_sample(model: NoisePredictor, schedule: NoiseSchedule, x_T: torch.Tensor, **options) -> torch.Tensor:
    """Run :func:`ddim_steps` to the end and return the final images."""
    return final_state(ddim_steps(model, schedule, x_T, **options))


def dpm_solver_sample(model: NoisePredictor, schedule: NoiseSchedule, x_T: torch.Tensor, **options) -> torch.Tensor:
    """Run :func:`dpm_solver_steps` to the end and return the final images."""
    return final_state(dpm_solver_steps(model, schedule, x_T, **options))


def final_state(steps: Iterator[SamplerStep]) -> torch.Tensor:
    """Drain a sampler's steps and return the last sample."""
    last_step = None
    for step in steps:
        last_step = step
    if last_step is None:
        raise ValueError("the sampler made no steps")
    return last_step.x


SAMPLERS = {"ddpm": ddpm_steps, "ddim": ddim_steps, "dpm++2m": dpm_solver_steps}
DEFAULT_NUM_STEPS = {"ddpm": None, "ddim": 50, "dpm++2m": 20}  # without num_steps or timesteps; None: every step


def get_sampler(name: str) -> Callable[..., Iterator[SamplerStep]]:
    """The steps function for a sampler name: ``"ddpm"``, ``"ddim"`` or ``"dpm++2m"``."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]


def with_guidance(
    model: Callable[..., torch.Tensor],
    class_labels: torch.Tensor,
    guidance_scale: float = 1.0,
    null_label: int | None = None,
) -> NoisePredictor:
    """Bind class labels to a conditional model, with classifier-free guidance (Ho & Salimans 2022).

    eps = eps_uncond + w * (eps_cond - eps_uncond)     (their Eq. 6, with w = 1 + their w)
    ``guidance_scale`` w = 1 is plain conditional sampling (one model call per step); w = 0 is
    unconditional; w > 1 pushes samples towards their class. ``null_label`` defaults to
    ``model.null_label``. The result has the sampler signature ``(x_t, t) -> eps``.
    """
    if null_label is None:
        null_label = getattr(model, "null_label", None)
        if null_label is None:
            raise ValueError("the model has no null_label; pass null_label= for the 'no label' class")
    class_labels = torch.as_tensor(class_labels)

    def guided_model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        labels = class_labels.to(x_t.device)
        if labels.shape != (x_t.shape[0],):
            raise ValueError(f"class_labels must have shape ({x_t.shape[0]},), got {tuple(labels.shape)}")
        if guidance_scale == 1.0:
            return model(x_t, t, class_labels=labels)
        unconditional = torch.full_like(labels, null_label)
        # One batched call for both halves: (2B, C, H, W)
        eps = model(
            torch.cat([x_t, x_t]),
            torch.cat([t, t]),
            class_labels=torch.cat([labels, unconditional]),
        )
        eps_cond, eps_uncond = eps.chunk(2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

    return guided_model


def resolve_clip(clip_x0: bool | None, x: torch.Tensor) -> bool:
    """Whether a sampler clips its guess of the clean image to [-1, 1]; ``None`` picks the default.

    Images in the package lie in [-1, 1], so for an image batch (B, C, H, W) the default is to clip.
    Without it, the first step from pure noise goes wrong on the cosine schedule: its last beta is
    capped at 0.999, so alpha_bar_{T-1} is about 2.4e-9 and the guess
    x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)   (DDPM Eq. 15)
    multiplies the model's small error in eps by 1 / sqrt(alpha_bar_t), about 20,000; DDIM and
    DPM-Solver++ then carry that guess to the end. Clipping keeps the guess an image
    (diffusers' schedulers clip by default for the same reason).

    Data that does not live in [-1, 1] must say so: latent codes (notebook 09) pass
    ``clip_x0=False``; for other shapes (2-D points, test vectors) there is no safe default, and the
    sampler asks for ``clip_x0=True`` or ``False``.
    """
    if clip_x0 is not None:
        return bool(clip_x0)
    if x.ndim == 4:
        return True
    raise ValueError(
        f"x_T has shape {tuple(x.shape)}, not an image batch (B, C, H, W), so there is no safe default for clip_x0: "
        "pass clip_x0=False for data outside [-1, 1] (points, latent codes), "
        "or clip_x0=True to keep x0 guesses in [-1, 1]"
    )


def _check_timesteps(timesteps: list[int], schedule: NoiseSchedule) -> list[int]:
    timesteps = [int(s) for s in timesteps]
    if not timesteps or any(a <= b for a, b in zip(timesteps, timesteps[1:])):
        raise ValueError("timesteps must be a non-empty, strictly decreasing list")
    if timesteps[0] >= schedule.num_steps or timesteps[-1] < 0:
        raise ValueError(f"timesteps must lie in [0, {schedule.num_steps - 1}]")
    return timesteps


def _check_start(x_T: torch.Tensor) -> torch.Tensor:
    if not isinstance(x_T, torch.Tensor) or x_T.ndim < 2:
        raise ValueError(
            "x_T must be a batch of pure-noise samples, shape (B, ...); make one with torch.randn(shape, generator=...)"
        )
    return x_T


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
