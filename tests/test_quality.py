import math

import pytest
import torch

from coursekit.data import load_dataset
from coursekit.quality import (
    FeatureClassifier,
    class_accuracy,
    evaluate_samples,
    frechet_distance,
    load_or_train_classifier,
)


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


def test_the_score_separates_real_digits_from_noise(tmp_path):
    train_set, held_out = load_dataset("digits"), load_dataset("digits", train=False)
    classifier, accuracy = load_or_train_classifier(train_set, held_out, tmp_path)
    assert accuracy > 0.9
    assert (tmp_path / "classifier-digits.pt").exists()
    cached, cached_accuracy = load_or_train_classifier(train_set, held_out, tmp_path)
    assert cached_accuracy == accuracy
    assert all(torch.equal(a, b) for a, b in zip(classifier.state_dict().values(), cached.state_dict().values()))

    real = evaluate_samples(train_set.images[-300:], train_set, held_out, classifier, accuracy)
    noise = evaluate_samples(torch.rand(300, 1, 16, 16) * 2 - 1, train_set, held_out, classifier, accuracy)
    blurred_images = torch.nn.functional.avg_pool2d(train_set.images[-300:], 3, stride=1, padding=1)
    blurred = evaluate_samples(blurred_images, train_set, held_out, classifier, accuracy)
    assert real.ratio < 2 and real.class_coverage == 1.0 and real.class_entropy > 0.95
    assert real.frechet_distance < blurred.frechet_distance < noise.frechet_distance
    assert noise.ratio > 10
    ones = train_set.images[train_set.labels == 1][:100]
    only_ones = evaluate_samples(ones, train_set, held_out, classifier, accuracy)
    assert only_ones.class_coverage <= 0.3 and only_ones.class_entropy < 0.5
    # the classifier puts real digits in their own class, and a shuffle of the labels only by chance
    assert class_accuracy(classifier, held_out.images, held_out.labels) == pytest.approx(accuracy)
    shuffled = held_out.labels[torch.randperm(len(held_out), generator=torch.Generator().manual_seed(0))]
    assert class_accuracy(classifier, held_out.images, shuffled) < 0.3
    with pytest.raises(ValueError, match="one requested label per sample"):
        class_accuracy(classifier, held_out.images, held_out.labels[:3])
    assert "Fréchet" in real.summary() and math.isfinite(real.real_frechet_distance)
    with pytest.raises(ValueError, match="fewer"):
        evaluate_samples(torch.zeros(5000, 1, 16, 16), train_set, held_out, classifier)


def test_classifier_features_have_the_stated_shape():
    classifier = FeatureClassifier(3, 10, feature_dim=32)
    assert classifier.features(torch.zeros(2, 3, 28, 28)).shape == (2, 32)
    assert classifier(torch.zeros(2, 3, 9, 9)).shape == (2, 10)
