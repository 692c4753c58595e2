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

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from coursekit.attributes import AttributeReader, adherence, wilson_interval
from coursekit.checkpoints import CheckpointError, float_weights, half_weights, load_checkpoint, load_model_weights
from coursekit.device import pick_device
from coursekit.glyphs import make_glyphs, vocabulary
from coursekit.latent import (
    Autoencoder,
    AutoencoderConfig,
    decode_latents,
    encode_dataset,
    glyph_autoencoder_config,
    glyph_latent_unet_config,
    load_autoencoder,
    train_autoencoder,
)
from coursekit.prompts import PromptEncoder, prompt_loss, with_prompt_guidance
from coursekit.samplers import get_sampler
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
    batch_size: int = 128  # for the mini-CLIP and the U-Net
    autoencoder_batch_size: int = 64  # full-resolution convolutions: a smaller batch
    prompt_dropout: float = 0.1  # share of empty prompts while the U-Net trains
    autoencoder_width: int = 16  # channels at full resolution
    unet_width: int = 48
    precision: str = "auto"
    device: str = "auto"
    seed: int = 0
    progress: bool = False  # a progress bar for each part

    def to_dict(self) -> dict:
        return asdict(self)

    def recipe(self) -> dict:
        """What is trained, without where and how it is shown (stored, and compared on resuming)."""
        return {key: value for key, value in self.to_dict().items() if key not in ("device", "progress")}


def _part_config(config: TextToImageConfig, steps: int, learning_rate: float, batch_size: int = 0) -> TrainConfig:
    return TrainConfig(
        max_steps=steps, batch_size=batch_size or config.batch_size, learning_rate=learning_rate, warmup_steps=50,
        precision=config.precision, device=config.device, seed=config.seed, progress=config.progress,
        checkpoint_every_minutes=2.0,
    )  # fmt: skip


def _data_settings(config: TextToImageConfig, batch_size: int = 0) -> dict:
    """What a part's training draws from: stored with it, so that resuming on other data is refused
    (the step counts may grow: resuming with more steps trains on)."""
    return {"images": config.images, "seed": config.seed, "batch_size": batch_size or config.batch_size}


def train_clip(run_dir: str | Path, config: TextToImageConfig | None = None, glyphs=None) -> TrainState:
    """Train (or resume) the first part alone, the mini-CLIP, into ``run_dir/clip``: what
    :func:`train_text_to_image` does first, so that a later call to it carries on from there."""
    config = config or TextToImageConfig()
    glyphs = glyphs if glyphs is not None else make_glyphs(config.images, seed=config.seed)
    tokenizer = Tokenizer(vocabulary())
    text_config = TextConfig(len(tokenizer))
    torch.manual_seed(config.seed)
    metadata = {"text_config": text_config.to_dict(), "tokenizer": tokenizer.to_dict(), "data": _data_settings(config)}
    settings = _part_config(config, config.clip_steps, 2e-3)
    model = MiniCLIP(text_config)
    return train(model, caption_tensors(glyphs, tokenizer), clip_loss(), settings, run_dir=Path(run_dir) / "clip",
                 metadata=metadata)  # fmt: skip


def load_clip(run: str | Path, device: str | torch.device | None = None) -> tuple[MiniCLIP, Tokenizer]:
    """The mini-CLIP of a text-to-image run (its ``clip`` part may be the only one trained yet) or bundle,
    with its tokenizer."""
    folder = Path(run) / "clip"
    payload = _read_part(folder, PARTS["clip"]) if folder.is_dir() else read_parts(run)["clip"]
    return _clip_and_tokenizer(payload, run, device)


