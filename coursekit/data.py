"""Data: 2-D point clouds for intuition, and image datasets in one value range (notebooks 00-03).

Every image tensor inside the package lives in **[-1, 1]**, shape (N, C, H, W), float32.
Convert at the edges only: :func:`to_unit_range` for showing or saving, :func:`from_unit_range`
for images that arrive in [0, 1]. A wrong range is the commonest reason samples come out as noise.

The built-in ``"digits"`` dataset ships inside scikit-learn (1,797 handwritten digits, 8x8,
scaled up to 16x16), so it works with no network at all. MNIST, Fashion-MNIST and CIFAR-10
download through torchvision on demand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

OFFLINE_DATASET = "digits"


# ----------------------------------------------------------------------------- 2-D points


def _moons(n: int, generator: torch.Generator) -> torch.Tensor:
    upper = n // 2
    angles = torch.rand(n, generator=generator, dtype=torch.float64) * math.pi
    x = torch.where(torch.arange(n) < upper, torch.cos(angles), 1 - torch.cos(angles))
    y = torch.where(torch.arange(n) < upper, torch.sin(angles), 0.5 - torch.sin(angles))
    return torch.stack([x - 0.5, y - 0.25], dim=1) * 1.6


def _swiss_roll(n: int, generator: torch.Generator) -> torch.Tensor:
    turns = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator, dtype=torch.float64))
    return torch.stack([turns * torch.cos(turns), turns * torch.sin(turns)], dim=1) / 7


def _rings(n: int, generator: torch.Generator) -> torch.Tensor:
    angles = 2 * math.pi * torch.rand(n, generator=generator, dtype=torch.float64)
    radius = torch.where(torch.arange(n) % 2 == 0, 0.6, 1.4).double()
    return torch.stack([radius * torch.cos(angles), radius * torch.sin(angles)], dim=1)


def _heart(n: int, generator: torch.Generator) -> torch.Tensor:
    s = 2 * math.pi * torch.rand(n, generator=generator, dtype=torch.float64)
    x = 16 * torch.sin(s) ** 3
    y = 13 * torch.cos(s) - 5 * torch.cos(2 * s) - 2 * torch.cos(3 * s) - torch.cos(4 * s)
    return torch.stack([x, y + 2.5], dim=1) / 10


POINT_CLOUDS = {"moons": _moons, "swiss_roll": _swiss_roll, "rings": _rings, "heart": _heart}


def make_points(
    name: str = "moons",
    n: int = 2000,
    noise: float = 0.03,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A 2-D point cloud of ``n`` points, shape (n, 2), float32, roughly within [-2, 2].

    ``name`` is one of ``"moons"``, ``"swiss_roll"``, ``"rings"`` or ``"heart"``; ``noise`` is
    the standard deviation of a little Gaussian jitter added to every point.
    """
    if name not in POINT_CLOUDS:
        raise ValueError(f"unknown point cloud {name!r}; choose one of {sorted(POINT_CLOUDS)}")
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    points = POINT_CLOUDS[name](n, generator)
    points = points + noise * torch.randn(points.shape, generator=generator, dtype=torch.float64)
    return points.float()


# ----------------------------------------------------------------------------- images


@dataclass
class ImageDataset:
    """Images in [-1, 1] with their labels; small enough to hold as one tensor."""

    images: torch.Tensor  # (N, C, H, W) float32 in [-1, 1]
    labels: torch.Tensor  # (N,) int64 class indices
    class_names: list[str]  # name of each class index
    name: str  # the dataset's name, as given to load_dataset

    def __post_init__(self) -> None:
        check_image_range(self.images)
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"need one label per image, got {tuple(self.labels.shape)} labels for {self.images.shape[0]} images"
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, held_out_fraction: float = 0.2, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
        """A reproducible random split into (training, held-out) datasets."""
        if not 0 < held_out_fraction < 1:
            raise ValueError(f"held_out_fraction must lie in (0, 1), got {held_out_fraction}")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        cut = len(self) - max(1, round(held_out_fraction * len(self)))
        return self.subset(order[:cut]), self.subset(order[cut:])

    def subset(self, indices: torch.Tensor) -> ImageDataset:
        return ImageDataset(self.images[indices], self.labels[indices], self.class_names, self.name)


class DatasetDownloadError(RuntimeError):
    """A dataset could not be downloaded; the message says what to do instead."""


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clipped: for showing and saving images."""
    return ((images + 1) / 2).clamp(0, 1)


def from_unit_range(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]: for images that arrive from a file or torchvision."""
    return images * 2 - 1


