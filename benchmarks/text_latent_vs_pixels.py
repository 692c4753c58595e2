"""Stable Diffusion's secret ingredient on the glyphs: latent against pixel space, at equal training minutes.

    python benchmarks/text_latent_vs_pixels.py --run runs/text-to-image     # after benchmarks/text_to_image.py

Two text-conditioned U-Nets read the same frozen text encoder (the run's mini-CLIP) and train in turns,
a chunk of minutes at a time: one on the run's 8x8x4 codes, one on the 32x32x3 pixels. After each
chunk both paint the same prompts (guidance 3, DDIM 25 steps) and the attribute reader scores them.
Printed: steps per second, sampling milliseconds per image, and character and colour adherence with
95 % Wilson intervals, for single-character prompts of seen pairs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from coursekit.attributes import adherence, load_attribute_reader, wilson_interval
from coursekit.glyphs import make_glyphs, vocabulary
from coursekit.latent import decode_latents, encode_dataset, glyph_latent_unet_config, glyph_pixel_unet_config
from coursekit.prompts import prompt_loss, with_prompt_guidance
from coursekit.samplers import final_state, get_sampler
from coursekit.schedules import make_schedule
from coursekit.text import Tokenizer
from coursekit.text_to_image import TextToImageConfig, load_text_to_image
from coursekit.training import TrainConfig, train
from coursekit.unet import UNet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/text-to-image", help="a text-to-image run (its CLIP, autoencoder)")
    parser.add_argument("--out", default="runs/latent-vs-pixels")
    parser.add_argument("--minutes", type=float, nargs="+", default=[2.5, 5.0, 10.0], help="cumulative budgets")
    parser.add_argument("--prompts", type=int, default=200)
    args = parser.parse_args()

    pipeline = load_text_to_image(args.run, device="cpu")
    recipe = TextToImageConfig()
    glyphs = make_glyphs(recipe.images, seed=recipe.seed)
    ids = Tokenizer(vocabulary()).encode(glyphs.captions)
    latents = encode_dataset(pipeline.autoencoder, glyphs)
    reader = load_attribute_reader()  # the shipped judge (tools/make_attribute_reader.py)
    scenes = make_glyphs(args.prompts, seed=50, two_fraction=0.0).scenes
    captions = [scene.caption for scene in scenes]
    context_dim = pipeline.prompts.context_dim
    spaces = {
        "latent 8x8x4": (glyph_latent_unet_config(recipe.unet_width, context_dim), latents.images,
                         make_schedule("linear", 1000), (4, 8, 8)),
        "pixels 32x32x3": (glyph_pixel_unet_config(32, context_dim), glyphs.images, make_schedule("cosine", 1000),
                           (3, 32, 32)),
    }  # fmt: skip
    models = {}
    for name, (config, _, _, _) in spaces.items():
        torch.manual_seed(0)
        models[name] = UNet(config)
        print(f"{name}: U-Net of {sum(p.numel() for p in models[name].parameters()) / 1e6:.2f} M parameters")
    for budget in args.minutes:
        for name, (_, data, schedule, shape) in spaces.items():
            folder = Path(args.out) / name.split()[0]
            settings = TrainConfig(
                max_steps=None, max_minutes=budget, batch_size=recipe.batch_size, learning_rate=1e-3, warmup_steps=50,
                precision="fp32", device="cpu", progress=False, checkpoint_every_minutes=None,
            )  # fmt: skip
            state = train(models[name], (data, ids), prompt_loss(schedule, pipeline.prompts, recipe.prompt_dropout),
                          settings, run_dir=folder)  # fmt: skip
            model = state.ema_model.eval()
            started = time.perf_counter()
            with torch.no_grad():
                x_T = torch.randn(len(captions), *shape, generator=torch.Generator().manual_seed(1))
                guided = with_prompt_guidance(model, pipeline.prompts, captions, 3.0)
                is_latent = shape[0] == 4
                steps = get_sampler("ddim")(guided, schedule, x_T, num_steps=25, clip_x0=not is_latent)
                images = final_state(steps)
                images = decode_latents(pipeline.autoencoder, images, pipeline.latent_scale) if is_latent else images
            milliseconds = 1000 * (time.perf_counter() - started) / len(captions)
            shares = adherence(reader.read(images.clamp(-1, 1)), scenes)
            parts = []
            for attribute in ("character", "colour", "position"):
                low, high = wilson_interval(shares[attribute], len(scenes))
                parts.append(f"{attribute} {shares[attribute]:.2f} [{low:.2f}, {high:.2f}]")
            print(f"{budget:5.1f} min  {name:<15} {state.step:>6,} steps ({state.step / state.elapsed_seconds:.1f}/s)  "
                  f"{milliseconds:5.1f} ms/image  " + "; ".join(parts), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
