"""Row buffering so files are laid out by row count, never by the caller's batch sizes."""

from __future__ import annotations

import numpy as np


class RowBuffer:
    """Holds rows of parallel column arrays until a full block (row group, chunk) can be cut.

    Cutting fixed-size blocks keeps memory bounded by one block plus one batch, and makes the
    bytes of a file depend only on the rows written, which is what lets a resumed or sharded
    run reproduce an uninterrupted one exactly.
    """

    def __init__(self) -> None:
        self._pieces: list[tuple[np.ndarray, ...]] = []
        self.num_rows = 0

    def append(self, *columns: np.ndarray) -> None:
        if columns[0].shape[0]:
            self._pieces.append(columns)
            self.num_rows += columns[0].shape[0]

    def take(self, rows: int) -> tuple[np.ndarray, ...]:
        """Remove and return the first ``rows`` rows (fewer if fewer are buffered)."""
        rows = min(rows, self.num_rows)
        taken: list[tuple[np.ndarray, ...]] = []
        got = 0
        while got < rows:
            piece = self._pieces[0]
            need = rows - got
            size = piece[0].shape[0]
            if size <= need:
                taken.append(piece)
                self._pieces.pop(0)
                got += size
            else:
                taken.append(tuple(column[:need] for column in piece))
                self._pieces[0] = tuple(column[need:] for column in piece)
                got += need
        self.num_rows -= rows
        if len(taken) == 1:
            return taken[0]
        return tuple(np.concatenate(parts) for parts in zip(*taken, strict=True))
