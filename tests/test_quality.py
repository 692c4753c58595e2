"""The yardstick, tested against known answers: closed-form distances, real images scored as samples, noise."""

import math

import pytest
import torch

from coursekit.distances import (
    frechet_distance,
    kernel_inception_distance,
    kid_interval,
    mmd_permutation_test,
    nearest_neighbours,
    polynomial_kernel,
)
from coursekit.quality import (
    NEAR_COPY_SHARE,
    FeatureClassifier,
    Yardstick,
    class_accuracy,
    kid_intervals_overlap,
    samples_to_separate,
    split_real_images,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_frechet_distance_matches_closed_forms():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(200_000, 1, generator=generator, dtype=torch.float64) * 2 + 1
    b = torch.randn(200_000, 1, generator=generator, dtype=torch.float64) * 0.5 - 1
    # 1-D: (mu_a - mu_b)^2 + (sigma_a - sigma_b)^2 = 4 + 2.25
    assert frechet_distance(a, b) == pytest.approx(6.25, rel=0.01)
    # Diagonal covariances: sum (mu diff)^2 + sum (sqrt(var_a) - sqrt(var_b))^2, computed exactly
    std_a, std_b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 1.0, 0.5])
    x = torch.randn(300_000, 3, generator=generator, dtype=torch.float64) * std_a
    y = torch.randn(300_000, 3, generator=generator, dtype=torch.float64) * std_b + 1
    expected = 3 * 1.0 + ((std_a - std_b) ** 2).sum().item()
    assert frechet_distance(x, y) == pytest.approx(expected, rel=0.01)


def test_frechet_distance_of_a_set_with_itself_is_zero_and_rotations_do_not_matter():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(500, 4, generator=generator, dtype=torch.float64) @ torch.randn(
        4, 4, generator=generator, dtype=torch.float64
    )
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    y = torch.randn(500, 4, generator=generator, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, generator=generator, dtype=torch.float64))
    assert frechet_distance(x @ rotation, y @ rotation) == pytest.approx(frechet_distance(x, y), rel=1e-6)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        frechet_distance(torch.zeros(5, 2), torch.zeros(5, 3))


def _expected_kernel(mean_a: torch.Tensor, mean_b: torch.Tensor) -> float:
    """E[(x.y / d + 1)^3] for independent x ~ N(mean_a, I), y ~ N(mean_b, I), derived by hand.

    x.y = sum_i u_i with u_i = x_i y_i independent; E[u] = a b, E[u^2] = (1 + a^2)(1 + b^2),
    E[u^3] = (a^3 + 3a)(b^3 + 3b). The cumulants of a sum add up, and E[S^2] = k2 + k1^2,
    E[S^3] = k3 + 3 k2 k1 + k1^3.
    """
    a, b = mean_a.double(), mean_b.double()
    d = len(a)
    m1, m2, m3 = a * b, (1 + a**2) * (1 + b**2), (a**3 + 3 * a) * (b**3 + 3 * b)
    k1, k2, k3 = m1.sum(), (m2 - m1**2).sum(), (m3 - 3 * m2 * m1 + 2 * m1**3).sum()
    s1, s2, s3 = k1, k2 + k1**2, k3 + 3 * k2 * k1 + k1**3
    return (s3 / d**3 + 3 * s2 / d**2 + 3 * s1 / d + 1).item()


def test_kid_of_two_gaussians_with_a_known_mean_shift_is_the_known_mmd():
    shift = torch.tensor([0.5, 0.0, -0.3, 0.0], dtype=torch.float64)
    zero = torch.zeros(4, dtype=torch.float64)
    exact = _expected_kernel(zero, zero) + _expected_kernel(shift, shift) - 2 * _expected_kernel(zero, shift)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 4, generator=generator, dtype=torch.float64)
    y = torch.randn(3000, 4, generator=generator, dtype=torch.float64) + shift
    low, high, error = kid_interval(x, y, rounds=300)
    estimate = kernel_inception_distance(x, y)
    print(f"exact MMD^2 {exact:.4f}, KID {estimate:.4f} [{low:.4f}, {high:.4f}]")
    assert low <= exact <= high
    assert estimate == pytest.approx(exact, abs=3 * error)


def test_kid_is_the_unbiased_estimate_written_out():
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(7, 3, generator=generator), torch.randn(5, 3, generator=generator) + 1
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    by_hand = ((kxx.sum() - kxx.trace()) / (7 * 6) + (kyy.sum() - kyy.trace()) / (5 * 4) - 2 * kxy.mean()).item()
    assert kernel_inception_distance(x, y) == pytest.approx(by_hand, rel=1e-12)
    assert polynomial_kernel(x, y)[2, 3].item() == pytest.approx(((x[2] @ y[3]).item() / 3 + 1) ** 3, rel=1e-6)


def test_two_draws_from_one_distribution_give_an_interval_around_zero_and_no_rejection():
    """Over 20 pairs of independent draws, the interval contains 0 (95 % each) and the test rarely rejects."""
    covered, rejected = 0, 0
    for seed in range(20):
        generator = torch.Generator().manual_seed(100 + seed)
        x = torch.randn(200, 4, generator=generator, dtype=torch.float64)
        y = torch.randn(300, 4, generator=generator, dtype=torch.float64)
        low, high, _ = kid_interval(x, y, rounds=300, seed=seed)
        covered += low <= 0 <= high
        rejected += mmd_permutation_test(x, y, rounds=200, seed=seed) < 0.05
    assert covered >= 18
    assert rejected <= 3
    # and a real difference is found at this count
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(200, 4, generator=generator, dtype=torch.float64)
    y = torch.randn(300, 4, generator=generator, dtype=torch.float64) + 0.5
    assert mmd_permutation_test(x, y, rounds=200) < 0.01
    assert kid_interval(x, y, rounds=300)[0] > 0


