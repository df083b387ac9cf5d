"""DataLoader workers kept across passes (``tokenizer.sources.workers``): the same worker
processes serve the next pass over the same source, a pass that fails or stops early starts
the next one with fresh workers, another source gets its own, and workers on CPU run niced."""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from vqtok.tokenizer.accel import CPU_WORKER_NICE, Accel
from vqtok.tokenizer.config import DataConfig
from vqtok.tokenizer.errors import DataError
from vqtok.tokenizer.sources import ImageSource, iterate_batches, open_source
from vqtok.tokenizer.sources import workers as pool


class WhoLoads(ImageSource):
    """Images are the ids; the labels say which process (and at what niceness) loaded them.
    Id ``bad`` raises a DataError naming it."""

    def __init__(self, bad: int = -1) -> None:
        self.name, self.fingerprint, self.channels, self.image_size = "who", "x", 1, 2
        self.splits = {"train": np.arange(64)}
        self.bad = bad

    def load_batch(self, ids: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        ids = np.asarray(ids)
        if self.bad in ids:
            raise DataError(f"who: image {self.bad} is corrupt")
        images = torch.from_numpy(ids).float().view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
        who = torch.tensor([os.getpid() * 100 + os.nice(0)] * len(ids))
        return images, who


def loaders(source: ImageSource, ids: np.ndarray, nice: int = 0) -> tuple[np.ndarray, set]:
    """The ids in the order the pass gave them, and the (pid, niceness) pairs that loaded them."""
    got, who = [], set()
    for images, labels in iterate_batches(source, ids, 8, num_workers=2, worker_nice=nice):
        got.append(images[:, 0, 0, 0].long().numpy())
        who.update(divmod(int(x), 100) for x in labels)
    return np.concatenate(got), who


def test_a_second_pass_over_the_same_source_reuses_the_workers_and_keeps_the_order():
    source = WhoLoads()
    ids = np.arange(64)[::-1].copy()
    first, who_first = loaders(source, ids)
    second, who_second = loaders(source, ids[:40])
    assert first.tolist() == ids.tolist()
    assert second.tolist() == ids[:40].tolist()
    pids = {pid for pid, _ in who_first}
    assert len(pids) == 2 and os.getpid() not in pids
    assert {pid for pid, _ in who_second} <= pids  # no new processes
    assert gc.get_freeze_count() == 0  # the fork's freeze is undone in this process
    pool.drop()


def test_another_source_gets_workers_of_its_own():
    one, other = WhoLoads(), WhoLoads()
    _, who_one = loaders(one, np.arange(32))
    _, who_other = loaders(other, np.arange(32))
    assert not {p for p, _ in who_one} & {p for p, _ in who_other}
    pool.drop()


def test_a_failed_pass_leaves_no_workers_for_the_next_one():
    source = WhoLoads(bad=20)
    _, before = loaders(source, np.arange(16))  # ids 0-15: fine
    with pytest.raises(DataError) as error:
        loaders(source, np.arange(32))
    assert str(error.value) == "who: image 20 is corrupt"  # the worker's own line
    _, after = loaders(source, np.arange(16))
    assert not {p for p, _ in before} & {p for p, _ in after}
    pool.drop()


def test_a_pass_closed_early_leaves_no_workers_for_the_next_one():
    source = WhoLoads()
    first = iterate_batches(source, np.arange(64), 8, num_workers=2)
    _, labels = next(first)
    pids = {int(x) // 100 for x in labels}
    first.close()  # e.g. a consumer that stopped at a fault
    _, after = loaders(source, np.arange(64))
    assert not pids & {p for p, _ in after}
    pool.drop()


def test_workers_run_niced_on_cpu():
    assert Accel.for_device("cpu").worker_nice == CPU_WORKER_NICE > 0
    base = os.nice(0)
    _, who = loaders(WhoLoads(), np.arange(32), nice=CPU_WORKER_NICE)
    assert {nice for _, nice in who} == {min(base + CPU_WORKER_NICE, 19)}
    pool.drop()


def test_real_images_through_kept_workers_equal_loading_in_process():
    sample = open_source(DataConfig())
    ids = np.arange(300)
    direct = sample.load_batch(ids)[0]
    for _ in range(2):  # the second pass runs on the kept workers
        batches = [images for images, _ in iterate_batches(sample, ids, 64, num_workers=2)]
        assert torch.equal(torch.cat(batches), direct)
    pool.drop()
