"""Sampling speed and quality: DDPM with 1000 steps against DDIM and DPM-Solver++(2M) with few.

    python benchmarks/sampling.py [--run runs/demo] [--samples 1000] [--device auto]

Speed is measured on a batch of 64 images and reported in seconds per image. With a trained
run folder, both samplers also draw ``--samples`` images that are scored with the course's
download-free Fréchet distance.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from coursekit.data import load_dataset
from coursekit.device import pick_device
from coursekit.quality import evaluate_samples, load_or_train_classifier
from coursekit.runs import generate, load_run
from coursekit.schedules import make_schedule
from coursekit.unet import UNet

from common import machine, median_seconds

BASELINE = "DDPM, 1000 steps"
SAMPLERS = {
    BASELINE: dict(sampler="ddpm"),
    "DDIM, 50 steps": dict(sampler="ddim", num_steps=50),
    "DDIM, 20 steps": dict(sampler="ddim", num_steps=20),
    "DDIM, 10 steps": dict(sampler="ddim", num_steps=10),
    "DPM-Solver++(2M), 20 steps": dict(sampler="dpm++2m", num_steps=20),
    "DPM-Solver++(2M), 10 steps": dict(sampler="dpm++2m", num_steps=10),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo", help="a trained run folder (optional)")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = pick_device(args.device)
    print(f"machine: {machine()}")
    trained = (Path(args.run) / "checkpoint.pt").exists()
    if trained:
        run = load_run(args.run, device=device)
        model, schedule, shape = run.model, run.schedule, tuple(run.metadata["image_shape"])
    else:
        print(f"no run in {args.run}: timing an untrained model (train one with `coursekit demo`)")
        model, schedule, shape = UNet().to(device).eval(), make_schedule("cosine"), (1, 16, 16)

    seconds_per_image = {}
    for name, options in SAMPLERS.items():
        seconds = median_seconds(
            lambda o=options: generate(model, schedule, shape, 64, progress=False, **o),
            repeats=1 if options["sampler"] == "ddpm" else 3,
            warmup=1,
        )
        seconds_per_image[name] = seconds / 64
        print(f"{name}: {1000 * seconds / 64:.1f} ms per image (batch of 64)")
    for name, seconds in seconds_per_image.items():
        if name != BASELINE:
            print(f"{name} is {seconds_per_image[BASELINE] / seconds:.1f}x faster than {BASELINE}")
    if not trained:
        return

    name = run.metadata["dataset"]
    train_set, held_out = load_dataset(name, train=True), load_dataset(name, train=False)
    classifier, accuracy = load_or_train_classifier(train_set, held_out, args.run)
    scores = {}
    for label, options in SAMPLERS.items():
        start = time.perf_counter()
        images, _ = generate(model, schedule, shape, args.samples, progress=False, **options)
        report = evaluate_samples(images, train_set, held_out, classifier, accuracy)
        scores[label] = report.frechet_distance
        print(f"{label}: {report.summary()} ({time.perf_counter() - start:.0f} s)")
    for label, score in scores.items():
        if label != BASELINE:
            print(f"score ratio {label} / {BASELINE}: {score / scores[BASELINE]:.2f} (1.00 = equal; lower is better)")


if __name__ == "__main__":
    main()
