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
