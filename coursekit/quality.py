"""The course's yardstick: a sample-quality score that needs no download and that real images cannot beat.

The standard FID compares Inception-network features of generated and real images, and the Inception
weights must be downloaded. Here a small classifier trained on the course's own dataset supplies the
features instead. What makes the score honest is which images each part sees:

* the real images are split four ways (:func:`split_real_images`), and the feature classifier is
  trained on its own part only;
* samples are compared with a *reference* part that the classifier never saw;
* the *floor* is real-vs-real: a third part, also unseen, compared with the reference at the same
  sample count. Samples can only come out better than it by chance, and its interval says how much
  chance;
* a fourth part (the held-out images, unseen by the diffusion model too) is kept for the self-check
  :meth:`Yardstick.score_real`, which scores real images as if they were samples.

Each :class:`QualityReport` has the Kernel Inception Distance (KID, unbiased, so 0 means "as close as
real images") with a bootstrap interval, the Fréchet distance beside its floor, a permutation test that
says whether the samples can be told apart from real images at this sample count, and the share of
samples that are near-copies of a training image.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from coursekit.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from coursekit.data import ImageDataset, check_image_range, load_dataset
from coursekit.distances import (
    frechet_distance,
    kernel_inception_distance,
    kid_interval,
    mmd_permutation_test,
    nearest_neighbours,
)

MAX_SAMPLES = 2000  # the largest sample count scored (the kernels are N x N matrices)
MIN_SAMPLES = 10
MIN_REFERENCE = 600  # real images the samples are compared with, at least
MIN_CLASSIFIER = 300  # real images the feature classifier learns from, at least
SPLIT_SEED = 1234  # fixed: every run of the course splits the real images the same way
NEAR_COPY_SHARE = 0.05  # the share of unseen real images counted as near-copies, by construction
SIGNIFICANCE = 0.05  # below this p-value, samples and real images can be told apart
CLASSIFIER_EPOCHS = 60  # on the 479 digits of the classifier part: about 97 % held-out accuracy, 6 s
CACHE_VARIABLE = "COURSEKIT_YARDSTICK_CACHE"  # a folder for the classifier, shared by every run
YARDSTICK_VERSION = 2  # in the cache file's name: a new protocol never reads an old classifier


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
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state as it was
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
def class_accuracy(classifier: FeatureClassifier, samples: torch.Tensor, requested_labels: torch.Tensor) -> float:
    """The share of samples that the feature classifier puts in the class they were asked for (notebook 08)."""
    requested_labels = torch.as_tensor(requested_labels).cpu()
    if requested_labels.shape != (len(samples),):
        raise ValueError(f"need one requested label per sample, got {tuple(requested_labels.shape)} for {len(samples)}")
    predicted = _batched(classifier, samples).argmax(dim=1).cpu()
    return (predicted == requested_labels).double().mean().item()


# ----------------------------------------------------------------------------- the real images, four ways


@dataclass
class RealSplits:
    """Disjoint parts of a dataset's real images, each with one job."""

    classifier: ImageDataset  # trains the feature network, and nothing else
    reference: ImageDataset  # what samples (and the floor) are compared with
    floor: ImageDataset  # real images scored like samples: the best a score can honestly be
    held_out: ImageDataset  # the dataset's held-out images: the self-check, and near-copy distances
    training: ImageDataset  # the diffusion model's training images (classifier, reference and floor)

    @property
    def max_samples(self) -> int:
        """The most samples one report can score: the floor needs as many real images."""
        return min(len(self.floor), len(self.held_out))


def split_real_images(name: str = "digits", root: str | Path = "data", download: bool = True) -> RealSplits:
    """Split a dataset's real images for the yardstick (fixed seed, so always the same way).

    The training split (what ``load_dataset(name)`` returns, and so what the course's models learn
    from) is cut into floor, reference and classifier parts; the held-out split stays whole. For the
    built-in digits (1,438 + 359 images): floor 359, reference 600, classifier 479, held-out 359.
    """
    training = load_dataset(name, root=root, train=True, download=download)
    held_out = load_dataset(name, root=root, train=False, download=download)
    floor_size = min(len(held_out), MAX_SAMPLES)
    reference_size = max(floor_size, MIN_REFERENCE)
    classifier_size = len(training) - floor_size - reference_size
    if classifier_size < MIN_CLASSIFIER:
        raise ValueError(
            f"{name!r} has {len(training)} training images: too few to split into a floor ({floor_size}), "
            f"a reference ({reference_size}) and at least {MIN_CLASSIFIER} for the feature classifier"
        )
    order = torch.randperm(len(training), generator=torch.Generator().manual_seed(SPLIT_SEED))
    return RealSplits(
        classifier=training.subset(order[floor_size + reference_size :]),
        reference=training.subset(order[floor_size : floor_size + reference_size]),
        floor=training.subset(order[:floor_size]),
        held_out=held_out.subset(torch.randperm(len(held_out), generator=torch.Generator().manual_seed(SPLIT_SEED))),
        training=training,
    )


