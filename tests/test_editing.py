"""SDEdit and RePaint tested with no training: the Gaussian oracle is a perfect model, so an edit must keep
the data distribution, and inpainting independent coordinates must fill in their marginal distribution."""

import pytest
import torch

from coursekit.editing import edit, edit_strength_to_timestep, inpaint, inpaint_steps
from coursekit.forward import add_noise
from coursekit.oracle import GaussianOracle
from coursekit.samplers import ddpm_sample
from coursekit.schedules import make_schedule

# Per-pixel mean and std of 1x2x2 "images", inside the image range [-1, 1]
MEAN = torch.tensor([[[0.2, -0.3], [0.0, 0.4]]], dtype=torch.float64)
STD = torch.tensor([[[0.3, 0.5], [0.2, 0.4]]], dtype=torch.float64)
# Keep the left column, fill in the right one; one mask for the whole batch, (1, 1, 2, 2)
MASK = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]], dtype=torch.float64)


pytestmark = pytest.mark.usefixtures("one_thread")


def _moment_errors(samples, mean, std):
    """The largest error of the mean, in units of std, and the largest relative error of the std."""
    mean_error = ((samples.mean(0) - mean) / std).abs().max().item()
    std_error = ((samples.std(0) - std) / std).abs().max().item()
    return mean_error, std_error


def test_edit_strength_picks_the_start_timestep():
    assert edit_strength_to_timestep(0.0, 1000) == 0
    assert edit_strength_to_timestep(1.0, 1000) == 999
    assert edit_strength_to_timestep(0.3, 1000) == 300  # 299.7
    assert edit_strength_to_timestep(0.001, 1000) == 1  # 0.999
    assert edit_strength_to_timestep(0.5, 10) == 4  # 4.5: ties go to even, as in ddim_timesteps
    assert edit_strength_to_timestep(1.0, 1) == 0
    for strength in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"strength must lie in \[0, 1\]"):
            edit_strength_to_timestep(strength, 1000)
    with pytest.raises(ValueError, match="num_steps"):
        edit_strength_to_timestep(0.5, 0)


def test_edit_with_strength_zero_returns_the_images_untouched():
    schedule = make_schedule("linear", 50)

    def model(x_t, t):
        raise AssertionError("strength 0 must not call the model")

    images = torch.rand(3, 1, 2, 2) * 2 - 1
    edited = edit(model, schedule, images, 0.0)
    assert torch.equal(edited, images) and edited is not images


def test_edit_with_strength_one_is_ddpm_sampling_from_the_noised_images():
    schedule = make_schedule("cosine", 100)
    oracle = GaussianOracle(MEAN, STD, schedule)
    images = oracle.sample_data(16, generator=torch.Generator().manual_seed(1))
    edited = edit(oracle, schedule, images, 1.0, generator=torch.Generator().manual_seed(2))
    generator = torch.Generator().manual_seed(2)
    x_T, _ = add_noise(images, torch.full((16,), 99), schedule, generator=generator)  # strength 1: t = T-1
    assert torch.equal(edited, ddpm_sample(oracle, schedule, x_T, generator=generator, clip_x0=True))


@pytest.mark.parametrize("strength", [0.3, 0.7])
def test_edit_with_the_oracle_keeps_the_data_distribution(strength):
    # Data noised to t is exactly what the reverse process expects at t, so a perfect model turns
    # edited data back into data. 1000 steps keep the sampler's own error (too small a variance per
    # step with few steps) well under the tolerance.
    schedule = make_schedule("cosine", 1000)
    oracle = GaussianOracle(MEAN, STD, schedule)
    generator = torch.Generator().manual_seed(0)
    images = oracle.sample_data(8_000, generator=generator)
    edited = edit(oracle, schedule, images, strength, generator=generator, clip_x0=False)
    mean_error, std_error = _moment_errors(edited, MEAN, STD)
    print(f"SDEdit strength {strength}: mean error {mean_error:.4f}, relative std error {std_error:.4f}")
    assert mean_error < 0.045  # 4 standard errors: 4 / sqrt(N)
    assert std_error < 0.04  # 5 standard errors, 1/sqrt(2N) = 0.008 for a std, plus the sampler's own error
    assert not torch.allclose(edited, images, atol=0.05)  # and it did change the images


def test_stronger_edits_move_further_from_the_input():
    schedule = make_schedule("cosine", 100)
    oracle = GaussianOracle(MEAN, STD, schedule)
    images = oracle.sample_data(2_000, generator=torch.Generator().manual_seed(3))
    distances = []
    for strength in (0.1, 0.3, 0.6, 1.0):
        edited = edit(oracle, schedule, images, strength, generator=torch.Generator().manual_seed(4))
        distances.append((edited - images).pow(2).mean().item())
    assert distances == sorted(distances)
    # strength 1 forgets the input: two independent draws differ by 2 std^2 on average
    assert distances[-1] == pytest.approx(2 * STD.pow(2).mean().item(), rel=0.1)


