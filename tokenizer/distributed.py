"""Process-group plumbing for multi-process (DDP) training; no-ops in a single process.

The quantizer calls ``all_reduce_sum_`` and ``broadcast_`` on its codebook statistics, so the
same code keeps every rank's codebook identical under torchrun and costs nothing without it.
``torchrun`` (``python -m torch.distributed.run``) sets RANK / WORLD_SIZE / LOCAL_RANK and the
rendezvous address; ``init_from_env`` turns those into a process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place; returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` on every rank with rank ``src``'s; returns it."""
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj`` (picklable, small), in rank order; ``[obj]`` in one process."""
    if not is_distributed():
        return [obj]
    out: list[object] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


@dataclass(frozen=True)
class Launch:
    """What torchrun told this process: its rank, the world size and its local device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_from_env(device: str = "auto") -> Launch:
    """Join the process group torchrun set up: NCCL on CUDA (one GPU per local rank), else gloo.

    ``device`` is the config's ``train.device``: ``auto`` uses CUDA when present.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank_ = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(local % torch.cuda.device_count())
        chosen = torch.device("cuda", torch.cuda.current_device())
    else:
        chosen = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                device_id=chosen if use_cuda else None)
    return Launch(rank_, world, local, chosen)


def shutdown() -> None:
    """Leave the process group together: a rank that tore down its gloo pairs while another
    still used them aborted now and then ("terminate called without an active exception").
    The same abort also came later, in the interpreter's finalization: torchrun's workers
    leave through ``train_main.exit_now``, which skips it."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def shard_batch(batch_ids: np.ndarray, rank_: int, world: int) -> np.ndarray:
    """This rank's share of one global batch: every ``world``-th id starting at ``rank_``.

    Shares differ in size by at most one. A rank left with nothing (a last batch smaller than
    the world) takes one id of the batch again, so every rank runs every step: collectives
    must be called the same number of times on all ranks.
    """
    mine = batch_ids[rank_::world]
    if len(mine) == 0 and len(batch_ids):
        mine = batch_ids[rank_ % len(batch_ids) : rank_ % len(batch_ids) + 1]
    return mine


def shard_eval(ids: np.ndarray, rank_: int, world: int) -> np.ndarray:
    """This rank's part of an evaluation set: each id on exactly one rank (no padding), so
    summed statistics count every image once."""
    return ids[rank_::world]