def check_image_range(images: torch.Tensor, tolerance: float = 1e-4) -> None:
    """Raise a ValueError unless ``images`` is a (N, C, H, W) float tensor within [-1, 1]."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor of shape (N, C, H, W), got {shape}")
    if images.numel() and (images.min() < -1 - tolerance or images.max() > 1 + tolerance):
        raise ValueError(
            f"images must lie in [-1, 1], got values from {float(images.min()):.3g} to "
            f"{float(images.max()):.3g}; convert [0, 1] images with from_unit_range(), "
            "and 0-255 images by dividing by 255 first"
        )


def load_digits(size: int = 16) -> ImageDataset:
    """scikit-learn's handwritten digits (1,797 images, 10 classes), resized to ``size`` x ``size``.

    Shipped inside scikit-learn: no download, ever. This is the course's offline dataset.
    """
    if size < 8:
        raise ValueError(f"size must be at least 8 (the originals are 8x8), got {size}")
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16  # (N, 1, 8, 8) in [0, 1]
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = from_unit_range(images.clamp(0, 1))
    labels = torch.tensor(bunch.target, dtype=torch.long)
    return ImageDataset(images, labels, [str(d) for d in range(10)], "digits")


TORCHVISION_DATASETS = {
    "mnist": ("MNIST", [str(d) for d in range(10)]),
    "fashion_mnist": (
        "FashionMNIST",
        [
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ],
    ),
    "cifar10": (
        "CIFAR10",
        ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
    ),
}


def load_torchvision(name: str, root: str | Path = "data", train: bool = True, download: bool = True) -> ImageDataset:
    """MNIST, Fashion-MNIST or CIFAR-10 through torchvision, downloaded into ``root`` on demand."""
    if name not in TORCHVISION_DATASETS:
        raise ValueError(f"unknown torchvision dataset {name!r}; choose one of {sorted(TORCHVISION_DATASETS)}")
    import torchvision

    class_name, class_names = TORCHVISION_DATASETS[name]
    dataset_class = getattr(torchvision.datasets, class_name)
    try:
        dataset = dataset_class(root=str(root), train=train, download=download)
    except (
        OSError,
        RuntimeError,
    ) as error:  # URLError is an OSError; torchvision raises RuntimeError
        raise DatasetDownloadError(
            f"could not load {name!r} into {Path(root).resolve()} ({error}). Check the network "
            f"connection, or place the files there by hand; to work offline, use the built-in "
            f"dataset instead: load_dataset({OFFLINE_DATASET!r})"
        ) from error
    pixels = torch.as_tensor(dataset.data)  # uint8: (N, H, W) or (N, H, W, 3) for CIFAR-10
    pixels = pixels[:, None] if pixels.ndim == 3 else pixels.permute(0, 3, 1, 2)
    images = from_unit_range(pixels.float() / 255)
    labels = torch.as_tensor(dataset.targets, dtype=torch.long)
    return ImageDataset(images.contiguous(), labels, class_names, name)


DATASETS = ("digits", "glyphs", *TORCHVISION_DATASETS)
GLYPHS_COUNT = {True: 10_000, False: 2_000}  # training and held-out images of the built-in glyphs


def load_dataset(
    name: str = OFFLINE_DATASET,
    root: str | Path = "data",
    train: bool = True,
    download: bool = True,
) -> ImageDataset:
    """Load an image dataset by name: ``"digits"`` and ``"glyphs"`` (offline), ``"mnist"``, ``"fashion_mnist"``,
    ``"cifar10"``.

    ``train=False`` gives the held-out images (the test files; for digits, a fixed 20% split; for glyphs,
    new images drawn from another seed, with the same pairs of colour and character as training:
    :func:`coursekit.glyphs.make_glyphs` makes any number, and the held-out pairs too).
    """
    if name == "glyphs":  # captioned characters drawn by code (coursekit.glyphs)
        from coursekit.glyphs import make_glyphs

        return make_glyphs(GLYPHS_COUNT[train], seed=0 if train else 1)
    if name == "digits":  # a fixed 80/20 split stands in for torchvision's train/test files
        training, held_out = load_digits().split(held_out_fraction=0.2, seed=0)
        return training if train else held_out
    if name in TORCHVISION_DATASETS:
        return load_torchvision(name, root=root, train=train, download=download)
    raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")
