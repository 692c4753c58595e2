"""Question bank, part one: the exercises of notebooks 01-04 (forward process, U-Net, training, sampling).

Each exercise asks for a variation on what its course notebook shows (the inverse of a formula, a
jump between two noise levels, another block layout, another parameterisation), so that copying the
notebook's worked cell does not answer it. For each question: the reference it is compared with, the
cases it is tried on (edge cases included), how one case is run, two hints and the catalogue of
mistakes learners really make, each with the diagnosis a learner whose output matches it is given.
The learner's code is called exactly as ``call`` says, with fresh inputs for every case.
"""

from __future__ import annotations

from functools import partial

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
from coursekit.embeddings import sinusoidal_embedding
from coursekit.forward import posterior_mean_variance
from coursekit.oracle import GaussianOracle
from coursekit.schedules import NoiseSchedule, make_schedule, per_example
from coursekit.unet import group_norm


def _schedule_from_alpha_bar(alpha_bar: torch.Tensor) -> NoiseSchedule:
    return NoiseSchedule.from_betas(reference_betas(alpha_bar.double().cpu()))


# ============================================================================= 01: the forward process


def reference_betas(alpha_bar: torch.Tensor) -> torch.Tensor:
    previous = torch.cat([torch.ones(1, dtype=alpha_bar.dtype), alpha_bar[:-1]])  # alpha_bar before step 0 is 1
    return 1 - alpha_bar / previous  # alpha_t = alpha_bar_t / alpha_bar_{t-1}, beta_t = 1 - alpha_t


def reference_noise_further(x_s, s, t, alpha_bar, noise):
    ratio = per_example(alpha_bar[t].double() / alpha_bar[s].double(), x_s)  # alpha_bar_t / alpha_bar_s
    return ratio.sqrt() * x_s + (1 - ratio).sqrt() * noise


def reference_snr(alpha_bar):
    return alpha_bar / (1 - alpha_bar)


def _cases_betas() -> list[dict]:
    return [
        {"alpha_bar": make_schedule("linear", 1000).alpha_bar, "label": "linear schedule, T=1000, float64"},
        {"alpha_bar": make_schedule("cosine", 50).alpha_bar, "label": "cosine schedule, T=50"},
        {"alpha_bar": torch.tensor([0.5, 0.25, 0.125]), "label": "alpha_bar 0.5, 0.25, 0.125 (float32)"},
        {"alpha_bar": torch.tensor([0.9], dtype=torch.float64), "label": "a single step, T=1"},
    ]


def _cases_noise_further() -> list[dict]:
    generator = seeded_generator(1)
    linear, cosine = make_schedule("linear", 1000).alpha_bar, make_schedule("cosine", 1000).alpha_bar
    return [
        {
            "x_s": torch.rand(4, 1, 8, 8, generator=generator) * 2 - 1,
            "s": torch.tensor([0, 10, 300, 999]),
            "t": torch.tensor([5, 500, 999, 999]),
            "alpha_bar": linear,
            "noise": torch.randn(4, 1, 8, 8, generator=generator),
            "label": "4 images, s -> t: 0->5, 10->500, 300->999, 999->999",
        },
        {
            "x_s": torch.randn(5, 2, generator=generator, dtype=torch.float64),
            "s": torch.tensor([0, 0, 100, 400, 998]),
            "t": torch.tensor([0, 999, 101, 900, 999]),
            "alpha_bar": cosine,
            "noise": torch.randn(5, 2, generator=generator, dtype=torch.float64),
            "label": "2-D float64 points, s = t = 0 among them",
        },
        {
            "x_s": torch.rand(1, 3, 4, 6, generator=generator) * 2 - 1,
            "s": torch.tensor([200]),
            "t": torch.tensor([800]),
            "alpha_bar": cosine,
            "noise": torch.randn(1, 3, 4, 6, generator=generator),
            "label": "a batch of one 3-channel 4x6 image",
        },
    ]


def _cases_snr() -> list[dict]:
    return [
        {"alpha_bar": make_schedule(name, 1000).alpha_bar, "label": f"{name} schedule"} for name in ("linear", "cosine")
    ] + [{"alpha_bar": torch.tensor([0.5, 0.2]), "label": "alpha_bar 0.5, 0.2 (float32)"}]


def _betas_without_step_0(alpha_bar):
    return 1 - alpha_bar[1:] / alpha_bar[:-1]


def _betas_rolled(alpha_bar):
    return 1 - alpha_bar / torch.roll(alpha_bar, 1)


def _betas_as_differences(alpha_bar):
    previous = torch.cat([torch.ones(1, dtype=alpha_bar.dtype), alpha_bar[:-1]])
    return previous - alpha_bar


