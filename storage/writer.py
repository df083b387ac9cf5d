"""What both token-file writers share: the checks on what callers hand them, the row buffer
that cuts fixed-size blocks, and the temp file published on success or dropped on error.

A format's writer (``parquet.ParquetTokenWriter``, ``hdf5.HDF5TokenWriter``) adds only how
a block is written and how its library handle is closed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import numpy as np
from vqtok.files.atomic import AtomicFile
from vqtok.storage.errors import TokenStoreError
from vqtok.storage.grid import check_codes_range
from vqtok.storage.meta import TokenMeta

#: Split names become folder names and HDF5 fixed-width strings: keep them short and plain.
SPLIT_NAME_MAX_BYTES = 32
_SPLIT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_INT32_MAX = np.iinfo(np.int32).max
_INT64_MAX = np.iinfo(np.int64).max


class Batch(NamedTuple):
    """A validated batch: codes flattened to (B, h*w) in the store's dtype, private copies."""

    codes: np.ndarray
    ids: np.ndarray
    labels: np.ndarray

    @property
    def num_rows(self) -> int:
        return int(self.ids.shape[0])


def check_split_name(split: Any, where: object) -> str:
    if not isinstance(split, str) or not _SPLIT_RE.fullmatch(split):
        raise TokenStoreError(
            where,
            f"split name {split!r} is not allowed; use 1-{SPLIT_NAME_MAX_BYTES} characters from "
            "A-Z a-z 0-9 _ . - starting with a letter or digit (it becomes a folder name)",
        )
    return split


def _integer_array(name: str, value: Any, where: object) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise TokenStoreError(
            where,
            f"{name} must be an integer array, got dtype {array.dtype}; "
            "cast with .astype(np.int64)",
        )
    return array


def normalize_batch(meta: TokenMeta, codes: Any, ids: Any, labels: Any, where: object) -> Batch:
    """Validate a batch against ``meta`` and return private, contiguous copies.

    Copying matters: writers buffer rows until a row group or chunk is full, and callers often
    reuse their batch buffers.
    """
    codes = _integer_array("codes", codes, where)
    if codes.ndim < 1 or codes.shape[1:] != meta.grid_shape:
        shape = ", ".join(str(n) for n in ("B", *meta.grid_shape))
        raise TokenStoreError(
            where, f"codes must have shape ({shape}) for this store, got {tuple(codes.shape)}"
        )
    rows = codes.shape[0]
    check_codes_range(codes, meta.codebook_size, where, "write")

    ids = _integer_array("ids", ids, where)
    if ids.shape != (rows,):
        raise TokenStoreError(
            where, f"ids must have shape ({rows},) to match codes, got {tuple(ids.shape)}"
        )
    if rows and (ids.min() < 0 or (ids.dtype.kind == "u" and ids.max() > _INT64_MAX)):
        raise TokenStoreError(
            where, "ids must be dataset indices in [0, 2**63); got a value outside that"
        )

    if labels is None:
        labels = np.full(rows, -1, dtype=np.int32)
    else:
        labels = _integer_array("labels", labels, where)
        if labels.shape != (rows,):
            raise TokenStoreError(
                where, f"labels must have shape ({rows},) to match codes, got {tuple(labels.shape)}"
            )
        if rows and (labels.min() < -1 or labels.max() > _INT32_MAX):
            raise TokenStoreError(where, "labels must be in [-1, 2**31) with -1 meaning 'no label'")

    return Batch(
        codes=codes.astype(meta.codes_dtype, copy=True).reshape(rows, meta.tokens_per_row),
        ids=ids.astype(np.int64, copy=True),
        labels=labels.astype(np.int32, copy=True),
    )


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


class PublishOnSuccess:
    """``with`` support for writers: ``close()`` (publish) on success, ``abort()`` on error."""

    def close(self) -> Any:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class TokenFileWriter(PublishOnSuccess):
    """Append token batches to one file; it appears under ``path`` only on success.

    Rows are buffered and written in blocks of exactly ``block_rows`` rows (row groups,
    chunks), so memory stays bounded and a file's bytes depend only on the rows written,
    never on how the caller batched them. Subclasses implement ``_split_column`` (how a
    split name is stored per row), ``_flush`` (write one block), ``_finish`` (close the
    library's handle after the last block) and ``_release`` (close it on abort).
    """

    def __init__(self, path: str | os.PathLike[str], meta: TokenMeta, block_rows: int) -> None:
        self.path = Path(path)
        self.meta = meta
        self.block_rows = block_rows
        self.num_rows = 0
        self._buffer = RowBuffer()
        self._closed = False
        self._target = AtomicFile(self.path)

    def write(self, codes: Any, ids: Any, labels: Any, split: str) -> None:
        """Append rows; ``labels=None`` stores -1 ("no label")."""
        if self._closed:
            raise TokenStoreError(self.path, "write() after close(); open a new writer")
        check_split_name(split, self.path)
        batch = normalize_batch(self.meta, codes, ids, labels, self.path)
        if not batch.num_rows:
            return
        self._buffer.append(batch.codes, batch.ids, batch.labels,
                            self._split_column(split, batch.num_rows))
        self.num_rows += batch.num_rows
        while self._buffer.num_rows >= self.block_rows:
            self._flush(self.block_rows)

    def close(self) -> Path:
        """Flush, fsync and rename into place; returns the final path."""
        if self._closed:
            return self.path
        try:
            if self._buffer.num_rows:
                self._flush(self._buffer.num_rows)
            self._finish()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return self._target.publish()

    def abort(self) -> None:
        """Drop everything written so far; nothing appears under the final name."""
        self._closed = True
        try:
            self._release()
        except Exception:  # the temp file is deleted next; its state does not matter
            pass
        self._target.abort()

    def _split_column(self, split: str, rows: int) -> np.ndarray:
        raise NotImplementedError

    def _flush(self, rows: int) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError
