"""Process group set-up for `torchrun --nproc_per_node=N -m efficient_transformers train ...`.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; with them the trainer
joins a process group (gloo on CPU, NCCL on CUDA) and wraps the model in DistributedDataParallel.
Without them it is one process and nothing here does anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    started_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def setup(device: str) -> Dist:
    """Join the process group torchrun describes (if any). `device` "cpu" or "cuda"."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    started = False
    if not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
        started = True
    return Dist(rank=rank, world=world, local_rank=local_rank, started_here=started)


def teardown(d: Dist) -> None:
    if d.started_here and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: list[float], d: Dist, device: torch.device) -> list[float]:
    """Sum a few numbers over every process (identity with one process)."""
    if not d.active:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()