def _clip_and_tokenizer(payload: dict, run: str | Path, device) -> tuple[MiniCLIP, Tokenizer]:
    words = payload["metadata"]["tokenizer"]
    clip = build_clip(payload, f"{run} (mini-CLIP)").to(pick_device(device))
    return clip, Tokenizer(words["words"], words["max_length"])


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
    states["clip"] = train_clip(run_dir, config, glyphs)
    # 2. The autoencoder: glyphs <-> codes
    states["autoencoder"] = train_autoencoder(
        glyphs, run_dir / "autoencoder", glyph_autoencoder_config(config.autoencoder_width),
        _part_config(config, config.autoencoder_steps, 1e-3, config.autoencoder_batch_size),
        extra_metadata={"data": _data_settings(config, config.autoencoder_batch_size)},
    )  # fmt: skip
    # 3. The U-Net on the scaled codes, reading the frozen text encoder's token vectors
    prompts = PromptEncoder(tokenizer, build_clip(_read_part(run_dir / "clip", PARTS["clip"])).text)
    latents = encode_dataset(load_autoencoder(run_dir / "autoencoder", device="cpu"), glyphs)
    schedule = make_schedule("linear", 1000)  # codes cannot be clipped: see coursekit.latent
    unet_config = glyph_latent_unet_config(config.unet_width, context_dim=prompts.context_dim)
    torch.manual_seed(config.seed)
    unet_metadata = {
        "model_config": unet_config.to_dict(),
        "schedule": {"name": "linear", "num_steps": 1000},
        "latent_scale": latents.scale,
        "text_to_image": config.recipe(),
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


SHIPPED_NAME = "shipped-text-to-image"  # the bundle inside coursekit, as --run names it (coursekit.runs.SHIPPED_RUNS)
PARTS = {"clip": "text_config", "autoencoder": "autoencoder_config", "unet": "latent_scale"}  # part -> its key


def read_parts(run: str | Path) -> dict[str, dict]:
    """The three parts' checkpoints (``ema`` weights and ``metadata`` each): from a run folder of
    :func:`train_text_to_image`, or from one file written by :func:`bundle_parts`."""
    from coursekit.runs import checkpoint_path

    run = checkpoint_path(run) if str(run) == SHIPPED_NAME else Path(run)
    if run.is_file():
        parts = load_checkpoint(run).get("parts")
        if not isinstance(parts, dict) or set(parts) != set(PARTS):
            raise CheckpointError(f"{run} is no text-to-image bundle (it needs the parts {sorted(PARTS)})")
        return parts
    return {part: _read_part(run / part, needed) for part, needed in PARTS.items()}


def is_text_to_image(run: str | Path) -> bool:
    """Whether ``run`` names a text-to-image model: a run folder of :func:`train_text_to_image`, or the shipped one."""
    folder = Path(run)
    return str(run) == SHIPPED_NAME or ((folder / "unet").is_dir() and (folder / "clip").is_dir())


def _read_part(folder: Path, needed: str) -> dict:
    path = folder / CHECKPOINT_NAME
    if not path.is_file():
        run = str(folder.parent)
        raise CheckpointError(f"no checkpoint at {path}; train it first with train_text_to_image({run!r})")
    payload = load_checkpoint(path)
    if needed not in (payload.get("metadata") or {}):
        raise CheckpointError(f"{path} holds no {needed!r}; it was not written by train_text_to_image")
    return {"ema": payload["ema"], "metadata": payload["metadata"], "step": payload["step"]}


def bundle_parts(run_dir: str | Path) -> dict:
    """The three parts' EMA weights (fp16, half the size) and settings as one payload for one file."""
    parts = read_parts(run_dir)
    for payload in parts.values():
        payload["ema"] = half_weights(payload["ema"])
    return {"parts": parts}


def build_clip(payload: dict, source: str | Path = "mini-CLIP") -> MiniCLIP:
    """The mini-CLIP of a part's checkpoint (its EMA weights), in eval mode."""
    model = MiniCLIP(TextConfig(**payload["metadata"]["text_config"]))
    load_model_weights(model, float_weights(payload["ema"]), source)
    return model.eval()


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
        frames: int = 0,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Images (N, 3, 32, 32) in [-1, 1] for the prompts, sampled as codes and decoded; with ``frames``,
        also about that many decoded snapshots of the way there (for an animation)."""
        device = next(self.unet.parameters()).device
        x_T = torch.randn(len(captions), 4, 8, 8, generator=torch.Generator().manual_seed(seed)).to(device)
        model = with_prompt_guidance(self.unet, self.prompts.to(device), list(captions), guidance_scale)
        steps = list(get_sampler(sampler)(model, self.schedule, x_T, num_steps=num_steps, clip_x0=False))
        keep = set(range(len(steps) - 1, -1, -max(1, len(steps) // frames))) if frames else set()
        kept = [step.x for index, step in enumerate(steps) if index in keep]
        snapshots = [decode_latents(self.autoencoder, codes, self.latent_scale) for codes in kept]
        return decode_latents(self.autoencoder, steps[-1].x, self.latent_scale), snapshots


@torch.no_grad()
def word_attention_maps(pipeline: TextToImage, caption: str, num_steps: int = 25, guidance_scale: float = 3.0,
                        seed: int = 0) -> tuple[list[str], torch.Tensor, torch.Tensor]:  # fmt: skip
    """Where each word of ``caption`` looked while one image was painted.

    Returns ``(words, maps, image)``: ``maps`` is (steps, words, 8, 8), the cross-attention weight from each
    position of the 8x8 code to each word, averaged over the heads and over the cross-attention blocks at
    full code resolution, at every sampling step (the prompted half of each guided call); ``image`` is
    the painted image (3, 32, 32).
    """
    words = caption.split()
    unet, device = pipeline.unet, next(pipeline.unet.parameters()).device
    model = with_prompt_guidance(unet, pipeline.prompts.to(device), [caption], guidance_scale)
    per_step = []

    def recording_model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = model(x_t, t)
        per_step.append(unet.word_maps(count=1)[0, : len(words)].cpu())  # the prompted half's image
        return eps

    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed)).to(device)
    steps = list(get_sampler("ddim")(recording_model, pipeline.schedule, x_T, num_steps=num_steps, clip_x0=False))
    image = decode_latents(pipeline.autoencoder, steps[-1].x, pipeline.latent_scale)[0]
    return words, torch.stack(per_step), image


@dataclass
class AdherenceReport:
    """What a prompt set's images show, read by the attribute reader (:mod:`coursekit.attributes`)."""

    shares: dict[str, float]  # per attribute, the share of images that show what the prompt asked for
    count: int  # prompts (one image each)
    clip_score: float  # the mini-CLIP's mean cosine similarity of each image with its prompt
    ms_per_image: float  # sampling and decoding, in batches of all the prompts

    def interval(self, attribute: str) -> tuple[float, float]:
        """The 95 % Wilson interval of one attribute's share."""
        return wilson_interval(self.shares[attribute], self.count)

    def describe(self, attribute: str) -> str:
        low, high = self.interval(attribute)
        return f"{self.shares[attribute]:.2f} [{low:.2f}, {high:.2f}]"


def prompt_sets(count: int = 200) -> dict[str, list]:
    """The three sets of prompts that adherence is measured on (fixed seeds, so every report uses the same):
    single characters of seen colour-character pairs, of held-out pairs, and two characters of seen pairs."""
    return {
        "seen pairs": make_glyphs(count, seed=50, two_fraction=0.0).scenes,
        "held-out pairs": make_glyphs(count, seed=51, split="held_out", two_fraction=0.0).scenes,
        "two characters": make_glyphs(count, seed=52, two_fraction=1.0).scenes,
    }


def measure_adherence(pipeline: TextToImage, reader: AttributeReader, scenes: list, guidance_scale: float = 3.0,
                      num_steps: int = 25, seed: int = 1) -> AdherenceReport:  # fmt: skip
    """Paint one image per scene's caption and read back what it shows (timed)."""
    captions = [scene.caption for scene in scenes]
    started = time.perf_counter()
    images, _ = pipeline.generate(captions, guidance_scale=guidance_scale, num_steps=num_steps, seed=seed)
    milliseconds = 1000 * (time.perf_counter() - started) / len(captions)
    clip_score = pipeline.clip.score(images, pipeline.prompts.ids(captions).to(images.device)).mean().item()
    return AdherenceReport(adherence(reader.read(images), scenes), len(scenes), clip_score, milliseconds)


def load_text_to_image(run: str | Path, device: str | torch.device | None = None) -> TextToImage:
    """Read back the three parts trained by :func:`train_text_to_image` (a run folder or a bundle file)."""
    parts, device = read_parts(run), pick_device(device)
    clip, tokenizer = _clip_and_tokenizer(parts["clip"], run, device)
    prompts = PromptEncoder(tokenizer, clip.text)
    autoencoder = Autoencoder(AutoencoderConfig(**parts["autoencoder"]["metadata"]["autoencoder_config"]))
    load_model_weights(autoencoder, float_weights(parts["autoencoder"]["ema"]), f"{run} (autoencoder)")
    metadata = parts["unet"]["metadata"]
    unet = UNet(UNetConfig(**metadata["model_config"]))
    load_model_weights(unet, float_weights(parts["unet"]["ema"]), f"{run} (U-Net)")
    schedule = make_schedule(metadata["schedule"]["name"], metadata["schedule"]["num_steps"])
    return TextToImage(
        unet.to(device).eval(), schedule, prompts, autoencoder.to(device).eval(), metadata["latent_scale"], clip
    )