# ----------------------------------------------------------------------------- the report


@dataclass
class QualityReport:
    """The score of a set of images, beside what real images score at the same count."""

    kid: float  # Kernel Inception Distance to the reference (unbiased: about 0 for real images)
    kid_low: float  # its 95 % bootstrap interval
    kid_high: float
    kid_standard_error: float
    floor_kid: float  # real images (the floor part) against the reference, same count
    floor_kid_low: float
    floor_kid_high: float
    fd: float  # Fréchet distance to the reference (biased upwards at small counts)
    floor_fd: float  # the same for real images: the Fréchet floor
    p_value: float  # permutation test of "these come from the distribution of the real images"
    distinguishable: bool  # p_value below SIGNIFICANCE: told apart from real images at this count
    near_copies: float  # share of samples closer to a training image than 95 % of unseen real images are
    near_copies_expected: float  # what unseen real images give, by construction (0.05)
    class_coverage: float  # share of classes that at least 1 % of the samples fall in
    class_entropy: float  # entropy of the predicted class histogram / log(classes) (1 = balanced)
    num_samples: int
    classifier_accuracy: float  # the feature classifier's accuracy on the held-out images

    def to_dict(self) -> dict:
        return asdict(self)

    def samples_to_tell_apart_from_real(self) -> int | None:
        """About how many samples a KID interval would need to exclude 0, if KID stayed where it is.

        ``None`` when KID is at or below 0: no count would then separate the samples from real images.
        """
        if self.kid <= 0:
            return None
        return math.ceil(self.num_samples * (1.96 * self.kid_standard_error / self.kid) ** 2)

    def verdict(self) -> str:
        """In words: can these images be told apart from real ones at this sample count?"""
        count = f"{self.num_samples} samples"
        if self.distinguishable:
            return f"at {count}, these can be told apart from real images (p = {self.p_value:.3f})"
        needed = self.samples_to_tell_apart_from_real()
        more = (
            f"; telling them apart would take about {needed:,} samples if KID stayed at {self.kid:.4f}"
            if needed is not None
            else "; KID is at or below 0, as for real images"
        )
        return f"at {count}, these cannot be told apart from real images (p = {self.p_value:.2f}){more}"

    def summary(self) -> str:
        return (
            f"KID {self.kid:.4f} [{self.kid_low:.4f}, {self.kid_high:.4f}] vs real images "
            f"{self.floor_kid:.4f} [{self.floor_kid_low:.4f}, {self.floor_kid_high:.4f}]; "
            f"Fréchet {self.fd:.3f} vs real {self.floor_fd:.3f}; near-copies {self.near_copies:.0%} "
            f"(unseen real images: {self.near_copies_expected:.0%}); classes covered {self.class_coverage:.0%}; "
            f"{self.verdict()}"
        )


def samples_to_separate(a: QualityReport, b: QualityReport, z: float = 1.96) -> int | None:
    """About how many samples each would need for the KID intervals of two settings to separate.

    The standard error shrinks as 1 / sqrt(samples); ``None`` when the two KIDs are equal. A result at
    or below the count already used means they are separated now.
    """
    gap = abs(a.kid - b.kid)
    if gap == 0:
        return None
    spread = z * math.sqrt(a.kid_standard_error**2 + b.kid_standard_error**2)
    return math.ceil(max(a.num_samples, b.num_samples) * (spread / gap) ** 2)


def kid_intervals_overlap(a: QualityReport, b: QualityReport) -> bool:
    """True when the two reports' KID intervals overlap: this sample count does not separate them."""
    return a.kid_low <= b.kid_high and b.kid_low <= a.kid_high


# ----------------------------------------------------------------------------- the yardstick


