"""Token files in HDF5: the streaming writer and the reader.

Datasets ``codes`` (N, h, w), or (N, h, w, depth) for codes with depth, ``ids``, ``labels``
and ``splits`` (fixed-width UTF-8 bytes), gzip-compressed in chunks; the store's TokenMeta is
JSON in the root attributes (with flat copies for people browsing with h5ls).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from vqtok.storage.errors import TokenStoreError
from vqtok.storage.grid import TokenGrid, check_grid, read_only
from vqtok.storage.meta import META_KEY, TokenMeta
from vqtok.storage.writer import SPLIT_NAME_MAX_BYTES, TokenFileWriter

# --- writing ----------------------------------------------------------------------------------

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


class HDF5TokenWriter(TokenFileWriter):
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
        super().__init__(path, meta, chunk_rows)
        self.chunk_rows = chunk_rows
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
        grid = meta.grid_shape
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

    def _split_column(self, split: str, rows: int) -> np.ndarray:
        """Fixed-width UTF-8 bytes per row."""
        return np.full(rows, split.encode(), dtype=SPLIT_DTYPE)

    def _flush(self, rows: int) -> None:
        codes, ids, labels, splits = self._buffer.take(rows)
        start = self._ids.shape[0]
        stop = start + rows
        for dataset, values in (
            (self._codes, codes.reshape(rows, *self.meta.grid_shape)),
            (self._ids, ids),
            (self._labels, labels),
            (self._splits, splits),
        ):
            dataset.resize(stop, axis=0)
            dataset[start:stop] = values

    def _finish(self) -> None:
        self._file.close()

    def _release(self) -> None:
        self._file.close()


# --- reading ----------------------------------------------------------------------------------

_DATASETS = ("codes", "ids", "labels", "splits")


def _open(path: str | os.PathLike[str]) -> h5py.File:
    if not Path(path).is_file():
        raise TokenStoreError(path, "no such file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise TokenStoreError(path, f"not a readable HDF5 file ({exc})") from None


def _meta(handle: h5py.File, where: object) -> TokenMeta:
    raw = handle.attrs.get(META_KEY)
    if raw is None:
        raise TokenStoreError(where, f"no '{META_KEY}' attribute; not a vqtok token file")
    return TokenMeta.from_json(raw, where=where)


def read_hdf5_meta(path: str | os.PathLike[str]) -> TokenMeta:
    with _open(path) as handle:
        return _meta(handle, path)


def decode_splits(raw: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
    """Fixed-width names -> (index, names) in first-seen order.

    Work is per run of equal names, not per row: a split is written in contiguous batches.
    """
    if raw.size == 0:
        return np.zeros(0, dtype=np.int32), ()
    starts = np.flatnonzero(np.concatenate(([True], raw[1:] != raw[:-1])))
    lengths = np.diff(np.append(starts, raw.size))
    names: list[str] = []
    run_index = np.empty(starts.size, dtype=np.int32)
    for run, head in enumerate(raw[starts]):
        name = head.decode("utf-8")
        if name not in names:
            names.append(name)
        run_index[run] = names.index(name)
    return np.repeat(run_index, lengths), tuple(names)


def read_hdf5_split_rows(path: str | os.PathLike[str]) -> dict[str, int]:
    """Rows per split, reading only the ``splits`` dataset."""
    with _open(path) as handle:
        if "splits" not in handle:
            raise TokenStoreError(path, "missing dataset splits; not a vqtok token file")
        index, names = decode_splits(handle["splits"][()])
    return {name: int((index == i).sum()) for i, name in enumerate(names)}


def read_hdf5_grid(path: str | os.PathLike[str]) -> TokenGrid:
    path = Path(path)
    with _open(path) as handle:
        meta = _meta(handle, path)
        missing = [name for name in _DATASETS if name not in handle]
        if missing:
            raise TokenStoreError(
                path, f"missing dataset(s) {', '.join(missing)}; not a vqtok token file"
            )
        try:
            codes, ids, labels, raw_splits = (handle[name][()] for name in _DATASETS)
        except OSError as exc:
            raise TokenStoreError(
                path, f"cannot decode the HDF5 data ({exc}); the file is corrupt"
            ) from None
    if raw_splits.dtype.kind != "S":
        raise TokenStoreError(
            path, f"splits dataset is {raw_splits.dtype}, expected fixed-width bytes"
        )
    split_index, split_names = decode_splits(raw_splits)
    for name, array, dtype in (("ids", ids, np.int64), ("labels", labels, np.int32)):
        if array.dtype != dtype:
            raise TokenStoreError(
                path, f"{name} dataset is {array.dtype}, expected {np.dtype(dtype)}"
            )
    read_only(codes, ids, labels, split_index)
    return check_grid(TokenGrid(codes, ids, labels, split_index, split_names, meta), path)
