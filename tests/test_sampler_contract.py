"""One contract for every registered sampler, diffusion and flow alike.

Each one accepts the shared keywords (``generator``, ``clip_x0``; and ``prediction`` for diffusion
samplers), walks its time grid downwards to the data, gives the same images for the same seed, honours
``clip_x0``, and brings back the Gaussian data's moments when its model is the exact oracle.
"""

import pytest
import torch

from coursekit.flow import FLOW_SAMPLERS, GaussianVelocityOracle
from coursekit.oracle import GaussianOracle
from coursekit.samplers import SAMPLERS
from coursekit.schedules import make_schedule

MEAN, STD = torch.tensor([0.6, -0.4]), torch.tensor([0.2, 0.5])  # well inside [-1, 1]: clipping must not bite
SCHEDULE = make_schedule("cosine", 200)
ALL = [("diffusion", name) for name in sorted(SAMPLERS)] + [("flow", name) for name in sorted(FLOW_SAMPLERS)]
STEPS = {"ddpm": None, "ddim": 100, "dpm++2m": 50, "euler": 200, "heun": 50}


def _run(kind, name, x_T, model=None, **options):
    if kind == "diffusion":
        model = model or GaussianOracle(MEAN, STD, SCHEDULE)
        if STEPS[name]:
            options.setdefault("num_steps", STEPS[name])
        return list(SAMPLERS[name](model, SCHEDULE, x_T, **options))
    model = model or GaussianVelocityOracle(MEAN, STD)
    return list(FLOW_SAMPLERS[name](model, x_T, num_steps=STEPS[name], **options))


def _time(step) -> float:
    return float(step.t if hasattr(step, "t") else step.s)


@pytest.mark.parametrize("kind, name", ALL)
def test_every_sampler_keeps_the_contract(kind, name):
    x_T = torch.randn(20_000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    shared = {"generator": torch.Generator().manual_seed(1), "clip_x0": False}
    if kind == "diffusion":
        shared["prediction"] = "eps"
    steps = _run(kind, name, x_T, **shared)
    times = [_time(step) for step in steps]
    assert times == sorted(times, reverse=True) and len(set(times)) == len(times)  # strictly downwards
    assert times[-1] == 0 if kind == "diffusion" else 0 < times[-1] < 1  # ... to the data
    samples = steps[-1].x
    assert torch.allclose(samples.mean(0), MEAN.double(), atol=0.02), samples.mean(0)
    assert torch.allclose(samples.std(0), STD.double(), rtol=0.06), samples.std(0)

    again = _run(kind, name, x_T, **{**shared, "generator": torch.Generator().manual_seed(1)})[-1].x
    assert torch.equal(again, samples)  # the same seed, the same images


@pytest.mark.parametrize("kind, name", ALL)
def test_every_sampler_honours_clip_x0(kind, name):
    x_T = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(2))

    def far_out(x, t):  # a model whose clean-image guess lies far outside [-1, 1]
        return torch.full_like(x, -3.0) if kind == "diffusion" else x - 3.0

    for clip in (True, False):
        steps = _run(kind, name, x_T, model=far_out, clip_x0=clip, generator=torch.Generator().manual_seed(3))
        inside = all(bool((step.x0_pred.abs() <= 1 + 1e-6).all()) for step in steps)
        assert inside == clip, (name, clip)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_diffusion_sampler_takes_the_shared_keywords(name):
    oracle = GaussianOracle(MEAN, STD, SCHEDULE)
    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    shared = {"generator": torch.Generator().manual_seed(5), "clip_x0": False, "prediction": "eps"}
    by_count = list(SAMPLERS[name](oracle, SCHEDULE, x, num_steps=10, start_t=120, **shared))
    assert [step.t for step in by_count] == [120, 107, 93, 80, 67, 53, 40, 27, 13, 0]
    by_list = list(SAMPLERS[name](oracle, SCHEDULE, x, timesteps=[150, 90, 30], **shared))
    assert [step.t for step in by_list] == [150, 90, 30]  # the last visited step jumps to the data
    with pytest.raises(ValueError, match="not both"):
        list(SAMPLERS[name](oracle, SCHEDULE, x, timesteps=[150, 90], num_steps=3))
    with pytest.raises(ValueError, match="prediction"):
        list(SAMPLERS[name](oracle, SCHEDULE, x, prediction="noise"))


def test_respaced_ddpm_is_ddim_with_eta_one():
    """DDIM Sec. 4.1: eta = 1 is DDPM's posterior, also over a jump of many steps."""
    from coursekit.samplers import ddim_sample, ddpm_sample

    oracle = GaussianOracle(MEAN, STD, SCHEDULE)
    x_T = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    options = {"num_steps": 25, "clip_x0": False}
    respaced = ddpm_sample(oracle, SCHEDULE, x_T, generator=torch.Generator().manual_seed(7), **options)
    ddim = ddim_sample(oracle, SCHEDULE, x_T, generator=torch.Generator().manual_seed(7), eta=1.0, **options)
    assert torch.allclose(respaced, ddim, atol=1e-10)
    every = ddpm_sample(oracle, SCHEDULE, x_T, generator=torch.Generator().manual_seed(8), clip_x0=False)
    listed = ddpm_sample(
        oracle,
        SCHEDULE,
        x_T,
        generator=torch.Generator().manual_seed(8),
        timesteps=list(range(199, -1, -1)),
        clip_x0=False,
    )
    assert torch.equal(every, listed)