def _betas_ratio_upside_down(alpha_bar):
    previous = torch.cat([torch.ones(1, dtype=alpha_bar.dtype), alpha_bar[:-1]])
    return 1 - previous / alpha_bar


def _further_from_x0(x_s, s, t, alpha_bar, noise):
    a = per_example(alpha_bar[t], x_s)
    return a.sqrt() * x_s + (1 - a).sqrt() * noise


def _further_without_square_roots(x_s, s, t, alpha_bar, noise):
    ratio = per_example(alpha_bar[t] / alpha_bar[s], x_s)
    return ratio * x_s + (1 - ratio) * noise


def _further_with_all_the_noise(x_s, s, t, alpha_bar, noise):
    ratio = per_example(alpha_bar[t] / alpha_bar[s], x_s)
    return ratio.sqrt() * x_s + per_example(1 - alpha_bar[t], x_s).sqrt() * noise


def _further_for_images_only(x_s, s, t, alpha_bar, noise):
    ratio = (alpha_bar[t] / alpha_bar[s]).to(x_s.dtype).view(-1, 1, 1, 1)
    return ratio.sqrt() * x_s + (1 - ratio).sqrt() * noise


def _further_in_float64(x_s, s, t, alpha_bar, noise):
    ratio = (alpha_bar[t] / alpha_bar[s]).reshape(-1, *([1] * (x_s.ndim - 1)))
    return ratio.sqrt() * x_s + (1 - ratio).sqrt() * noise


register(
    Question(
        "01.q1",
        2,
        "betas_from_alpha_bar",
        reference_betas,
        _cases_betas,
        lambda f, c: f(c["alpha_bar"]),
        "alpha_bar is a running product of alphas: how do you get one factor back from two neighbouring "
        "products? And what is the product before step 0?",
        "beta[t] = 1 - alpha_bar[t] / alpha_bar[t-1], with alpha_bar[-1] taken as 1 (so beta[0] = 1 - alpha_bar[0]); "
        "same shape and dtype as alpha_bar",
        mistakes=[
            Mistake(
                "beta_0 is missing: before step 0 the product is 1, so beta_0 = 1 - alpha_bar_0", _betas_without_step_0
            ),
            Mistake("torch.roll wraps around: step 0 was divided by the last alpha_bar instead of 1", _betas_rolled),
            Mistake(
                "differences of alpha_bar are not betas: one step multiplies, so use a ratio", _betas_as_differences
            ),
            Mistake("the ratio is upside down: alpha_t is alpha_bar_t over alpha_bar_(t-1)", _betas_ratio_upside_down),
        ],
        forbidden={"NoiseSchedule", "make_schedule"},
    )
)
register(
    Question(
        "01.q2",
        3,
        "noise_further",
        reference_noise_further,
        _cases_noise_further,
        lambda f, c: f(c["x_s"], c["s"], c["t"], c["alpha_bar"], c["noise"]),
        "x_s already carries the noise of step s. Going from s to t multiplies by the alphas of steps s+1..t "
        "only: what is their product, written with alpha_bar?",
        "ratio = alpha_bar[t] / alpha_bar[s], reshaped to (B, 1, ..., 1) and cast to x_s's dtype; "
        "x_t = sqrt(ratio) * x_s + sqrt(1 - ratio) * noise",
        mistakes=[
            Mistake(
                "this jumps from the clean image: x_s is already noised to step s, so scale by "
                "alpha_bar_t / alpha_bar_s, not alpha_bar_t",
                _further_from_x0,
            ),
            Mistake(
                "alpha_bar ratios are variances: x_s and the noise are multiplied by their square roots",
                _further_without_square_roots,
            ),
            Mistake(
                "too much fresh noise: x_s already has some, so the new noise adds only the variance "
                "1 - alpha_bar_t / alpha_bar_s",
                _further_with_all_the_noise,
            ),
            Mistake(
                "view(-1, 1, 1, 1) fits images only: reshape to (B, 1, ..., 1) with as many 1s as x_s has "
                "dimensions after the batch",
                _further_for_images_only,
            ),
            Mistake("alpha_bar is float64: cast the ratio to x_s's dtype, so the result keeps it", _further_in_float64),
        ],
        forbidden={"add_noise"},
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
        "signal variance over noise variance: which part of x_t's variance is the image's, and which the noise's?",
        "SNR = alpha_bar / (1 - alpha_bar), element by element",
        mistakes=[
            Mistake("the noise's variance is 1 - alpha_bar, not 1 + alpha_bar", lambda a: a / (1 + a)),
            Mistake(
                "that is the ratio of standard deviations; the SNR compares variances (no square root)",
                lambda a: (a / (1 - a)).sqrt(),
            ),
            Mistake("upside down: signal over noise, not noise over signal", lambda a: (1 - a) / a),
        ],
    )
)
register(
    Written(
        "01.q4",
        2,
        "In the two rows of noised digits, from which step on can you no longer make out the digit, with each "
        "schedule? Read the SNR at that step off the plot: roughly what value is it, and why does the cosine "
        "schedule keep the digit longer?",
    )
)


