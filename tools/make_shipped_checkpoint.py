"""Make the small checkpoint that ships inside coursekit (coursekit/assets/digits_unet.pt).

    python tools/make_shipped_checkpoint.py        # about 6-8 minutes on a 2-core CPU

Notebook 04 and a workshop without time to train use it. The run is reproducible: fixed seed,
fixed step count and fp32 on the CPU, so the same command gives the same weights on the same
software. Only the EMA weights are kept, stored in fp16 (half the size); loading casts them back.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from coursekit.checkpoints import load_checkpoint, save_checkpoint
from coursekit.data import load_dataset
from coursekit.runs import SHIPPED_CHECKPOINT, train_diffusion
from coursekit.training import TrainConfig

STEPS = 3000


def main() -> None:
    with tempfile.TemporaryDirectory() as run_dir:
        config = TrainConfig(
            max_steps=STEPS,
            precision="fp32",
            device="cpu",
            seed=0,
            checkpoint_every_steps=None,
            checkpoint_every_minutes=None,
        )
        state = train_diffusion(load_dataset("digits"), run_dir, train_config=config)
        payload = load_checkpoint(Path(run_dir) / "checkpoint.pt")
    shipped = {
        "ema": {name: tensor.half() for name, tensor in payload["ema"].items()},
        "step": payload["step"],
        "loss_history": payload["loss_history"],
        "metadata": payload["metadata"],
        "made_by": "python tools/make_shipped_checkpoint.py",
    }
    save_checkpoint(shipped, SHIPPED_CHECKPOINT)
    size = SHIPPED_CHECKPOINT.stat().st_size / 1e6
    final_loss = state.loss_history[-1][1]
    print(f"{state.step} steps, final loss {final_loss:.4f}; wrote {SHIPPED_CHECKPOINT} ({size:.1f} MB)")
    assert torch.isfinite(torch.tensor(final_loss))


if __name__ == "__main__":
    main()
