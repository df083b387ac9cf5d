"""Retry only what a retry can fix: I/O errors. A bad input fails the same way every time."""

from __future__ import annotations

from typing import Any


def retry_on_io_error(_task: Any, _task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except OSError:
        return True
    except Exception:  # noqa: BLE001 - anything else is deterministic: do not retry
        return False
    return False