class Yardstick:
    """A dataset's quality score: the feature classifier and the real images it never saw.

    Build one with :meth:`for_dataset`; then :meth:`score` any images (N, C, H, W) in [-1, 1].
    """

    def __init__(self, splits: RealSplits, classifier: FeatureClassifier, accuracy: float, seed: int = 0):
        self.splits = splits
        self.classifier = classifier.eval()
        self.accuracy = accuracy
        self.seed = seed
        self._reference = self.features(splits.reference.images)
        self._floor = self.features(splits.floor.images)
        held_out_distances, _ = nearest_neighbours(splits.held_out.images, splits.training.images)
        self.near_copy_distance = torch.quantile(held_out_distances, NEAR_COPY_SHARE).item()

    @classmethod
    def for_dataset(
        cls,
        name: str = "digits",
        root: str | Path = "data",
        cache_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
    ) -> Yardstick:
        """The yardstick of a dataset; with ``cache_dir`` its classifier is trained once and kept there.

        Without ``cache_dir``, the folder named by the environment variable ``COURSEKIT_YARDSTICK_CACHE``
        is used when it is set (one classifier shared by every run on a machine); else none.
        """
        cache_dir = cache_dir if cache_dir is not None else os.environ.get(CACHE_VARIABLE) or None
        splits = split_real_images(name, root=root)
        path = Path(cache_dir) / f"yardstick-v{YARDSTICK_VERSION}-{name}.pt" if cache_dir is not None else None
        if path is not None and path.exists():
            classifier, accuracy = _load_classifier(path, splits)
        else:
            classifier = train_classifier(splits.classifier, epochs=CLASSIFIER_EPOCHS)
            accuracy = class_accuracy(classifier, splits.held_out.images, splits.held_out.labels)
            if path is not None:
                save_checkpoint(
                    {
                        "weights": classifier.state_dict(),
                        "image_shape": list(splits.training.image_shape),
                        "num_classes": splits.training.num_classes,
                        "accuracy": accuracy,
                        "split_seed": SPLIT_SEED,
                    },
                    path,
                )
        return cls(splits, classifier.to(device), accuracy)

    @property
    def max_samples(self) -> int:
        return self.splits.max_samples

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return _batched(self.classifier.features, images).double()

    def check_count(self, count: int) -> None:
        """Refuse a sample count the yardstick cannot score, naming the limits."""
        if not MIN_SAMPLES <= count <= self.max_samples:
            raise ValueError(
                f"can score between {MIN_SAMPLES} and {self.max_samples} samples of {self.splits.training.name!r} "
                f"(the floor needs as many unseen real images), got {count}"
            )

    @torch.no_grad()
    def score(self, samples: torch.Tensor) -> QualityReport:
        """Score ``samples`` (N, C, H, W) in [-1, 1] against the reference, beside the floor at N."""
        if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
            raise ValueError("samples must be a batch of images (N, C, H, W) in [-1, 1]")
        if tuple(samples.shape[1:]) != tuple(self.splits.training.image_shape):
            raise ValueError(
                f"samples have shape {tuple(samples.shape[1:])}; this yardstick scores "
                f"{tuple(self.splits.training.image_shape)} images of {self.splits.training.name!r}"
            )
        check_image_range(samples)
        count = len(samples)
        self.check_count(count)
        samples = samples.detach().float().cpu()
        generated = self.features(samples)
        floor = self._floor[:count]
        kid_low, kid_high, kid_error = kid_interval(generated, self._reference, seed=self.seed)
        floor_low, floor_high, _ = kid_interval(floor, self._reference, seed=self.seed + 1)
        p_value = mmd_permutation_test(generated, self._reference, seed=self.seed)
        distances, _ = nearest_neighbours(samples, self.splits.training.images)
        probabilities = _batched(self.classifier, samples).softmax(dim=1)
        histogram = torch.bincount(probabilities.argmax(dim=1), minlength=probabilities.shape[1]).double() / count
        nonzero = histogram[histogram > 0]
        entropy = -(nonzero * nonzero.log()).sum().item() / math.log(len(histogram))
        return QualityReport(
            kid=kernel_inception_distance(generated, self._reference),
            kid_low=kid_low,
            kid_high=kid_high,
            kid_standard_error=kid_error,
            floor_kid=kernel_inception_distance(floor, self._reference),
            floor_kid_low=floor_low,
            floor_kid_high=floor_high,
            fd=frechet_distance(generated, self._reference),
            floor_fd=frechet_distance(floor, self._reference),
            p_value=p_value,
            distinguishable=p_value < SIGNIFICANCE,
            near_copies=(distances < self.near_copy_distance).double().mean().item(),
            near_copies_expected=NEAR_COPY_SHARE,
            class_coverage=(histogram >= 0.01).double().mean().item(),
            class_entropy=entropy,
            num_samples=count,
            classifier_accuracy=self.accuracy,
        )

    def score_real(self, count: int) -> QualityReport:
        """The self-check: ``count`` held-out real images, which took no part in the metric, scored as samples."""
        self.check_count(count)
        return self.score(self.splits.held_out.images[:count])

    def nearest_training_images(self, samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's nearest training image (pixel distance) and that distance: is it a new image?"""
        distances, indices = nearest_neighbours(samples.detach().float().cpu(), self.splits.training.images)
        return self.splits.training.images[indices], distances

    def class_accuracy(self, samples: torch.Tensor, requested_labels: torch.Tensor) -> float:
        return class_accuracy(self.classifier, samples, requested_labels)


def _load_classifier(path: Path, splits: RealSplits) -> tuple[FeatureClassifier, float]:
    payload = load_checkpoint(path)
    shape, classes = list(splits.training.image_shape), splits.training.num_classes
    if payload.get("image_shape") != shape or payload.get("num_classes") != classes:
        raise CheckpointError(f"{path} was trained for other images; delete it to retrain")
    if payload.get("split_seed") != SPLIT_SEED:
        raise CheckpointError(f"{path} was trained on another split of the real images; delete it to retrain")
    classifier = FeatureClassifier(shape[0], classes)
    classifier.load_state_dict(payload["weights"])
    return classifier.eval(), float(payload["accuracy"])


def _batched(function, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    device = next(iter(getattr(function, "__self__", function).parameters())).device
    with torch.no_grad():
        outputs = [function(images[i : i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(outputs)
