"""Test-only pause points: fault-injection tests stop the real CLI at a known state.

With ``VQTOK_PAUSE_AT="NAME:N"`` the N-th ``pause_point(NAME)`` call of the process writes
the file named by ``VQTOK_PAUSE_MARKER`` and then waits until the process is killed or
interrupted. A test that waits for the marker and then sends its signal interrupts the run
exactly there, however fast or slow the machine is.

With ``VQTOK_CRASH_AT="NAME:N"`` the process kills itself (SIGKILL) at that point instead: a
Dask worker dying mid-shard. With ``VQTOK_CRASH_ONCE=PATH`` as well, only the first process
to get there (the one that creates PATH) dies; the others, and the worker started in the dead
one's place, run on. Without the variables (always, outside the tests) a pause point costs two
environment lookups.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

from vqtok.files.atomic import write_bytes_atomic

_hits: Counter[tuple[str, str]] = Counter()


def _reached(variable: str, name: str) -> bool:
    """Whether this call is the N-th ``name`` call that ``variable`` ("NAME:N") asks for."""
    spec = os.environ.get(variable)
    if not spec:
        return False
    wanted, _, count = spec.rpartition(":")
    if wanted != name:
        return False
    _hits[variable, name] += 1
    return _hits[variable, name] == int(count)


def _crash_here() -> None:
    once = os.environ.get("VQTOK_CRASH_ONCE")
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return  # another process has already died here
    os.kill(os.getpid(), signal.SIGKILL)


def pause_point(name: str) -> None:
    if _reached("VQTOK_CRASH_AT", name):
        _crash_here()
    if not _reached("VQTOK_PAUSE_AT", name):
        return
    count = os.environ["VQTOK_PAUSE_AT"].rpartition(":")[2]
    marker = os.environ.get("VQTOK_PAUSE_MARKER")
    if marker:
        write_bytes_atomic(Path(marker), f"{name}:{count} pid {os.getpid()}\n".encode())
    while True:  # until SIGKILL, or SIGINT (KeyboardInterrupt) in the main thread
        time.sleep(0.05)
