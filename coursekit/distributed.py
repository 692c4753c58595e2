"""Training on several GPUs (or CPU processes) with torch.distributed (notebook 03's loop, scaled out).

Launch the same script once per device with ``torchrun``; it sets ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``, and :func:`coursekit.training.train` notices them::

    torchrun --nproc_per_node 4 -m coursekit train --dataset mnist --run runs/mnist

Data parallelism in three sentences: every process holds a full copy of the model; each step, every
process takes its own share of the global batch, and DistributedDataParallel averages the gradients
across processes during ``backward()``, so every copy takes the same optimizer step. The result is
the single-process result on the whole batch, split into shares: see ``TrainConfig.micro_batches``,
which splits a batch in the same way inside one process. Only rank 0 writes checkpoints and logs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Distributed:
    """Where this process stands among the processes of one training run."""

    rank: int = 0  # this process's index, 0 .. world_size - 1
    world_size: int = 1  # how many processes train together
    local_rank: int = 0  # its index on this machine: which GPU it uses

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints, shows progress and calls back."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over all processes (the value itself in a single process)."""
        if not self.enabled:
            return value
        total = value.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total / self.world_size

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every process if ``flag`` is true on any: a stop decision they all share."""
        if not self.enabled:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def any_of(self, flags: list[bool], device: torch.device) -> list[bool]:
        """:meth:`any` for several flags in one exchange."""
        if not self.enabled:
            return list(flags)
        values = torch.tensor([1.0 if flag else 0.0 for flag in flags], device=device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return [bool(value) for value in values.tolist()]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def from_environment() -> Distributed:
    """Join the process group that ``torchrun`` describes in the environment (if any).

    Uses NCCL for CUDA tensors and gloo for CPU tensors (a CPU run on a GPU machine, or a test on a
    laptop). Without
    ``WORLD_SIZE`` (or with 1) this is a plain single-process run.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise RuntimeError(
                f"WORLD_SIZE={world_size} is set but {name} is not: start distributed training with "
                "torchrun (torchrun --nproc_per_node N your_script.py), which sets all of them"
            )
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if not dist.is_initialized():
        if torch.cuda.is_available() and dist.is_nccl_available():
            torch.cuda.set_device(local_rank)
            dist.init_process_group(backend="cpu:gloo,cuda:nccl")  # each tensor goes by its device
        else:
            dist.init_process_group(backend="gloo")
    return Distributed(rank=rank, world_size=world_size, local_rank=local_rank)


def device_for(distributed: Distributed, requested: torch.device) -> torch.device:
    """Each process's own GPU (``cuda:LOCAL_RANK``) when training on CUDA; else the device asked for."""
    if distributed.enabled and requested.type == "cuda":
        return torch.device("cuda", distributed.local_rank)
    return requested
