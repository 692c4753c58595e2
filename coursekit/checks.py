"""Graded exercise questions: instant feedback in the notebook, and the same checks for the grader.

Each question names the function (or class) the learner writes, the reference it is compared with,
the cases it is tried on, and a hint. In a notebook::

    from coursekit.checks import check, learner_or_reference
    check("01.q2")                              # prints: passed, not implemented yet, or the first mismatch
    noisy = learner_or_reference("01.q2")       # the learner's function if it passes, else the reference

``check`` never raises, unless the environment variable ``COURSEKIT_STRICT=1`` is set (CI uses it
so that a broken solution fails the build).
"""

from __future__ import annotations

import ast
import html
import inspect
import math
import os
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from coursekit.embeddings import sinusoidal_embedding
from coursekit.forward import add_noise, posterior_mean_variance, predict_x0
from coursekit.losses import drop_labels
from coursekit.oracle import GaussianOracle
from coursekit.samplers import with_guidance
from coursekit.schedules import NoiseSchedule, make_schedule
from coursekit.unet import ResidualBlock

STRICT_VARIABLE = "COURSEKIT_STRICT"


class Mismatch(Exception):
    """The learner's answer differs from the reference; the message says how."""


@dataclass
class Question:
    """One graded question."""

    id: str  # "NN.qK": notebook number and question number
    points: int
    name: str  # the function or class the learner defines
    reference: Callable  # what the answer must agree with (same signature)
    cases: Callable[[], list[dict]]  # grader-chosen inputs, plain tensors and numbers
    call: Callable[[Callable, dict], object]  # how one case is run with an implementation
    hint: str  # what to look at when it fails
    forbidden: set[str] = field(default_factory=set)  # package names that would answer it for you
    compare: Callable[[object, object, dict], None] | None = None  # custom comparison, else tensors


@dataclass
class Result:
    """The outcome of one check, printable in a notebook."""

    question: str
    status: str  # "passed", "not implemented", "missing", "failed", "uses the reference"
    points: int
    max_points: int
    message: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def __repr__(self) -> str:
        mark = {"passed": "✅", "not implemented": "🚧", "missing": "❓"}.get(self.status, "❌")
        return f"{mark} {self.question} ({self.points}/{self.max_points} points): {self.message}"

    def _repr_html_(self) -> str:
        colour = "#1b7f3b" if self.passed else ("#8a6d00" if self.status == "not implemented" else "#b3261e")
        return f'<pre style="color:{colour}; white-space:pre-wrap">{html.escape(repr(self))}</pre>'


# ----------------------------------------------------------------------------- comparisons


