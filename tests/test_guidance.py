"""Guidance by gradients (classifier guidance, proven on Gaussian data) and self-guidance's properties."""

import math

import pytest
import torch

from coursekit.guidance import (
    NoisyClassifier,
    classifier_energy,
    energy_gradient,
    gradient_guidance,
    noisy_classifier_loss,
)
from coursekit.oracle import GaussianOracle
from coursekit.samplers import ddim_sample
from coursekit.schedules import make_schedule
from coursekit.self_guidance import (
    Move,
    Resize,
    centroid,
    edit_energy,
    ink_centroid_and_area,
    self_guided_generate,
    shape,
    size,
    word_index,
)


@pytest.mark.parametrize("std", [1.0, 0.5, 2.0])
def test_a_linear_property_shifts_gaussian_samples_by_the_closed_form(std):
    """Data N(m, s^2 I), the exact noise predictor, and log p(y | x) = g . x (a gradient g everywhere).

    DDIM is Euler's method for d x_bar / d sigma = eps(x) in x_bar = x / sqrt(alpha_bar), sigma =
    sqrt((1 - alpha_bar) / alpha_bar). With the oracle, eps = sigma (x_bar - m) / (s^2 + sigma^2), and the
    guided sampler adds -w sigma / sqrt(1 + sigma^2) g. The shift delta between the guided and the
    unguided sample from the same noise then obeys a linear ODE, solved by hand from delta(sigma_T) = 0:

        delta(0) = s w g ln( (sqrt(1 + sigma_T^2) + sqrt(s^2 + sigma_T^2)) / (1 + s) ),

    the same for every sample (everything is linear).
    """
    schedule = make_schedule("linear", 1000)
    oracle = GaussianOracle(torch.tensor([0.3, -0.2, 0.0, 1.0]), std, schedule)
    g = torch.tensor([1.0, -0.5, 0.0, 2.0], dtype=torch.float64)
    weight = 0.7
    x_T = torch.randn(32, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plain = ddim_sample(oracle, schedule, x_T, num_steps=1000, clip_x0=False)
    energy = lambda x, t: -(x * g).sum(dim=1)  # noqa: E731  E = -log p(y | x) = -g . x
    guided = ddim_sample(gradient_guidance(oracle, schedule, energy, weight), schedule, x_T, num_steps=1000,
                         clip_x0=False)  # fmt: skip
    alpha_bar_T = schedule.alpha_bar[-1].item()
    sigma_T = math.sqrt((1 - alpha_bar_T) / alpha_bar_T)
    factor = std * math.log((math.sqrt(1 + sigma_T**2) + math.sqrt(std**2 + sigma_T**2)) / (1 + std))
    expected = weight * factor * g
    shift = guided - plain
    assert torch.allclose(shift, expected.expand_as(shift), rtol=0.01, atol=1e-3), (shift.mean(0), expected)
    assert shift.std(dim=0).max() < 1e-9  # the same shift for every sample


def test_guidance_of_weight_zero_is_the_model_and_the_gradient_is_per_image():
    schedule = make_schedule("linear", 100)
    oracle = GaussianOracle(0.0, 1.0, schedule)
    energy = lambda x, t: (x**2).sum(dim=1)  # noqa: E731
    x = torch.randn(3, 2, dtype=torch.float64)
    t = torch.tensor([5, 50, 99])
    assert torch.equal(gradient_guidance(oracle, schedule, energy, 0.0)(x, t), oracle(x, t))
    assert torch.allclose(energy_gradient(energy, x, t), 2 * x)  # d/dx of |x|^2, image by image


def test_the_classifier_energy_is_minus_the_log_probability_of_the_asked_class():
    class Fixed(torch.nn.Module):
        def forward(self, x_t, t):
            return torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])

    energies = classifier_energy(Fixed(), torch.tensor([0, 2]))(torch.zeros(2, 1, 4, 4), torch.tensor([0, 0]))
    expected_first = -(2.0 - math.log(math.exp(2) + 1 + math.exp(-1)))
    assert energies[0].item() == pytest.approx(expected_first) and energies[1].item() == pytest.approx(math.log(3))


def test_a_noisy_classifier_learns_from_noised_digits():
    from coursekit.data import load_dataset
    from coursekit.training import TrainConfig, train

    torch.manual_seed(0)
    digits = load_dataset("digits")
    schedule = make_schedule("cosine", 1000)
    config = TrainConfig(max_steps=150, batch_size=64, learning_rate=3e-3, warmup_steps=10, ema_decay=0.0,
                         precision="fp32", device="cpu", progress=False)  # fmt: skip
    state = train(NoisyClassifier(), digits, noisy_classifier_loss(schedule), config)
    classifier = state.ema_model.eval()
    with torch.no_grad():
        little_noise = classifier(digits.images[:300], torch.full((300,), 10)).argmax(dim=1)
    assert (little_noise == digits.labels[:300]).float().mean() > 0.6
    assert state.loss_history[-1][1] < state.loss_history[0][1]


# ----------------------------------------------------------------------------- self-guidance's properties


