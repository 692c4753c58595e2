"""A miniature Stable Diffusion: mini-CLIP, a latent autoencoder and a U-Net with cross-attention.

One run folder holds the three parts, each trained by the course's own loop and each its own run
folder, so that every part resumes where it stopped:

    run_dir/clip/          the mini-CLIP (coursekit.text); its text encoder, frozen, reads prompts
    run_dir/autoencoder/   32x32x3 glyphs <-> 8x8x4 codes (coursekit.latent), 12 times fewer numbers
    run_dir/unet/          the noise predictor on the codes, reading the prompt by cross-attention,
                           trained with a share of empty prompts (coursekit.prompts)

:func:`load_text_to_image` reads it back as a :class:`TextToImage`, which paints from prompts with
classifier-free guidance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from coursekit.checkpoints import CheckpointError, load_checkpoint, load_model_weights
from coursekit.device import pick_device
from coursekit.glyphs import make_glyphs, vocabulary
from coursekit.latent import (
    Autoencoder,
    AutoencoderConfig,
    decode_latents,
    encode_dataset,
    load_autoencoder,
    train_autoencoder,
)
from coursekit.prompts import PromptEncoder, prompt_loss, with_prompt_guidance
from coursekit.samplers import final_state, get_sampler
from coursekit.schedules import NoiseSchedule, make_schedule
from coursekit.text import MiniCLIP, TextConfig, Tokenizer, caption_tensors, clip_loss
from coursekit.training import CHECKPOINT_NAME, TrainConfig, TrainState, train
from coursekit.unet import UNet, UNetConfig


@dataclass
class TextToImageConfig:
    """What each part trains for. The defaults are the course's laptop recipe."""

    images: int = 10_000  # training glyphs, drawn once (coursekit.glyphs, held-out pairs left out)
    clip_steps: int = 800
    autoencoder_steps: int = 1500
    unet_steps: int = 3000
    batch_size: int = 128
    prompt_dropout: float = 0.1  # share of empty prompts while the U-Net trains
    unet_width: int = 64
    precision: str = "auto"
    device: str = "auto"
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def latent_text_unet_config(context_dim: int, width: int = 64) -> UNetConfig:
    """A U-Net for 8x8x4 codes: two levels (8x8, 4x4), self- and cross-attention at both."""
    return UNetConfig(
        in_channels=4, base_channels=width, channel_multipliers=(1, 2), attention_levels=(0, 1), num_heads=4,
        context_dim=context_dim,
    )  # fmt: skip


def glyph_autoencoder_config() -> AutoencoderConfig:
    """32x32x3 -> 8x8x4: two halvings, 4 code channels (3,072 numbers become 256)."""
    return AutoencoderConfig(in_channels=3, latent_channels=4, base_channels=32, num_downsamples=2)


def _part_config(config: TextToImageConfig, steps: int, learning_rate: float) -> TrainConfig:
    return TrainConfig(
        max_steps=steps, batch_size=config.batch_size, learning_rate=learning_rate, warmup_steps=50,
        precision=config.precision, device=config.device, seed=config.seed, progress=False,
        checkpoint_every_minutes=2.0,
    )  # fmt: skip


def train_text_to_image(run_dir: str | Path, config: TextToImageConfig | None = None, report=print) -> dict:
    """Train (or resume) the three parts in order; returns each part's :class:`TrainState`.

    ``report`` receives one line per finished part (its steps, minutes and final loss).
    """
    config = config or TextToImageConfig()
    run_dir = Path(run_dir)
    glyphs = make_glyphs(config.images, seed=config.seed)
    tokenizer = Tokenizer(vocabulary())
    states: dict[str, TrainState] = {}

    # 1. The mini-CLIP: images and captions into one space; its text encoder becomes the prompt reader
    text_config = TextConfig(len(tokenizer))
    torch.manual_seed(config.seed)
    clip = MiniCLIP(text_config)
    clip_metadata = {"text_config": text_config.to_dict(), "tokenizer": tokenizer.to_dict()}
    states["clip"] = train(clip, caption_tensors(glyphs, tokenizer), clip_loss(),
                           _part_config(config, config.clip_steps, 2e-3), run_dir=run_dir / "clip",
                           metadata=clip_metadata)  # fmt: skip
    # 2. The autoencoder: glyphs <-> codes
    states["autoencoder"] = train_autoencoder(
        glyphs, run_dir / "autoencoder", glyph_autoencoder_config(),
        _part_config(config, config.autoencoder_steps, 2e-3),
    )  # fmt: skip
    # 3. The U-Net on the scaled codes, reading the frozen text encoder's token vectors
    prompts = PromptEncoder(tokenizer, load_clip(run_dir / "clip").text)
    latents = encode_dataset(load_autoencoder(run_dir / "autoencoder", device="cpu"), glyphs)
    schedule = make_schedule("linear", 1000)  # codes cannot be clipped: see coursekit.latent
    unet_config = latent_text_unet_config(prompts.context_dim, config.unet_width)
    torch.manual_seed(config.seed)
    unet_metadata = {
        "model_config": unet_config.to_dict(),
        "schedule": {"name": "linear", "num_steps": 1000},
        "latent_scale": latents.scale,
        "text_to_image": config.to_dict(),
    }
    states["unet"] = train(
        UNet(unet_config), (latents.images, tokenizer.encode(glyphs.captions)),
        prompt_loss(schedule, prompts, config.prompt_dropout), _part_config(config, config.unet_steps, 1e-3),
        run_dir=run_dir / "unet", metadata=unet_metadata,
    )  # fmt: skip
    for part, state in states.items():
        loss = state.loss_history[-1][1] if state.loss_history else float("nan")
        report(f"{part:>11}: {state.step:,} steps in {state.elapsed_seconds / 60:.1f} min, final loss {loss:.4f}")
    return states