# ============================================================================= 02: the U-Net


def reference_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    frequencies = torch.exp(-torch.log(torch.tensor(10_000.0)) * torch.arange(half, dtype=torch.float32) / half)
    angles = t.float()[..., None] * frequencies  # (..., half): any shape of t
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class ScaleShiftBlock(nn.Module):
    """A residual block whose timestep sets a scale and a shift per channel (the layout of improved DDPM)."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, 2 * out_channels)  # a scale and a shift per channel
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x, time_emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.time_proj(F.silu(time_emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return h + self.skip(x)


def _cases_embedding() -> list[dict]:
    return [
        {"t": torch.tensor([0, 1, 2, 999]), "dim": 32, "label": "t = 0, 1, 2, 999 (int64), dim 32"},
        {"t": torch.tensor([[0, 5, 9], [100, 500, 999]]), "dim": 8, "label": "t of shape (2, 3), dim 8"},
        {"t": torch.tensor([0.5, 10.25, 999.9], dtype=torch.float64), "dim": 16, "label": "float64 times, dim 16"},
        {"t": torch.tensor([7]), "dim": 2, "label": "a batch of one, dim 2"},
    ]


def _cases_block() -> list[dict]:
    cases = []
    shapes = [(16, 16, 2, (8, 8), 24), (16, 32, 2, (6, 10), 24), (8, 16, 1, (4, 4), 12)]
    for index, (c_in, c_out, batch, (height, width), time_dim) in enumerate(shapes):
        with torch.random.fork_rng(devices=[]):  # leave the learner's global random state alone
            torch.manual_seed(index)
            block = ScaleShiftBlock(c_in, c_out, time_dim)
            for parameter in block.parameters():  # away from PyTorch's initial values, so every part matters
                parameter.data += 0.1 * torch.randn(parameter.shape)
        generator = seeded_generator(10 + index)
        cases.append(
            {
                "in_channels": c_in,
                "out_channels": c_out,
                "time_dim": time_dim,
                "state": block.state_dict(),
                "x": torch.randn(batch, c_in, height, width, generator=generator),
                "time_emb": torch.randn(batch, time_dim, generator=generator),
                "label": f"{c_in} -> {c_out} channels, batch {batch}, {height}x{width}",
            }
        )
    return cases


def _call_block(implementation, case):
    block = implementation(case["in_channels"], case["out_channels"], case["time_dim"])
    try:
        block.load_state_dict(case["state"])
    except RuntimeError as error:  # the message names the learner's class: keep only what does not fit
        problems = str(error).split(":", 1)[-1].strip()
        raise RuntimeError(f"the block's weights do not fit yours: {problems}") from None
    block.eval()
    with torch.no_grad():
        return block(case["x"], case["time_emb"])


def _embedding_for_first_axis_only(t, dim):
    half = dim // 2
    frequencies = torch.exp(-torch.log(torch.tensor(10_000.0)) * torch.arange(half, dtype=torch.float32) / half)
    angles = t.float()[:, None] * frequencies[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def _embedding_over_dim(t, dim):
    half = dim // 2
    frequencies = torch.exp(-torch.log(torch.tensor(10_000.0)) * torch.arange(half, dtype=torch.float32) / dim)
    angles = t.float()[..., None] * frequencies
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


def _embedding_cosines_first(t, dim):
    return reference_embedding(t, dim).roll(dim // 2, dims=-1)


def _embedding_interleaved(t, dim):
    sines_then_cosines = reference_embedding(t, dim)
    half = dim // 2
    return torch.stack([sines_then_cosines[..., :half], sines_then_cosines[..., half:]], dim=-1).flatten(-2)


def _embedding_keeping_the_dtype(t, dim):
    half = dim // 2
    frequencies = torch.exp(-torch.log(torch.tensor(10_000.0)) * torch.arange(half, dtype=torch.float32) / half)
    angles = t[..., None] * frequencies.to(t.dtype if t.is_floating_point() else torch.float32)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class _BlockWithoutOne(ScaleShiftBlock):
    def forward(self, x, time_emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.time_proj(F.silu(time_emb))[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(self.dropout(F.silu(self.norm2(h) * scale + shift)))
        return h + self.skip(x)


class _BlockShiftFirst(ScaleShiftBlock):
    def forward(self, x, time_emb):
        h = self.conv1(F.silu(self.norm1(x)))
        shift, scale = self.time_proj(F.silu(time_emb))[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(self.dropout(F.silu(self.norm2(h) * (1 + scale) + shift)))
        return h + self.skip(x)


class _BlockScaledAfterSiLU(ScaleShiftBlock):
    def forward(self, x, time_emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.time_proj(F.silu(time_emb))[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(self.dropout(F.silu(self.norm2(h)) * (1 + scale) + shift))
        return h + self.skip(x)


class _BlockWithoutSkip(ScaleShiftBlock):
    def forward(self, x, time_emb):
        return super().forward(x, time_emb) - self.skip(x)


class _AdditiveBlock(nn.Module):
    """Notebook 02's layout: the time embedding added, one number per channel."""

    def __init__(self, in_channels, out_channels, time_dim):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x, time_emb):
        h = self.conv1(F.silu(self.norm1(x))) + self.time_proj(F.silu(time_emb))[:, :, None, None]
        return self.conv2(self.dropout(F.silu(self.norm2(h)))) + self.skip(x)


