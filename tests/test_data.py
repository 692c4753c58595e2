import struct
import urllib.error

import pytest
import torch
import torchvision

from coursekit.data import (
    DatasetDownloadError,
    ImageDataset,
    check_image_range,
    from_unit_range,
    load_dataset,
    load_digits,
    make_points,
    to_unit_range,
)


def _write_idx(path, array, magic_type=0x08):
    header = struct.pack(">BBBB", 0, 0, magic_type, array.ndim) + b"".join(
        struct.pack(">I", size) for size in array.shape
    )
    path.write_bytes(header + array.numpy().astype("uint8").tobytes())


def _write_tiny_mnist(root, count=6):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = torch.zeros(count, 28, 28, dtype=torch.uint8)
    images[:, 10:18, 12:16] = 255  # a white bar
    images[0, 0, 0] = 0
    labels = torch.arange(count, dtype=torch.uint8) % 10
    for prefix in ("train", "t10k"):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return images, labels


def test_mnist_loads_from_tiny_idx_files_in_the_stated_range(tmp_path):
    images, labels = _write_tiny_mnist(tmp_path)
    dataset = load_dataset("mnist", root=tmp_path, train=True, download=False)
    assert dataset.images.shape == (6, 1, 28, 28) and dataset.images.dtype == torch.float32
    assert dataset.images.min().item() == -1.0 and dataset.images.max().item() == 1.0
    assert torch.equal(dataset.labels, labels.long())
    assert torch.equal(to_unit_range(dataset.images)[:, 0], images.float() / 255)
    assert dataset.class_names[3] == "3"
    test_split = load_dataset("mnist", root=tmp_path, train=False, download=True)  # files exist
    assert len(test_split) == 6


def test_a_failed_download_says_so_and_names_the_offline_dataset(tmp_path, monkeypatch):
    def offline(self):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    with pytest.raises(DatasetDownloadError, match="load_dataset\\('digits'\\)"):
        load_dataset("mnist", root=tmp_path)
    with pytest.raises(DatasetDownloadError, match="network"):
        load_dataset("fashion_mnist", root=tmp_path, download=False)


def test_builtin_digits_work_offline_with_labels_in_range():
    digits = load_digits(16)
    assert digits.images.shape == (1797, 1, 16, 16)
    assert digits.num_classes == 10 and set(digits.labels.tolist()) == set(range(10))
    check_image_range(digits.images)
    assert digits.images.min().item() == -1.0 and digits.images.max().item() == pytest.approx(1.0)
    train, held_out = load_dataset("digits", train=True), load_dataset("digits", train=False)
    assert len(train) + len(held_out) == 1797 and len(held_out) == 359
    assert torch.equal(load_dataset("digits", train=False).images, held_out.images)  # fixed split


def test_range_conversions_round_trip_and_wrong_ranges_are_caught():
    x = torch.rand(2, 1, 4, 4)
    assert torch.allclose(to_unit_range(from_unit_range(x)), x)
    with pytest.raises(ValueError, match=r"\[-1, 1\].*from_unit_range"):
        check_image_range(x * 255)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        ImageDataset(torch.zeros(3, 4, 4), torch.zeros(3, dtype=torch.long), ["a"], "bad")


def test_point_clouds_are_reproducible_and_named():
    for name in ("moons", "swiss_roll", "rings", "heart"):
        points = make_points(name, 500, generator=torch.Generator().manual_seed(1))
        assert points.shape == (500, 2) and points.abs().max() < 3
        assert torch.equal(points, make_points(name, 500, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="choose one of"):
        make_points("spiral")
    with pytest.raises(ValueError, match="choose one of"):
        load_dataset("imagenet")
