"""Latent diffusion: compress the images first, then diffuse the small codes (notebook 09).

Stable Diffusion's secret ingredient (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models", arXiv:2112.10752) is that the diffusion model never sees pixels. An
autoencoder, trained once and then frozen, squeezes a 512x512x3 image into a 64x64x4 latent code
(a downsampling factor f = 8, so 48 times fewer numbers), the U-Net learns to denoise those codes,
and the decoder turns a sampled code back into an image. Two details make it work:

- the autoencoder is regularised, so its codes have no holes the decoder has never seen: SD uses
  a small KL penalty towards N(0, I) (the paper's "KL-reg", Sec. 3.1);
- the codes are multiplied by a constant to give them unit standard deviation, the scale the
  noise schedule assumes (Sec. 4.3.2 and Appendix G): SD's famous ``0.18215`` is 1 / (the std
  of its latents), measured on a batch of training images.

Sections are numbered from arXiv:2112.10752v2.

We do the same in miniature: 16x16x1 digits become 4x4x4 codes (f = 4, 256 numbers -> 64). The
autoencoder here is a plain one, trained with a little Gaussian noise added to its codes, so
that the decoder learns to tolerate the small errors a diffusion model's samples will have. The
scale is 1 / (the std of the codes of the training set), passed unchanged to held-out codes.

The pipeline: :func:`train_autoencoder` -> :func:`load_autoencoder` -> :func:`encode_dataset`
-> :func:`train_latent_diffusion` -> ``coursekit.runs.generate(model, schedule, latents.image_shape,
count, clip_x0=False)`` -> :func:`decode_latents`. The clip must be off: clipping the x0 guess to
[-1, 1] suits pixels, but unit-std latent codes regularly lie outside that range.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from coursekit.checkpoints import CheckpointError, float_weights, load_checkpoint, load_model_weights
from coursekit.device import pick_device
from coursekit.runs import train_diffusion
from coursekit.training import CHECKPOINT_NAME, TrainConfig, TrainState, train
from coursekit.unet import UNetConfig, group_norm

# ----------------------------------------------------------------------------- the autoencoder


@dataclass
class AutoencoderConfig:
    """The knobs of :class:`Autoencoder`. The defaults turn 16x16 digits into 4x4x4 codes."""

    in_channels: int = 1  # image channels
    latent_channels: int = 4  # channels of the latent code
    base_channels: int = 16  # channels at full resolution; doubled at every downsample (16, 32, 64)
    num_downsamples: int = 2  # each halves height and width: 16x16 -> 4x4

    def __post_init__(self) -> None:
        if min(self.in_channels, self.latent_channels, self.base_channels) < 1:
            raise ValueError(
                "in_channels, latent_channels and base_channels must be positive, got "
                f"{self.in_channels}, {self.latent_channels} and {self.base_channels}"
            )
        if self.num_downsamples < 0:
            raise ValueError(f"num_downsamples must be >= 0, got {self.num_downsamples}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def downsampling_factor(self) -> int:
        """The paper's f: how many times smaller the code is than the image, along each side."""
        return 2**self.num_downsamples


