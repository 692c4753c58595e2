"""Every public sampler, called with its defaults on the shipped digit model, paints digits.

The shipped model was trained with the package's defaults (cosine schedule, 1000 steps). Called
with nothing but the model, the schedule and pure noise, each sampler must return images inside
[-1, 1] that the course's yardstick scores far better than noise. The cosine schedule's capped last
step is what made the old defaults paint noise; a test shows that the failure is real without
clipping, so the default is not guarding against nothing.
"""

import pytest
import torch

from coursekit.data import load_dataset
from coursekit.editing import edit, inpaint
from coursekit.quality import Yardstick
from coursekit.runs import generate, load_shipped_model
from coursekit.samplers import SAMPLERS, ddim_sample, ddpm_sample, dpm_solver_sample, get_sampler

COUNT = 24  # images per sampler: enough to tell digits from noise, few enough for 1000-step samplers


@pytest.fixture(scope="module")
def shipped():
    return load_shipped_model(device="cpu")


@pytest.fixture(scope="module")
def gauge():
    yardstick = Yardstick.for_dataset("digits")
    noise = torch.rand(COUNT, 1, 16, 16, generator=torch.Generator().manual_seed(99)) * 2 - 1
    noise_kid = yardstick.score(noise).kid

    def check(images: torch.Tensor, name: str) -> None:
        assert images.shape == (COUNT, 1, 16, 16), name
        assert torch.isfinite(images).all(), f"{name}: not finite"
        low, high = images.min().item(), images.max().item()
        assert -1 <= low and high <= 1, f"{name} at its defaults left the image range: [{low:.3g}, {high:.3g}]"
        report = yardstick.score(images)
        print(f"{name}: {report.summary()}; uniform noise KID {noise_kid:.3f}")
        assert report.kid_high < 0.2 * noise_kid, f"{name} at its defaults scores like noise"
        assert report.class_coverage >= 0.7, f"{name}: too few digits among the samples"

    return check


def _noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(COUNT, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_every_registered_sampler_is_covered_here():
    assert set(SAMPLERS) == {"ddpm", "ddim", "dpm++2m"}, "a new sampler needs its default test below"


def test_ddim_at_its_defaults(shipped, gauge):
    gauge(ddim_sample(shipped.model, shipped.schedule, _noise()), "ddim_sample")


def test_ddim_with_eta_one_at_its_defaults(shipped, gauge):
    generator = torch.Generator().manual_seed(3)
    gauge(ddim_sample(shipped.model, shipped.schedule, _noise(), eta=1.0, generator=generator), "ddim_sample(eta=1)")


def test_dpm_solver_at_its_defaults(shipped, gauge):
    gauge(dpm_solver_sample(shipped.model, shipped.schedule, _noise()), "dpm_solver_sample")


def test_ddpm_at_its_defaults(shipped, gauge):
    generator = torch.Generator().manual_seed(4)
    gauge(ddpm_sample(shipped.model, shipped.schedule, _noise(), generator=generator), "ddpm_sample")


def test_generate_at_its_defaults(shipped, gauge):
    for name in SAMPLERS:
        if name == "ddpm":
            continue  # 1000 steps again: ddpm_sample above covers it
        images, _ = generate(shipped.model, shipped.schedule, (1, 16, 16), COUNT, sampler=name, progress=False)
        gauge(images, f"generate(sampler={name!r})")


def test_editing_at_its_defaults(shipped, gauge):
    digits = load_dataset("digits", train=False).images[:COUNT]
    gauge(edit(shipped.model, shipped.schedule, digits, 0.6, generator=torch.Generator().manual_seed(5)), "edit")
    mask = torch.ones(1, 1, 16, 16)
    mask[..., 8:] = 0  # fill in the right half
    filled = inpaint(
        shipped.model, shipped.schedule, digits, mask, _noise(6), generator=torch.Generator().manual_seed(6)
    )
    gauge(filled, "inpaint")
    assert torch.equal(filled[..., :8], digits[..., :8]), "inpainting changed the pixels it was told to keep"


def test_without_clipping_the_first_guess_blows_up_on_the_cosine_schedule(shipped):
    """Why the default clips: 1 / sqrt(alpha_bar) at the last step is about 20,000."""
    last = shipped.schedule.alpha_bar[-1].item()
    assert 1 / last**0.5 > 10_000
    unclipped = ddim_sample(shipped.model, shipped.schedule, _noise()[:8], clip_x0=False)
    assert unclipped.abs().max() > 10, "the blow-up the default guards against did not happen"


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_data_that_is_not_an_image_batch_must_choose_clipping(shipped, name):
    points = torch.randn(10, 2)
    with pytest.raises(ValueError, match="clip_x0=False"):
        next(get_sampler(name)(lambda x, t: torch.zeros_like(x), shipped.schedule, points))
    steps = get_sampler(name)(lambda x, t: torch.zeros_like(x), shipped.schedule, points, clip_x0=False)
    assert next(steps).x.shape == (10, 2)
