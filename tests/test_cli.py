import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from coursekit.cli import main
from coursekit.runs import generate, load_run


def test_help_is_there_for_newcomers():
    result = subprocess.run([sys.executable, "-m", "coursekit", "--help"], capture_output=True, text=True, check=True)
    assert "coursekit demo" in result.stdout
    for command in ("train", "sample", "evaluate", "demo"):
        assert command in result.stdout


def test_train_sample_evaluate_round_trip(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert (
        main(
            [
                "train",
                "--run",
                run,
                "--steps",
                "3",
                "--base-channels",
                "8",
                "--precision",
                "fp32",
                "--timesteps",
                "50",
                "--conditional",
            ]
        )
        == 0
    )
    assert "trained 3 steps" in capsys.readouterr().out
    assert (
        main(
            [
                "sample",
                "--run",
                run,
                "--count",
                "4",
                "--steps",
                "5",
                "--class-label",
                "7",
                "--guidance-scale",
                "2",
            ]
        )
        == 0
    )
    assert Image.open(tmp_path / "run" / "samples.png").size[0] > 0
    assert Image.open(tmp_path / "run" / "reverse.gif").n_frames > 2
    assert main(["sample", "--run", run, "--count", "2", "--sampler", "ddpm", "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "samples.png").exists()
    assert main(["evaluate", "--run", run, "--samples", "20", "--steps", "3"]) == 0
    report = json.loads((tmp_path / "run" / "quality.json").read_text())
    assert report["num_samples"] == 20 and report["training_steps"] == 3
    # the run resumes: more steps continue from step 3
    assert (
        main(
            [
                "train",
                "--run",
                run,
                "--steps",
                "5",
                "--base-channels",
                "8",
                "--timesteps",
                "50",
                "--conditional",
            ]
        )
        == 0
    )
    assert load_run(run).step == 5


def test_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["sample", "--run", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["train", "--dataset", "imagenet"]) == 2
    assert "invalid choice: 'imagenet'" in capsys.readouterr().err


def test_demo_runs_end_to_end_in_a_tiny_budget(tmp_path, capsys):
    run = tmp_path / "demo"
    assert main(["demo", "--run", str(run), "--minutes", "0.05", "--samples", "40"]) == 0
    out = capsys.readouterr().out
    assert "samples.png" in out and "reverse.gif" in out and "KID" in out and "Fréchet" in out
    for name in ("checkpoint.pt", "samples.png", "reverse.gif", "quality.json"):
        assert (run / name).exists(), name
    cache = Path(os.environ.get("COURSEKIT_YARDSTICK_CACHE") or run)  # conftest.py shares one across the tests
    assert (cache / "yardstick-v2-digits.pt").exists()


def test_generate_is_reproducible_and_keeps_frames(tmp_path):
    main(["train", "--run", str(tmp_path / "r"), "--steps", "1", "--base-channels", "8", "--timesteps", "20"])
    run = load_run(tmp_path / "r")
    first, frames = generate(run.model, run.schedule, (1, 16, 16), 3, num_steps=10, frames=5, progress=False)
    second, _ = generate(run.model, run.schedule, (1, 16, 16), 3, num_steps=10, progress=False)
    assert torch.equal(first, second) and first.shape == (3, 1, 16, 16)
    assert len(frames) == 6 and torch.equal(frames[-1].clamp(-1, 1), first)


EVALUATE_KEYS = {"kid", "kid_low", "kid_high", "floor_kid", "fd", "floor_fd", "near_copies", "num_samples",
                 "distinguishable"}  # fmt: skip


def test_evaluate_real_is_indistinguishable_and_prints_one_json_object(tmp_path, capsys):
    data_root = str(tmp_path / "data")
    assert (
        main(["evaluate", "--real", "--dataset", "digits", "--samples", "359", "--json", "--data-root", data_root]) == 0
    )
    out = capsys.readouterr().out.strip()
    record = json.loads(out)  # one object, nothing else on stdout
    assert EVALUATE_KEYS <= set(record)
    assert record["num_samples"] == 359 and record["distinguishable"] is False
    assert record["kid_low"] <= 0 <= record["kid_high"]
    assert record["floor_kid_low"] <= 0 <= record["floor_kid_high"]


def test_evaluate_a_run_as_json(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["train", "--run", run, "--steps", "2", "--base-channels", "8", "--timesteps", "20"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--run", run, "--samples", "30", "--steps", "2", "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip())
    assert EVALUATE_KEYS <= set(record) and record["num_samples"] == 30
    assert record["distinguishable"] is True  # a model trained for 2 steps paints noise
    assert record["sampler"] == "ddim" and record["steps"] == 2


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--samples", "5000"], "between 10 and 359"),
        (["--samples", "0"], "argument --samples: must be at least 1, got 0"),
        (["--steps", "0"], "argument --steps: must be at least 1, got 0"),
        (["--eta", "2"], "argument --eta: must be from 0 to 1, got 2"),
        (["--dataset", "digits"], "--dataset goes with --real"),
    ],
)
def test_evaluate_refuses_bad_input_before_any_work(tmp_path, capsys, arguments, message):
    run = tmp_path / "run"
    assert main(["train", "--run", str(run), "--steps", "1", "--base-channels", "8", "--timesteps", "20"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), *arguments]) == 2
    assert message in capsys.readouterr().err
    assert not list(run.glob("yardstick-*")), "the classifier was trained before the input was checked"


def test_evaluate_refuses_a_run_without_a_checkpoint_and_an_unknown_dataset_or_sampler(tmp_path, capsys):
    assert main(["evaluate", "--run", str(tmp_path / "empty")]) == 2
    assert "holds no checkpoint.pt" in capsys.readouterr().err
    assert main(["evaluate", "--real", "--dataset", "imagenet"]) == 2
    assert "unknown dataset" in capsys.readouterr().err
    assert main(["evaluate", "--sampler", "rk4"]) == 2  # argparse names the choices
    assert "invalid choice: 'rk4'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["train", "--minutes", "-1"], "argument --minutes: must be a finite number above 0, got -1"),
        (["train", "--minutes", "nan"], "argument --minutes: must be a finite number above 0, got nan"),
        (["train", "--steps", "0"], "argument --steps: must be at least 1, got 0"),
        (["train", "--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
        (["train", "--lr", "0"], "argument --lr: must be a finite number above 0, got 0"),
        (["train", "--timesteps", "1"], "argument --timesteps: a diffusion needs at least 2 steps, got 1"),
        (["train", "--base-channels", "two"], "argument --base-channels: expected a whole number, got 'two'"),
        (["demo", "--minutes", "0"], "argument --minutes: must be a finite number above 0, got 0"),
        (["demo", "--samples", "-5"], "argument --samples: must be at least 1, got -5"),
        (["sample", "--count", "0"], "argument --count: must be at least 1, got 0"),
        (["sample", "--guidance", "-1"], "argument --guidance-scale/--guidance: must be a finite number of at least 0"),
    ],
)
def test_every_command_refuses_bad_numbers_before_any_work(tmp_path, capsys, arguments, message):
    run = tmp_path / "run"
    assert main([*arguments, "--run", str(run)]) == 2
    assert message in capsys.readouterr().err
    assert not run.exists(), "the command started work before refusing its input"