def compare_tensors(got, expected, case: dict, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """Raise Mismatch naming the first difference: type, shape, dtype, then values."""
    label = case.get("label", "")
    where = f" ({label})" if label else ""
    if not isinstance(got, torch.Tensor):
        raise Mismatch(f"expected a tensor{where}, got {type(got).__name__}")
    if tuple(got.shape) != tuple(expected.shape):
        raise Mismatch(f"expected shape {tuple(expected.shape)}{where}, got {tuple(got.shape)}")
    if got.dtype != expected.dtype:
        raise Mismatch(f"expected dtype {expected.dtype}{where}, got {got.dtype}")
    got_cpu, expected_cpu = got.detach().cpu(), expected.detach().cpu()
    if not torch.isfinite(got_cpu).all() and torch.isfinite(expected_cpu).all():
        raise Mismatch(f"your result contains NaN or inf{where}")
    if not torch.allclose(got_cpu, expected_cpu, atol=atol, rtol=rtol):
        index = (got_cpu - expected_cpu).abs().flatten().argmax().item()
        raise Mismatch(
            f"values differ{where}: at flat index {index} expected "
            f"{expected_cpu.flatten()[index].item():.6g}, got {got_cpu.flatten()[index].item():.6g}"
        )


def _compare_samples(got, expected, case: dict) -> None:
    """Same random draws, so the same samples; and say so when only the statistics are right."""
    try:
        compare_tensors(got, expected, case, atol=1e-6, rtol=1e-5)
    except Mismatch as mismatch:
        try:
            _compare_sample_statistics(got, expected, case)
        except Mismatch:
            raise mismatch from None
        raise Mismatch(
            "your samples have the data's mean and spread, but differ from the reference drawn with the "
            "same random numbers: draw z exactly as described, once per step, none on the last"
        ) from None


def _compare_sample_statistics(got, expected, case: dict) -> None:
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        raise Mismatch(f"expected samples of shape {tuple(expected.shape)}, got {shape}")
    got = got.detach().cpu().double()
    mean, std = case["data_mean"], case["data_std"]
    if not torch.isfinite(got).all():
        raise Mismatch("your samples contain NaN or inf")
    if (got.mean(0) - mean).abs().max() > 0.05 or ((got.std(0) - std) / std).abs().max() > 0.1:
        raise Mismatch(
            f"the samples should have mean {mean.tolist()} and std {std.tolist()} (the data's), "
            f"got mean {got.mean(0).numpy().round(3).tolist()} and std {got.std(0).numpy().round(3).tolist()}"
        )


# ----------------------------------------------------------------------------- references


def _schedule_from_alpha_bar(alpha_bar: torch.Tensor) -> NoiseSchedule:
    alpha_bar = alpha_bar.double().cpu()
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    return NoiseSchedule.from_betas(1 - alpha_bar / previous)


def reference_alpha_bar(betas: torch.Tensor) -> torch.Tensor:
    return NoiseSchedule.from_betas(betas).alpha_bar.to(betas.dtype)


def reference_noisy_image(x0, t, alpha_bar, noise):
    return add_noise(x0, t, _schedule_from_alpha_bar(alpha_bar), noise=noise)[0]


def reference_snr(alpha_bar):
    return alpha_bar / (1 - alpha_bar)


def reference_diffusion_loss(model, x0, t, noise, alpha_bar):
    x_t = reference_noisy_image(x0, t, alpha_bar, noise)
    return F.mse_loss(model(x_t, t), noise)


def reference_training_step(model, optimizer, x0, t, noise, alpha_bar):
    loss = reference_diffusion_loss(model, x0, t, noise, alpha_bar)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def reference_reverse_step(x_t, t, eps, alpha_bar, z):
    schedule = _schedule_from_alpha_bar(alpha_bar)
    steps = torch.full((x_t.shape[0],), int(t))
    x_t64, eps64, z64 = x_t.double(), eps.double(), z.double()  # float64 inside: no cancellation at small t
    x0_pred = predict_x0(x_t64, steps, eps64, schedule)
    mean, variance = posterior_mean_variance(x0_pred, x_t64, steps, schedule)
    return (mean + variance.sqrt() * z64 if t > 0 else mean).to(x_t.dtype)


def reference_sample(model, x_T, alpha_bar, generator):
    x = x_T
    for t in reversed(range(len(alpha_bar))):
        eps = model(x, torch.full((x.shape[0],), t))
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype) if t > 0 else torch.zeros_like(x)
        x = reference_reverse_step(x, t, eps, alpha_bar, z)
    return x


# ----------------------------------------------------------------------------- cases


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cases_alpha_bar() -> list[dict]:
    return [
        {"betas": make_schedule("linear", 1000).betas, "label": "linear schedule, T=1000"},
        {"betas": make_schedule("cosine", 50).betas, "label": "cosine schedule, T=50"},
        {"betas": torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64), "label": "betas 0.5, 0.5, 0.5"},
        {"betas": torch.tensor([0.1, 0.2], dtype=torch.float32), "label": "float32 betas"},
    ]


def _cases_noisy_image() -> list[dict]:
    alpha_bar = make_schedule("cosine", 1000).alpha_bar
    generator = _generator(1)
    images = torch.rand(4, 1, 16, 16, generator=generator) * 2 - 1
    points = torch.randn(5, 2, generator=generator, dtype=torch.float64)
    return [
        {
            "x0": images,
            "t": torch.tensor([0, 10, 500, 999]),
            "alpha_bar": alpha_bar,
            "noise": torch.randn(4, 1, 16, 16, generator=generator),
            "label": "4 images, t = 0, 10, 500, 999",
        },
        {
            "x0": points,
            "t": torch.tensor([3, 3, 3, 998, 999]),
            "alpha_bar": alpha_bar,
            "noise": torch.randn(5, 2, generator=generator, dtype=torch.float64),
            "label": "2-D float64 points",
        },
        {
            "x0": images[:1],
            "t": torch.tensor([250]),
            "alpha_bar": alpha_bar,
            "noise": torch.zeros(1, 1, 16, 16),
            "label": "zero noise",
        },
    ]


