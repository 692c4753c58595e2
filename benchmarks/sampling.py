"""Sampling speed and quality: DDPM with 1000 steps against DDIM and DPM-Solver++(2M) with few.

    python benchmarks/sampling.py [--run runs/demo | --shipped] [--samples N] [--device auto]

Speed is measured on a batch of 64 images and reported in milliseconds per image. With a trained
run folder (or the shipped model), every sampler also draws ``--samples`` images (default: the most
the yardstick allows) scored with the course's yardstick: KID with its 95 % interval beside real
images, and whether each pair of samplers can be told apart at this sample count.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from coursekit.device import pick_device
from coursekit.quality import Yardstick, kid_intervals_overlap, samples_to_separate
from coursekit.runs import generate, load_run, load_shipped_model
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
    parser.add_argument("--shipped", action="store_true", help="use the model that ships with coursekit")
    parser.add_argument("--samples", type=int, default=None, help="samples per sampler (default: the most allowed)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = pick_device(args.device)
    print(f"machine: {machine()}")
    trained = args.shipped or (Path(args.run) / "checkpoint.pt").exists()
    if trained:
        run = load_shipped_model(device=device) if args.shipped else load_run(args.run, device=device)
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

    yardstick = Yardstick.for_dataset(run.metadata["dataset"], cache_dir=None if args.shipped else args.run)
    count = args.samples or yardstick.max_samples
    yardstick.check_count(count)
    reports = {"real images (held out)": yardstick.score_real(count)}
    for label, options in SAMPLERS.items():
        start = time.perf_counter()
        images, _ = generate(model, schedule, shape, count, progress=False, **options)
        reports[label] = yardstick.score(images)
        print(f"{label} ({time.perf_counter() - start:.0f} s): {reports[label].summary()}")
    print(f"\n| sampler | ms per image | KID [95 % interval] | Fréchet | told apart from real ({count} samples) |")
    print("|---|---|---|---|---|")
    for label, report in reports.items():
        speed = f"{1000 * seconds_per_image[label]:.1f}" if label in seconds_per_image else "-"
        print(
            f"| {label} | {speed} | {report.kid:.3f} [{report.kid_low:.3f}, {report.kid_high:.3f}] | "
            f"{report.fd:.3f} | {'yes' if report.distinguishable else 'no'} (p = {report.p_value:.3f}) |"
        )
    floor = reports[BASELINE]
    print(f"\nfloor (real vs real at {count}): KID {floor.floor_kid:.3f}, Fréchet {floor.floor_fd:.3f}")
    labels = list(SAMPLERS)
    for i, first in enumerate(labels):
        for second in labels[i + 1 :]:
            a, b = reports[first], reports[second]
            if kid_intervals_overlap(a, b):
                needed = samples_to_separate(a, b)
                more = f"about {needed:,} samples each would" if needed else "no sample count would"
                print(f"{first} vs {second}: intervals overlap at {count}; {more} separate them")
            else:
                print(f"{first} vs {second}: separated at {count} samples")


if __name__ == "__main__":
    main()