@pytest.mark.parametrize("resample", [1, 3])
def test_inpaint_with_the_oracle_keeps_the_known_pixels_and_fills_in_the_marginal(resample):
    # Independent pixels: the right distribution of a filled pixel given the kept ones is its marginal.
    schedule = make_schedule("cosine", 200)
    oracle = GaussianOracle(MEAN, STD, schedule)
    generator = torch.Generator().manual_seed(5)
    images = oracle.sample_data(8_000, generator=generator)
    x_T = torch.randn(images.shape, dtype=torch.float64, generator=generator)
    steps = inpaint_steps(oracle, schedule, images, MASK, x_T, generator=generator, resample=resample, clip_x0=False)
    for step in steps:
        if step.t == 0:
            filled = step.x
            break
        # After the step at t the kept pixels are the images noised to the level of x_{t-1} (DDPM Eq. 4)
        alpha_bar = schedule.alpha_bar[step.t - 1]
        noise = (step.x[..., 0] - alpha_bar.sqrt() * images[..., 0]) / (1 - alpha_bar).sqrt()
        assert noise.mean().abs() < 0.05 and (noise.std() - 1).abs() < 0.05, f"kept pixels off at t={step.t}"
    assert torch.equal(filled[..., 0], images[..., 0])  # kept: exactly the input
    mean_error, std_error = _moment_errors(filled[..., 1], MEAN[..., 1], STD[..., 1])
    print(f"RePaint resample={resample}: mean error {mean_error:.4f}, relative std error {std_error:.4f}")
    assert mean_error < 0.045  # 4 standard errors: 4 / sqrt(N)
    # The sampler's own error with 200 steps: a std about 2% too small, about 4% with resample=3
    # (each extra round adds another slightly too narrow reverse step), Monte Carlo error 1/sqrt(2N) = 0.008.
    assert std_error < (0.05 if resample == 1 else 0.07)
    # One noise draw serves both parts (see inpaint_steps): it must not tie a filled pixel to a kept one
    pairs = torch.stack([filled[:, 0, 0, 0], filled[:, 0, 0, 1]])
    assert torch.corrcoef(pairs)[0, 1].abs() < 0.05  # 4.5 standard errors of a correlation


def test_inpaint_feeds_the_model_samples_at_the_level_of_each_timestep():
    # Keep every pixel: each model input at t, after a plain step or after going back up one step
    # (resampling, DDPM Eq. 2), must be the images noised to level t (DDPM Eq. 4).
    schedule = make_schedule("cosine", 100)
    oracle = GaussianOracle(MEAN, STD, schedule)
    generator = torch.Generator().manual_seed(14)
    images = oracle.sample_data(4_000, generator=generator)
    x_T = torch.randn(images.shape, dtype=torch.float64, generator=generator)
    inputs = []

    def recording_oracle(x_t, t):
        inputs.append((int(t[0]), x_t))
        return oracle(x_t, t)

    keep_all = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    inpaint(recording_oracle, schedule, images, keep_all, x_T, generator=generator, resample=2)
    assert len(inputs) == 2 * 99 + 1
    for t, x_t in inputs[1:]:  # the first input is x_T itself
        alpha_bar = schedule.alpha_bar[t]
        noise = (x_t - alpha_bar.sqrt() * images) / (1 - alpha_bar).sqrt()
        assert noise.mean().abs() < 0.04 and (noise.std() - 1).abs() < 0.04, f"model input off at t={t}"


