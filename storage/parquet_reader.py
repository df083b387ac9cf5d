"""Parquet token file -> TokenGrid without per-row Python work."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from vqtok.storage.errors import TokenStoreError
from vqtok.storage.grid import TokenGrid, check_grid, read_only
from vqtok.storage.meta import TokenMeta
from vqtok.storage.parquet_schema import COLUMNS, meta_from_schema


def read_parquet_meta(path: str | os.PathLike[str]) -> TokenMeta:
    """Only the footer is read: cheap enough to check a tokenizer before loading codes."""
    with _open(path) as parquet:
        return meta_from_schema(parquet.schema_arrow, path)


def _open(path: str | os.PathLike[str]) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except FileNotFoundError:
        raise TokenStoreError(path, "no such file") from None
    except (pa.ArrowException, OSError) as exc:
        raise TokenStoreError(path, f"not a readable Parquet file ({exc})") from None


def _values(array: pa.Array, dtype: np.dtype) -> np.ndarray:
    """A primitive array's values as a NumPy view of its data buffer, without a copy
    (``Array.to_numpy`` would import pandas, half a second of a one-shot command)."""
    if pa.from_numpy_dtype(dtype) != array.type:
        raise TypeError(f"codes are {array.type}, the metadata says {dtype}")
    data = array.buffers()[1]
    if data is None:
        return np.empty(0, dtype=dtype)
    return np.frombuffer(data, dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize)


def _column_values(column: pa.ChunkedArray, where: object) -> np.ndarray:
    """A primitive column as one NumPy array (a view when it is one chunk)."""
    if column.null_count:
        raise TokenStoreError(where, f"column of {column.type} has null rows; the file is corrupt")
    dtype = np.dtype(column.type.to_pandas_dtype())
    parts = [_values(chunk, dtype) for chunk in column.chunks]
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


def _codes(column: pa.ChunkedArray, meta: TokenMeta, where: object) -> np.ndarray:
    """Zero-copy for a single row group, one copy otherwise.

    ``flatten()`` (not ``.values``) because a sliced list array's ``.values`` ignores the slice
    offset and would return another row's tokens.
    """
    shape = (meta.grid_h, meta.grid_w)
    if column.null_count:
        raise TokenStoreError(where, "codes column has null rows; the file is corrupt")
    flat = [chunk.flatten() for chunk in column.chunks]
    if any(values.null_count for values in flat):
        raise TokenStoreError(where, "codes contain null tokens; the file is corrupt")
    parts = [_values(values, meta.codes_dtype) for values in flat]
    if not parts:
        return np.empty((0, *shape), dtype=meta.codes_dtype)
    if len(parts) == 1:
        return parts[0].reshape(-1, *shape)
    out = np.empty((len(column), meta.tokens_per_row), dtype=meta.codes_dtype)
    start = 0
    for part in parts:
        rows = part.size // meta.tokens_per_row
        out[start : start + rows] = part.reshape(rows, -1)
        start += rows
    return out.reshape(-1, *shape)


def _splits(column: pa.ChunkedArray, where: object) -> tuple[np.ndarray, tuple[str, ...]]:
    if column.null_count:
        raise TokenStoreError(where, "split column has nulls; the file is corrupt")
    if not pa.types.is_dictionary(column.type):
        column = column.dictionary_encode()
    # Row groups may carry different dictionaries (a split first seen mid-file).
    column = pa.table({"split": column}).unify_dictionaries().column(0)
    if not column.num_chunks:
        return np.zeros(0, dtype=np.int32), ()
    names = tuple(column.chunk(0).dictionary.to_pylist())
    index = np.concatenate(
        [_values(chunk.indices, np.dtype(chunk.indices.type.to_pandas_dtype()))
         for chunk in column.chunks]
    )
    return index.astype(np.int32, copy=False), names


def read_parquet_grid(path: str | os.PathLike[str], *, use_threads: bool = True) -> TokenGrid:
    path = Path(path)
    with _open(path) as parquet:
        meta = meta_from_schema(parquet.schema_arrow, path)
        try:
            table = parquet.read(columns=list(COLUMNS), use_threads=use_threads)
        except (pa.ArrowException, OSError) as exc:
            raise TokenStoreError(
                path, f"cannot decode the Parquet data ({exc}); the file is corrupt"
            ) from None
    codes = _codes(table.column("codes"), meta, path)
    ids = _column_values(table.column("id"), path)
    labels = _column_values(table.column("label"), path)
    split_index, split_names = _splits(table.column("split"), path)
    read_only(codes, ids, labels, split_index)
    return check_grid(TokenGrid(codes, ids, labels, split_index, split_names, meta), path)