def _cases_snr() -> list[dict]:
    return [
        {"alpha_bar": make_schedule(name, 1000).alpha_bar, "label": f"{name} schedule"} for name in ("linear", "cosine")
    ] + [{"alpha_bar": torch.tensor([0.5, 0.2]), "label": "alpha_bar 0.5, 0.2 (float32)"}]


def _cases_embedding() -> list[dict]:
    return [
        {"t": torch.tensor([0, 1, 2, 999]), "dim": 32, "label": "t = 0, 1, 2, 999, dim 32"},
        {"t": torch.tensor([7]), "dim": 2, "label": "dim 2"},
        {"t": torch.arange(0, 1000, 100), "dim": 128, "label": "dim 128"},
    ]


def _cases_residual_block() -> list[dict]:
    cases = []
    for index, (c_in, c_out) in enumerate([(16, 16), (16, 32)]):
        with torch.random.fork_rng(devices=[]):  # leave the learner's global random state alone
            torch.manual_seed(index)
            block = ResidualBlock(c_in, c_out, time_dim=24)
        generator = _generator(10 + index)
        cases.append(
            {
                "in_channels": c_in,
                "out_channels": c_out,
                "time_dim": 24,
                "state": block.state_dict(),
                "x": torch.randn(2, c_in, 8, 8, generator=generator),
                "time_emb": torch.randn(2, 24, generator=generator),
                "label": f"{c_in} -> {c_out} channels",
            }
        )
    return cases


