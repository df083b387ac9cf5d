"""Test-only pause points: fault-injection tests stop the real CLI at a known state.

With ``VQTOK_PAUSE_AT="NAME:N"`` the N-th ``pause_point(NAME)`` call of the process writes
the file named by ``VQTOK_PAUSE_MARKER`` and then waits until the process is killed or
interrupted. A test that waits for the marker and then sends its signal interrupts the run
exactly there, however fast or slow the machine is. Without the variable (always, outside
the tests) a pause point costs one environment lookup.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

_hits: Counter[str] = Counter()


def pause_point(name: str) -> None:
    spec = os.environ.get("VQTOK_PAUSE_AT")
    if not spec:
        return
    wanted, _, count = spec.rpartition(":")
    if wanted != name:
        return
    _hits[name] += 1
    if _hits[name] != int(count):
        return
    marker = os.environ.get("VQTOK_PAUSE_MARKER")
    if marker:
        tmp = Path(marker).with_name(Path(marker).name + ".tmp")
        tmp.write_text(f"{name}:{count} pid {os.getpid()}\n")
        os.replace(tmp, marker)
    while True:  # until SIGKILL, or SIGINT (KeyboardInterrupt) in the main thread
        time.sleep(0.05)