def test_inpaint_fills_independent_pixels_exactly_as_ddpm_samples_them():
    # The oracle treats every pixel on its own, and the noise draws line up with ddpm_steps, so without
    # resampling the filled pixels are bit for bit the DDPM samples of those pixels from the same x_T.
    schedule = make_schedule("linear", 50)
    oracle = GaussianOracle(MEAN, STD, schedule)
    images = oracle.sample_data(16, generator=torch.Generator().manual_seed(9))
    x_T = torch.randn(images.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    filled = inpaint(oracle, schedule, images, MASK, x_T, generator=torch.Generator().manual_seed(11))
    sampled = ddpm_sample(oracle, schedule, x_T, generator=torch.Generator().manual_seed(11), clip_x0=True)
    assert torch.equal(filled[..., 1], sampled[..., 1])
    assert torch.equal(filled[..., 0], images[..., 0])


def test_inpaint_with_a_full_mask_returns_the_images_and_an_empty_one_is_ddpm_sampling():
    schedule = make_schedule("linear", 50)
    oracle = GaussianOracle(MEAN, STD, schedule)
    images = oracle.sample_data(16, generator=torch.Generator().manual_seed(6))
    x_T = torch.randn(images.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    keep_all = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    for resample in (1, 2):
        kept = inpaint(oracle, schedule, images, keep_all, x_T, generator=torch.Generator(), resample=resample)
        assert torch.equal(kept, images)
    # An empty mask keeps nothing: the noise draws line up with ddpm_steps, so the result is bit-identical.
    filled = inpaint(oracle, schedule, images, torch.zeros(1, 1, 1, 1), x_T, generator=torch.Generator().manual_seed(8))
    sampled = ddpm_sample(oracle, schedule, x_T, generator=torch.Generator().manual_seed(8), clip_x0=True)
    assert torch.equal(filled, sampled)


def test_inpaint_yields_every_timestep_once():
    schedule = make_schedule("linear", 20)
    oracle = GaussianOracle(MEAN, STD, schedule)
    images = oracle.sample_data(4, generator=torch.Generator().manual_seed(12))
    x_T = torch.randn(images.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    calls = []

    def counting_oracle(x_t, t):
        calls.append(int(t[0]))
        return oracle(x_t, t)

    steps = list(inpaint_steps(counting_oracle, schedule, images, MASK[0, 0], x_T, resample=3))
    assert [s.t for s in steps] == list(range(19, -1, -1))
    assert all(s.x.shape == images.shape and s.x0_pred.shape == images.shape for s in steps)
    assert calls == [t for t in range(19, 0, -1) for _ in range(3)] + [0]  # no resampling at t = 0


def test_bad_editing_input_raises_clear_errors():
    schedule = make_schedule("linear", 10)
    oracle = GaussianOracle(0.0, 1.0, schedule)
    images, x_T = torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match=r"strength must lie in \[0, 1\]"):
        edit(oracle, schedule, images, 1.2)
    with pytest.raises(ValueError, match="images must be a batch"):
        edit(oracle, schedule, torch.zeros(4), 0.5)
    with pytest.raises(ValueError, match="images and x_T must have one shape"):
        inpaint(oracle, schedule, images, MASK, torch.zeros(2, 1, 3, 3))
    with pytest.raises(ValueError, match="does not broadcast to the images' shape"):
        inpaint(oracle, schedule, images, torch.ones(3, 1, 2, 2), x_T)
    with pytest.raises(ValueError, match="does not broadcast to the images' shape"):
        inpaint(oracle, schedule, images, torch.ones(1, 1, 1, 2, 2), x_T)  # would add a dimension
    for values in (2.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match=r"mask values must lie in \[0, 1\]"):
            inpaint(oracle, schedule, images, torch.full((1, 1, 2, 2), values), x_T)
    for resample in (0, 1.5, True):
        with pytest.raises(ValueError, match="resample must be an integer >= 1"):
            inpaint(oracle, schedule, images, MASK, x_T, resample=resample)


def test_inpaint_with_fewer_steps_jumps_as_respaced_ddpm_does():
    # num_steps visits fewer timesteps: with an empty mask it is respaced DDPM sampling (the same jumps and
    # noise draws as ddpm_sample(num_steps=...)); a full mask still returns the images; resampling goes back
    # up each jump, so each visited step but the last calls the model `resample` times.
    schedule = make_schedule("linear", 50)
    oracle = GaussianOracle(MEAN, STD, schedule)
    images = oracle.sample_data(16, generator=torch.Generator().manual_seed(14))
    x_T = torch.randn(images.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(15))
    empty = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    filled = inpaint(oracle, schedule, images, empty, x_T, generator=torch.Generator().manual_seed(16), num_steps=10)
    sampled = ddpm_sample(
        oracle, schedule, x_T, generator=torch.Generator().manual_seed(16), num_steps=10, clip_x0=True
    )
    torch.testing.assert_close(filled, sampled, rtol=0, atol=1e-12)
    keep_all = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    kept = inpaint(oracle, schedule, images, keep_all, x_T, generator=torch.Generator(), num_steps=10, resample=2)
    assert torch.equal(kept, images)
    calls = []

    def counting_oracle(x_t, t):
        calls.append(int(t[0]))
        return oracle(x_t, t)

    steps = list(inpaint_steps(counting_oracle, schedule, images, MASK[0, 0], x_T, resample=2, num_steps=5))
    visited = [s.t for s in steps]
    assert visited == sorted(set(visited), reverse=True) and len(visited) == 5 and visited[-1] == 0
    assert calls == [t for t in visited[:-1] for _ in range(2)] + [0]


def test_edit_with_fewer_steps_is_respaced_ddpm_from_the_same_start():
    schedule = make_schedule("linear", 50)
    oracle = GaussianOracle(MEAN, STD, schedule)
    images = oracle.sample_data(8, generator=torch.Generator().manual_seed(17))
    generator = torch.Generator().manual_seed(18)
    start_t = edit_strength_to_timestep(0.6, schedule.num_steps)
    x_t, _ = add_noise(images, torch.full((8,), start_t), schedule, generator=generator)
    mine = ddpm_sample(oracle, schedule, x_t, generator=generator, start_t=start_t, num_steps=6, clip_x0=True)
    theirs = edit(oracle, schedule, images, 0.6, generator=torch.Generator().manual_seed(18), num_steps=6)
    torch.testing.assert_close(theirs, mine, rtol=0, atol=1e-12)
