"""The one exception type of the storage layer."""

from __future__ import annotations

from pathlib import Path


class TokenStoreError(ValueError):
    """A token file, batch or store is unusable; the message names the file and the fix.

    A ValueError subclass so callers that already guard bad input with ``except ValueError``
    keep working, while code that wants to tell storage problems apart can catch this.
    """

    def __init__(self, where: str | Path | None, problem: str) -> None:
        self.path = str(where) if where is not None else None
        message = f"{where}: {problem}" if where is not None else problem
        # One line, always: messages end up in logs and flow run states.
        super().__init__(" ".join(message.split()))
