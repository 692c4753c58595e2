"""Data-parallel training: two processes under torchrun (gloo, on the CPU) against one process.

DistributedDataParallel averages the two processes' gradients, each computed on half of the
global batch; one process with ``micro_batches=2`` adds up the same two halves' gradients itself.
Both draw each half's noise from the same per-half generator, so the runs must agree up to float
rounding (the sums happen in a different order): weights within 1e-5 after 8 steps.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coursekit.checkpoints import load_checkpoint
from coursekit.training import train

from distributed_setup import make_run

HERE = Path(__file__).parent
TOLERANCE = 1e-5


def torchrun(run_dir: Path, steps: int, log_dir: Path) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    environment.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent)]))
    if sys.platform.startswith("linux"):
        environment.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback, whatever the host name resolves to
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "--log-dir", str(log_dir), "--redirects", "3",
        str(HERE / "distributed_run.py"), str(run_dir), str(steps),
    ]  # fmt: skip
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def weights(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "checkpoint.pt")["model"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    (root / "two").mkdir()
    torchrun(root / "two" / "run", 8, root / "logs-two")
    (root / "resumed").mkdir()
    torchrun(root / "resumed" / "run", 4, root / "logs-first-half")
    shutil.copytree(root / "resumed" / "run", root / "on-one-process")
    torchrun(root / "resumed" / "run", 8, root / "logs-second-half")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process has: the same order of float sums
    try:
        model, data, loss_fn, config = make_run(8, micro_batches=2)
        single = train(model, data, loss_fn, config, run_dir=root / "single")
        model, data, loss_fn, config = make_run(8, micro_batches=2)  # the second half in one process
        config.progress = False
        train(model, data, loss_fn, config, run_dir=root / "on-one-process")
    finally:
        torch.set_num_threads(threads)
    return root, single


def test_two_processes_match_one_process_with_the_same_global_batch(runs):
    root, single = runs
    one, two = weights(root / "single"), weights(root / "two" / "run")
    differences = {name: (one[name] - two[name]).abs().max().item() for name in one}
    print(f"largest weight difference after 8 steps: {max(differences.values()):.2e}")
    assert max(differences.values()) < TOLERANCE
    assert load_checkpoint(root / "two" / "run" / "checkpoint.pt")["step"] == single.step == 8
    # the logged loss is the mean over both processes, as one process logs it
    two_losses = load_checkpoint(root / "two" / "run" / "checkpoint.pt")["loss_history"]
    assert [step for step, _ in two_losses] == [step for step, _ in single.loss_history]
    assert torch.allclose(torch.tensor([v for _, v in two_losses]), torch.tensor([v for _, v in single.loss_history]))


def test_only_rank_zero_writes_checkpoints_and_logs(runs):
    root, _ = runs
    assert (root / "two" / "saves-rank0.txt").read_text().splitlines() == ["checkpoint.pt step 8"]
    assert not (root / "two" / "saves-rank1.txt").exists()
    logs = {rank: sorted((root / "logs-two").rglob(f"{rank}/stderr.log")) for rank in (0, 1)}
    assert logs[0] and logs[1], "torchrun wrote no per-rank logs"
    stderr = {rank: "".join(path.read_text() for path in paths) for rank, paths in logs.items()}
    assert "training" in stderr[0] and "training" not in stderr[1]  # the progress bar
    assert sorted(p.name for p in (root / "two" / "run").iterdir()) == ["checkpoint.pt"]


def test_a_resumed_two_process_run_continues_exactly(runs):
    root, _ = runs
    uninterrupted, resumed = weights(root / "two" / "run"), weights(root / "resumed" / "run")
    assert all(torch.equal(uninterrupted[name], resumed[name]) for name in uninterrupted)
    assert (root / "resumed" / "saves-rank0.txt").read_text().splitlines() == [
        "checkpoint.pt step 4",
        "checkpoint.pt step 8",
    ]


def test_micro_batches_add_up_to_the_whole_batch():
    # With a loss that draws nothing at random, 4 micro-batches of 4 give the step of one batch of 16.
    def fixed_loss(model, batch, generator):
        images, labels = batch
        return model(images, torch.full((len(images),), 50), class_labels=labels).sub(images).pow(2).mean()

    outputs = []
    for micro_batches in (1, 4):
        model, (images, labels), _, config = make_run(5, micro_batches=micro_batches)
        config.progress = False
        train(model, (images, labels), fixed_loss, config)
        with torch.no_grad():
            outputs.append(model.eval()(images, torch.full((64,), 30), class_labels=labels))
    # Outputs, not weights: AdamW turns rounding noise in gradients that are zero in exact arithmetic
    # (conv biases just before a GroupNorm) into full-size steps of weights that change no output.
    assert (outputs[0] - outputs[1]).abs().max() < 1e-5
    with pytest.raises(ValueError, match="multiple of micro_batches"):
        make_run(3, micro_batches=5)


def test_a_two_process_run_can_finish_in_one_process_with_micro_batches(runs):
    # e.g. started on a 2-GPU machine, finished on a laptop: the same shards, so the same model.
    # Compared by output: AdamW turns rounding noise in gradients that are zero in exact arithmetic
    # (conv biases just before a GroupNorm) into full steps of weights that change no output.
    root, _ = runs
    outputs = []
    for folder in (root / "two" / "run", root / "on-one-process"):
        model, (images, labels), _, _ = make_run(0, micro_batches=1)
        model.load_state_dict(weights(folder))
        with torch.no_grad():
            outputs.append(model.eval()(images, torch.full((64,), 40), class_labels=labels))
    assert (outputs[0] - outputs[1]).abs().max() < TOLERANCE
