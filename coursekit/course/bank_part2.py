"""Question bank, part two: the exercises of notebooks 05-08 (fewer steps, control, latents, editing).

References first, then the cases they are tried on, then the questions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from coursekit.course.bank_part1 import reference_noisy_image
from coursekit.course.engine import Mismatch, Question, compare_tensors, register, seeded, seeded_generator
from coursekit.losses import drop_labels
from coursekit.samplers import with_guidance
from coursekit.schedules import make_schedule


def reference_ddim_step(x_t, eps, alpha_bar_t, alpha_bar_prev):
    x0_pred = (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t**0.5  # DDPM Eq. 15
    return alpha_bar_prev**0.5 * x0_pred + (1 - alpha_bar_prev) ** 0.5 * eps  # DDIM Eq. 12, sigma = 0


def _half_log_snr(alpha_bar: float) -> float:
    return 0.5 * math.log(alpha_bar / (1 - alpha_bar))  # lambda = log(alpha / sigma)


def reference_dpm_solver_step(x_t, x0_pred, previous_x0_pred, alpha_bar_previous, alpha_bar_t, alpha_bar_next):
    if alpha_bar_next == 1.0:
        return x0_pred.clone()  # sigma_next = 0: the update lands on the x0 guess
    h = _half_log_snr(alpha_bar_next) - _half_log_snr(alpha_bar_t)
    direction = x0_pred
    if previous_x0_pred is not None:
        r = (_half_log_snr(alpha_bar_t) - _half_log_snr(alpha_bar_previous)) / h
        direction = (1 + 1 / (2 * r)) * x0_pred - 1 / (2 * r) * previous_x0_pred
    ratio = ((1 - alpha_bar_next) / (1 - alpha_bar_t)) ** 0.5
    return ratio * x_t - alpha_bar_next**0.5 * math.expm1(-h) * direction  # DPM-Solver++ Algorithm 2


def reference_drop_labels(labels, probability, null_label, generator):
    return drop_labels(labels, probability, null_label, generator)


def reference_guided_noise(model, x_t, t, labels, guidance_scale, null_label):
    return with_guidance(model, labels, guidance_scale, null_label)(x_t, t)


def reference_reconstruction_loss(autoencoder, images, latent_noise, generator):
    latents = autoencoder.encode(images)
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
    return F.mse_loss(autoencoder.decode(latents + latent_noise * noise), images)


def reference_scale_latents(latents):
    scale = 1 / latents.std().item()
    return latents * scale, scale


def reference_latents_to_images(autoencoder, latents, scale):
    return autoencoder.decode(latents / scale).clamp(-1, 1)


def reference_edit_start(images, strength, alpha_bar, noise):
    t = round(strength * (len(alpha_bar) - 1))
    return reference_noisy_image(images, torch.full((images.shape[0],), t), alpha_bar, noise), t


def reference_merge_known(x_generated, images, mask, alpha_bar_t, noise):
    known = alpha_bar_t**0.5 * images + (1 - alpha_bar_t) ** 0.5 * noise  # the kept pixels, noised to t
    return mask * known + (1 - mask) * x_generated  # RePaint Algorithm 1, line 8


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


class TinyAutoencoder(nn.Module):
    """A small stand-in autoencoder: 8x8 images <-> (2, 4, 4) latents."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv2d(1, 2, 4, stride=2, padding=1)
        self.decoder = nn.ConvTranspose2d(2, 1, 4, stride=2, padding=1)

    def encode(self, images):
        return self.encoder(images)

    def decode(self, latents):
        return torch.tanh(self.decoder(latents))


def _cases_ddim_step() -> list[dict]:
    alpha_bar = make_schedule("cosine", 1000).alpha_bar.tolist()
    generator = seeded_generator(8)
    cases = []
    for t, previous in ((999, 949), (500, 400), (20, 0), (0, None)):
        cases.append(
            {
                "x_t": torch.randn(3, 1, 4, 4, generator=generator),
                "eps": torch.randn(3, 1, 4, 4, generator=generator),
                "alpha_bar_t": alpha_bar[t],
                "alpha_bar_prev": alpha_bar[previous] if previous is not None else 1.0,
                "label": f"from t = {t} to {'the clean image' if previous is None else previous}",
            }
        )
    return cases


