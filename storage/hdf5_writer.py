"""Streaming, atomic HDF5 writer for token grids."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from vqtok.storage.atomic import AtomicFile, PublishOnSuccess
from vqtok.storage.batch import SPLIT_NAME_MAX_BYTES, check_split_name, normalize_batch
from vqtok.storage.buffer import RowBuffer
from vqtok.storage.errors import TokenStoreError
from vqtok.storage.meta import META_KEY, TokenMeta

#: About 1k rows a chunk: big enough for gzip to find the skew, small enough to read a slice.
DEFAULT_CHUNK_ROWS = 1024
#: gzip is the one compressor every HDF5 build has; level chosen with benchmarks/storage.py.
DEFAULT_GZIP_LEVEL = 4
SPLIT_DTYPE = np.dtype(f"S{SPLIT_NAME_MAX_BYTES}")


def write_meta_attrs(attrs: h5py.AttributeManager, meta: TokenMeta) -> None:
    """The JSON is what readers trust; the flat copies are for people browsing with h5ls."""
    attrs[META_KEY] = meta.to_json()
    for key, value in meta.to_dict().items():
        if key != "extra":
            attrs[key] = value


class HDF5TokenWriter(PublishOnSuccess):
    """Append token batches to one HDF5 file; it appears under ``path`` only on success.

    Datasets ``codes`` (N, h, w), ``ids``, ``labels`` and ``splits`` (fixed-width UTF-8 bytes)
    grow by whole chunks: rows are buffered until a chunk is full, so every chunk is compressed
    and written once and the file does not depend on the caller's batch sizes.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        meta: TokenMeta,
        *,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        compression_level: int = DEFAULT_GZIP_LEVEL,
    ) -> None:
        if chunk_rows < 1:
            raise TokenStoreError(path, f"chunk_rows must be >= 1, got {chunk_rows}")
        self.path = Path(path)
        self.meta = meta
        self.chunk_rows = chunk_rows
        self.num_rows = 0
        self._buffer = RowBuffer()
        self._closed = False
        self._target = AtomicFile(self.path)
        try:
            self._file = h5py.File(self._target.temp, "w")
            self._create(compression_level)
        except BaseException:
            self._target.abort()
            raise

    def _create(self, level: int) -> None:
        meta, rows = self.meta, self.chunk_rows
        filters: dict[str, Any] = {
            "compression": "gzip",
            "compression_opts": level,
            "shuffle": True,
        }
        grid = (meta.grid_h, meta.grid_w)
        self._codes = self._file.create_dataset(
            "codes",
            shape=(0, *grid),
            maxshape=(None, *grid),
            chunks=(rows, *grid),
            dtype=meta.codes_dtype,
            **filters,
        )
        self._ids = self._file.create_dataset(
            "ids", shape=(0,), maxshape=(None,), chunks=(rows,), dtype=np.int64, **filters
        )
        self._labels = self._file.create_dataset(
            "labels", shape=(0,), maxshape=(None,), chunks=(rows,), dtype=np.int32, **filters
        )
        self._splits = self._file.create_dataset(
            "splits", shape=(0,), maxshape=(None,), chunks=(rows,), dtype=SPLIT_DTYPE, **filters
        )
        write_meta_attrs(self._file.attrs, meta)

    def write(self, codes: Any, ids: Any, labels: Any, split: str) -> None:
        """Append rows; ``labels=None`` stores -1 ("no label")."""
        if self._closed:
            raise TokenStoreError(self.path, "write() after close(); open a new writer")
        check_split_name(split, self.path)
        batch = normalize_batch(self.meta, codes, ids, labels, self.path)
        if not batch.num_rows:
            return
        splits = np.full(batch.num_rows, split.encode(), dtype=SPLIT_DTYPE)
        self._buffer.append(batch.codes, batch.ids, batch.labels, splits)
        self.num_rows += batch.num_rows
        while self._buffer.num_rows >= self.chunk_rows:
            self._flush(self.chunk_rows)

    def _flush(self, rows: int) -> None:
        codes, ids, labels, splits = self._buffer.take(rows)
        start = self._ids.shape[0]
        stop = start + rows
        for dataset, values in (
            (self._codes, codes.reshape(rows, self.meta.grid_h, self.meta.grid_w)),
            (self._ids, ids),
            (self._labels, labels),
            (self._splits, splits),
        ):
            dataset.resize(stop, axis=0)
            dataset[start:stop] = values

    def close(self) -> Path:
        """Flush, fsync and rename into place; returns the final path."""
        if self._closed:
            return self.path
        try:
            if self._buffer.num_rows:
                self._flush(self._buffer.num_rows)
            self._file.close()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return self._target.publish()

    def abort(self) -> None:
        """Drop everything written so far; nothing appears under the final name."""
        self._closed = True
        try:
            self._file.close()
        except Exception:  # the temp file is deleted next; its state does not matter
            pass
        self._target.abort()

