"""Editing with a trained model: noise a little, then denoise (notebook 11).

Two tools built from pieces the course already has, with no retraining:

* :func:`edit` is SDEdit (Meng et al., arXiv:2108.01073): notebook 04's "a little noise"
  experiment turned into an editing tool. Noise an image (a rough sketch, a photo with a paste-in)
  part of the way with ``add_noise``, then run the DDPM sampler from there. The ``strength`` (SDEdit's
  t_0 in [0, 1]) trades faithfulness to the input (small) for realism (large).
* :func:`inpaint_steps` / :func:`inpaint` are RePaint (Lugmayr et al., arXiv:2201.09865v4,
  Algorithm 1): fill in the masked part of an image. At every reverse step the part to fill comes
  from the model and the part to keep is the input image noised to the same level; going back up
  one step and down again ("resampling") lets the two parts agree.

Timesteps follow the package convention (``schedules``): ``t = 0 ... T-1``, index ``t`` is the
paper's step ``t+1``, so the reverse step at ``t`` produces a sample at noise level ``t-1``
(the clean image after ``t = 0``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from coursekit.forward import add_noise, noising_step, posterior_mean_variance
from coursekit.parameterization import check_prediction, read_output
from coursekit.samplers import (
    NoisePredictor,
    SamplerStep,
    _check_start,
    _randn_like,
    ddpm_steps,
    final_state,
    jump_posterior,
    resolve_clip,
    sampling_timesteps,
)
from coursekit.schedules import NoiseSchedule


def edit_strength_to_timestep(strength: float, num_steps: int) -> int:
    """The timestep an edit of ``strength`` starts from: ``round(strength * (T - 1))``.

    ``strength = 0`` is timestep 0, the smallest dose of noise (``edit`` returns its input unchanged
    at exactly 0), ``strength = 1`` is ``T - 1`` (pure noise, so the input is forgotten). Ties round
    to even, as in ``ddim_timesteps``.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if not 0 <= float(strength) <= 1:  # also refuses NaN
        raise ValueError(f"strength must lie in [0, 1] (0 keeps the image, 1 starts from pure noise), got {strength!r}")
    return round(float(strength) * (num_steps - 1))


def edit(
    model: NoisePredictor,
    schedule: NoiseSchedule,
    images: torch.Tensor,
    strength: float,
    *,
    generator: torch.Generator | None = None,
    clip_x0: bool | None = None,
    num_steps: int | None = None,
) -> torch.Tensor:
    """SDEdit: noise ``images`` to the timestep ``strength`` picks, then denoise them with DDPM.

    ``images`` (B, C, H, W) are in [-1, 1]. ``strength = 0`` returns a copy of them (no model call);
    ``strength = 1`` is plain DDPM sampling from a noised copy that has (almost) forgotten them.
    With a perfect model the edit keeps the data distribution: data noised to ``t`` is exactly what
    the reverse process expects at ``t``. The result is on the device of ``images``. ``num_steps`` visits
    fewer, evenly spaced steps on the way down (respaced DDPM, as in ``ddpm_steps``); every step by default.
    """
    start_t = edit_strength_to_timestep(strength, schedule.num_steps)
    if not isinstance(images, torch.Tensor) or images.ndim < 2:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a batch of shape (B, C, H, W) in [-1, 1], got {shape}")
    if strength == 0:
        return images.clone()
    t = torch.full((images.shape[0],), start_t, device=images.device, dtype=torch.long)
    # 1. forward: jump from the images (x0) to x_{start_t} in one go, (B, C, H, W)
    x_t, _ = add_noise(images, t, schedule, noise=_randn_like(images, generator))  # DDPM Eq. 4
    # 2. reverse: ancestral sampling from start_t down to the clean image
    steps = ddpm_steps(model, schedule, x_t, generator=generator, clip_x0=clip_x0, start_t=start_t, num_steps=num_steps)
    return final_state(steps)  # DDPM Algorithm 2, from step start_t


