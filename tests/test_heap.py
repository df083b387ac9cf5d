"""heap.keep_freed_memory: freed activation-sized blocks are reused, not faulted in again.

Each case runs in a fresh interpreter (the policy is per process) and counts the minor page
faults of ten alloc-and-free rounds after three that let the allocator settle: observed
state, not timing.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
from vqtok.tokenizer import heap

SCRIPT = """
import resource, sys, torch
from vqtok.tokenizer.accel import Accel
from vqtok.tokenizer import heap

if sys.argv[1] == "prepare":
    Accel.for_device("cpu").prepare(torch.nn.Linear(2, 2))  # what train and encode call
applied = bool(heap._applied)

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

MIB = int(sys.argv[2])

def step():  # six blocks, every page written, then all freed: a step's activations
    blocks = [torch.ones(MIB * 2**18) for _ in range(6)]
    del blocks

for _ in range(3):  # the allocator settles
    step()
before = faults()
for _ in range(10):
    step()
print(applied, faults() - before)
"""

def pages_per_round(mib: int) -> int:
    return 6 * mib * 2**20 // 4096


pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="the policy is glibc's mallopt")


def _run(mode: str, mib: int = 20, **env: str) -> tuple[bool, int]:
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode, str(mib)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    applied, faults = done.stdout.split()
    return applied == "True", int(faults)


def test_prepared_process_reuses_freed_blocks_instead_of_faulting_them_in():
    applied, faults = _run("prepare", 20)
    assert applied
    assert faults < pages_per_round(20) // 10  # ten rounds of 30,720 pages each: all reused


def test_blocks_above_the_mmap_threshold_are_still_mapped_afresh():
    """What quantizers.vq.scratch relies on: its temporaries go back to the kernel on free."""
    assert 40 * 2**20 > heap.MMAP_THRESHOLD
    applied, faults = _run("prepare", 40)
    assert applied
    assert faults > 9 * pages_per_round(40)  # each of the ten rounds faults its pages in


def test_the_environment_switch_leaves_malloc_as_it_is():
    applied, _ = _run("prepare", VQTOK_KEEP_FREED_MEMORY="0")
    assert not applied
