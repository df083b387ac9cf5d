"""DataLoader worker processes kept from one pass over a source to the next.

An encode runs one task per shard and training one pass per epoch; a fresh DataLoader for
each would fork, warm up and join its workers every time (about 0.2 s with 2 workers on
MNIST tar shards, 5 % of a 10,000-image shard). Here the workers persist: a pass hands its
id batches to the live loader through a sampler it can refill, so only the first pass over a
source forks.

One loader is kept per process, for the last (source, settings) used; another source or
other settings replace it (its workers exit). A pass that does not run to its end (an error,
a generator closed early) drops the loader, so a later pass never inherits half-sent work.
"""

from __future__ import annotations

import functools
import gc
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .base import ImageSource


class IdBatches(Dataset):
    """Items are whole batches, addressed by their id arrays (what the sampler yields)."""

    def __init__(self, source: ImageSource) -> None:
        self.source = source

    def __getitem__(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self.source.load_batch(ids)


class _Refillable(Sampler):
    """The id batches of the current pass; replaced before each pass."""

    def __init__(self) -> None:
        self.batches: Sequence[np.ndarray] = []

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


@dataclass(frozen=True)
class _Settings:
    num_workers: int
    pin: bool
    prefetch: int
    nice: int


class _Pool:
    def __init__(self, source: ImageSource, settings: _Settings) -> None:
        self.source, self.settings = source, settings
        self.sampler = _Refillable()
        self.loader = DataLoader(
            IdBatches(source), batch_size=None, sampler=self.sampler,
            num_workers=settings.num_workers, pin_memory=settings.pin,
            prefetch_factor=max(settings.prefetch, 2), persistent_workers=True,
            worker_init_fn=functools.partial(_lower_priority, settings.nice)
            if settings.nice else None)
        self.busy = False


_current: _Pool | None = None
_lock = threading.Lock()


def worker_batches(source: ImageSource, batches: Sequence[np.ndarray], num_workers: int,
                   pin: bool = False, prefetch: int = 0, nice: int = 0,
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) for each id array, loaded by ``num_workers`` persistent workers that
    run ``nice`` steps below this process's priority."""
    global _current
    settings = _Settings(num_workers, pin, prefetch, nice)
    with _lock:
        pool = _current
        if pool is None or pool.source is not source or pool.settings != settings or pool.busy:
            pool = _Pool(source, settings)
            if _current is None or not _current.busy:
                _current = pool  # a nested pass (rare) gets a loader of its own
        pool.busy = True
    finished = False
    try:
        pool.sampler.batches = list(batches)
        if not pool.sampler.batches:
            finished = True
            return
        yield from _first_pass_lean(pool.loader)
        finished = True
    finally:
        pool.busy = False
        if not finished:
            drop(pool)


def drop(pool: _Pool | None = None) -> None:
    """Forget the kept loader (or ``pool``), so its workers exit."""
    global _current
    with _lock:
        if pool is None or pool is _current:
            _current = None


def _first_pass_lean(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's batches; when this pass forks the workers, it does so with this process's
    objects frozen out of the garbage collector: a forked worker's collections would
    otherwise write to every object they visit and so copy the parent's pages one by one."""
    gc.freeze()
    try:
        batches = iter(loader)  # forks the workers on the first pass only
    finally:
        gc.unfreeze()  # the workers keep theirs frozen; here collection goes on as before
    yield from batches


def _lower_priority(nice: int, _worker_id: int) -> None:
    os.nice(nice)