def load_clip(run_dir: str | Path, device: str | torch.device | None = "cpu") -> MiniCLIP:
    """The mini-CLIP trained in ``run_dir`` (its EMA weights), in eval mode."""
    payload = _payload(Path(run_dir), "text_config")
    model = MiniCLIP(TextConfig(**payload["metadata"]["text_config"]))
    load_model_weights(model, payload["ema"], Path(run_dir) / CHECKPOINT_NAME)
    return model.to(pick_device(device)).eval()


def load_tokenizer(run_dir: str | Path) -> Tokenizer:
    settings = _payload(Path(run_dir), "tokenizer")["metadata"]["tokenizer"]
    return Tokenizer(settings["words"], settings["max_length"])


def _payload(run_dir: Path, needed: str) -> dict:
    path = run_dir / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; train it first with train_text_to_image")
    payload = load_checkpoint(path)
    if needed not in (payload.get("metadata") or {}):
        raise CheckpointError(f"{path} holds no {needed!r}; it was not written by train_text_to_image")
    return payload


@dataclass
class TextToImage:
    """The three trained parts, ready to paint from prompts."""

    unet: UNet
    schedule: NoiseSchedule
    prompts: PromptEncoder
    autoencoder: Autoencoder
    latent_scale: float
    clip: MiniCLIP

    @torch.no_grad()
    def generate(
        self,
        captions: list[str],
        guidance_scale: float = 3.0,
        num_steps: int = 25,
        sampler: str = "ddim",
        seed: int = 0,
    ) -> torch.Tensor:
        """Images (N, 3, 32, 32) in [-1, 1] for the prompts, sampled in the codes' space, then decoded."""
        device = next(self.unet.parameters()).device
        generator = torch.Generator().manual_seed(seed)
        x_T = torch.randn(len(captions), 4, 8, 8, generator=generator).to(device)
        model = with_prompt_guidance(self.unet, self.prompts.to(device), list(captions), guidance_scale)
        codes = final_state(get_sampler(sampler)(model, self.schedule, x_T, num_steps=num_steps, clip_x0=False))
        return decode_latents(self.autoencoder, codes, self.latent_scale)


def load_text_to_image(run_dir: str | Path, device: str | torch.device | None = None) -> TextToImage:
    """Read back the three parts trained by :func:`train_text_to_image`."""
    run_dir, device = Path(run_dir), pick_device(device)
    clip = load_clip(run_dir / "clip", device)
    prompts = PromptEncoder(load_tokenizer(run_dir / "clip"), clip.text)
    payload = _payload(run_dir / "unet", "latent_scale")
    metadata = payload["metadata"]
    settings = metadata["model_config"]
    unet_config = UNetConfig(**{**settings, "channel_multipliers": tuple(settings["channel_multipliers"]),
                                "attention_levels": tuple(settings["attention_levels"])})  # fmt: skip
    unet = UNet(unet_config)
    load_model_weights(unet, payload["ema"], run_dir / "unet" / CHECKPOINT_NAME)
    schedule = make_schedule(metadata["schedule"]["name"], metadata["schedule"]["num_steps"])
    autoencoder = load_autoencoder(run_dir / "autoencoder", device)
    return TextToImage(unet.to(device).eval(), schedule, prompts, autoencoder, metadata["latent_scale"], clip)
