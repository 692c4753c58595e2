"""Make the small checkpoints that ship inside coursekit (coursekit/assets/).

    python tools/make_shipped_checkpoint.py                # digits_unet.pt, 6-8 minutes on a 2-core CPU
    python tools/make_shipped_checkpoint.py --conditional  # digits_unet_conditional.pt (class labels, for 08)

Notebooks 04, 05 and 10 (and 07, with --conditional) use them, and so can a workshop without time to
train. The run is reproducible: fixed seed, fixed step count and fp32 on the CPU, so the same command
gives the same weights on the same software. Only the EMA weights are kept, stored in fp16 (half the
size); loading casts them back.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from coursekit.checkpoints import load_checkpoint, save_checkpoint, shipped_payload
from coursekit.data import load_dataset
from coursekit.runs import SHIPPED_CHECKPOINT, SHIPPED_CONDITIONAL_CHECKPOINT, train_diffusion
from coursekit.training import TrainConfig

STEPS = 3000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conditional", action="store_true", help="train with class labels and label dropout")
    conditional = parser.parse_args().conditional
    destination = SHIPPED_CONDITIONAL_CHECKPOINT if conditional else SHIPPED_CHECKPOINT
    with tempfile.TemporaryDirectory() as run_dir:
        config = TrainConfig(
            max_steps=STEPS,
            precision="fp32",
            device="cpu",
            seed=0,
            checkpoint_every_steps=None,
            checkpoint_every_minutes=None,
        )
        state = train_diffusion(load_dataset("digits"), run_dir, train_config=config, conditional=conditional)
        payload = load_checkpoint(Path(run_dir) / "checkpoint.pt")
    made_by = "python tools/make_shipped_checkpoint.py" + (" --conditional" if conditional else "")
    shipped = shipped_payload(payload, made_by)
    save_checkpoint(shipped, destination)
    size = destination.stat().st_size / 1e6
    final_loss = state.loss_history[-1][1]
    print(f"{state.step} steps, final loss {final_loss:.4f}; wrote {destination} ({size:.1f} MB)")
    assert torch.isfinite(torch.tensor(final_loss))


if __name__ == "__main__":
    main()
