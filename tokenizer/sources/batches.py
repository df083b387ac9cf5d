"""Batches of a source: id batches, DataLoader workers (``workers``; their errors name the
file), and a prefetching thread that overlaps loading with the model's work."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from typing import TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..errors import DataError
from .base import ImageSource
from .workers import IdBatches, worker_batches

T = TypeVar("T")


def split_batches(ids: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]


def iterate_batches(
    source: ImageSource, ids: np.ndarray, batch_size: int, num_workers: int = 0,
    pin: bool = False, prefetch: int = 0, worker_nice: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches in the order of ``ids``; see ``iterate_id_batches``."""
    yield from iterate_id_batches(source, split_batches(ids, batch_size), num_workers, pin,
                                  prefetch, worker_nice)


def iterate_id_batches(
    source: ImageSource, batches: Sequence[np.ndarray], num_workers: int = 0,
    pin: bool = False, prefetch: int = 0, worker_nice: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) for each array of ids, in order.

    ``num_workers`` > 0 loads in DataLoader worker processes (for decoding image files), run
    ``worker_nice`` steps below this process's priority (``Accel.worker_nice``) and kept for
    the next pass over the same source (``workers``); otherwise
    ``prefetch`` > 0 loads up to that many batches ahead in a background thread, so loading
    overlaps compute (tensor indexing releases the GIL). ``pin`` puts batches in page-locked
    memory for non-blocking copies to a GPU.
    """
    if num_workers > 0:
        try:
            yield from worker_batches(source, batches, num_workers, pin, prefetch, worker_nice)
        except DataError as exc:
            raise DataError(_worker_message(str(exc))) from None
        return
    if pin and prefetch == 0:  # torch's pinning thread, no worker processes
        yield from DataLoader(IdBatches(source), batch_size=None, sampler=list(batches),
                              pin_memory=True)
        return
    loaded = (source.load_batch(ids) for ids in batches)
    items = (_pinned(batch) for batch in loaded) if pin else loaded
    if prefetch > 0:
        yield from prefetched(items, prefetch)
    else:
        yield from items


def _worker_message(text: str) -> str:
    """A worker's DataError as torch re-raises it ("Caught DataError in DataLoader worker
    process 0.", then the worker's traceback) back to its own one-line message, which names
    the file."""
    if not text.startswith("Caught DataError"):
        return text
    last = text.rstrip().splitlines()[-1]
    _, sep, message = last.partition("DataError: ")
    return message if sep else last


def _pinned(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch[0].pin_memory(), batch[1].pin_memory()


_DONE = object()


def prefetched(items: Iterator[T], depth: int) -> Iterator[T]:
    """``items``, produced up to ``depth`` ahead by a background thread.

    Errors in the producer are raised here, at the item where they happened; closing the
    generator early stops the producer within a fraction of a second.
    """
    box: queue.Queue[tuple[object, BaseException | None]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[object, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                box.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put((_DONE, exc))
            return
        put((_DONE, None))

    worker = threading.Thread(target=produce, name="vqtok-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item, error = box.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        worker.join()
