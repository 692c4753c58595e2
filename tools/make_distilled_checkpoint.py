"""Make the one-step model that ships inside coursekit (coursekit/assets/digits_unet_one_step.pt).

    python tools/make_distilled_checkpoint.py    # about 15 minutes on a 2-core CPU

Progressive distillation (notebook 07) of the shipped digits model, from 64 DDIM steps to 32, 16, 8,
4, 2 and 1, with the course's settings (:func:`coursekit.runs.distillation_config`). Reproducible like
tools/make_shipped_checkpoint.py: fixed seed, fixed step counts, fp32 on the CPU. Only the last
student's EMA weights are kept, in fp16; its metadata says it predicts v on one timestep, so
``coursekit sample --run shipped-one-step --steps 1`` samples it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from coursekit.checkpoints import load_checkpoint, save_checkpoint, shipped_payload
from coursekit.runs import SHIPPED_ONE_STEP_CHECKPOINT, distill_run, distillation_config, load_shipped_model
from coursekit.training import CHECKPOINT_NAME


def main() -> None:
    config = distillation_config(
        precision="fp32", device="cpu", seed=0, checkpoint_every_steps=None, checkpoint_every_minutes=None
    )
    with tempfile.TemporaryDirectory() as out_dir:
        for round_ in distill_run(load_shipped_model(device="cpu"), out_dir, train_config=config):
            minutes, loss = round_.state.elapsed_seconds / 60, round_.state.loss_history[-1][1]
            steps = round_.state.step
            print(f"{round_.num_steps:2d} steps: {steps} training steps, {minutes:.1f} min, loss {loss:.5f}")
            assert torch.isfinite(torch.tensor(loss)), "the distillation diverged"
        payload = load_checkpoint(Path(out_dir) / f"{round_.num_steps:02d}-steps" / CHECKPOINT_NAME)
    shipped = shipped_payload(payload, "python tools/make_distilled_checkpoint.py")
    save_checkpoint(shipped, SHIPPED_ONE_STEP_CHECKPOINT)
    size = SHIPPED_ONE_STEP_CHECKPOINT.stat().st_size / 1e6
    print(f"wrote {SHIPPED_ONE_STEP_CHECKPOINT} ({size:.1f} MB)")


if __name__ == "__main__":
    main()