def _disc(size_px: int, centre: tuple[float, float], radius: float) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(size_px) + 0.5, torch.arange(size_px) + 0.5, indexing="ij")
    return (((xs - centre[0]) ** 2 + (ys - centre[1]) ** 2) <= radius**2).double()


def test_a_hand_made_blob_has_its_known_centroid_and_size():
    disc = _disc(32, centre=(8.0, 20.0), radius=5.0)  # in pixels: x = 8, y = 20 of 32
    maps = torch.stack([disc, 3 * disc])  # the scale of a map does not matter
    assert torch.allclose(centroid(maps), torch.tensor([[8 / 32, 20 / 32]] * 2, dtype=torch.float64), atol=1e-9)
    area = disc.mean().item()  # about pi 5^2 / 32^2
    assert size(maps, sharpness=60.0) == pytest.approx(torch.tensor([area, area], dtype=torch.float64), rel=1e-3)
    assert ((shape(maps) > 0.5) == (disc > 0)).all()


def test_one_bright_pixel_sits_at_its_centre_and_two_at_their_midpoint():
    maps = torch.zeros(2, 4, 8)
    maps[0, 1, 6] = 1.0
    maps[1, 0, 0] = maps[1, 3, 7] = 1.0
    assert torch.allclose(centroid(maps), torch.tensor([[6.5 / 8, 1.5 / 4], [0.5, 0.5]]))
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        centroid(torch.zeros(4, 8))


def test_descending_a_move_energy_moves_the_centroid_to_its_target():
    logits = (4 * _disc(8, centre=(2.0, 2.0), radius=1.5)).float()[None].requires_grad_(True)
    edit = Move("3", to=(0.75, 0.6))
    optimizer = torch.optim.SGD([logits], lr=2.0)
    for _ in range(300):
        maps = logits.flatten(1).softmax(dim=1).view(1, 8, 8)
        energy = edit_energy(edit, maps)
        optimizer.zero_grad()
        energy.sum().backward()
        optimizer.step()
    assert energy.item() < 0.02
    assert edit_energy(Resize("3", 2.0), maps, reference_size=size(maps).detach() / 2).item() < 1e-6


def test_a_move_that_keeps_its_size_adds_the_size_difference():
    maps = _disc(8, centre=(2.0, 5.0), radius=2.0).float()[None]
    plain = edit_energy(Move("3", to=(0.5, 0.5)), maps)
    same_size = edit_energy(Move("3", to=(0.5, 0.5), keep_size=True), maps, reference_size=size(maps))
    bigger = edit_energy(Move("3", to=(0.5, 0.5), keep_size=True), maps, reference_size=size(maps) + 0.1)
    assert torch.allclose(same_size, plain) and torch.allclose(bigger, plain + 0.1)
    with pytest.raises(ValueError, match="reference_size"):
        edit_energy(Move("3", to=(0.5, 0.5), keep_size=True), maps)


def test_edits_name_words_of_their_prompt():
    assert word_index("a large green 3 on the left", "3") == 3
    with pytest.raises(ValueError, match="not a word of the prompt"):
        word_index("a large green 3", "7")
    with pytest.raises(ValueError, match="reference_size"):
        edit_energy(Resize("3", 2.0), torch.ones(1, 8, 8))


def test_ink_is_measured_on_the_drawn_glyphs():
    from coursekit.glyphs import Glyph, Scene, render

    left = render(Scene((Glyph("1", "white", position="left"),)))[None]
    right = render(Scene((Glyph("1", "white", position="right"),)))[None]
    centres, _ = ink_centroid_and_area(torch.cat([left, right]))
    assert centres[0, 0] < 0.4 < 0.6 < centres[1, 0]
    assert ink_centroid_and_area(torch.full((1, 3, 8, 8), -1.0))[1].item() == 0.0  # all black: no ink


def test_self_guidance_moves_the_words_attention_where_it_is_asked():
    """The mechanism, on the shipped mini Stable Diffusion: guided steps lower the edit's energy read from
    the model's own attention maps (whether the painted glyph follows is measured by the benchmark)."""
    from coursekit.text_to_image import load_text_to_image

    pipeline = load_text_to_image("shipped-text-to-image", device="cpu")
    captions = [f"a small {c} in the middle" for c in ("green 3", "red 8", "blue 5")] * 2
    edits = [Move(c.split()[2], to=(0.3, 0.5)) for c in captions[:3]] + [
        Move(c.split()[2], to=(0.7, 0.5)) for c in captions[3:]
    ]
    unchanged = self_guided_generate(pipeline, captions, edits, weight=0.0, num_steps=10)
    assert torch.equal(unchanged.unguided, unchanged.guided)  # weight 0: the unguided images twice
    assert torch.equal(unchanged.unguided_energies, unchanged.guided_energies)
    result = self_guided_generate(pipeline, captions, edits, weight=0.6, num_steps=10, guided_steps=(0.0, 0.6))
    assert result.guided.shape == (6, 3, 32, 32) and result.guided_energies.shape == (10, 6)
    before, after = result.unguided_energies[2:6].mean(), result.guided_energies[2:6].mean()
    assert after < 0.7 * before, (before, after)  # the attention moved towards its targets
    with pytest.raises(ValueError, match="give one edit"):
        self_guided_generate(pipeline, captions, edits[:2])
