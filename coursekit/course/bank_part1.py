"""Question bank, part one: the exercises of notebooks 01-04 (forward process, U-Net, training, sampling).

For each question: the reference it is compared with, the cases it is tried on, and how one case is
run. The learner's code is called exactly as ``call`` says, with fresh inputs for every case.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from coursekit.course.engine import Mismatch, Question, compare_tensors, register, seeded, seeded_generator
from coursekit.embeddings import sinusoidal_embedding
from coursekit.forward import add_noise, posterior_mean_variance, predict_x0
from coursekit.oracle import GaussianOracle
from coursekit.schedules import NoiseSchedule, make_schedule
from coursekit.unet import ResidualBlock


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


def _cases_alpha_bar() -> list[dict]:
    return [
        {"betas": make_schedule("linear", 1000).betas, "label": "linear schedule, T=1000"},
        {"betas": make_schedule("cosine", 50).betas, "label": "cosine schedule, T=50"},
        {"betas": torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64), "label": "betas 0.5, 0.5, 0.5"},
        {"betas": torch.tensor([0.1, 0.2], dtype=torch.float32), "label": "float32 betas"},
    ]


def _cases_noisy_image() -> list[dict]:
    alpha_bar = make_schedule("cosine", 1000).alpha_bar
    generator = seeded_generator(1)
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
        generator = seeded_generator(10 + index)
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
    return seeded(TinyDenoiser, 5).state_dict()


def _cases_training() -> list[dict]:
    alpha_bar = make_schedule("cosine", 1000).alpha_bar
    generator = seeded_generator(3)
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
    generator = seeded_generator(4)
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
            "x_T": torch.randn(20_000, 2, generator=seeded_generator(6), dtype=torch.float64),
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
        return implementation(model, case["x_T"], case["alpha_bar"], seeded_generator(7))


QUESTIONS: dict[str, Question] = {}

register(
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
register(
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
register(
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
register(
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
register(
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
register(
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
register(
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
register(
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
register(
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


def _call_loss(implementation, case):
    model = TinyDenoiser()
    model.load_state_dict(case["state"])
    with torch.no_grad():
        return implementation(model, case["x0"], case["t"], case["noise"], case["alpha_bar"])
