"""Keep freed CPU memory for the next step instead of handing it back to the kernel.

A training step or an encode batch frees a few hundred MiB of activations at once and asks
for the same sizes again moments later. glibc's malloc gives the top of its heap back to the
kernel whenever more than its trim threshold is free there (learned at run time: twice the
mmap threshold, at most 64 MiB), so every step paid a page fault for each page it had just
released: on the 2-core CPU, 1.8 M minor faults and 3.5 s of system time per 100 training
steps of the default model (18 % of their CPU), and 1.46 M faults per 20,000-image encode
(benchmarks/heap.py). PyTorch has no caching allocator on CPU; its tuning guides preload
jemalloc or tcmalloc for this. ``keep_freed_memory`` gets the same effect from glibc itself
with two ``mallopt`` calls, once per process: the mmap threshold fixed at glibc's largest
learned value (so requests above it are still mapped afresh and unmapped on free, which
``quantizers.vq.scratch`` relies on) and the trim threshold raised to ``TRIM_THRESHOLD``.
The cost is up to that much freed memory kept in the process's RSS.

``VQTOK_KEEP_FREED_MEMORY=0`` in the environment leaves malloc as it is.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

#: glibc's largest learned mmap threshold (HEAP_MAX_SIZE / 2 on 64-bit): requests above it
#: are always mapped afresh and unmapped on free.
MMAP_THRESHOLD = 32 * 2**20
#: Free memory at the top of the heap kept for reuse (glibc learns at most 64 MiB).
TRIM_THRESHOLD = 256 * 2**20
ENV_SWITCH = "VQTOK_KEEP_FREED_MEMORY"

_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_THRESHOLD = -3

_applied: bool | None = None  # None: not tried yet in this process


def keep_freed_memory() -> bool:
    """Apply the policy above once per process; True when glibc took it. A no-op (False)
    off Linux/glibc and when ``VQTOK_KEEP_FREED_MEMORY=0``."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if os.environ.get(ENV_SWITCH, "1").strip() == "0":
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Setting either threshold stops glibc learning both, so the mmap one is set as well.
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
