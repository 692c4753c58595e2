"""Pictures: image grids, a noising strip and schedule plots (every notebook)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from coursekit.data import check_image_range, to_unit_range
from coursekit.forward import add_noise
from coursekit.schedules import NoiseSchedule


def _pyplot():
    """pyplot, imported late so that the package loads fast where nothing is drawn."""
    import matplotlib.pyplot as plt

    return plt


def image_grid(images: torch.Tensor, ncols: int | None = None, padding: int = 1) -> torch.Tensor:
    """Tile a batch (N, C, H, W) in [-1, 1] into one (C, H', W') image in [0, 1]."""
    check_image_range(images, tolerance=float("inf"))
    count, channels, height, width = images.shape
    ncols = ncols or max(1, int(count**0.5 + 0.999))
    nrows = -(-count // ncols)
    grid = torch.ones(channels, nrows * (height + padding) + padding, ncols * (width + padding) + padding)
    pictures = to_unit_range(images.detach().float().cpu())
    for index in range(count):
        row, col = divmod(index, ncols)
        top, left = padding + row * (height + padding), padding + col * (width + padding)
        grid[:, top : top + height, left : left + width] = pictures[index]
    return grid


def grid_to_pil(grid: torch.Tensor, scale: int = 1):
    """A (C, H, W) image in [0, 1] as a PIL image, enlarged ``scale`` times (nearest neighbour)."""
    from PIL import Image

    pixels = (grid.clamp(0, 1) * 255).round().byte()
    if pixels.shape[0] == 1:
        picture = Image.fromarray(pixels[0].numpy(), mode="L")
    else:
        picture = Image.fromarray(pixels.permute(1, 2, 0).numpy(), mode="RGB")
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    return picture


def save_image_grid(images: torch.Tensor, path: str | Path, ncols: int | None = None, scale: int = 4) -> Path:
    """Save a batch in [-1, 1] as one PNG grid; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_to_pil(image_grid(images, ncols), scale).save(path)
    return path


def save_animation(
    frames: Sequence[torch.Tensor],
    path: str | Path,
    ncols: int | None = None,
    scale: int = 4,
    frame_ms: int = 80,
    hold_last_ms: int = 1500,
) -> Path:
    """Save a list of batches (each (N, C, H, W) in [-1, 1]) as an animated GIF of grids."""
    if not frames:
        raise ValueError("need at least one frame to animate")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pictures = [grid_to_pil(image_grid(frame.clamp(-1, 1), ncols), scale) for frame in frames]
    durations = [frame_ms] * (len(pictures) - 1) + [hold_last_ms]
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=durations, loop=0)
    return path


def show_images(
    images: torch.Tensor,
    ncols: int | None = None,
    title: str | None = None,
    ax=None,
    size: float = 4.0,
):
    """Show a batch in [-1, 1] as a grid with matplotlib; returns the axes."""
    plt = _pyplot()
    grid = image_grid(images, ncols)
    if ax is None:
        _, ax = plt.subplots(figsize=(size, size))
    if grid.shape[0] == 1:
        ax.imshow(grid[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(grid.permute(1, 2, 0).numpy())
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax


def show_noising(
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: Sequence[int],
    generator: torch.Generator | None = None,
):
    """One image (C, H, W) at several noise levels, left to right; returns the figure."""
    plt = _pyplot()
    if x0.ndim != 3:
        raise ValueError(f"show_noising takes one image (C, H, W), got shape {tuple(x0.shape)}")
    t = torch.tensor(list(timesteps), dtype=torch.long)
    x_t, _ = add_noise(x0.expand(len(t), *x0.shape).clone(), t, schedule, generator=generator)
    figure, axes = plt.subplots(1, len(t), figsize=(1.6 * len(t), 1.9))
    for ax, image, step in zip(list(getattr(axes, "flat", [axes])), x_t, t.tolist()):
        show_images(image[None].clamp(-1, 1), ax=ax, title=f"t={step}")
    figure.tight_layout()
    return figure


def plot_schedules(schedules: Sequence[NoiseSchedule]):
    """alpha_bar and log-SNR against t for each schedule; returns the figure."""
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    for schedule in schedules:
        steps = torch.arange(schedule.num_steps)
        left.plot(steps.numpy(), schedule.alpha_bar.numpy(), label=schedule.name)
        right.plot(steps.numpy(), schedule.snr().log().numpy(), label=schedule.name)
    left.set(xlabel="timestep t", ylabel="alpha_bar_t (signal kept)", title="How much signal is left")
    right.set(xlabel="timestep t", ylabel="log SNR", title="Signal-to-noise ratio")
    left.legend()
    figure.tight_layout()
    return figure
