"""Controlled generation, measured: classifier guidance on the digits, self-guidance on the mini Stable Diffusion.

    python benchmarks/controlled_generation.py                  # about 3 minutes on a 2-core CPU
    python benchmarks/controlled_generation.py --skip-classifier

1. Classifier guidance (coursekit.guidance): a noise-aware classifier trained here on noised digits steers
   the shipped *unconditional* digits model towards asked digits. Per scale: the share of samples the
   yardstick's classifier reads as the asked digit, and KID with its interval.
2. Self-guidance (coursekit.self_guidance) on the shipped text-to-image model: single-character prompts
   ("a small green 3 in the middle"), each asked to move its colour word's object left or right by 0.2 of
   the width, or up or down, and to grow to twice or shrink to half its area. The truth is read from the
   pixels (the ink of a glyph drawn on black): achieved displacement along the asked direction, area ratio,
   the attention energy before and after, and what the edit costs in character and colour adherence
   (the shipped attribute reader) and in CLIP score. Intervals: 95 % (t for means, Wilson for shares).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from coursekit.attributes import adherence, load_attribute_reader, wilson_interval
from coursekit.glyphs import CHARACTERS, COLOURS, parse_caption
from coursekit.self_guidance import Move, Resize, ink_centroid_and_area, self_guided_generate
from coursekit.text_to_image import load_text_to_image


def mean_interval(values: list[float]) -> str:
    mean = statistics.fmean(values)
    half = 1.96 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]"


def share(hits: list[bool]) -> str:
    value = sum(hits) / len(hits)
    low, high = wilson_interval(value, len(hits))
    return f"{value:.2f} [{low:.2f}, {high:.2f}]"


def classifier_guidance(scales: list[float], samples: int) -> None:
    from coursekit.data import load_dataset
    from coursekit.guidance import NoisyClassifier, classifier_energy, gradient_guidance, noisy_classifier_loss
    from coursekit.quality import Yardstick
    from coursekit.runs import load_shipped_model
    from coursekit.samplers import ddim_sample
    from coursekit.training import TrainConfig, train

    run = load_shipped_model(device="cpu")
    started = time.perf_counter()
    torch.manual_seed(0)
    config = TrainConfig(max_steps=1500, batch_size=128, learning_rate=2e-3, warmup_steps=50, ema_decay=0.0,
                         precision="fp32", device="cpu", progress=False)  # fmt: skip
    classifier = train(NoisyClassifier(), load_dataset("digits"), noisy_classifier_loss(run.schedule), config)
    classifier = classifier.ema_model.eval().requires_grad_(False)
    print(f"noise-aware classifier: {(time.perf_counter() - started) / 60:.1f} min")
    yardstick = Yardstick.for_dataset("digits")
    asked = torch.arange(samples) % 10
    for scale in scales:
        started = time.perf_counter()
        guided = gradient_guidance(run.model, run.schedule, classifier_energy(classifier, asked), scale)
        x_T = torch.randn(samples, 1, 16, 16, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            images = ddim_sample(guided, run.schedule, x_T, num_steps=50).clamp(-1, 1)
        milliseconds = 1000 * (time.perf_counter() - started) / samples
        report = yardstick.score(images)
        accuracy = yardstick.class_accuracy(images, asked)
        low, high = wilson_interval(accuracy, samples)
        print(f"classifier guidance {scale:>4g}: asked digit {accuracy:.2f} [{low:.2f}, {high:.2f}]; "
              f"{report.summary().splitlines()[0]}; {milliseconds:.1f} ms/image")  # fmt: skip


def self_guidance(weights: list[float], seed: int) -> None:
    pipeline = load_text_to_image("shipped-text-to-image", device="cpu")
    reader = load_attribute_reader()
    generator = torch.Generator().manual_seed(seed)
    colours = list(COLOURS)
    prompts = []
    for _ in range(12):
        character = CHARACTERS[torch.randint(len(CHARACTERS), (1,), generator=generator).item()]
        colour = colours[torch.randint(len(colours), (1,), generator=generator).item()]
        prompts.append(f"a small {colour} {character} in the middle")
    moves = {"left": (0.3, 0.5), "right": (0.7, 0.5), "up": (0.5, 0.3), "down": (0.5, 0.7)}
    jobs = []  # (caption, edit, what was asked)
    for index, caption in enumerate(prompts):
        colour = caption.split()[2]
        for name in (("left", "right"), ("up", "down"))[index % 2]:
            jobs.append((caption, Move(colour, to=moves[name]), name))
        for factor in (2.0, 0.5):
            jobs.append((caption, Resize(colour, factor), factor))
    captions = [caption for caption, _, _ in jobs]
    scenes = [parse_caption(caption) for caption in captions]
    print(f"{sum(isinstance(e, Move) for _, e, _ in jobs)} prompt-and-move pairs, "
          f"{sum(isinstance(e, Resize) for _, e, _ in jobs)} prompt-and-resize pairs")  # fmt: skip
    for weight in weights:
        started = time.perf_counter()
        result = self_guided_generate(pipeline, captions, [edit for _, edit, _ in jobs], weight=weight, seed=seed)
        milliseconds = 1000 * (time.perf_counter() - started) / len(jobs)  # both runs
        (centre_before, area_before), (centre_after, area_after) = (
            ink_centroid_and_area(result.unguided),
            ink_centroid_and_area(result.guided),
        )
        along, ratios, moved_half = [], [], []
        for i, (_, edit, asked) in enumerate(jobs):
            if isinstance(edit, Move):
                axis = 0 if asked in ("left", "right") else 1
                sign = -1 if asked in ("left", "up") else 1
                wanted = abs(edit.to[axis] - 0.5)
                achieved = sign * (centre_after[i, axis] - centre_before[i, axis]).item()
                along.append(achieved / wanted)
                moved_half.append(achieved >= wanted / 2)
            else:
                ratio = (area_after[i].clamp_min(1e-3) / area_before[i].clamp_min(1e-3)).item()  # no ink counts as 1e-3
                ratios.append(math.log(ratio) / math.log(asked))
        before = adherence(reader.read(result.unguided), scenes)
        after = adherence(reader.read(result.guided), scenes)
        ids = pipeline.prompts.ids(captions)
        clip_before = pipeline.clip.score(result.unguided, ids).mean().item()
        clip_after = pipeline.clip.score(result.guided, ids).mean().item()
        energy = result.unguided_energies.mean().item(), result.guided_energies.mean().item()
        print(f"weight {weight:g}: moves achieved {mean_interval(along)} of the asked displacement "
              f"(at least half of it: {share(moved_half)}); resizes achieved {mean_interval(ratios)} of the asked "
              f"log area ratio; attention energy {energy[0]:.3f} -> {energy[1]:.3f}; character "
              f"{before['character']:.2f} -> {after['character']:.2f}, colour {before['colour']:.2f} -> "
              f"{after['colour']:.2f}; CLIP score {clip_before:.3f} -> {clip_after:.3f}; "
              f"{milliseconds:.0f} ms an image for both runs")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0, 3.0])
    parser.add_argument("--samples", type=int, default=359)
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.15, 0.3, 0.45, 0.6])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-classifier", action="store_true")
    args = parser.parse_args()
    if not args.skip_classifier:
        classifier_guidance(args.scales, args.samples)
    self_guidance(args.weights, args.seed)


if __name__ == "__main__":
    main()
