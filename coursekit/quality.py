"""A sample-quality score that needs no download (notebooks 04-07).

The standard FID compares Inception-network features of generated and real images, and the
Inception weights must be downloaded. Here a small classifier trained on the course's own
dataset supplies the features instead; the score is the Fréchet distance between the features
of generated images and of held-out real images. A distance means little alone, so it is always
reported beside the real-vs-real distance: real training images against the same held-out set,
at the same sample count. A score near that reference means "as close as real images get".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from coursekit.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from coursekit.data import ImageDataset, check_image_range


class FeatureClassifier(nn.Module):
    """A small CNN classifier; its penultimate layer gives the features for the score."""

    def __init__(self, in_channels: int, num_classes: int, feature_dim: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GroupNorm(8, 64), nn.SiLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.GroupNorm(8, 64), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(64, feature_dim), nn.SiLU(),
        )  # fmt: skip
        self.classify = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)  # (B, feature_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(images))  # (B, num_classes) logits


def train_classifier(
    dataset: ImageDataset,
    epochs: int = 15,
    batch_size: int = 128,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> FeatureClassifier:
    """Train a :class:`FeatureClassifier` on ``dataset`` (small random shifts as augmentation)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = FeatureClassifier(dataset.image_shape[0], dataset.num_classes).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * math.ceil(len(dataset) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(dataset), generator=generator)
        for start in range(0, len(dataset), batch_size):
            indices = order[start : start + batch_size]
            images = _random_shift(dataset.images[indices], generator).to(device)
            loss = F.cross_entropy(model(images), dataset.labels[indices].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def _random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    shifts = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator).tolist()
    return torch.roll(images, shifts=shifts, dims=(2, 3))


@torch.no_grad()
def classifier_accuracy(classifier: FeatureClassifier, dataset: ImageDataset) -> float:
    predictions = _batched(classifier, dataset.images).argmax(dim=1)
    return (predictions == dataset.labels).float().mean().item()


def load_or_train_classifier(
    dataset: ImageDataset, held_out: ImageDataset, cache_dir: str | Path, device: str | torch.device = "cpu"
) -> tuple[FeatureClassifier, float]:
    """The dataset's quality classifier, cached in ``cache_dir``; returns (classifier, held-out accuracy)."""
    path = Path(cache_dir) / f"classifier-{dataset.name}.pt"
    shape = list(dataset.image_shape)
    if path.exists():
        payload = load_checkpoint(path)
        if payload.get("image_shape") != shape or payload.get("num_classes") != dataset.num_classes:
            raise CheckpointError(f"{path} was trained for other images; delete it to retrain")
        classifier = FeatureClassifier(shape[0], dataset.num_classes)
        classifier.load_state_dict(payload["weights"])
        return classifier.to(device).eval(), float(payload["accuracy"])
    classifier = train_classifier(dataset, device=device)
    accuracy = classifier_accuracy(classifier, held_out)
    save_checkpoint(
        {
            "weights": classifier.state_dict(),
            "image_shape": shape,
            "num_classes": dataset.num_classes,
            "accuracy": accuracy,
        },
        path,
    )
    return classifier, accuracy


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D) (Heusel et al. 2017):

    d^2 = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)).
    Tr((S_a S_b)^(1/2)) is computed as the sum of square roots of the eigenvalues of the
    symmetric matrix S_a^(1/2) S_b S_a^(1/2), which has the same eigenvalues, in float64.
    """
    if features_a.ndim != 2 or features_b.ndim != 2 or features_a.shape[1] != features_b.shape[1]:
        raise ValueError(
            f"need two (N, D) feature sets of one D, got {tuple(features_a.shape)} and {tuple(features_b.shape)}"
        )
    if len(features_a) < 2 or len(features_b) < 2:
        raise ValueError("need at least two samples in each feature set")
    a, b = features_a.double(), features_b.double()
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    values, vectors = torch.linalg.eigh(cov_a)
    sqrt_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    middle = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0)
    distance = (mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * middle.sqrt().sum()
    return max(distance.item(), 0.0)


@dataclass
class QualityReport:
    """The score of a set of generated images."""

    frechet_distance: float  # generated vs held-out real, in classifier features (lower is better)
    real_frechet_distance: float  # real training images vs held-out, same count: the floor to aim at
    ratio: float  # frechet_distance / real_frechet_distance (1 = as good as real images)
    class_coverage: float  # share of classes that at least 1% of the samples fall in
    class_entropy: float  # entropy of the predicted class histogram / log(classes) (1 = balanced)
    mean_confidence: float  # mean top class probability (high on noise too: read it with the rest)
    num_samples: int
    classifier_accuracy: float  # the feature classifier's held-out accuracy

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"score (Fréchet distance, lower is better) {self.frechet_distance:.3f} vs real images "
            f"{self.real_frechet_distance:.3f} ({self.ratio:.1f}x); classes covered "
            f"{self.class_coverage:.0%}, balance {self.class_entropy:.2f}; "
            f"{self.num_samples} samples"
        )


@torch.no_grad()
def evaluate_samples(
    samples: torch.Tensor,
    real_train: ImageDataset,
    held_out: ImageDataset,
    classifier: FeatureClassifier,
    classifier_accuracy: float = float("nan"),
    seed: int = 0,
) -> QualityReport:
    """Score generated ``samples`` (N, C, H, W) in [-1, 1] against ``held_out`` real images."""
    check_image_range(samples)
    count = len(samples)
    if count > len(real_train):
        raise ValueError(
            f"{count} samples but only {len(real_train)} real training images to compare "
            "with at the same count; draw fewer samples"
        )
    reference = _batched(classifier.features, held_out.images)
    generated_logits = _batched(classifier, samples)
    generated = _batched(classifier.features, samples)
    order = torch.randperm(len(real_train), generator=torch.Generator().manual_seed(seed))[:count]
    real = _batched(classifier.features, real_train.images[order])
    distance = frechet_distance(generated, reference)
    real_distance = frechet_distance(real, reference)
    probabilities = generated_logits.softmax(dim=1)
    histogram = torch.bincount(probabilities.argmax(dim=1), minlength=probabilities.shape[1]).double() / count
    nonzero = histogram[histogram > 0]
    entropy = -(nonzero * nonzero.log()).sum().item() / math.log(len(histogram))
    return QualityReport(
        frechet_distance=distance,
        real_frechet_distance=real_distance,
        ratio=distance / max(real_distance, 1e-12),
        class_coverage=(histogram >= 0.01).double().mean().item(),
        class_entropy=entropy,
        mean_confidence=probabilities.max(dim=1).values.mean().item(),
        num_samples=count,
        classifier_accuracy=classifier_accuracy,
    )


@torch.no_grad()
def class_accuracy(classifier: FeatureClassifier, samples: torch.Tensor, requested_labels: torch.Tensor) -> float:
    """The share of samples that the feature classifier puts in the class they were asked for (notebook 06)."""
    requested_labels = torch.as_tensor(requested_labels).cpu()
    if requested_labels.shape != (len(samples),):
        raise ValueError(f"need one requested label per sample, got {tuple(requested_labels.shape)} for {len(samples)}")
    predicted = _batched(classifier, samples).argmax(dim=1).cpu()
    return (predicted == requested_labels).double().mean().item()


def _batched(function, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    device = next(iter(getattr(function, "__self__", function).parameters())).device
    outputs = [function(images[i : i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(outputs)
