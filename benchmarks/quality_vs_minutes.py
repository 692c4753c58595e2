"""The score against training minutes on the built-in digits.

    python benchmarks/quality_vs_minutes.py [--minutes 1 2 4 8] [--samples N] [--run runs/bench-quality]

Trains one run and, by resuming it, stops at each budget to score DDIM-50 samples of the EMA weights
with the yardstick (default: as many as it allows). Delete the run folder to start afresh.
"""

from __future__ import annotations

import argparse

from coursekit.data import load_dataset
from coursekit.quality import Yardstick
from coursekit.runs import generate, load_run, train_diffusion
from coursekit.training import TrainConfig

from common import machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--run", default="runs/bench-quality")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    train_set = load_dataset("digits")
    yardstick = Yardstick.for_dataset("digits", cache_dir=args.run)
    count = args.samples or yardstick.max_samples
    yardstick.check_count(count)
    print("minutes  steps  precision  KID [95 % interval]         floor KID  told apart")
    for minutes in sorted(args.minutes):
        config = TrainConfig(max_steps=None, max_minutes=minutes, device=args.device, progress=False)
        state = train_diffusion(train_set, args.run, train_config=config)
        run = load_run(args.run, device=args.device)
        images, _ = generate(run.model, run.schedule, (1, 16, 16), count, progress=False)
        report = yardstick.score(images)
        print(
            f"{minutes:7.1f}  {state.step:5d}  {state.precision:>9}  {report.kid:6.3f} "
            f"[{report.kid_low:6.3f}, {report.kid_high:6.3f}]  {report.floor_kid:9.3f}  "
            f"{'yes' if report.distinguishable else 'no'} (p = {report.p_value:.3f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
