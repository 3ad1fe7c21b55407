"""Data parallelism for prompt training: ``torchrun --nproc_per_node N rankone train ...``.

Only the prompt parameters are synchronised: every rank holds the same frozen backbone, draws
its own shard of the data, and the gradients of the (few) trainable prompt tensors are
all-reduced by hand after each accumulated step. That is what DDP would do for this module,
without DDP's need for every parameter to get a gradient in every step (a mixed batch rarely
touches every task's factors). Rank 0 broadcasts its initial parameters so all ranks start,
and therefore stay, identical.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def init_distributed(device: str) -> Dist:
    """Join the process group started by torchrun (gloo on CPU, NCCL on GPU), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(0, 1, pick_device(device))
    target = pick_device(device)
    if target.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        target = torch.device("cuda", local)
        torch.cuda.set_device(target)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), target)


def broadcast_parameters(params: list[nn.Parameter], ctx: Dist) -> None:
    if ctx.world > 1:
        for p in params:
            dist.broadcast(p.data, src=0)


def average_gradients(params: list[nn.Parameter], ctx: Dist) -> None:
    """Mean of every rank's gradient; a parameter without a gradient here counts as zero.

    Zero-filling happens in a single process too, so that one and several processes run
    the same optimizer updates (AdamW skips parameters whose gradient is None).
    """
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if ctx.world > 1:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(ctx.world)


def barrier(ctx: Dist) -> None:
    if ctx.world > 1:
        dist.barrier()


def shutdown(ctx: Dist) -> None:
    if ctx.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