register(
    Question(
        "02.q1",
        2,
        "timestep_embedding",
        reference_embedding,
        _cases_embedding,
        lambda f, c: f(c["t"], c["dim"]),
        "t may have any shape and may hold fractions: put the frequency axis last, and compute in float32",
        "frequencies w_k = exp(-ln(10000) * k / (dim/2)) for k = 0..dim/2-1; angles = t.float()[..., None] * w; "
        "torch.cat([sin(angles), cos(angles)], dim=-1)",
        mistakes=[
            Mistake(
                "t can have any shape: add the frequency axis at the end (t[..., None]), not after the first dimension",
                _embedding_for_first_axis_only,
            ),
            Mistake("the exponent divides k by dim/2 (the number of frequencies), not by dim", _embedding_over_dim),
            Mistake("sines come first, then cosines", _embedding_cosines_first),
            Mistake("the halves are not interleaved: all the sines, then all the cosines", _embedding_interleaved),
            Mistake("the embedding is float32 whatever t's dtype: use t.float()", _embedding_keeping_the_dtype),
        ],
        forbidden={"sinusoidal_embedding", "TimeEmbedding"},
    )
)
register(
    Question(
        "02.q2",
        3,
        "ScaleShiftBlock",
        ScaleShiftBlock,
        _cases_block,
        _call_block,
        "the timestep now sets two numbers per channel; where does each act, relative to norm2 and the SiLU?",
        "time_proj = Linear(time_dim, 2 * out_channels); scale, shift = time_proj(SiLU(time_emb)).chunk(2) per "
        "channel; h = conv1(SiLU(norm1(x))); h = norm2(h) * (1 + scale) + shift; "
        "h = conv2(dropout(SiLU(h))); return h + skip(x)",
        mistakes=[
            Mistake(
                "multiply by (1 + scale), so that a time_proj output of zero leaves the features as they are",
                _BlockWithoutOne,
            ),
            Mistake("the first half of time_proj's output is the scale, the second half the shift", _BlockShiftFirst),
            Mistake("scale and shift act right after norm2, before the SiLU", _BlockScaledAfterSiLU),
            Mistake("the skip path is missing: return h + skip(x)", _BlockWithoutSkip),
            Mistake(
                "this is notebook 02's layout: here time_proj gives 2 * out_channels numbers, a scale and a "
                "shift per channel",
                _AdditiveBlock,
            ),
        ],
        forbidden={"ResidualBlock", "UNet"},
    )
)
register(
    Written(
        "02.q3",
        2,
        "Why does the U-Net need to be told the timestep at all? What would go wrong if it had to judge the "
        "noise level from the image alone?",
    )
)


# ============================================================================= 03: training


def reference_v_loss(model, x0, t, noise, alpha_bar):
    a = per_example(alpha_bar[t], x0)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    v = a.sqrt() * noise - (1 - a).sqrt() * x0  # the velocity target (Salimans & Ho 2022)
    return F.mse_loss(model(x_t, t), v)


def reference_accumulated_step(model, optimizer, x0, t, noise, alpha_bar, micro_batches):
    optimizer.zero_grad()
    total = 0.0
    for x0_part, t_part, noise_part in zip(*(tensor.chunk(micro_batches) for tensor in (x0, t, noise))):
        loss = reference_v_loss(model, x0_part, t_part, noise_part, alpha_bar) / micro_batches
        loss.backward()  # gradients add up across the micro-batches
        total += loss.item()
    optimizer.step()
    return total


