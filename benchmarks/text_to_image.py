"""The miniature Stable Diffusion, measured: training minutes per part, prompt adherence, CLIP score, speed.

    python benchmarks/text_to_image.py --run runs/text-to-image          # trains (or resumes), then measures
    python benchmarks/text_to_image.py --run runs/text-to-image --prompts 50 --scales 1 3   # quicker

Adherence is read by the attribute reader (coursekit.attributes), trained here on glyphs of every pair
of colour and character; it is reported per attribute for single-character prompts of seen pairs, of
held-out pairs, and for two-character prompts, against the guidance scale. Each share comes with a
95 % Wilson interval. The CLIP score is the mini-CLIP's cosine similarity between each image and its prompt.
"""

from __future__ import annotations

import argparse
import math
import time

from coursekit.attributes import ATTRIBUTES, adherence, train_attribute_reader
from coursekit.glyphs import make_glyphs
from coursekit.text_to_image import TextToImageConfig, load_text_to_image, train_text_to_image
from coursekit.training import TrainConfig


def wilson(share: float, count: int) -> tuple[float, float]:
    """The 95 % Wilson interval of a share measured on ``count`` trials."""
    if count == 0 or math.isnan(share):
        return float("nan"), float("nan")
    z = 1.96
    centre = (share + z * z / (2 * count)) / (1 + z * z / count)
    half = z * math.sqrt(share * (1 - share) / count + z * z / (4 * count * count)) / (1 + z * z / count)
    return centre - half, centre + half


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/text-to-image")
    parser.add_argument("--prompts", type=int, default=200, help="prompts per set (default: %(default)s)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0, 7.5])
    parser.add_argument("--unet-steps", type=int, default=TextToImageConfig.unet_steps)
    args = parser.parse_args()

    train_text_to_image(args.run, TextToImageConfig(unet_steps=args.unet_steps, precision="fp32"))
    pipeline = load_text_to_image(args.run, device="cpu")
    started = time.perf_counter()
    reader = train_attribute_reader(
        20_000, TrainConfig(max_steps=1500, batch_size=128, learning_rate=2e-3, warmup_steps=50, ema_decay=0.0,
                            precision="fp32", device="cpu", progress=False),
    )  # fmt: skip
    print(f"attribute reader: {(time.perf_counter() - started) / 60:.1f} min")
    real = make_glyphs(1000, seed=99, split="any")
    real_shares = adherence(reader.read(real.images), real.scenes)
    print("reader on real glyphs: " + ", ".join(f"{name} {share:.3f}" for name, share in real_shares.items()))

    sets = {
        "seen, one character": make_glyphs(args.prompts, seed=50, two_fraction=0.0).scenes,
        "held-out, one character": make_glyphs(args.prompts, seed=51, split="held_out", two_fraction=0.0).scenes,
        "seen, two characters": make_glyphs(args.prompts, seed=52, two_fraction=1.0).scenes,
    }
    for scale in args.scales:
        for name, scenes in sets.items():
            captions = [scene.caption for scene in scenes]
            started = time.perf_counter()
            images, _ = pipeline.generate(captions, guidance_scale=scale, num_steps=25, seed=1)
            milliseconds = 1000 * (time.perf_counter() - started) / len(captions)
            shares = adherence(reader.read(images), scenes)
            clip = pipeline.clip.score(images, pipeline.prompts.ids(captions)).mean().item()
            parts = []
            for attribute in ATTRIBUTES:
                share = shares[attribute]
                if not math.isnan(share):
                    low, high = wilson(share, len(scenes))
                    parts.append(f"{attribute} {share:.2f} [{low:.2f}, {high:.2f}]")
            print(f"w={scale:<4} {name:<24} {milliseconds:5.1f} ms/image  CLIP {clip:.3f}  " + "; ".join(parts))


if __name__ == "__main__":
    main()
