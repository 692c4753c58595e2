"""The command line: ``coursekit train | sample | evaluate | demo`` (also ``python -m coursekit``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DESCRIPTION = """\
Train a small diffusion model, draw images from it and score them.

Start here:   coursekit demo
  trains on the built-in digits (no download) for a few minutes, then writes a grid of
  samples, an animation of the reverse process and a quality score into runs/demo.

Then:   coursekit train --dataset mnist --minutes 10 --run runs/mnist
        coursekit sample --run runs/mnist --sampler ddpm
        coursekit evaluate --run runs/mnist
Each command has its own --help.
"""


RUN_HELP = (
    "run folder to load (default: %(default)s), a checkpoint file, or a model that ships with coursekit: "
    "shipped, shipped-conditional, shipped-one-step, shipped-text-to-image (with --prompt)"
)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)  # every number is checked here, before any work
    except SystemExit as stop:  # argparse has printed what was wrong (or the help)
        return stop.code if isinstance(stop.code, int) else 2
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return args.handler(args)
    except (ValueError, RuntimeError) as error:  # our errors say what to do; no traceback needed
        print(f"coursekit {args.command}: error: {error}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coursekit", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train a model into a run folder (resumes if it holds one)",
        description="Train a U-Net noise predictor. Running it again on the same "
        "--run folder resumes where it stopped; raise --steps or --minutes to go on.",
    )
    _add_data_options(train)
    _add_training_options(train)
    train.set_defaults(handler=run_train)

    sample = commands.add_parser(
        "sample",
        help="draw images: a PNG grid and a GIF of the reverse process",
        description="Draw images from a trained run with DDPM or DDIM.",
    )
    sample.add_argument("--run", default="runs/demo", help=RUN_HELP)
    _add_sampling_options(sample)
    sample.add_argument("--count", type=_positive_int, default=64, help="images to draw (default: %(default)s)")
    sample.add_argument(
        "--class-label",
        type=int,
        default=None,
        help="for a model trained with --conditional: the class to draw",
    )
    sample.add_argument(
        "--prompt",
        default=None,
        help='for a text-to-image run: what to draw, in the words of its captions ("a small green 4 on the right")',
    )
    sample.add_argument(
        "--guidance-scale",
        "--guidance",
        type=_non_negative_float,
        default=None,
        help="classifier-free guidance on the class label or prompt: 1 = plain, >1 = stronger "
        "(default: 1 with --class-label, 3 with --prompt)",
    )
    sample.add_argument(
        "--out",
        default=None,
        help="folder for samples.png and reverse.gif (default: the run; runs/NAME for a shipped model)",
    )
    sample.set_defaults(handler=run_sample)

    evaluate = commands.add_parser(
        "evaluate",
        help="score samples (or real images) with the yardstick: KID with an interval, beside real images",
        description="Draw samples from a run and score them with the download-free yardstick: the Kernel "
        "Inception Distance with a 95%% interval and the Fréchet distance, each beside what unseen real images "
        "score at the same count, a test of whether the samples can be told apart from real images, and the "
        "share of near-copies of training images. --real scores real images that took no part in the metric "
        "instead: a self-check that must come out indistinguishable.",
    )
    evaluate.add_argument("--run", default="runs/demo", help=RUN_HELP)
    evaluate.add_argument("--real", action="store_true", help="score held-out real images instead of samples")
    evaluate.add_argument("--dataset", default=None, help="with --real: the dataset (default: digits)")
    evaluate.add_argument("--data-root", default="data", help="where torchvision datasets live")
    evaluate.add_argument(
        "--samples", type=_positive_int, default=None, help="images to score (default: the most the data allows)"
    )
    evaluate.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    _add_sampling_options(evaluate)
    evaluate.set_defaults(handler=run_evaluate)

    demo = commands.add_parser(
        "demo",
        help="the main job: train on built-in digits, sample, score",
        description="Train on the built-in digits within a time budget on "
        "whatever device is here, then sample, animate and score.",
    )
    demo.add_argument("--run", default="runs/demo", help="run folder (default: %(default)s)")
    demo.add_argument(
        "--minutes", type=_positive_float, default=4.0, help="training time budget (default: %(default)s)"
    )
    demo.add_argument(
        "--samples", type=_positive_int, default=None, help="samples to score (default: the most the data allows)"
    )
    demo.add_argument("--device", default="auto", help="cuda, mps, cpu or auto (default: %(default)s)")
    demo.set_defaults(handler=run_demo)

    grade = commands.add_parser(
        "grade",
        help="grade a folder of submitted exercise notebooks into a CSV",
        description="Take each submission's answer cells (never the rest), read them for code that "
        "reaches outside the answer (flagged for a human look, not run), run the answers in a fresh "
        "sandboxed process (bubblewrap where installed) under time, memory and file limits, and "
        "compare their outputs with the reference here. Rows reach grades.csv as each submission "
        "finishes; running the command again grades only new or changed submissions. Submissions "
        "are never modified.",
    )
    grade.add_argument("paths", nargs="*", help="submission notebooks, or folders holding them")
    grade.add_argument("--out", default="grades.csv", help="the gradebook (default: %(default)s)")
    grade.add_argument("--feedback", default=None, help="folder for feedback files (default: beside --out)")
    grade.add_argument("--exercise", default=None, help="NN, when file names do not say (e.g. 01)")
    grade.add_argument(
        "--question-timeout",
        "--cell-timeout",
        dest="question_timeout",
        type=_positive_int,
        default=60,
        help="seconds for one question's cases (default: %(default)s)",
    )
    grade.add_argument(
        "--total-timeout", type=_positive_int, default=600, help="seconds per notebook (default: %(default)s)"
    )
    grade.add_argument(
        "--memory-mb", type=_positive_int, default=4096, help="memory per notebook (default: %(default)s)"
    )
    grade.add_argument("--workers", type=_positive_int, default=None, help="notebooks graded at once (default: cores)")
    grade.add_argument("--no-isolation", action="store_true", help="do not use bubblewrap even where it is installed")
    grade.add_argument(
        "--id-from",
        choices=("folder", "filename", "metadata"),
        default="folder",
        help="where the student ID comes from: the student's folder, the file name without the "
        "exercise part, or the notebook's metadata.coursekit.student_id (default: %(default)s)",
    )
    grade.add_argument("--lms", default=None, help="also write a gradebook for Canvas or Moodle to this CSV")
    grade.add_argument(
        "--id-column", default="SIS User ID", help="the ID column's name in --lms (default: %(default)s)"
    )
    grade.add_argument(
        "--gradescope",
        default=None,
        metavar="DIR",
        help="write a Gradescope autograder bundle (setup.sh, run_autograder, autograder.zip) to DIR",
    )
    grade.set_defaults(handler=run_grade)

    exercises = commands.add_parser(
        "make-exercises",
        help="generate exercises/ from solutions/",
        description="Replace every solution region of solutions/NN_*.ipynb by "
        "'raise NotImplementedError' and write exercises/NN_*.ipynb.",
    )
    exercises.add_argument("--solutions", default="solutions")
    exercises.add_argument("--exercises", default="exercises")
    exercises.add_argument("--check", action="store_true", help="only report exercises that differ")
    exercises.set_defaults(handler=run_make_exercises)

    preflight = commands.add_parser(
        "preflight",
        help="is this machine ready for the course? (run it the day before a workshop)",
        description="Report Python, torch and the device, free memory and disk, whether the built-in "
        "data and the shipped models load and sliders will render, and how long each notebook should "
        "take here. Exits with 1 when something needs fixing.",
    )
    preflight.add_argument("--device", default="auto", help="cuda, mps, cpu or auto (default: %(default)s)")
    preflight.add_argument("--no-measure", action="store_true", help="skip the few-second speed measurement")
    preflight.set_defaults(handler=run_preflight)
    return parser


def run_preflight(args: argparse.Namespace) -> int:
    from coursekit.course.preflight import run_preflight as check_machine

    report = check_machine(args.device, measure=not args.no_measure)
    print(report.summary())
    return 0 if report.ready else 1


def run_grade(args: argparse.Namespace) -> int:
    from coursekit.course.gradebook import grade
    from coursekit.course.sandbox import Limits

    if args.gradescope:
        from coursekit.course.gradescope import write_bundle

        archive = write_bundle(args.gradescope, args.exercise)
        print(f"wrote the Gradescope autograder to {args.gradescope}; upload {archive}")
        if not args.paths:
            return 0
    if not args.paths:
        print("coursekit grade: give the submissions to grade (notebooks or folders), or --gradescope DIR")
        return 2
    limits = Limits(question_seconds=args.question_timeout, total_seconds=args.total_timeout, memory_mb=args.memory_mb)
    rows = grade(
        args.paths,
        out=args.out,
        feedback_dir=args.feedback,
        limits=limits,
        workers=args.workers,
        exercise=args.exercise,
        isolation=not args.no_isolation,
        id_from=args.id_from,
        lms=args.lms,
        id_column=args.id_column,
    )
    problems = sum(1 for row in rows if row.error)
    review = sum(1 for row in rows if row.review)
    print(
        f"graded {len(rows)} submissions into {args.out} ({problems} with a problem noted in the error "
        f"column, {review} with something for you to look at in needs_review); feedback files in "
        f"{args.feedback or Path(args.out).parent / 'feedback'}"
        + (f"; LMS gradebook in {args.lms}" if args.lms else "")
    )
    return 0


def run_make_exercises(args: argparse.Namespace) -> int:
    from coursekit.course.authoring import make_exercises

    stale = make_exercises(args.solutions, args.exercises, check=args.check)
    if args.check and stale:
        print("out of date: " + ", ".join(map(str, stale)) + "; run coursekit make-exercises and commit")
        return 1
    print(f"{len(stale)} exercise notebook(s) {'differ' if args.check else 'written'}")
    return 0


def _positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1, refused with a clear message otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _positive_float(text: str) -> float:
    """An argparse type: a number above 0 (minutes, a learning rate), refused with a clear message otherwise."""
    value = _number(text)
    if not 0 < value < float("inf"):  # nan fails both comparisons
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    """An argparse type: a finite number of at least 0 (a guidance scale)."""
    value = _number(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of at least 0, got {text}")
    return value


def _unit_float(text: str) -> float:
    """An argparse type: a number from 0 to 1 (DDIM's eta)."""
    value = _non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be from 0 to 1, got {text}")
    return value


def _timesteps(text: str) -> int:
    value = _positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"a diffusion needs at least 2 steps, got {value}")
    return value


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    from coursekit.data import DATASETS

    parser.add_argument(
        "--dataset",
        default="digits",
        choices=DATASETS,
        help="digits is built in and works offline; the others download (default: digits)",
    )
    parser.add_argument("--data-root", default="data", help="where torchvision datasets are downloaded")


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", default="runs/train", help="run folder for checkpoints (default: %(default)s)")
    parser.add_argument("--steps", type=_positive_int, default=None, help="stop after this many steps")
    parser.add_argument("--minutes", type=_positive_float, default=None, help="stop after this many minutes")
    parser.add_argument("--batch-size", type=_positive_int, default=128)
    parser.add_argument("--lr", type=_positive_float, default=2e-3, help="learning rate (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="cuda, mps, cpu or auto (default: %(default)s)")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--schedule", default="cosine", choices=("linear", "cosine"))
    parser.add_argument("--timesteps", type=_timesteps, default=1000, help="diffusion steps T (default: %(default)s)")
    parser.add_argument("--base-channels", type=_positive_int, default=32, help="U-Net width (default: %(default)s)")
    parser.add_argument("--conditional", action="store_true", help="learn class labels (for guidance)")
    parser.add_argument(
        "--objective",
        default="eps",
        choices=("eps", "flow"),
        help="eps: predict the noise (DDPM); flow: predict the flow-matching velocity (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0)


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sampler",
        default=None,
        choices=("ddim", "dpm++2m", "ddpm", "euler", "heun"),
        help="ddim: few steps, deterministic; dpm++2m: second order, fewer steps still; ddpm: every step; "
        "euler and heun: for flow-matching runs (default: ddim, or euler for a flow-matching run)",
    )
    parser.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help="sampling steps (default: the sampler's own: ddim 50, dpm++2m 20, ddpm every step of the schedule, "
        "euler 50, heun 25)",
    )
    parser.add_argument("--eta", type=_unit_float, default=None, help="DDIM noise, 0 to 1 (default: 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="cuda, mps, cpu or auto (default: %(default)s)")


def run_train(args: argparse.Namespace) -> int:
    from coursekit.data import load_dataset
    from coursekit.distributed import from_environment
    from coursekit.runs import train_diffusion
    from coursekit.training import TrainConfig
    from coursekit.unet import UNetConfig

    distributed = from_environment()  # several processes under torchrun, else one
    if not distributed.is_main:
        distributed.barrier()  # let rank 0 download the data first
    dataset = load_dataset(args.dataset, root=args.data_root, train=True)
    if distributed.is_main:
        distributed.barrier()
    steps = args.steps if args.steps is not None or args.minutes is not None else 2000
    config = TrainConfig(
        max_steps=steps,
        max_minutes=args.minutes,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        device=args.device,
        precision=args.precision,
        seed=args.seed,
    )
    model_config = UNetConfig(in_channels=dataset.image_shape[0], base_channels=args.base_channels)
    state = train_diffusion(
        dataset,
        args.run,
        model_config,
        args.schedule,
        args.timesteps,
        config,
        conditional=args.conditional,
        objective=args.objective,
    )
    if distributed.enabled:
        import torch.distributed

        torch.distributed.destroy_process_group()
    if not distributed.is_main:
        return 0
    final = f"final loss {state.loss_history[-1][1]:.4f}; " if state.loss_history else ""
    print(
        f"trained {state.step} steps in {state.elapsed_seconds / 60:.1f} min ({state.precision}); "
        f"{final}checkpoint in {args.run}"
    )
    print(f"next: coursekit sample --run {args.run}")
    return 0


def run_sample(args: argparse.Namespace) -> int:
    from coursekit.runs import generate, load_run
    from coursekit.text_to_image import is_text_to_image

    if args.prompt is not None:
        return _sample_prompt(args)
    if is_text_to_image(args.run):
        example = '--prompt "a small green 4 on the right"'
        raise ValueError(f"{args.run} paints from prompts: add --prompt, e.g. {example}")
    run = load_run(args.run, device=args.device)
    options = run.sampling_options(args.sampler, args.steps)  # refuses what this run cannot do
    labels = None
    if args.class_label is not None:
        num_classes = run.model.config.num_classes
        if num_classes is None:
            raise ValueError("--class-label needs a model trained with --conditional")
        if not 0 <= args.class_label < num_classes:
            raise ValueError(f"--class-label must lie in [0, {num_classes - 1}]")
        import torch

        labels = torch.full((args.count,), args.class_label)
    images, frames = generate(
        run.model,
        run.schedule,
        tuple(run.metadata["image_shape"]),
        args.count,
        **options,
        eta=args.eta,
        class_labels=labels,
        guidance_scale=1.0 if args.guidance_scale is None else args.guidance_scale,
        seed=args.seed,
        frames=40,
    )
    return _write_samples(args, images, frames)


def _write_samples(args: argparse.Namespace, images, frames) -> int:
    """samples.png and reverse.gif into --out, or the run's output folder."""
    from coursekit.plots import save_animation, save_image_grid
    from coursekit.runs import output_folder

    out = Path(args.out) if args.out else output_folder(args.run)
    grid = save_image_grid(images, out / "samples.png")
    gif = save_animation(frames, out / "reverse.gif")
    print(f"wrote {grid} and {gif}")
    return 0


def _sample_prompt(args: argparse.Namespace) -> int:
    """``coursekit sample --prompt``: a text-to-image run (coursekit.text_to_image) paints the prompt."""
    from coursekit.text_to_image import load_text_to_image

    if args.class_label is not None:
        raise ValueError("--prompt and --class-label do not go together: a text-to-image run reads prompts")
    if args.sampler not in (None, "ddim", "dpm++2m", "ddpm") or args.eta is not None:
        raise ValueError("a text-to-image run samples with --sampler ddim, dpm++2m or ddpm (no --eta)")
    pipeline = load_text_to_image(args.run, device=args.device)
    pipeline.prompts.ids(args.prompt)  # refuses, before any work, words the model never learned
    images, frames = pipeline.generate(
        [args.prompt] * args.count,
        guidance_scale=3.0 if args.guidance_scale is None else args.guidance_scale,
        num_steps=args.steps or 25,
        sampler=args.sampler or "ddim",
        seed=args.seed,
        frames=40,
    )
    return _write_samples(args, images, frames)


def run_evaluate(args: argparse.Namespace) -> int:
    from coursekit.data import DATASETS

    # Refuse bad input before any work (loading, training the classifier, sampling)
    if args.real:
        dataset = args.dataset or "digits"
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; choose one of {list(DATASETS)}")
    else:
        if args.dataset is not None:
            raise ValueError("--dataset goes with --real; a run is scored against the dataset it was trained on")
        _check_run_folder(args.run)
        _check_sampling_options(args)
        dataset = None
    record = _evaluate(
        args.run, args.samples, args.sampler, args.steps, args.eta, args.seed, args.device, args.data_root,
        real_dataset=dataset, quiet=args.json,
    )  # fmt: skip
    if args.json:
        print(json.dumps(record))
    else:
        print(record["summary"])
    return 0


def _check_run_folder(run_dir) -> None:
    from coursekit.runs import checkpoint_path
    from coursekit.training import CHECKPOINT_NAME

    if not checkpoint_path(run_dir).exists():
        raise ValueError(
            f"{run_dir} holds no {CHECKPOINT_NAME}: train into it first (coursekit train --run {run_dir}), "
            "or pass --run with a trained run folder"
        )


def _check_sampling_options(args: argparse.Namespace) -> None:
    from coursekit.flow import FLOW_SAMPLERS
    from coursekit.samplers import SAMPLERS

    if args.sampler is not None and args.sampler not in {**SAMPLERS, **FLOW_SAMPLERS}:
        raise ValueError(f"unknown sampler {args.sampler!r}; choose one of {sorted(SAMPLERS) + sorted(FLOW_SAMPLERS)}")
    if args.eta is not None and args.sampler not in (None, "ddim"):
        raise ValueError(f"--eta is DDIM's option; the {args.sampler} sampler has none")


def _evaluate(
    run_dir, samples, sampler, steps, eta, seed, device, data_root="data", real_dataset=None, quiet=False
) -> dict:
    """Score a run's samples (or, with ``real_dataset``, held-out real images); returns the JSON record."""
    from coursekit.quality import CACHE_VARIABLE, MIN_SAMPLES, Yardstick, split_real_images
    from coursekit.runs import count_sampling_steps, generate, load_run, output_folder

    run = None if real_dataset else load_run(run_dir, device=device)
    options = run.sampling_options(sampler, steps) if run is not None else {}  # checked before any work
    name = real_dataset or run.metadata["dataset"]
    splits = split_real_images(name, root=data_root)
    count = splits.max_samples if samples is None else samples
    if not MIN_SAMPLES <= count <= splits.max_samples:  # checked before the classifier is trained
        raise ValueError(
            f"--samples must lie between {MIN_SAMPLES} and {splits.max_samples} for {name!r}: the floor needs as many "
            f"real images that the metric never saw, got {count}"
        )
    if not quiet:
        print("preparing the yardstick (its classifier is trained once, then cached)...", file=sys.stderr)
    cache = os.environ.get(CACHE_VARIABLE) or (output_folder(run_dir) if run is not None else Path(data_root))
    yardstick = Yardstick.for_dataset(name, root=data_root, cache_dir=cache)
    if run is None:
        report = yardstick.score_real(count)
        record = {**report.to_dict(), "scored": f"{count} held-out real images of {name}"}
    else:
        images, _ = generate(
            run.model, run.schedule, tuple(run.metadata["image_shape"]), count,
            **options, eta=eta, seed=seed, progress=not quiet,
        )  # fmt: skip
        report = yardstick.score(images)
        record = {
            **report.to_dict(),
            "sampler": options["sampler"],
            "steps": len(options["timesteps"])
            if "timesteps" in options
            else count_sampling_steps(options["sampler"], run.schedule, steps),
            "training_steps": run.step,
        }
        output_folder(run_dir).mkdir(parents=True, exist_ok=True)
        (output_folder(run_dir) / "quality.json").write_text(json.dumps(record, indent=2))
    record["dataset"] = name
    record["summary"] = report.summary()
    return record


def run_demo(args: argparse.Namespace) -> int:
    from coursekit.data import load_dataset
    from coursekit.device import describe_device, pick_device
    from coursekit.runs import train_diffusion
    from coursekit.training import TrainConfig

    started = time.perf_counter()
    print(f"coursekit demo on {describe_device(pick_device(args.device))}")
    dataset = load_dataset("digits", train=True)
    print(f"1/3 training on {len(dataset)} built-in digits for up to {args.minutes:g} minutes")
    config = TrainConfig(max_steps=None, max_minutes=args.minutes, device=args.device)
    state = train_diffusion(dataset, args.run, train_config=config)
    final = f", final loss {state.loss_history[-1][1]:.4f}" if state.loss_history else ""
    print(f"    {state.step} steps{final}, precision {state.precision}")
    print("2/3 sampling a grid and an animation of the reverse process")
    sample_args = argparse.Namespace(
        run=args.run,
        sampler="ddim",
        steps=50,
        eta=0.0,
        seed=0,
        device=args.device,
        count=64,
        class_label=None,
        prompt=None,
        guidance_scale=1.0,
        out=None,
    )
    run_sample(sample_args)
    print("3/3 scoring samples with the yardstick: KID beside what unseen real digits score")
    record = _evaluate(args.run, args.samples, "ddim", 50, 0.0, 0, args.device)
    print(record["summary"])
    print(f"\ndone in {(time.perf_counter() - started) / 60:.1f} min. Look at:")
    print(f"  {args.run}/samples.png   64 new digits, painted from pure noise")
    print(f"  {args.run}/reverse.gif   the reverse process, noise to digits")
    print(f"  {args.run}/quality.json  the score (KID with its interval), beside what real digits score")
    print("Next: open notebooks/00_intuition.ipynb (jupyter lab), or train longer with")
    print(f"  coursekit train --run {args.run} --minutes {2 * args.minutes:g}   (resumes this run)")
    return 0