class TinyDenoiser(nn.Module):
    """A small stand-in model for the training questions: (x_t, t) -> eps."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, x_t, t):
        time_plane = (t.float() / 1000).view(-1, 1, 1, 1).expand_as(x_t)
        return self.conv(torch.cat([x_t, time_plane], dim=1))


def _tiny_model_state() -> dict:
    return _seeded(TinyDenoiser, 5).state_dict()


def _cases_training() -> list[dict]:
    alpha_bar = make_schedule("cosine", 1000).alpha_bar
    generator = _generator(3)
    return [
        {
            "state": _tiny_model_state(),
            "x0": torch.rand(6, 1, 8, 8, generator=generator) * 2 - 1,
            "t": torch.tensor([0, 1, 100, 500, 900, 999]),
            "noise": torch.randn(6, 1, 8, 8, generator=generator),
            "alpha_bar": alpha_bar,
            "label": "6 images, t from 0 to 999",
        }
    ]


def _cases_reverse_step() -> list[dict]:
    alpha_bar = make_schedule("linear", 1000).alpha_bar
    generator = _generator(4)
    cases = []
    for t in (999, 500, 1, 0):
        cases.append(
            {
                "x_t": torch.randn(3, 1, 4, 4, generator=generator),
                "t": t,
                "eps": torch.randn(3, 1, 4, 4, generator=generator),
                "alpha_bar": alpha_bar,
                "z": torch.randn(3, 1, 4, 4, generator=generator),
                "label": f"t = {t}",
            }
        )
    return cases


def _cases_sample() -> list[dict]:
    return [
        {
            "data_mean": torch.tensor([0.5, -1.0], dtype=torch.float64),
            "data_std": torch.tensor([0.3, 1.5], dtype=torch.float64),
            "alpha_bar": make_schedule("cosine", 100).alpha_bar,
            "x_T": torch.randn(20_000, 2, generator=_generator(6), dtype=torch.float64),
            "label": "Gaussian data, the exact noise predictor, T=100",
        }
    ]


# ----------------------------------------------------------------------------- calls


def _call_training(implementation, case):
    model = TinyDenoiser()
    model.load_state_dict(case["state"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = implementation(model, optimizer, case["x0"], case["t"], case["noise"], case["alpha_bar"])
    return {"loss": torch.tensor(float(loss)), "weight": model.conv.weight.detach().clone()}


def _compare_training(got, expected, case) -> None:
    if not isinstance(got, dict):
        raise Mismatch("could not run your training step")
    compare_tensors(got["loss"], expected["loss"], {"label": "the returned loss"})
    compare_tensors(
        got["weight"],
        expected["weight"],
        {"label": "the weights after one step: did you call zero_grad, backward and step?"},
    )


def _call_residual_block(implementation, case):
    block = implementation(case["in_channels"], case["out_channels"], case["time_dim"])
    block.load_state_dict(case["state"])
    with torch.no_grad():
        return block(case["x"], case["time_emb"])


def _call_sample(implementation, case):
    schedule = _schedule_from_alpha_bar(case["alpha_bar"])
    oracle = GaussianOracle(case["data_mean"], case["data_std"], schedule)

    def model(x_t, t):  # the exact noise predictor, with nothing else to look at
        return oracle(x_t, t)

    with torch.no_grad():
        return implementation(model, case["x_T"], case["alpha_bar"], _generator(7))


QUESTIONS: dict[str, Question] = {}


def _register(question: Question) -> None:
    QUESTIONS[question.id] = question


_register(
    Question(
        "01.q1",
        2,
        "alpha_bar_from_betas",
        reference_alpha_bar,
        _cases_alpha_bar,
        lambda f, c: f(c["betas"]),
        "alpha_bar[t] is the product of (1 - beta) over steps 0..t: torch.cumprod; keep the dtype of betas",
        forbidden={"NoiseSchedule", "make_schedule", "coursekit"},
    )
)
_register(
    Question(
        "01.q2",
        3,
        "noisy_image",
        reference_noisy_image,
        _cases_noisy_image,
        lambda f, c: f(c["x0"], c["t"], c["alpha_bar"], c["noise"]),
        "x_t = sqrt(alpha_bar[t]) * x0 + sqrt(1 - alpha_bar[t]) * noise, with alpha_bar[t] reshaped to "
        "broadcast over each example (view(-1, 1, ...)) and cast to x0's dtype",
        forbidden={"add_noise", "coursekit"},
    )
)
_register(
    Question(
        "01.q3",
        2,
        "signal_to_noise",
        reference_snr,
        _cases_snr,
        lambda f, c: f(c["alpha_bar"]),
        "SNR = alpha_bar / (1 - alpha_bar), element by element",
        forbidden={"coursekit"},
    )
)
_register(
    Question(
        "02.q1",
        2,
        "timestep_embedding",
        lambda t, dim: sinusoidal_embedding(t, dim),
        _cases_embedding,
        lambda f, c: f(c["t"], c["dim"]),
        "frequencies exp(-log(10000) * k / (dim/2)) for k = 0..dim/2-1; sines first, then cosines; float32",
        forbidden={"sinusoidal_embedding", "coursekit"},
    )
)
_register(
    Question(
        "02.q2",
        3,
        "MyResidualBlock",
        ResidualBlock,
        _cases_residual_block,
        _call_residual_block,
        "norm1 -> SiLU -> conv1, add time_proj(SiLU(time_emb)) per channel, norm2 -> SiLU -> dropout -> conv2, "
        "plus skip(x); use exactly these attribute names so the weights load",
        forbidden={"ResidualBlock", "coursekit"},
    )
)
_register(
    Question(
        "03.q1",
        3,
        "diffusion_loss",
        reference_diffusion_loss,
        _cases_training,
        lambda f, c: _call_loss(f, c),
        "noise x0 to x_t with the closed form, then F.mse_loss(model(x_t, t), noise)",
        forbidden={"noise_prediction_loss", "add_noise", "coursekit"},
    )
)
_register(
    Question(
        "03.q2",
        2,
        "training_step",
        reference_training_step,
        _cases_training,
        _call_training,
        "loss = diffusion_loss(...); optimizer.zero_grad(); loss.backward(); optimizer.step(); return loss.item()",
        forbidden={"noise_prediction_loss", "coursekit"},
        compare=_compare_training,
    )
)
_register(
    Question(
        "04.q1",
        3,
        "reverse_step",
        reference_reverse_step,
        _cases_reverse_step,
        lambda f, c: f(c["x_t"], c["t"], c["eps"], c["alpha_bar"], c["z"]),
        "mean = (x_t - beta_t / sqrt(1 - alpha_bar_t) * eps) / sqrt(alpha_t); add sqrt(beta_tilde_t) * z "
        "only when t > 0; get beta_t and alpha_t from alpha_bar[t] / alpha_bar[t-1] (1 before the first step)",
        forbidden={"ddpm_steps", "ddpm_sample", "posterior_mean_variance", "coursekit"},
    )
)
_register(
    Question(
        "04.q2",
        3,
        "sample",
        reference_sample,
        _cases_sample,
        _call_sample,
        "loop t from T-1 down to 0: eps = model(x, t as a (B,) tensor), z = torch.randn(x.shape, "
        "generator=generator, dtype=x.dtype) (zeros on the last step), x = reverse_step(...)",
        forbidden={"ddpm_steps", "ddpm_sample", "ddim_sample", "coursekit"},
        compare=_compare_samples,
    )
)


# ============================================================================= part two (05-08)
# References first, then the cases they are tried on, then the questions.


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


def _seeded(module_class: type[nn.Module], seed: int) -> nn.Module:
    """A module with weights from ``seed``, leaving the learner's global random state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return module_class()


