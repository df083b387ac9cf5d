"""Open files (and what was read from them) that a source keeps per process.

A source is pickled into DataLoader worker processes, or inherited by fork: a file handle
must not travel with it (pickle refuses; a forked one shares its file offset with the
parent's, so two processes seeking it read each other's bytes). ``ProcessCache`` is empty
when pickled and forgets, without closing, what another process opened.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any


class ProcessCache:
    """Up to ``limit`` objects made on first use in this process, least recently used dropped
    (and closed, if they have ``close``). ``lock`` serializes users that share one object."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self.lock = threading.RLock()

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        if self._pid != os.getpid():  # forked: the parent's handles are not ours to use
            self._reset()
        with self.lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            value = make()
            self._items[key] = value
            while len(self._items) > self.limit:
                _, old = self._items.popitem(last=False)
                if hasattr(old, "close"):
                    old.close()
            return value

    def close(self) -> None:
        """Close everything this process opened."""
        if self._pid != os.getpid():
            self._reset()
            return
        with self.lock:
            for item in self._items.values():
                if hasattr(item, "close"):
                    item.close()
            self._items.clear()

    def __getstate__(self) -> dict[str, Any]:
        return {"limit": self.limit}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.limit = state["limit"]
        self._reset()
