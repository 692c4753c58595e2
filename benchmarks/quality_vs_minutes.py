"""The score against training minutes on the built-in digits.

    python benchmarks/quality_vs_minutes.py [--minutes 1 2 4 8] [--samples 1000] [--run runs/bench-quality]

Trains one run and, by resuming it, stops at each budget to score 1000 DDIM-50 samples of the
EMA weights. Delete the run folder to start afresh.
"""

from __future__ import annotations

import argparse

from coursekit.data import load_dataset
from coursekit.quality import evaluate_samples, load_or_train_classifier
from coursekit.runs import generate, load_run, train_diffusion
from coursekit.training import TrainConfig

from common import machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--run", default="runs/bench-quality")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    train_set, held_out = load_dataset("digits"), load_dataset("digits", train=False)
    classifier, accuracy = load_or_train_classifier(train_set, held_out, args.run)
    print("minutes  steps  precision  score  real-vs-real  ratio  coverage")
    for minutes in sorted(args.minutes):
        config = TrainConfig(max_steps=None, max_minutes=minutes, device=args.device, progress=False)
        state = train_diffusion(train_set, args.run, train_config=config)
        run = load_run(args.run, device=args.device)
        images, _ = generate(run.model, run.schedule, (1, 16, 16), args.samples, progress=False)
        report = evaluate_samples(images, train_set, held_out, classifier, accuracy)
        print(
            f"{minutes:7.1f}  {state.step:5d}  {state.precision:>9}  {report.frechet_distance:5.3f}  "
            f"{report.real_frechet_distance:12.3f}  {report.ratio:5.2f}  {report.class_coverage:8.0%}",
            flush=True,
        )


if __name__ == "__main__":
    main()
