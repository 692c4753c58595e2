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


# ----------------------------------------------------------------------------- the U-Net, drawn


def unet_shapes(model, image_size: int) -> dict[str, tuple[int, ...]]:
    """The shape (C, H, W) after each part of a :class:`coursekit.unet.UNet`, read from a real forward
    pass of one blank image with hooks: ``stem``, ``down 0..``, ``middle``, ``up 0..`` (lowest level
    first, as the up path runs) and ``head``."""
    parts = {"stem": model.stem} | {f"down {i}": level for i, level in enumerate(model.down_levels)}
    parts |= {"middle": model.middle_out} | {f"up {i}": level for i, level in enumerate(model.up_levels)}
    parts["head"] = model.head
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        part.register_forward_hook(lambda module, inputs, output, name=name: shapes.__setitem__(name, output.shape[1:]))
        for name, part in parts.items()
    ]
    config = model.config
    x = torch.zeros(1, config.in_channels, image_size, image_size, device=next(model.parameters()).device)
    context = None
    if config.context_dim is not None:
        context = torch.zeros(1, 1, config.context_dim, device=x.device)
    labels = torch.zeros(1, dtype=torch.long, device=x.device) if config.num_classes else None
    try:
        with torch.no_grad():
            model(x, torch.zeros(1, dtype=torch.long, device=x.device), class_labels=labels, context=context)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: tuple(shapes[name]) for name in parts}


def draw_unet(model, image_size: int, ax=None):
    """A diagram of a U-Net with the shape at each level, from :func:`unet_shapes`: the down path on the
    left, the middle at the bottom, the up path on the right, skip connections across. Returns the axes."""
    plt = _pyplot()
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    shapes = unet_shapes(model, image_size)
    levels = len(model.down_levels)
    attention = [model.config.has_attention(level) for level in range(levels)]
    if ax is None:
        _, ax = plt.subplots(figsize=(10, 1.3 * levels + 2.2))

    def box(name: str, x: float, y: float, label: str, colour: str) -> None:
        channels, height, width = shapes[name]
        text = f"{label}\n{channels} x {height} x {width}"
        ax.add_patch(FancyBboxPatch((x - 1.15, y - 0.38), 2.3, 0.76, boxstyle="round,pad=0.04", fc=colour, ec="0.3"))
        ax.text(x, y, text, ha="center", va="center", fontsize=9)

    def arrow(start: tuple, end: tuple, style: str = "-|>", colour: str = "0.25", dashed: bool = False) -> None:
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=12, color=colour, lw=1.3,
                                     linestyle="--" if dashed else "-"))  # fmt: skip

    top, right = levels + 0.4, 5.2  # the stem and head row; the up path's column
    box("stem", 0, top, "image in -> stem", "#dde8f5")
    for level in range(levels):
        note = " + attention" if attention[level] else ""
        box(f"down {level}", 0, levels - 1 - level, f"down level {level}{note}", "#c9dcf0")
        up_index = levels - 1 - level  # the up path runs from the lowest level up
        box(f"up {up_index}", right, levels - 1 - level, f"up level {level}{note}", "#f5dcc9")
    box("middle", right / 2, -1.1, "middle: res, attention, res", "#e6e6e6")
    box("head", right, top, "head -> predicted noise", "#f0e4c9")
    arrow((0, top - 0.4), (0, levels - 1 + 0.4))
    for level in range(levels - 1):
        arrow((0, levels - 1 - level - 0.4), (0, levels - 2 - level + 0.4))  # downsample: half the size
        arrow((right, levels - 2 - level + 0.4), (right, levels - 1 - level - 0.4))  # upsample: twice the size
    arrow((0.3, -0.4), (right / 2 - 0.6, -0.72))
    arrow((right / 2 + 0.6, -0.72), (right - 0.3, -0.4))
    arrow((right, levels - 1 + 0.4), (right, top - 0.4))
    for level in range(levels):
        y = levels - 1 - level
        arrow((1.2, y), (right - 1.2, y), colour="#b05a1a", dashed=True)
    ax.text(right / 2, levels - 1 + 0.55, "skip connections\n(concatenated)", ha="center", fontsize=8, color="#b05a1a")
    ax.text(-1.45, (levels - 1) / 2, "down: halve the size", rotation=90, ha="center", va="center", fontsize=8)
    ax.text(right + 1.45, (levels - 1) / 2, "up: double the size", rotation=90, ha="center", va="center", fontsize=8)
    ax.set(xlim=(-1.7, right + 1.7), ylim=(-1.7, top + 0.6), aspect="equal")
    ax.axis("off")
    return ax