def test_nearest_neighbours_finds_the_copy():
    pool = torch.randn(50, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    queries = pool[[3, 17]] + 1e-3
    distances, indices = nearest_neighbours(queries, pool)
    assert indices.tolist() == [3, 17] and (distances < 0.01).all()


@pytest.fixture(scope="module")
def yardstick():
    return Yardstick.for_dataset("digits")


def test_the_splits_are_disjoint_and_the_classifier_sees_only_its_own():
    splits = split_real_images("digits")
    assert (len(splits.classifier), len(splits.reference), len(splits.floor), len(splits.held_out)) == (
        479,
        600,
        359,
        359,
    )
    rows = {
        name: {tuple(image.flatten().tolist()) for image in getattr(splits, name).images}
        for name in ("classifier", "reference", "floor", "held_out")
    }
    names = list(rows)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            # the digits hold a few exact duplicates of their own; no more than those may be shared
            assert len(rows[first] & rows[second]) <= 3, (first, second)
    assert splits.max_samples == 359


def test_real_images_scored_as_samples_are_indistinguishable(yardstick):
    report = yardstick.score_real(yardstick.max_samples)
    print(report.summary())
    assert report.distinguishable is False and report.p_value > 0.05
    assert report.kid_low <= 0 <= report.kid_high
    assert report.floor_kid_low <= 0 <= report.floor_kid_high
    assert report.near_copies == pytest.approx(NEAR_COPY_SHARE, abs=0.02)
    assert report.class_coverage == 1.0 and report.class_entropy > 0.95
    assert yardstick.accuracy > 0.9
    assert "cannot be told apart" in report.verdict()


def test_noise_and_blur_are_distinguishable_and_ordered(yardstick):
    noise = yardstick.score(torch.rand(359, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    blurred_images = torch.nn.functional.avg_pool2d(yardstick.splits.held_out.images, 3, stride=1, padding=1)
    blurred = yardstick.score(blurred_images)
    real = yardstick.score_real(359)
    assert noise.distinguishable and blurred.distinguishable
    assert real.kid < blurred.kid < noise.kid
    assert noise.kid_low > real.kid_high and noise.fd > 10 * noise.floor_fd
    assert "can be told apart" in noise.verdict()
    assert not kid_intervals_overlap(noise, real)
    assert samples_to_separate(noise, real) < 359  # already separated
    assert math.isfinite(noise.floor_fd)


def test_copies_of_training_images_are_caught_as_near_copies(yardstick):
    copies = yardstick.score(yardstick.splits.training.images[:200])
    assert copies.near_copies == 1.0
    nearest, distances = yardstick.nearest_training_images(yardstick.splits.training.images[:5])
    assert torch.equal(nearest, yardstick.splits.training.images[:5]) and (distances == 0).all()


def test_one_class_only_covers_few_classes(yardstick):
    held_out = yardstick.splits.held_out
    only_ones = yardstick.score(held_out.images[held_out.labels == 1][:30])
    assert only_ones.class_coverage <= 0.3 and only_ones.class_entropy < 0.5
    assert only_ones.distinguishable  # thirty ones are not a sample of all digits


def test_the_yardstick_refuses_what_it_cannot_score(yardstick):
    with pytest.raises(ValueError, match="between 10 and 359"):
        yardstick.score(torch.zeros(400, 1, 16, 16))
    with pytest.raises(ValueError, match="between 10 and 359"):
        yardstick.score_real(5)
    with pytest.raises(ValueError, match="this yardstick scores"):
        yardstick.score(torch.zeros(20, 3, 16, 16))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        yardstick.score(torch.full((20, 1, 16, 16), 3.0))


def test_the_classifier_is_cached_and_class_accuracy_reads_labels(tmp_path, yardstick):
    first = Yardstick.for_dataset("digits", cache_dir=tmp_path)
    assert (tmp_path / "yardstick-v2-digits.pt").exists()
    again = Yardstick.for_dataset("digits", cache_dir=tmp_path)
    assert again.accuracy == first.accuracy
    weights = zip(first.classifier.state_dict().values(), again.classifier.state_dict().values())
    assert all(torch.equal(a, b) for a, b in weights)
    held_out = yardstick.splits.held_out
    assert yardstick.class_accuracy(held_out.images, held_out.labels) == pytest.approx(yardstick.accuracy)
    shuffled = held_out.labels[torch.randperm(len(held_out), generator=torch.Generator().manual_seed(0))]
    assert class_accuracy(yardstick.classifier, held_out.images, shuffled) < 0.3
    with pytest.raises(ValueError, match="one requested label per sample"):
        class_accuracy(yardstick.classifier, held_out.images, held_out.labels[:3])


def test_samples_to_separate_follows_the_square_root_law(yardstick):
    real = yardstick.score_real(100)
    blurred = yardstick.score(
        torch.nn.functional.avg_pool2d(yardstick.splits.held_out.images[:100], 3, stride=1, padding=1)
    )
    needed = samples_to_separate(real, blurred)
    gap = abs(real.kid - blurred.kid)
    spread = 1.96 * math.hypot(real.kid_standard_error, blurred.kid_standard_error)
    assert needed == math.ceil(100 * (spread / gap) ** 2)


def test_classifier_features_have_the_stated_shape():
    classifier = FeatureClassifier(3, 10, feature_dim=32)
    assert classifier.features(torch.zeros(2, 3, 28, 28)).shape == (2, 32)
    assert classifier(torch.zeros(2, 3, 9, 9)).shape == (2, 10)
