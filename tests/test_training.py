import io
import math

import pytest
import torch

from coursekit.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from coursekit.losses import diffusion_loss
from coursekit.schedules import make_schedule
from coursekit.training import (
    EMA,
    TrainConfig,
    TrainingDivergedError,
    resolve_precision,
    train,
)
from coursekit.unet import UNet

SCHEDULE = make_schedule("cosine", 100)


def _data():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(64, 1, 8, 8, generator=generator) * 2 - 1
    return images, torch.randint(0, 3, (64,), generator=generator)


def _model():
    torch.manual_seed(0)
    return UNet(base_channels=8, channel_multipliers=(1, 2), attention_levels=(1,), num_classes=3, dropout=0.1)


def _config(steps, **overrides):
    settings = dict(
        max_steps=steps,
        batch_size=16,
        precision="fp32",
        device="cpu",
        progress=False,
        log_every=2,
        checkpoint_every_steps=None,
        checkpoint_every_minutes=None,
        warmup_steps=3,
    )
    return TrainConfig(**{**settings, **overrides})


LOSS = diffusion_loss(SCHEDULE, conditional=True, label_dropout=0.2, null_label=3)


def test_resuming_continues_exactly(tmp_path):
    straight = _model()
    train(straight, _data(), LOSS, _config(8), run_dir=tmp_path / "straight")

    resumed = _model()
    first_half = train(resumed, _data(), LOSS, _config(4), run_dir=tmp_path / "resumed")
    assert first_half.step == 4
    resumed_again = _model()  # a fresh process would build a fresh model
    state = train(resumed_again, _data(), LOSS, _config(8), run_dir=tmp_path / "resumed")
    assert state.step == 8
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed_again.state_dict().items()):
        assert torch.equal(a, b), name
    ema_straight = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")["ema"]
    ema_resumed = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["ema"]
    assert all(torch.equal(ema_straight[k], ema_resumed[k]) for k in ema_straight)
    assert [s for s, _ in state.loss_history] == [2, 4, 6, 8]


def test_training_lowers_the_loss_and_keeps_an_ema():
    model = _model()
    state = train(model, _data(), LOSS, _config(60, learning_rate=3e-3, log_every=10))
    losses = [loss for _, loss in state.loss_history]
    assert losses[-1] < losses[0]
    assert state.ema_model is not None and state.images_per_second > 0
    assert not torch.equal(state.ema_model.head.weight, model.head.weight)


def test_ema_follows_its_formula():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.9)
    model.weight.data.fill_(1.0)
    ema.update(model, step=100)  # warmed-up decay: min(0.9, 101/110) = 0.9
    assert ema.model.weight.item() == pytest.approx(0.1)
    ema.update(model, step=0)  # first steps: decay min(0.9, 1/10) = 0.1
    assert ema.model.weight.item() == pytest.approx(0.1 * 0.1 + 0.9)


def test_a_time_budget_stops_training():
    state = train(_model(), _data(), LOSS, _config(None, max_minutes=0.02))
    assert 0 < state.step and state.elapsed_seconds >= 1.2


def test_a_nan_loss_stops_with_advice():
    def exploding(model, batch, generator):
        return model(batch[0], torch.zeros(len(batch[0]), dtype=torch.long)).sum() * math.nan

    with pytest.raises(TrainingDivergedError, match="learning_rate"):
        train(_model(), _data(), exploding, _config(10))


def test_corrupt_truncated_and_foreign_checkpoints_raise_clear_errors(tmp_path):
    run = tmp_path / "run"
    train(_model(), _data(), LOSS, _config(2), run_dir=run)
    path = run / "checkpoint.pt"
    good = path.read_bytes()

    path.write_bytes(good[: len(good) // 2])  # truncated, as by a crash without atomic writes
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        train(_model(), _data(), LOSS, _config(4), run_dir=run)
    assert path.read_bytes() == good[: len(good) // 2]  # never silently replaced by a fresh start

    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)

    path.write_bytes(good)
    wider = UNet(base_channels=16, channel_multipliers=(1, 2), num_classes=3)
    with pytest.raises(CheckpointError, match="different model"):
        train(wider, _data(), LOSS, _config(4), run_dir=run)

    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="not a coursekit checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"step": 1}, path)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1  # the old checkpoint survives a failed write
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary left behind


def test_precision_choice():
    cpu, fake_cuda = torch.device("cpu"), torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("auto", cpu, measure=lambda: True) == "bf16"
    assert resolve_precision("auto", cpu, measure=lambda: False) == "fp32"
    with pytest.raises(ValueError, match="CUDA"):
        resolve_precision("fp16", fake_cuda)
    with pytest.raises(ValueError, match="choose one of"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="budget"):
        TrainConfig(max_steps=None, max_minutes=None)


def test_resuming_with_other_settings_is_refused(tmp_path):
    train(_model(), _data(), LOSS, _config(2), run_dir=tmp_path, metadata={"schedule": "cosine"})
    with pytest.raises(CheckpointError, match="other settings"):
        train(_model(), _data(), LOSS, _config(4), run_dir=tmp_path, metadata={"schedule": "linear"})
    with pytest.warns(UserWarning, match="bit-identical"):
        state = train(
            _model(), _data(), LOSS, _config(4, precision="bf16"), run_dir=tmp_path, metadata={"schedule": "cosine"}
        )
    assert state.precision == "bf16" and state.step == 4


def test_the_bf16_trial_is_small_and_runs_once_per_kind_of_model(monkeypatch):
    from types import SimpleNamespace

    from coursekit import training

    model = torch.nn.Linear(4, 4)
    batches = SimpleNamespace(batch_size=128, tensors=(torch.randn(128, 4),))
    seen = []

    def loss_fn(trial, batch, generator):
        seen.append(batch[0].shape[0])
        return trial(batch[0]).pow(2).mean()

    monkeypatch.setattr(training, "_BF16_DECISIONS", {})
    first = training._bf16_is_faster_on_cpu(model, batches, loss_fn)
    assert seen and set(seen) == {training.BF16_TRIAL_BATCH}  # a small batch, not the run's 128
    monkeypatch.setattr(training.copy, "deepcopy", lambda *args: pytest.fail("measured twice"))
    assert training._bf16_is_faster_on_cpu(model, batches, loss_fn) is first


def test_progress_in_a_log_is_a_few_lines_not_one_per_step(capsys):
    """Written to a file (pytest's capture is one), a bar redraws every LOG_INTERVAL seconds, not every step."""
    import time

    from coursekit.progress import LOG_INTERVAL, progress_bar

    log = io.StringIO()
    with progress_bar(total=1000, desc="steps", file=log) as bar:
        for _ in range(1000):
            bar.update(1)
    assert log.getvalue().count("\r") <= 3 and "1000/1000" in log.getvalue(), log.getvalue()

    started = time.perf_counter()
    train(_model(), _data(), LOSS, _config(60, progress=True))
    seconds = time.perf_counter() - started
    written = capsys.readouterr().err
    redraws = written.count("\r") + written.count("\n")
    assert "60/60" in written, f"the bar's last state is missing from the log: {written!r}"
    assert redraws <= 3 + seconds / LOG_INTERVAL, f"{redraws} lines for 60 steps in {seconds:.0f} s:\n{written}"

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert progress_bar(total=3, file=Terminal()).mininterval == 0.1  # live in a terminal
