"""Run by tests/test_distributed.py under torchrun: a tiny diffusion training, one run folder.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_run.py RUN_DIR STEPS

Each process notes (in RUN_DIR/../saves-rank<r>.txt) every checkpoint it writes, so the test can
show that only rank 0 writes.
"""

import os
import sys
from pathlib import Path

import coursekit.training
from coursekit.checkpoints import save_checkpoint
from coursekit.distributed import from_environment

sys.path.insert(0, str(Path(__file__).parent))
from distributed_setup import make_run  # noqa: E402


def main() -> None:
    run_dir, steps = Path(sys.argv[1]), int(sys.argv[2])
    rank = int(os.environ.get("RANK", "0"))
    saves = run_dir.parent / f"saves-rank{rank}.txt"

    def noting_save(payload, path):
        with saves.open("a") as log:
            log.write(f"{path.name} step {payload['step']}\n")
        save_checkpoint(payload, path)

    coursekit.training.save_checkpoint = noting_save
    distributed = from_environment()
    model, data, loss_fn, config = make_run(steps, micro_batches=1)
    coursekit.training.train(model, data, loss_fn, config, run_dir=run_dir)
    print(f"rank {distributed.rank} of {distributed.world_size} done")


if __name__ == "__main__":
    main()
