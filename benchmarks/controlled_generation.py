"""Controlled generation, measured: classifier guidance on the digits, self-guidance on the mini Stable Diffusion.

    python benchmarks/controlled_generation.py                  # about 4 minutes on a 2-core CPU
    python benchmarks/controlled_generation.py --skip-classifier --distance 0.3

Set COURSEKIT_YARDSTICK_CACHE to a folder to train each yardstick's classifier once (the glyphs' takes
about 6 minutes on a 2-core CPU, the digits' under one).

1. Classifier guidance (coursekit.guidance): a noise-aware classifier trained here on noised digits steers
   the shipped *unconditional* digits model towards asked digits. Per scale: the share of samples the
   yardstick's classifier reads as the asked digit, and KID with its interval.
2. Self-guidance (coursekit.self_guidance) on the shipped text-to-image model: single-character prompts
   ("a small green 3 in the middle"), each asked to move its colour word's object left or right by
   ``--distance`` of the width (0.2), or up or down, and to grow to twice or shrink to half its area. The
   truth is read from the pixels (the ink of a glyph drawn on black): achieved displacement along the
   asked direction, area ratio, the attention energy before and after, and what the edit costs in
   character and colour adherence (the shipped attribute reader), in CLIP score and in image quality (the
   glyphs' yardstick: KID of the guided images against the unguided ones' at the same count). Intervals:
   95 % (t for means, Wilson for shares, bootstrap for KID).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from coursekit.attributes import ATTRIBUTES, adherence, label_tensor, load_attribute_reader, wilson_interval
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


def print_pairs(jobs, centre_before, centre_after, area_before, area_after, read_after, scenes) -> None:
    """One line per prompt-and-edit pair: what was asked, what the pixels show, whether the character stayed."""
    column = list(ATTRIBUTES).index("character")
    character_kept = (read_after[:, column] == label_tensor(scenes)[:, column]).tolist()
    for i, (caption, edit, asked) in enumerate(jobs):
        moved = (centre_after[i] - centre_before[i]).tolist()
        if isinstance(edit, Move):
            wanted = (edit.to[0] - 0.5, edit.to[1] - 0.5)
            what = f"move {asked:>5}: asked ({wanted[0]:+.2f}, {wanted[1]:+.2f})"
            what += f", moved ({moved[0]:+.2f}, {moved[1]:+.2f})"
        else:
            ratio = (area_after[i].clamp_min(1e-3) / area_before[i].clamp_min(1e-3)).item()
            what = f"resize x{asked:g}: area ratio {ratio:.2f}, moved ({moved[0]:+.2f}, {moved[1]:+.2f})"
        print(f"  {caption:<32} {what}; character {'kept' if character_kept[i] else 'lost'}")


def kid(report) -> str:
    return f"{report.kid:.3f} [{report.kid_low:.3f}, {report.kid_high:.3f}]"


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


def self_guidance(weights: list[float], seed: int, prompt_count: int, distance: float, show_pairs: list[float]) -> None:
    from coursekit.quality import Yardstick

    pipeline = load_text_to_image("shipped-text-to-image", device="cpu")
    reader = load_attribute_reader()
    column = list(ATTRIBUTES).index("character")
    started = time.perf_counter()
    yardstick = Yardstick.for_dataset("glyphs")
    print(f"glyphs yardstick ready in {(time.perf_counter() - started) / 60:.1f} min")
    generator = torch.Generator().manual_seed(seed)
    colours = list(COLOURS)
    prompts = []
    for _ in range(prompt_count):
        character = CHARACTERS[torch.randint(len(CHARACTERS), (1,), generator=generator).item()]
        colour = colours[torch.randint(len(colours), (1,), generator=generator).item()]
        prompts.append(f"a small {colour} {character} in the middle")
    low, high = 0.5 - distance, 0.5 + distance
    moves = {"left": (low, 0.5), "right": (high, 0.5), "up": (0.5, low), "down": (0.5, high)}
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
        read_before, read_after = reader.read(result.unguided), reader.read(result.guided)
        is_move = torch.tensor([isinstance(edit, Move) for _, edit, _ in jobs])
        moved_scenes = [scene for scene, move in zip(scenes, is_move) if move]
        resized_scenes = [scene for scene, move in zip(scenes, is_move) if not move]
        before = adherence(read_before[is_move], moved_scenes)
        after = adherence(read_after[is_move], moved_scenes)
        after_resize = adherence(read_after[~is_move], resized_scenes)
        kept = read_after[:, column] == label_tensor(scenes)[:, column]
        moved_intact = [
            half and bool(kept[i]) for half, i in zip(moved_half, torch.nonzero(is_move).flatten().tolist())
        ]
        if weight in show_pairs:
            print_pairs(jobs, centre_before, centre_after, area_before, area_after, read_after, scenes)
        ids = pipeline.prompts.ids(captions)
        clip_before = pipeline.clip.score(result.unguided, ids).mean().item()
        clip_after = pipeline.clip.score(result.guided, ids).mean().item()
        energy = result.unguided_energies.mean().item(), result.guided_energies.mean().item()
        quality = yardstick.score(result.unguided), yardstick.score(result.guided)
        print(f"weight {weight:g}: moves achieved {mean_interval(along)} of the asked displacement "
              f"(at least half of it: {share(moved_half)}; half of it with the character kept: "
              f"{share(moved_intact)}); resizes achieved {mean_interval(ratios)} of the asked log area ratio; "
              f"attention energy {energy[0]:.3f} -> {energy[1]:.3f}; character "
              f"{before['character']:.2f} -> {after['character']:.2f}, colour {before['colour']:.2f} -> "
              f"{after['colour']:.2f} (resized: character {after_resize['character']:.2f}, colour "
              f"{after_resize['colour']:.2f}); CLIP score {clip_before:.3f} -> {clip_after:.3f}; "
              f"KID {kid(quality[0])} -> {kid(quality[1])}; "
              f"{milliseconds:.0f} ms an image for both runs")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0, 3.0])
    parser.add_argument("--samples", type=int, default=359)
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.15, 0.3, 0.45, 0.6])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts", type=int, default=24, help="prompts; each gives two moves and two resizes")
    parser.add_argument("--distance", type=float, default=0.2, help="how far to move, as a share of the width")
    parser.add_argument("--pairs", type=float, nargs="*", default=[0.3], help="weights whose every pair is printed")
    parser.add_argument("--skip-classifier", action="store_true")
    args = parser.parse_args()
    if args.prompts < 2 or not 0 < args.distance < 0.5:
        parser.error("--prompts must be at least 2 and --distance between 0 and 0.5")
    if not args.skip_classifier:
        classifier_guidance(args.scales, args.samples)
    self_guidance(args.weights, args.seed, args.prompts, args.distance, args.pairs)


if __name__ == "__main__":
    main()