class TinyDenoiser(nn.Module):
    """A small stand-in model for the training questions: (x_t, t) -> a guess of the same shape."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, x_t, t):
        time_plane = (t.to(x_t.dtype) / 1000).view(-1, 1, 1, 1).expand_as(x_t)
        return self.conv(torch.cat([x_t, time_plane], dim=1))


def _cases_training() -> list[dict]:
    alpha_bar = make_schedule("cosine", 1000).alpha_bar
    generator = seeded_generator(3)
    cases = []
    settings = [
        (6, torch.tensor([0, 1, 100, 500, 900, 999]), torch.float32, "SGD", 1, False),
        (6, torch.tensor([3, 30, 300, 600, 800, 950]), torch.float32, "SGD with momentum", 2, True),
        (6, torch.tensor([999, 998, 500, 2, 1, 0]), torch.float64, "Adam", 3, True),
        (1, torch.tensor([999]), torch.float32, "Adam", 1, True),
    ]
    for batch, t, dtype, optimizer, micro_batches, leftover in settings:
        cases.append(
            {
                "state": seeded(TinyDenoiser, 5).state_dict(),
                "x0": (torch.rand(batch, 1, 8, 8, generator=generator) * 2 - 1).to(dtype),
                "t": t,
                "noise": torch.randn(batch, 1, 8, 8, generator=generator).to(dtype),
                "alpha_bar": alpha_bar,
                "optimizer": optimizer,
                "micro_batches": micro_batches,
                "leftover": leftover,
                "label": (
                    f"batch of {batch}, {dtype}, {optimizer}, {micro_batches} micro-batch(es)"
                    + (", gradients left over from before" if leftover else "")
                ),
            }
        )
    return cases


def _model_for(case) -> TinyDenoiser:
    model = TinyDenoiser().to(case["x0"].dtype)
    model.load_state_dict(case["state"])
    return model


def _call_loss(implementation, case):
    with torch.no_grad():
        return implementation(_model_for(case), case["x0"], case["t"], case["noise"], case["alpha_bar"])


def _call_training(implementation, case):
    model = _model_for(case)
    if case["optimizer"] == "SGD":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    elif case["optimizer"] == "SGD with momentum":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    if case["leftover"]:  # a backward pass nobody cleared up after
        model(case["x0"], case["t"]).pow(2).mean().backward()
    loss = implementation(
        model, optimizer, case["x0"], case["t"], case["noise"], case["alpha_bar"], case["micro_batches"]
    )
    return {
        "loss_type": type(loss).__name__,
        "loss": torch.tensor(float(loss)) if isinstance(loss, (int, float, torch.Tensor)) else torch.tensor(0.0),
        "weight": model.conv.weight.detach().clone(),
        "bias": model.conv.bias.detach().clone(),
    }


def _compare_training(got, expected, case) -> None:
    if not isinstance(got, dict) or set(got) != set(expected):
        raise Mismatch("could not run your training step")
    if got["loss_type"] != expected["loss_type"]:
        raise Mismatch(f"return the loss as a Python {expected['loss_type']} (loss.item()), not a {got['loss_type']}")
    compare_tensors(got["loss"], expected["loss"], {"part": "the returned loss"})
    for name in ("weight", "bias"):
        compare_tensors(got[name], expected[name], {"part": f"the model's {name} after your step"})


def _loss_on_noise(model, x0, t, noise, alpha_bar):
    a = per_example(alpha_bar[t], x0)
    return F.mse_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t), noise)


def _loss_with_v_reversed(model, x0, t, noise, alpha_bar):
    a = per_example(alpha_bar[t], x0)
    return F.mse_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t), a.sqrt() * x0 - (1 - a).sqrt() * noise)


def _loss_with_v_coefficients_swapped(model, x0, t, noise, alpha_bar):
    a = per_example(alpha_bar[t], x0)
    return F.mse_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t), (1 - a).sqrt() * noise - a.sqrt() * x0)


def _loss_in_float64(model, x0, t, noise, alpha_bar):
    a = alpha_bar[t].reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    return F.mse_loss(model(x_t, t), a.sqrt() * noise - (1 - a).sqrt() * x0)


def _loss_summed(model, x0, t, noise, alpha_bar):
    a = per_example(alpha_bar[t], x0)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    return F.mse_loss(model(x_t, t), a.sqrt() * noise - (1 - a).sqrt() * x0, reduction="sum")


def _accumulated_step_with(clear_first=True, clear_inside=False, divide=True, step_inside=False, as_float=True):
    """``reference_accumulated_step`` with one thing done the way learners often get it wrong."""

    def accumulated_step(model, optimizer, x0, t, noise, alpha_bar, micro_batches):
        if clear_first:
            optimizer.zero_grad()
        total = 0.0
        for x0_part, t_part, noise_part in zip(*(tensor.chunk(micro_batches) for tensor in (x0, t, noise))):
            if clear_inside:
                optimizer.zero_grad()
            loss = reference_v_loss(model, x0_part, t_part, noise_part, alpha_bar)
            (loss / micro_batches if divide else loss).backward()
            if step_inside:
                optimizer.step()
            total = total + (loss.item() if as_float else loss.detach()) / micro_batches
        if not step_inside:
            optimizer.step()
        return total

    return accumulated_step


register(
    Question(
        "03.q1",
        3,
        "v_prediction_loss",
        reference_v_loss,
        _cases_training,
        _call_loss,
        "the noising is the one you know; what changes is the target the model's output is compared with",
        "a = alpha_bar[t] cast to x0's dtype and reshaped to (B, 1, 1, 1); x_t = sqrt(a) x0 + sqrt(1 - a) noise; "
        "v = sqrt(a) noise - sqrt(1 - a) x0; F.mse_loss(model(x_t, t), v)",
        mistakes=[
            Mistake(
                "your target is the noise itself (notebook 03's loss); this model predicts v, which mixes the "
                "noise and x0",
                _loss_on_noise,
            ),
            Mistake("your v has the opposite sign: the noise term is the positive one", _loss_with_v_reversed),
            Mistake(
                "the coefficients in v are swapped: the noise is weighted by sqrt(alpha_bar), x0 by "
                "sqrt(1 - alpha_bar)",
                _loss_with_v_coefficients_swapped,
            ),
            Mistake(
                "alpha_bar is float64 and x0 float32: cast alpha_bar[t] to x0's dtype before mixing", _loss_in_float64
            ),
            Mistake("the loss is the mean over every number (F.mse_loss's default), not the sum", _loss_summed),
        ],
        forbidden={"noise_prediction_loss", "add_noise", "diffusion_loss"},
    )
)
register(
    Question(
        "03.q2",
        3,
        "accumulated_step",
        reference_accumulated_step,
        _cases_training,
        _call_training,
        "the gradients of several backward passes add up: what has to happen before the first one, what to "
        "each micro-batch's loss, and how many optimizer steps are there?",
        "optimizer.zero_grad() once first; for each of the micro_batches chunks (tensor.chunk): "
        "loss = v_prediction_loss(...) / micro_batches; loss.backward(); then optimizer.step() once; "
        "return the sum of the scaled losses as a Python float",
        mistakes=[
            Mistake(
                "gradients left over from before were added to yours: clear them first (optimizer.zero_grad())",
                _accumulated_step_with(clear_first=False),
            ),
            Mistake(
                "the gradients were cleared inside the loop, so only the last micro-batch counted",
                _accumulated_step_with(clear_inside=True),
            ),
            Mistake(
                "divide each micro-batch's loss by micro_batches, so that the summed gradients are the whole "
                "batch's mean",
                _accumulated_step_with(divide=False),
            ),
            Mistake(
                "one optimizer step per call, after all the micro-batches", _accumulated_step_with(step_inside=True)
            ),
            Mistake(
                "return the loss as a Python float (loss.item()), not a tensor", _accumulated_step_with(as_float=False)
            ),
        ],
        forbidden={"noise_prediction_loss", "train", "training_step"},
        compare=_compare_training,
    )
)
register(
    Written(
        "03.q3",
        2,
        "When would you reach for gradient accumulation, and why must each micro-batch's loss be divided by "
        "the number of micro-batches?",
    )
)


# ============================================================================= 04: the reverse process


def reference_reverse_step_from_x0(x_t, t, x0_pred, alpha_bar, z):
    schedule = _schedule_from_alpha_bar(alpha_bar)
    steps = torch.full((x_t.shape[0],), int(t))
    x_t64, x0_64, z64 = x_t.double(), x0_pred.double(), z.double()  # float64 inside: no cancellation at small t
    mean, variance = posterior_mean_variance(x0_64, x_t64, steps, schedule)
    return (mean + variance.sqrt() * z64 if t > 0 else mean).to(x_t.dtype)


def reference_sample(model, x_T, alpha_bar, generator):
    x = x_T
    for t in reversed(range(len(alpha_bar))):
        x0_pred = model(x, torch.full((x.shape[0],), t))
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype) if t > 0 else torch.zeros_like(x)
        x = reference_reverse_step_from_x0(x, t, x0_pred, alpha_bar, z)
    return x


def _step_numbers(t, alpha_bar, previous_at_zero):
    alpha_bar_t = alpha_bar[t].item()
    alpha_bar_prev = alpha_bar[t - 1].item() if (t > 0 or not previous_at_zero) else 1.0
    alpha_t = alpha_bar_t / alpha_bar_prev
    return alpha_bar_t, alpha_bar_prev, alpha_t, 1 - alpha_t


def _posterior_step(x_t, t, x0_pred, alpha_bar, z, previous_at_zero=True, noise_scale="beta_tilde", swap=False):
    alpha_bar_t, alpha_bar_prev, alpha_t, beta_t = _step_numbers(t, alpha_bar, previous_at_zero)
    x0_coef = alpha_bar_prev**0.5 * beta_t / (1 - alpha_bar_t)
    x_t_coef = alpha_t**0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
    if swap:
        x0_coef, x_t_coef = x_t_coef, x0_coef
    mean = x0_coef * x0_pred + x_t_coef * x_t
    beta_tilde = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t
    sigma = {"beta_tilde": beta_tilde**0.5, "beta": beta_t**0.5, "variance": beta_tilde}[noise_scale]
    return mean + sigma * z if (t > 0 or not previous_at_zero) else mean


def _step_treating_x0_as_noise(x_t, t, x0_pred, alpha_bar, z):
    alpha_bar_t, alpha_bar_prev, alpha_t, beta_t = _step_numbers(t, alpha_bar, True)
    mean = (x_t - beta_t / (1 - alpha_bar_t) ** 0.5 * x0_pred) / alpha_t**0.5
    sigma = ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t) ** 0.5
    return mean + sigma * z if t > 0 else mean


def _cases_reverse_step() -> list[dict]:
    alpha_bar = make_schedule("linear", 1000).alpha_bar
    generator = seeded_generator(4)
    cases = []
    for t, shape, dtype in ((999, (3, 1, 4, 4), torch.float32), (500, (3, 1, 4, 4), torch.float32),
                            (1, (3, 1, 4, 4), torch.float32), (0, (3, 1, 4, 4), torch.float32),
                            (10, (1, 2), torch.float64)):  # fmt: skip
        cases.append(
            {
                "x_t": torch.randn(shape, generator=generator, dtype=dtype),
                "t": t,
                "x0_pred": torch.randn(shape, generator=generator, dtype=dtype).clamp(-1, 1),
                "alpha_bar": alpha_bar,
                "z": torch.randn(shape, generator=generator, dtype=dtype),
                "label": f"t = {t}" + (", one float64 point" if dtype == torch.float64 else ""),
            }
        )
    return cases


class _CleanImageGuesser:
    """The exact x0 predictor for Gaussian data, called like a model: (x_t, t as a (B,) tensor) -> x0."""

    def __init__(self, case):
        schedule = _schedule_from_alpha_bar(case["alpha_bar"])
        self.oracle = GaussianOracle(case["data_mean"], case["data_std"], schedule)
        self.alpha_bar = schedule.alpha_bar

    def __call__(self, x_t, t):
        if not isinstance(t, torch.Tensor) or t.shape != (x_t.shape[0],):
            raise TypeError(f"the model expects t as a tensor of shape (B,) = ({x_t.shape[0]},), got {t!r}"[:120])
        a = per_example(self.alpha_bar[t], x_t)
        return (x_t - (1 - a).sqrt() * self.oracle(x_t, t)) / a.sqrt()


def _cases_sample() -> list[dict]:
    return [
        {
            "data_mean": torch.tensor([0.5, -1.0], dtype=torch.float64),
            "data_std": torch.tensor([0.3, 1.5], dtype=torch.float64),
            "alpha_bar": make_schedule("cosine", 100).alpha_bar,
            "x_T": torch.randn(20_000, 2, generator=seeded_generator(6), dtype=torch.float64),
            "label": "Gaussian 2-D data, T=100",
        },
        {
            "data_mean": torch.tensor(0.2, dtype=torch.float64),
            "data_std": torch.tensor(0.5, dtype=torch.float64),
            "alpha_bar": make_schedule("linear", 10).alpha_bar,
            "x_T": torch.randn(3, 1, 4, 4, generator=seeded_generator(7)),
            "label": "3 float32 images, T=10",
        },
        {
            "data_mean": torch.tensor(-0.3, dtype=torch.float64),
            "data_std": torch.tensor(0.8, dtype=torch.float64),
            "alpha_bar": make_schedule("cosine", 5).alpha_bar,
            "x_T": torch.randn(1, 3, generator=seeded_generator(8), dtype=torch.float64),
            "label": "a batch of one, T=5",
        },
    ]


def _call_sample(implementation, case):
    with torch.no_grad():
        return implementation(_CleanImageGuesser(case), case["x_T"], case["alpha_bar"], seeded_generator(9))


def _compare_samples(got, expected, case: dict) -> None:
    """Same random draws, so the same samples; and say so when only the statistics are right."""
    tolerance = 1e-9 if expected.dtype == torch.float64 else 1e-5
    try:
        compare_tensors(got, expected, case, atol=tolerance, rtol=tolerance * 10)
    except Mismatch as mismatch:
        if len(expected) < 1000:  # too few samples to judge their statistics
            raise
        try:
            _compare_sample_statistics(got, expected, case)
        except Mismatch:
            raise mismatch from None
        raise Mismatch(
            "your samples have the data's mean and spread, but differ from the reference's, drawn with the "
            "same random numbers"
        ) from None


def _compare_sample_statistics(got, expected, case: dict) -> None:
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        raise Mismatch("samples of the wrong shape")
    got = got.detach().cpu().double()
    mean, std = case["data_mean"], case["data_std"]
    if not torch.isfinite(got).all():
        raise Mismatch("your samples contain NaN or inf")
    if (got.mean(0) - mean).abs().max() > 0.05 or ((got.std(0) - std) / std).abs().max() > 0.1:
        raise Mismatch("the samples do not have the data's mean and spread")


def _sample_with(step, last_t: int = 0, first_t_offset: int = 1, generator_too: bool = True, int_t: bool = False):
    def sample(model, x_T, alpha_bar, generator):
        x = x_T
        for t in range(len(alpha_bar) - first_t_offset, last_t - 1, -1):
            x0_pred = model(x, t if int_t else torch.full((x.shape[0],), t))
            if t > 0:
                z = torch.randn(x.shape, generator=generator if generator_too else None, dtype=x.dtype)
            else:
                z = torch.zeros_like(x)
            x = step(x, t, x0_pred, alpha_bar, z)
        return x

    return sample


register(
    Question(
        "04.q1",
        3,
        "reverse_step_from_x0",
        reference_reverse_step_from_x0,
        _cases_reverse_step,
        lambda f, c: f(c["x_t"], c["t"], c["x0_pred"], c["alpha_bar"], c["z"]),
        "the mean mixes the model's clean-image guess and x_t; the noise scale is the posterior's, and there "
        "is no step before t = 0",
        "alpha_bar_prev = alpha_bar[t-1] (1 when t == 0); alpha_t = alpha_bar[t] / alpha_bar_prev; beta_t = 1 - "
        "alpha_t; mean = sqrt(alpha_bar_prev) beta_t / (1 - alpha_bar_t) * x0_pred + sqrt(alpha_t) (1 - "
        "alpha_bar_prev) / (1 - alpha_bar_t) * x_t; return mean + sqrt(beta_tilde_t) * z, just mean at t = 0",
        mistakes=[
            Mistake(
                "at t = 0 there is no step before: alpha_bar[t - 1] is alpha_bar[-1], the last entry; use 1",
                partial(_posterior_step, previous_at_zero=False),
            ),
            Mistake(
                "your noise scale is sqrt(beta_t); this step uses the posterior's, sqrt(beta_tilde_t)",
                partial(_posterior_step, noise_scale="beta"),
            ),
            Mistake(
                "z is multiplied by a standard deviation, sqrt(beta_tilde_t), not by the variance beta_tilde_t",
                partial(_posterior_step, noise_scale="variance"),
            ),
            Mistake("the coefficients of x0_pred and x_t are swapped", partial(_posterior_step, swap=True)),
            Mistake(
                "that is the step for a noise prediction (notebook 04's); this model guesses the clean image",
                _step_treating_x0_as_noise,
            ),
        ],
        forbidden={"ddpm_steps", "ddpm_sample", "posterior_mean_variance", "predict_x0"},
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
        "every step from T-1 down to 0, one draw of z per step from the generator, and none on the last",
        "for t from T-1 down to 0: x0_pred = model(x, t as a (B,) tensor); z = torch.randn(x.shape, "
        "generator=generator, dtype=x.dtype) if t > 0 else zeros; x = reverse_step_from_x0(x, t, x0_pred, "
        "alpha_bar, z)",
        mistakes=[
            Mistake(
                "your loop stops before t = 0: the last step, from t = 0 to the clean image, is missing",
                _sample_with(reference_reverse_step_from_x0, last_t=1),
            ),
            Mistake(
                "the steps run from T-1 down: alpha_bar has no entry T",
                _sample_with(reference_reverse_step_from_x0, first_t_offset=0),
            ),
            Mistake(
                "the model expects t as a tensor of shape (B,): torch.full((B,), t)",
                _sample_with(reference_reverse_step_from_x0, int_t=True),
            ),
            Mistake("the model guesses the clean image here, not the noise", _sample_with(_step_treating_x0_as_noise)),
            Mistake(
                "draw z with the generator you are given, so that the samples can be reproduced",
                _sample_with(reference_reverse_step_from_x0, generator_too=False),
                caught_by="drawn with the same random numbers",
            ),
        ],
        forbidden={"ddpm_steps", "ddpm_sample", "ddim_sample", "posterior_mean_variance"},
        compare=_compare_samples,
    )
)
register(
    Written(
        "04.q3",
        2,
        "Each step but the last adds fresh noise z. Why does that keep the samples varied, and what happens "
        "to them if you set z to zero at every step?",
    )
)


def _check_embedding_reference() -> None:
    """Keep the exercise's embedding equal to the package's for (B,) timesteps (tests call this)."""
    t = torch.arange(0, 1000, 37)
    if not torch.allclose(reference_embedding(t, 64), sinusoidal_embedding(t, 64), atol=1e-6):
        raise AssertionError("the exercise's timestep embedding drifted from coursekit.embeddings")
