"""torch.distributed as torchrun describes it: rank, world size and the few collectives the run uses.

Every function works without a process group (one process), so callers never branch on it.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    """Rank 0; before the process group is joined, the process torchrun started with RANK=0."""
    if dist.is_available() and dist.is_initialized():
        return rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def init_distributed(device_name: str) -> bool:
    """Join the process group torchrun describes in the environment; False when not under torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return True


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (a collective: every rank calls it); `obj` itself when not distributed."""
    if world_size() <= 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> list:
    """Every rank's `obj`, in rank order (a collective)."""
    if world_size() <= 1:
        return [obj]
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, obj)
    return parts


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm's running statistics) on every rank (a collective). DDP broadcasts them at the
    start of each training forward, after which each rank updates them with its own batch: without this, the
    ranks would evaluate their val shards with different statistics, and the epoch's val metrics would mix two
    models, neither of them the one rank 0 saves."""
    if world_size() > 1:
        for buf in module.buffers():
            dist.broadcast(buf.data, src=0)


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of `t` over ranks (a collective)."""
    if world_size() > 1:
        t = t.detach().clone()
        dist.all_reduce(t)
    return t


def any_rank(flag: torch.Tensor | bool, device: Optional[torch.device] = None) -> bool:
    """True when `flag` is set on any rank, so that every rank takes the same branch (a collective)."""
    if world_size() > 1:
        t = torch.as_tensor(flag, device=device).detach().to(torch.int32, copy=True).reshape(())
        if dist.get_backend() == "nccl" and t.device.type != "cuda":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())
    return bool(torch.as_tensor(flag).item())