class ConvBlock(nn.Sequential):
    """A 3x3 convolution, GroupNorm and SiLU: (B, C_in, H, W) -> (B, C_out, H/stride, W/stride)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1),
            group_norm(out_channels),
            nn.SiLU(),
        )


class Autoencoder(nn.Module):
    """Images (B, C, H, W) in [-1, 1] <-> latent codes (B, latent_channels, H/f, W/f), f = 2**num_downsamples.

    The encoder is a stem convolution, then per resolution a :class:`ConvBlock` and a stride-2
    ConvBlock that halves the size and doubles the channels, then a 1x1 convolution to the code's
    channels. The decoder mirrors it, growing the size with nearest-neighbour upsampling followed
    by a ConvBlock, and ends in tanh so that its images always lie in [-1, 1]. No attention and no
    residual connections: at 16x16 a few convolutions are enough (notebook 09).
    """

    def __init__(self, config: AutoencoderConfig | None = None, **overrides):
        super().__init__()
        if config is None:
            config = AutoencoderConfig(**overrides)
        elif overrides:
            config = AutoencoderConfig(**{**config.to_dict(), **overrides})
        self.config = config
        levels = config.num_downsamples
        widths = [config.base_channels * 2**level for level in range(levels + 1)]  # e.g. 16, 32, 64

        # 1. Encoder: (B, C, H, W) -> (B, latent_channels, H/f, W/f)
        encoder: list[nn.Module] = [nn.Conv2d(config.in_channels, widths[0], 3, padding=1)]
        for level in range(levels):
            encoder.append(ConvBlock(widths[level], widths[level]))
            encoder.append(ConvBlock(widths[level], widths[level + 1], stride=2))  # halve H and W
        encoder.append(ConvBlock(widths[-1], widths[-1]))
        encoder.append(nn.Conv2d(widths[-1], config.latent_channels, 1))
        self.encoder = nn.Sequential(*encoder)

        # 2. Decoder, the mirror image: (B, latent_channels, H/f, W/f) -> (B, C, H, W) in [-1, 1]
        decoder: list[nn.Module] = [nn.Conv2d(config.latent_channels, widths[-1], 3, padding=1)]
        decoder.append(ConvBlock(widths[-1], widths[-1]))
        for level in reversed(range(levels)):
            decoder.append(nn.Upsample(scale_factor=2, mode="nearest"))  # double H and W
            decoder.append(ConvBlock(widths[level + 1], widths[level]))
            decoder.append(ConvBlock(widths[level], widths[level]))
        decoder.append(nn.Conv2d(widths[0], config.in_channels, 3, padding=1))
        decoder.append(nn.Tanh())
        self.decoder = nn.Sequential(*decoder)

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """The shape (c, h, w) of the code of one image of shape (C, H, W)."""
        channels, height, width = image_shape
        factor = self.config.downsampling_factor
        if channels != self.config.in_channels:
            raise ValueError(
                f"this autoencoder takes images with {self.config.in_channels} channel(s), got {channels}; "
                f"build it with in_channels={channels}"
            )
        if height % factor or width % factor:
            raise ValueError(
                f"image height and width must be divisible by 2**num_downsamples = {factor}, got {height}x{width}; "
                "use fewer downsamples (28x28 works with 2, not 3), or pad or crop the images"
            )
        return (self.config.latent_channels, height // factor, width // factor)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images in [-1, 1] -> (B, latent_channels, H/f, W/f) codes (not yet scaled)."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(
                f"encode expects images of shape (B, {self.config.in_channels}, H, W), got {shape}; "
                "a single image needs a batch dimension (x[None])"
            )
        self.latent_shape(tuple(images.shape[1:]))  # raises on a wrong channel count or size
        return self.encoder(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, latent_channels, h, w) codes -> (B, C, h*f, w*f) images in [-1, 1]."""
        channels = self.config.latent_channels
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[1] != channels:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"decode expects latent codes of shape (B, {channels}, h, w), got {shape}")
        return self.decoder(latents)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The reconstruction ``decode(encode(images))``, same shape as ``images``."""
        return self.decode(self.encode(images))


def autoencoder_loss(latent_noise: float = 0.1):
    """The ``loss_fn(model, batch, generator)`` that :func:`coursekit.training.train` expects.

    1. encode the images (``batch`` is ``(images,)`` or ``(images, labels)``; labels are ignored);
    2. add ``latent_noise`` times standard Gaussian noise to the codes, so that the decoder learns
       to turn slightly-wrong codes into clean images (our stand-in for SD's KL regulariser);
    3. decode, and take the mean squared error against the original images.

    The noise is fixed, the codes are not: a plain autoencoder can drown the noise by growing its
    codes, and slowly does (on the digits, after 300 steps their std was 0.84 without noise and 1.5
    with 0.1; after 1500 steps with 0.1, 2.6). SD's KL term pins the codes' size instead.
    """
    if not (latent_noise >= 0 and math.isfinite(latent_noise)):
        raise ValueError(f"latent_noise must be a finite number >= 0 (0: a plain autoencoder), got {latent_noise}")

    def loss_fn(model: Autoencoder, batch: tuple, generator: torch.Generator | None = None) -> torch.Tensor:
        images = batch[0]
        # 1. Encode: (B, C, H, W) -> (B, c, h, w)
        latents = model.encode(images)
        # 2. Noise drawn on the generator's device, then moved, so a seed gives the same draws everywhere
        draw_device = generator.device if generator is not None else latents.device
        noise = torch.randn(latents.shape, generator=generator, device=draw_device)
        noisy_latents = latents + latent_noise * noise.to(latents.device, latents.dtype)
        # 3. Decode and compare: (B, C, H, W)
        reconstruction = model.decode(noisy_latents)
        return F.mse_loss(reconstruction.float(), images.float())

    return loss_fn


# ----------------------------------------------------------------------------- run folders


def train_autoencoder(
    dataset,
    run_dir: str | Path,
    config: AutoencoderConfig | None = None,
    train_config: TrainConfig | None = None,
    latent_noise: float = 0.1,
    callback: Callable[[TrainState], None] | None = None,
    extra_metadata: dict | None = None,
) -> TrainState:
    """Train an :class:`Autoencoder` on ``dataset`` (an ImageDataset) into ``run_dir``.

    A run folder that already holds a checkpoint is resumed exactly, like every run folder; the
    settings (with ``extra_metadata``) are stored beside the weights, and resuming with other settings
    is refused.
    """
    channels = dataset.image_shape[0]
    config = config or AutoencoderConfig(in_channels=channels)
    model = Autoencoder(config)
    model.latent_shape(dataset.image_shape)  # fail now, not at the first batch, on a wrong size
    metadata = {
        "autoencoder_config": config.to_dict(),
        "dataset": dataset.name,
        "image_shape": list(dataset.image_shape),
        "latent_noise": latent_noise,
        **(extra_metadata or {}),
    }
    loss_fn = autoencoder_loss(latent_noise)
    return train(model, dataset, loss_fn, train_config, run_dir=run_dir, callback=callback, metadata=metadata)


def _read_autoencoder_checkpoint(run_dir: str | Path) -> tuple[dict, Path]:
    """The checkpoint payload of an autoencoder run folder, or a CheckpointError saying what is there."""
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(
            f"no autoencoder checkpoint at {path}; train one first with train_autoencoder(dataset, {str(run_dir)!r})"
        )
    payload = load_checkpoint(path)
    metadata = payload.get("metadata") or {}
    if "autoencoder_config" not in metadata:
        is_diffusion_run = "model_config" in metadata
        hint = " It holds a diffusion model: load that with coursekit.runs.load_run." if is_diffusion_run else ""
        raise CheckpointError(f"{path} holds no autoencoder settings; it was not written by train_autoencoder.{hint}")
    return payload, path


def load_autoencoder(run_dir: str | Path, device: str | torch.device | None = None) -> Autoencoder:
    """The autoencoder trained in ``run_dir``, with its EMA weights, in eval mode."""
    payload, path = _read_autoencoder_checkpoint(run_dir)
    model = Autoencoder(AutoencoderConfig(**payload["metadata"]["autoencoder_config"]))
    weights = float_weights(payload["ema"])
    load_model_weights(model, weights, path)
    return model.to(pick_device(device)).eval()


# ----------------------------------------------------------------------------- latent codes


@dataclass
class LatentDataset:
    """The scaled latent codes of an image dataset: what the latent diffusion model trains on.

    It has the fields of an ImageDataset, so :func:`coursekit.runs.train_diffusion` and
    :func:`coursekit.training.train` accept it as they are; only the [-1, 1] range is not required.
    """

    images: torch.Tensor  # (N, c, h, w) scaled codes; "images" because to the diffusion model they are
    labels: torch.Tensor  # (N,) int64 class indices, as in the image dataset
    class_names: list[str]  # name of each class index
    name: str  # e.g. "digits-latent"
    scale: float  # the codes were multiplied by this to have unit std (SD's 0.18215)

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.ndim != 4 or not self.images.is_floating_point():
            shape = tuple(self.images.shape) if isinstance(self.images, torch.Tensor) else type(self.images).__name__
            raise ValueError(f"latent codes must be a float tensor of shape (N, c, h, w), got {shape}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"need one label per code, got {tuple(self.labels.shape)} labels for {self.images.shape[0]} codes"
            )
        _check_scale(self.scale)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The shape (c, h, w) of one code: the "image shape" the diffusion model sees."""
        return tuple(self.images.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _check_scale(scale: float) -> None:
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite positive number (1 / the std of the training codes), got {scale!r}")


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_dataset(
    autoencoder: Autoencoder,
    dataset,
    batch_size: int = 500,
    scale: float | None = None,
) -> LatentDataset:
    """Encode every image of ``dataset`` and scale the codes; returns a :class:`LatentDataset` on the CPU.

    With ``scale=None`` the scale is 1 / (the std of all the codes), so the result has unit std:
    use that on the training set, then pass the same ``scale=train_latents.scale`` for held-out
    images, as SD uses one fixed 0.18215 for every image.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if scale is not None:
        _check_scale(scale)
    device = _device_of(autoencoder)
    # 1. Encode in batches on the autoencoder's device: (N, C, H, W) -> (N, c, h, w), kept on the CPU
    codes = torch.cat(
        [
            autoencoder.encode(dataset.images[start : start + batch_size].to(device)).float().cpu()
            for start in range(0, len(dataset), batch_size)
        ]
    )
    # 2. Scale to unit std: z / std(z) (LDM Appendix G; SD's 0.18215 is this 1 / std)
    if scale is None:
        scale = 1.0 / codes.double().std().item()
    return LatentDataset(
        images=codes * scale,
        labels=dataset.labels.clone(),
        class_names=list(dataset.class_names),
        name=f"{dataset.name}-latent",
        scale=float(scale),
    )


@torch.no_grad()
def decode_latents(
    autoencoder: Autoencoder,
    latents: torch.Tensor,
    scale: float,
    batch_size: int = 500,
) -> torch.Tensor:
    """Scaled codes (N, c, h, w) -> images (N, C, H, W) in [-1, 1], on the CPU.

    ``scale`` is the one the codes were made with (``LatentDataset.scale``, or the ``"latent"``
    entry of a latent diffusion run's metadata); the codes are divided by it before decoding.
    Sampled codes come from ``coursekit.runs.generate(..., clip_x0=False)``: latent codes are not
    confined to [-1, 1], so clipping the x0 guess would distort them.
    """
    _check_scale(scale)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = _device_of(autoencoder)
    images = [
        autoencoder.decode(latents[start : start + batch_size].to(device) / scale).float().cpu()
        for start in range(0, latents.shape[0], batch_size)
    ]
    return torch.cat(images)  # the decoder ends in tanh: already in [-1, 1]


# ----------------------------------------------------------------------------- diffusion on the codes


def latent_unet_config(latent_channels: int = 4) -> UNetConfig:
    """A U-Net for 4x4 codes: two levels (4x4 and 2x2), wider than the pixel U-Net, attention at 2x2.

    At 4x4 there are only 16 positions, so a wide network (about 2.1M parameters) still trains
    faster per step than the default pixel U-Net does on 16x16 digits.
    """
    return UNetConfig(
        in_channels=latent_channels,
        base_channels=64,
        channel_multipliers=(1, 2),
        attention_levels=(-1,),
    )


def glyph_autoencoder_config(width: int = 16) -> AutoencoderConfig:
    """For the 32x32x3 glyphs: two halvings, 4 code channels (3,072 numbers become 8x8x4 = 256)."""
    return AutoencoderConfig(in_channels=3, latent_channels=4, base_channels=width, num_downsamples=2)


def glyph_latent_unet_config(width: int = 48, context_dim: int | None = None) -> UNetConfig:
    """A U-Net for 8x8x4 codes: two levels (8x8, 4x4), self-attention at both, and cross-attention to a
    prompt's token vectors where ``context_dim`` is set (notebook 10)."""
    return UNetConfig(
        in_channels=4, base_channels=width, channel_multipliers=(1, 2), attention_levels=(0, 1), num_heads=4,
        context_dim=context_dim,
    )  # fmt: skip


def glyph_pixel_unet_config(width: int = 32, context_dim: int | None = None) -> UNetConfig:
    """The pixel-space counterpart, for measuring what the codes save: 32x32x3 glyphs, three levels
    (32, 16, 8), attention at 16x16 and 8x8."""
    return UNetConfig(
        in_channels=3, base_channels=width, channel_multipliers=(1, 2, 2), attention_levels=(1, 2), num_heads=4,
        context_dim=context_dim,
    )  # fmt: skip


def train_latent_diffusion(
    latents: LatentDataset,
    autoencoder_dir: str | Path,
    run_dir: str | Path,
    model_config: UNetConfig | None = None,
    train_config: TrainConfig | None = None,
    conditional: bool = False,
    label_dropout: float = 0.1,
    schedule_name: str = "linear",
    callback: Callable[[TrainState], None] | None = None,
) -> TrainState:
    """Train a U-Net noise predictor on the codes ``latents`` into ``run_dir`` (resuming if it holds a run).

    This is :func:`coursekit.runs.train_diffusion` on codes instead of pixels: nothing in the
    diffusion changes. The checkpoint's metadata gains ``"latent": {"scale", "autoencoder_dir"}``,
    everything needed to decode samples later. Sample with ``coursekit.runs.generate(...,
    clip_x0=False)``, then :func:`decode_latents` with that scale.

    The schedule defaults to ``"linear"``, not the pixel runs' ``"cosine"``. The x0 guess is
    ``(x_t - sqrt(1 - alpha_bar) eps_pred) / sqrt(alpha_bar)`` (DDPM Eq. 15 rearranged), and the
    1000-step cosine schedule ends at alpha_bar = 2.4e-9, so the first sampling step magnifies any
    error in eps_pred 20,000 times (the linear one ends at 4e-5: 160 times). Pixel runs hide this
    behind ``clip_x0``; codes cannot be clipped to [-1, 1], and on the digits a cosine run's samples
    blew up where a linear run's came out as digits. SD, too, uses a linear schedule (of sqrt(beta)).
    """
    # 1. The codes must be the ones this autoencoder makes
    payload, _ = _read_autoencoder_checkpoint(autoencoder_dir)
    autoencoder_metadata = payload["metadata"]
    autoencoder = Autoencoder(AutoencoderConfig(**autoencoder_metadata["autoencoder_config"]))
    expected = autoencoder.latent_shape(tuple(autoencoder_metadata["image_shape"]))
    if latents.image_shape != expected:
        raise ValueError(
            f"the codes have shape {latents.image_shape}, but the autoencoder in {autoencoder_dir} makes "
            f"codes of shape {expected}; encode the dataset with that autoencoder (encode_dataset)"
        )
    # 2. Diffusion as usual, with the scale and the autoencoder's folder stored for decoding
    return train_diffusion(
        latents,
        run_dir,
        model_config=model_config or latent_unet_config(latents.image_shape[0]),
        schedule_name=schedule_name,
        train_config=train_config,
        conditional=conditional,
        label_dropout=label_dropout,
        callback=callback,
        extra_metadata={"latent": {"scale": latents.scale, "autoencoder_dir": str(autoencoder_dir)}},
    )