def _cases_ddim_step() -> list[dict]:
    alpha_bar = make_schedule("cosine", 1000).alpha_bar.tolist()
    generator = _generator(8)
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
    generator = _generator(9)
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
    generator = _generator(10)
    cases = []
    for scale in (0.0, 1.0, 3.0, 7.5):
        cases.append(
            {
                "state": _seeded(TinyConditionalDenoiser, 11).state_dict(),
                "x_t": torch.randn(4, 1, 6, 6, generator=generator),
                "t": torch.tensor([999, 500, 10, 0]),
                "labels": torch.tensor([0, 1, 2, 1]),
                "guidance_scale": scale,
                "label": f"guidance scale {scale}",
            }
        )
    return cases


def _cases_autoencoder() -> list[dict]:
    generator = _generator(12)
    cases = []
    for latent_noise in (0.0, 0.1, 0.5):
        cases.append(
            {
                "state": _seeded(TinyAutoencoder, 13).state_dict(),
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
    generator = _generator(15)
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
    generator = _generator(16)
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
        return implementation(_autoencoder(case), case["images"], case["latent_noise"], _generator(case["seed"]))


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


_register(
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
_register(
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
_register(
    Question(
        "06.q1",
        3,
        "drop_labels",
        reference_drop_labels,
        _cases_drop_labels,
        lambda f, c: f(c["labels"], c["probability"], c["null_label"], _generator(c["seed"])),
        "drop = torch.rand(labels.shape, generator=generator) < probability; "
        "torch.where(drop, null_label, labels), keeping the int64 dtype",
        forbidden={"diffusion_loss"},
    )
)
_register(
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
_register(
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
_register(
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
_register(
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
_register(
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
_register(
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


def _call_loss(implementation, case):
    model = TinyDenoiser()
    model.load_state_dict(case["state"])
    with torch.no_grad():
        return implementation(model, case["x0"], case["t"], case["noise"], case["alpha_bar"])


# ----------------------------------------------------------------------------- running checks


def questions_for(notebook_number: str) -> list[Question]:
    """The questions of one exercise notebook, e.g. ``"01"``."""
    return [q for q in QUESTIONS.values() if q.id.startswith(f"{notebook_number}.")]


def get_question(question_id: str) -> Question:
    if question_id not in QUESTIONS:
        raise ValueError(f"unknown question {question_id!r}; the questions are {sorted(QUESTIONS)}")
    return QUESTIONS[question_id]


def expected_outputs(question: Question) -> list:
    """The reference's answers to every case (computed where the grader runs)."""
    return [question.call(question.reference, case) for case in question.cases()]


ALWAYS_FORBIDDEN = {"coursekit", "learner_or_reference"}  # and any name starting with "reference_"


def referenced_names(definition: ast.AST) -> set[str]:
    """Names a definition takes from outside itself: free variables, attributes and imported modules.

    A local variable that happens to share a forbidden name (``snr = ...``) does not count.
    """
    local, names = set(), set()
    for node in ast.walk(definition):
        if isinstance(node, ast.arg):
            local.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            local.add(node.id)
    for node in ast.walk(definition):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in local:
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.update(alias.name for alias in node.names)
            names.add((node.module or "").split(".")[0])
    return names


def forbidden_names_used(question: Question, names: set[str]) -> set[str]:
    """The names among ``names`` that would let the package answer ``question``."""
    forbidden = (question.forbidden | ALWAYS_FORBIDDEN) - {question.name}
    return {name for name in names if name in forbidden or name.startswith("reference_")}


def names_used(implementation) -> set[str] | None:
    """The names an implementation takes from outside itself, from its source; None without source.

    A class defined in a notebook has no retrievable source of its own, but its methods do.
    """
    parts = [implementation]
    if inspect.isclass(implementation):
        parts = [member for member in vars(implementation).values() if inspect.isfunction(member)]
    names: set[str] = set()
    for part in parts:
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(part)))
        except (OSError, TypeError, SyntaxError):
            return None
        definitions = [node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
        if not definitions:
            return None
        names |= referenced_names(definitions[0])
    return names if parts else None


def score(question: Question, outputs: list, uses_reference: set[str] | None = None) -> Result:
    """Compare an implementation's outputs (or the exceptions it raised) with the reference."""
    if uses_reference:
        return Result(
            question.id,
            "uses the reference",
            0,
            question.points,
            f"{question.name} calls coursekit's own {', '.join(sorted(uses_reference))}, which answers "
            "this question for you: write the computation yourself (no points for this one)",
        )
    cases = question.cases()
    expected = expected_outputs(question)
    if not isinstance(outputs, list) or len(outputs) != len(cases):
        return Result(question.id, "failed", 0, question.points, "the answers to check are incomplete")
    for case, got, want in zip(cases, outputs, expected):
        if isinstance(got, BaseException) or (isinstance(got, dict) and "error" in got and len(got) == 2):
            name, text = (
                (type(got).__name__, str(got)) if isinstance(got, BaseException) else (got["error"], got["message"])
            )
            if name == "NotImplementedError":
                return Result(
                    question.id,
                    "not implemented",
                    0,
                    question.points,
                    f"not implemented yet: replace `raise NotImplementedError` in {question.name}",
                )
            return Result(
                question.id,
                "failed",
                0,
                question.points,
                f"{question.name} raised {name}: {text} ({case.get('label', '')}). Hint: {question.hint}",
            )
        try:
            (question.compare or compare_tensors)(got, want, case)
        except Mismatch as mismatch:
            return Result(question.id, "failed", 0, question.points, f"{mismatch}. Hint: {question.hint}")
    return Result(
        question.id,
        "passed",
        question.points,
        question.points,
        f"{question.name} agrees with the reference on all {len(cases)} cases",
    )


def run_implementation(question: Question, implementation) -> list:
    """Run every case; an exception becomes the case's output instead of stopping the run."""
    outputs = []
    for case in question.cases():
        try:
            outputs.append(question.call(implementation, case))
        except Exception as error:  # the learner's code may raise anything
            outputs.append(error)
    return outputs


def run_check(question_id: str, namespace: dict) -> Result:
    """Check the learner's definition of a question's function found in ``namespace``."""
    question = get_question(question_id)
    implementation = namespace.get(question.name)
    if implementation is None:
        return Result(
            question.id,
            "missing",
            0,
            question.points,
            f"define {question.name} first (run the cells above), then check again",
        )
    names = names_used(implementation)
    if names is None:
        return Result(
            question.id,
            "missing",
            0,
            question.points,
            f"{question.name} must be your own def or class in a cell of this notebook",
        )
    used = forbidden_names_used(question, names)
    return score(question, run_implementation(question, implementation), used)


def _caller_namespace() -> dict:
    try:
        from IPython import get_ipython

        shell = get_ipython()
        if shell is not None:
            return shell.user_ns
    except ImportError:
        pass
    return inspect.currentframe().f_back.f_back.f_globals


def check(question_id: str) -> Result:
    """Check a question against the learner's code; prints the result, never raises (unless strict)."""
    try:
        result = run_check(question_id, _caller_namespace())
    except ValueError as error:  # an unknown question id
        result = Result(question_id, "failed", 0, 0, str(error))
    if os.environ.get(STRICT_VARIABLE) == "1" and not result.passed:
        raise AssertionError(repr(result))
    return result


def learner_or_reference(question_id: str):
    """The learner's function if it passes its check, else the reference, saying so visibly.

    Cells after an exercise use this, so that a learner who is stuck can still run the rest of the
    notebook and see it teach.
    """
    question = get_question(question_id)
    namespace = _caller_namespace()
    result = run_check(question_id, namespace)
    if result.passed:
        return namespace[question.name]
    print(
        f"⚠️ {question_id}: using coursekit's reference {question.name} here, because yours "
        f"{'is not finished yet' if result.status in ('not implemented', 'missing') else 'does not pass yet'}. "
        "The rest of the notebook carries on."
    )
    return question.reference