def _cases_dpm_solver_step() -> list[dict]:
    alpha_bar = make_schedule("cosine", 1000).alpha_bar.tolist()
    generator = seeded_generator(9)
    cases = []
    for previous, t, following in ((None, 999, 899), (999, 899, 700), (600, 450, 300), (200, 100, 0), (100, 0, None)):
        x0_previous = torch.randn(2, 1, 4, 4, generator=generator) if previous is not None else None
        cases.append(
            {
                "x_t": torch.randn(2, 1, 4, 4, generator=generator),
                "x0_pred": torch.randn(2, 1, 4, 4, generator=generator),
                "previous_x0_pred": x0_previous,
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


def _cases_drop_labels() -> list[dict]:
    labels = torch.arange(10).repeat(20)
    return [
        {"labels": labels, "probability": 0.1, "null_label": 10, "seed": 0, "label": "probability 0.1"},
        {"labels": labels, "probability": 0.5, "null_label": 10, "seed": 1, "label": "probability 0.5"},
        {"labels": labels, "probability": 0.0, "null_label": 10, "seed": 2, "label": "probability 0"},
        {
            "labels": labels[:7] % 3,
            "probability": 0.9,
            "null_label": 3,
            "seed": 3,
            "label": "3 classes, probability 0.9",
        },
    ]


def _cases_guided_noise() -> list[dict]:
    generator = seeded_generator(10)
    cases = []
    for scale in (0.0, 1.0, 3.0, 7.5):
        cases.append(
            {
                "state": seeded(TinyConditionalDenoiser, 11).state_dict(),
                "x_t": torch.randn(4, 1, 6, 6, generator=generator),
                "t": torch.tensor([999, 500, 10, 0]),
                "labels": torch.tensor([0, 1, 2, 1]),
                "guidance_scale": scale,
                "label": f"guidance scale {scale}",
            }
        )
    return cases


def _cases_autoencoder() -> list[dict]:
    generator = seeded_generator(12)
    cases = []
    for latent_noise in (0.0, 0.1, 0.5):
        cases.append(
            {
                "state": seeded(TinyAutoencoder, 13).state_dict(),
                "images": torch.rand(5, 1, 8, 8, generator=generator) * 2 - 1,
                "latents": torch.randn(5, 2, 4, 4, generator=generator) * 3 + 0.2,
                "scale": 0.25 + latent_noise,
                "latent_noise": latent_noise,
                "seed": 14,
                "label": f"latent noise {latent_noise}",
            }
        )
    return cases


def _cases_edit_start() -> list[dict]:
    alpha_bar = make_schedule("cosine", 100).alpha_bar.float()
    generator = seeded_generator(15)
    cases = []
    for strength in (0.0, 0.3, 0.55, 1.0):
        cases.append(
            {
                "images": torch.rand(3, 1, 4, 4, generator=generator) * 2 - 1,
                "strength": strength,
                "alpha_bar": alpha_bar,
                "noise": torch.randn(3, 1, 4, 4, generator=generator),
                "label": f"strength {strength}",
            }
        )
    return cases


def _cases_merge_known() -> list[dict]:
    alpha_bar = make_schedule("cosine", 1000).alpha_bar.tolist()
    generator = seeded_generator(16)
    left_half = torch.zeros(1, 1, 4, 4)
    left_half[..., :2] = 1
    cases = []
    for t, mask in ((999, left_half), (300, left_half), (None, torch.rand(2, 1, 4, 4, generator=generator).round())):
        cases.append(
            {
                "x_generated": torch.randn(2, 1, 4, 4, generator=generator),
                "images": torch.rand(2, 1, 4, 4, generator=generator) * 2 - 1,
                "mask": mask,
                "alpha_bar_t": alpha_bar[t] if t is not None else 1.0,
                "noise": torch.randn(2, 1, 4, 4, generator=generator),
                "label": "the clean image, a random mask" if t is None else f"t = {t}, keep the left half",
            }
        )
    return cases


def _call_guided_noise(implementation, case):
    model = TinyConditionalDenoiser()
    model.load_state_dict(case["state"])
    with torch.no_grad():
        return implementation(model, case["x_t"], case["t"], case["labels"], case["guidance_scale"], model.null_label)


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
    compare_tensors(got[0], expected[0], {"label": "the scaled latents"})
    if not isinstance(got[1], (int, float)) or abs(got[1] - expected[1]) > 1e-5 * abs(expected[1]):
        raise Mismatch(f"expected the scale {expected[1]:.6g} as a Python float, got {got[1]!r}")


def _compare_edit_start(got, expected, case) -> None:
    if not isinstance(got, tuple) or len(got) != 2:
        raise Mismatch("return two things: (x_t, t)")
    if got[1] != expected[1] or not isinstance(got[1], int):
        raise Mismatch(f"expected t = {expected[1]} (an int) for {case['label']}, got {got[1]!r}")
    compare_tensors(got[0], expected[0], case)


register(
    Question(
        "05.q1",
        3,
        "ddim_step",
        reference_ddim_step,
        _cases_ddim_step,
        lambda f, c: f(c["x_t"], c["eps"], c["alpha_bar_t"], c["alpha_bar_prev"]),
        "x0_pred = (x_t - sqrt(1 - alpha_bar_t) * eps) / sqrt(alpha_bar_t); "
        "return sqrt(alpha_bar_prev) * x0_pred + sqrt(1 - alpha_bar_prev) * eps",
        forbidden={"ddim_steps", "ddim_sample", "predict_x0"},
    )
)
register(
    Question(
        "05.q2",
        3,
        "dpm_solver_step",
        reference_dpm_solver_step,
        _cases_dpm_solver_step,
        lambda f, c: f(
            c["x_t"],
            c["x0_pred"],
            c["previous_x0_pred"],
            c["alpha_bar_previous"],
            c["alpha_bar_t"],
            c["alpha_bar_next"],
        ),
        "lambda(a) = 0.5 * log(a / (1 - a)); h = lambda(next) - lambda(t); D = x0_pred on the first step, else "
        "(1 + 1/(2r)) x0_pred - 1/(2r) previous_x0_pred with r = (lambda(t) - lambda(previous)) / h; "
        "x_next = sqrt((1 - next) / (1 - t)) x_t - sqrt(next) (exp(-h) - 1) D; x0_pred itself when alpha_bar_next is 1",
        forbidden={"dpm_solver_steps", "dpm_solver_sample"},
    )
)
register(
    Question(
        "06.q1",
        3,
        "drop_labels",
        reference_drop_labels,
        _cases_drop_labels,
        lambda f, c: f(c["labels"], c["probability"], c["null_label"], seeded_generator(c["seed"])),
        "drop = torch.rand(labels.shape, generator=generator) < probability; "
        "torch.where(drop, null_label, labels), keeping the int64 dtype",
        forbidden={"diffusion_loss"},
    )
)
register(
    Question(
        "06.q2",
        3,
        "guided_noise",
        reference_guided_noise,
        _cases_guided_noise,
        _call_guided_noise,
        "eps_cond = model(x_t, t, class_labels=labels); eps_uncond = model(x_t, t, class_labels=a tensor full of "
        "null_label); return eps_uncond + guidance_scale * (eps_cond - eps_uncond)",
        forbidden={"with_guidance"},
    )
)
register(
    Question(
        "07.q1",
        3,
        "reconstruction_loss",
        reference_reconstruction_loss,
        _cases_autoencoder,
        _call_reconstruction_loss,
        "latents = autoencoder.encode(images); noise = torch.randn(latents.shape, generator=generator); "
        "F.mse_loss(autoencoder.decode(latents + latent_noise * noise), images)",
        forbidden={"autoencoder_loss"},
    )
)
register(
    Question(
        "07.q2",
        2,
        "scale_latents",
        reference_scale_latents,
        _cases_autoencoder,
        lambda f, c: f(c["latents"]),
        "scale = 1 / latents.std().item() (a Python float); return (latents * scale, scale)",
        forbidden={"encode_dataset"},
        compare=_compare_scaled_latents,
    )
)
register(
    Question(
        "07.q3",
        2,
        "latents_to_images",
        reference_latents_to_images,
        _cases_autoencoder,
        _call_latents_to_images,
        "undo the scaling first: autoencoder.decode(latents / scale), then clamp to [-1, 1]",
        forbidden={"decode_latents"},
    )
)
register(
    Question(
        "08.q1",
        2,
        "edit_start",
        reference_edit_start,
        _cases_edit_start,
        lambda f, c: f(c["images"], c["strength"], c["alpha_bar"], c["noise"]),
        "t = round(strength * (len(alpha_bar) - 1)); "
        "x_t = sqrt(alpha_bar[t]) * images + sqrt(1 - alpha_bar[t]) * noise; return (x_t, t)",
        forbidden={"edit", "add_noise", "edit_strength_to_timestep"},
        compare=_compare_edit_start,
    )
)
register(
    Question(
        "08.q2",
        3,
        "merge_known",
        reference_merge_known,
        _cases_merge_known,
        lambda f, c: f(c["x_generated"], c["images"], c["mask"], c["alpha_bar_t"], c["noise"]),
        "known = sqrt(alpha_bar_t) * images + sqrt(1 - alpha_bar_t) * noise; mask * known + (1 - mask) * x_generated",
        forbidden={"inpaint", "inpaint_steps", "add_noise"},
    )
)