def inpaint_steps(
    model: NoisePredictor,
    schedule: NoiseSchedule,
    images: torch.Tensor,
    mask: torch.Tensor,
    x_T: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    resample: int = 1,
    clip_x0: bool | None = None,
    prediction: str = "eps",
    num_steps: int | None = None,
) -> Iterator[SamplerStep]:
    """RePaint (Algorithm 1): fill in where ``mask`` is 0, keep ``images`` where it is 1.

    ``mask`` broadcasts against ``images`` (for example (1, 1, H, W) for one mask shared by the
    batch and the channels); its values are 0 or 1 (values in between blend the two parts). Start
    from pure noise ``x_T`` of the shape of ``images``. At every timestep t = T-1, ..., 0:

    1. the part to fill: one DDPM reverse step from x_t (as in ``ddpm_steps``, posterior variance);
    2. the part to keep: ``images`` noised to the level of x_{t-1} (the clean images when t = 0);
    3. x_{t-1} = mask * known + (1 - mask) * unknown;
    4. ``resample`` > 1: go back up one step (DDPM Eq. 2) and repeat 1-3, ``resample`` rounds in
       all (RePaint's U, with jumps of length 1; the paper used U = 10). The filled part then has
       time to agree with the kept part.

    Each step yields ``SamplerStep(t, x_{t-1}, x0_pred)`` after its last round, ``x0_pred`` being
    the model's guess of the whole image.

    ``num_steps`` visits fewer, evenly spaced timesteps (respacing, as ``ddpm_steps`` does): each
    jump from t to the next visited t' uses the posterior with alpha_bar_t / alpha_bar_t' as its
    alpha, the kept part is noised to t', and resampling goes back up from t' to t in one jump.

    Two choices differ from the paper's listing. One noise draw per round serves both parts (the
    paper draws two, lines 4 and 6): a kept pixel uses it in step 2 and a filled pixel in step 1, so
    with a 0/1 mask every pixel still gets its own independent noise, and the draws line up with
    ``ddpm_steps`` (an all-zero mask gives exactly DDPM sampling). And line 5 prints alpha_bar_t for
    the kept part, but x_{t-1} sits at the level alpha_bar_{t-1}: that level (our index t-1) is used.
    """
    x = _check_start(x_T)
    check_prediction(prediction)
    images, mask = _check_inpaint_inputs(images, mask, x, resample)
    clip_x0 = resolve_clip(clip_x0, x)  # on by default for image batches
    variances = schedule.posterior_variance()
    grid = sampling_timesteps(schedule, num_steps)  # every step by default
    for index, step in enumerate(grid):
        following = grid[index + 1] if index + 1 < len(grid) else -1  # -1: the clean image
        t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        jump = following != step - 1  # respaced: the jump's own alpha, alpha_bar_t / alpha_bar_t'
        rounds = resample if following >= 0 else 1  # Algorithm 1, line 9: no going back up from the clean image
        for round_index in range(rounds):
            # 1. the unknown part: one reverse step (or jump) from x_t, (B, C, H, W)
            x0_pred, _ = read_output(model, x, t, schedule, prediction, clip_x0)  # DDPM Eq. 15 for "eps"
            if jump:  # DDPM Eq. 7 for the jump
                mean, beta, jump_variance = jump_posterior(x0_pred, x, schedule, step, following)
            else:
                mean, _ = posterior_mean_variance(x0_pred, x, t, schedule)  # DDPM Eqs. 6-7
            if following >= 0:
                noise = _randn_like(x, generator)
                sigma = jump_variance**0.5 if jump else schedule.at(variances, t, like=x).sqrt()
                unknown = mean + sigma * noise  # RePaint Algorithm 1, line 7
                # 2. the known part: the images noised to the level of the next step
                known, _ = add_noise(images, torch.full_like(t, following), schedule, noise=noise)  # line 5
            else:
                unknown, known = mean, images  # the last step adds no noise
            # 3. join the two parts
            x = mask * known + (1 - mask) * unknown  # RePaint Algorithm 1, line 8
            # 4. resampling: back up to x_t, and go down again
            if round_index < rounds - 1:
                if jump:  # DDPM Eq. 4 between the two levels, alpha = 1 - beta
                    x = (1 - beta) ** 0.5 * x + beta**0.5 * _randn_like(x, generator)
                else:
                    x = _noising_step(x, t, schedule, generator)  # Algorithm 1, line 10 (DDPM Eq. 2)
        yield SamplerStep(step, x, x0_pred)


def inpaint(
    model: NoisePredictor,
    schedule: NoiseSchedule,
    images: torch.Tensor,
    mask: torch.Tensor,
    x_T: torch.Tensor,
    **options,
) -> torch.Tensor:
    """Run :func:`inpaint_steps` to the end and return the inpainted images."""
    return final_state(inpaint_steps(model, schedule, images, mask, x_T, **options))


def _check_inpaint_inputs(
    images: torch.Tensor, mask: torch.Tensor, x: torch.Tensor, resample: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the inpainting inputs; return images and mask on the device and dtype of x."""
    if not isinstance(images, torch.Tensor) or images.shape != x.shape:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(
            f"images and x_T must have one shape, got {shape} and {tuple(x.shape)}; "
            "make x_T with torch.randn(images.shape, generator=...)"
        )
    if isinstance(resample, bool) or not isinstance(resample, int) or resample < 1:
        raise ValueError(f"resample must be an integer >= 1 (1: no resampling; RePaint used 10), got {resample!r}")
    mask = torch.as_tensor(mask)
    try:
        broadcast = torch.broadcast_shapes(mask.shape, images.shape)
    except RuntimeError:
        broadcast = None
    if broadcast != images.shape:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to the images' shape {tuple(images.shape)}; "
            "use (B, C, H, W), (B, 1, H, W) or (1, 1, H, W)"
        )
    mask = mask.to(device=x.device, dtype=x.dtype)
    if not bool(((mask >= 0) & (mask <= 1)).all()):
        raise ValueError("mask values must lie in [0, 1]: 1 keeps a pixel, 0 fills it in")
    return images.to(device=x.device, dtype=x.dtype), mask


def _noising_step(
    x: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule, generator: torch.Generator | None
) -> torch.Tensor:
    """``noising_step`` run where the generator lives (as ``_randn_like`` draws), returned on x's device."""
    device = generator.device if generator is not None else x.device
    return noising_step(x.to(device), t.to(device), schedule, generator).to(x.device)
