"""The miniature Stable Diffusion, measured: training minutes per part, prompt adherence, CLIP score, speed.

    python benchmarks/text_to_image.py --run runs/text-to-image          # trains (or resumes), then measures
    python benchmarks/text_to_image.py --run runs/text-to-image --prompts 50 --scales 1 3   # quicker

Adherence is read by the attribute reader that ships with coursekit (coursekit.attributes, trained on
glyphs of every pair of colour and character); it is reported per attribute for single-character prompts
of seen pairs, of held-out pairs, and for two-character prompts, against the guidance scale. Each share comes with a
95 % Wilson interval. The CLIP score is the mini-CLIP's cosine similarity between each image and its prompt.
"""

from __future__ import annotations

import argparse
import math

from coursekit.attributes import ATTRIBUTES, adherence, load_attribute_reader
from coursekit.glyphs import make_glyphs
from coursekit.text_to_image import (
    TextToImageConfig,
    load_text_to_image,
    measure_adherence,
    prompt_sets,
    train_text_to_image,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/text-to-image")
    parser.add_argument("--prompts", type=int, default=200, help="prompts per set (default: %(default)s)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0, 7.5])
    parser.add_argument("--unet-steps", type=int, default=TextToImageConfig.unet_steps)
    args = parser.parse_args()

    train_text_to_image(args.run, TextToImageConfig(unet_steps=args.unet_steps, precision="fp32"))
    pipeline = load_text_to_image(args.run, device="cpu")
    reader = load_attribute_reader()  # the shipped judge (tools/make_attribute_reader.py)
    real = make_glyphs(1000, seed=99, split="any")
    real_shares = adherence(reader.read(real.images), real.scenes)
    print("reader on real glyphs: " + ", ".join(f"{name} {share:.3f}" for name, share in real_shares.items()))

    for scale in args.scales:
        for name, scenes in prompt_sets(args.prompts).items():
            report = measure_adherence(pipeline, reader, scenes, guidance_scale=scale)
            parts = [f"{a} {report.describe(a)}" for a in ATTRIBUTES if not math.isnan(report.shares[a])]
            print(
                f"w={scale:<4} {name:<24} {report.ms_per_image:5.1f} ms/image  CLIP {report.clip_score:.3f}  "
                + "; ".join(parts)
            )


if __name__ == "__main__":
    main()
