"""Token files in Parquet: the schema (and the metadata it carries), the streaming writer,
and the reader (to a TokenGrid without per-row Python work).

A file holds columns ``id`` (int64, delta-coded), ``label`` (int32), ``split`` (dictionary
string) and ``codes`` (a fixed-size list of h*w values in the store's dtype); the store's
TokenMeta is JSON in the schema metadata.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from vqtok.storage.errors import TokenStoreError
from vqtok.storage.grid import TokenGrid, check_grid, read_only
from vqtok.storage.meta import META_KEY, TokenMeta
from vqtok.storage.writer import TokenFileWriter

# --- schema -----------------------------------------------------------------------------------

COLUMNS = ("id", "label", "split", "codes")
#: Parquet path of the codes values inside the list column (Parquet's compliant LIST layout).
CODES_LEAF = "codes.list.element"


def codes_type(meta: TokenMeta) -> pa.DataType:
    # Named "element" because that is what Parquet's LIST layout calls it, so the schema read
    # back equals the schema written.
    item = pa.field("element", pa.from_numpy_dtype(meta.codes_dtype), nullable=False)
    return pa.list_(item, meta.tokens_per_row)


def arrow_schema(meta: TokenMeta) -> pa.Schema:
    """Non-null fields: Parquet then stores no definition levels worth speaking of."""
    return pa.schema(
        [
            pa.field("id", pa.int64(), nullable=False),
            pa.field("label", pa.int32(), nullable=False),
            pa.field("split", pa.dictionary(pa.int32(), pa.string()), nullable=False),
            pa.field("codes", codes_type(meta), nullable=False),
        ],
        metadata={META_KEY: meta.to_json()},
    )


def meta_from_schema(schema: pa.Schema, where: object) -> TokenMeta:
    """Metadata of a token table, after checking its columns can be what vqtok wrote."""
    raw = (schema.metadata or {}).get(META_KEY.encode())
    if raw is None:
        raise TokenStoreError(
            where, f"no '{META_KEY}' in the Parquet schema metadata; not a vqtok token file"
        )
    meta = TokenMeta.from_json(raw, where=where)
    missing = [name for name in COLUMNS if name not in schema.names]
    if missing:
        raise TokenStoreError(
            where, f"missing column(s) {', '.join(missing)}; not a vqtok token file"
        )
    expected = {"id": pa.int64(), "label": pa.int32(), "codes": codes_type(meta)}
    for name, want in expected.items():
        got = schema.field(name).type
        if not got.equals(want):
            raise TokenStoreError(
                where,
                f"column {name} is {got} but the metadata (codebook {meta.codebook_size}, grid "
                f"{meta.grid_text}) needs {want}; the file is corrupt or was rewritten "
                "by another tool",
            )
    return meta


# --- writing ----------------------------------------------------------------------------------

CodesEncoding = Literal["auto", "dictionary", "byte_stream_split", "plain"]

# Defaults chosen with benchmarks/storage.py (10k x 7x7 skewed tokens, K=512):
# - dictionary indices are bit-packed at ceil(log2(distinct)) bits; at <= 256 distinct codes
#   that is whole bytes, which zstd's Huffman stage codes at ~1.01x the entropy. Above 256
#   the 9+ bit packing defeats zstd (~1.24x) and BYTE_STREAM_SPLIT (low and high bytes as
#   separate streams) gets ~1.14x, so "auto" decides from the first row group's codes.
# - zstd level 6: level 12 saves 1% on byte-stream-split codes (> 256 codes in use; at most
#   256, every level writes the same dictionary file) but writes 2.5-3x slower, and an
#   incremental update rewrites every shard it touches, kept rows and all: writing is a cost
#   of every nightly run, not only of the first (16+ save another 2%, 6-10x slower).
# - row groups of ~1M tokens: 1k-row groups cost 6% in size and load slower; larger groups
#   only add writer memory.
DEFAULT_CODES_ENCODING: CodesEncoding = "auto"
DEFAULT_ZSTD_LEVEL = 6
DEFAULT_ROW_GROUP_TOKENS = 1 << 20
DICTIONARY_MAX_DISTINCT = 256
_ENCODINGS = ("auto", "dictionary", "byte_stream_split", "plain")


def default_row_group_size(meta: TokenMeta) -> int:
    return max(1, DEFAULT_ROW_GROUP_TOKENS // meta.tokens_per_row)


def choose_codes_encoding(sample: np.ndarray | None) -> str:
    """Dictionary when its indices fit a byte, else byte-stream-split (see the notes above)."""
    if sample is None or sample.size == 0:
        return "byte_stream_split"
    flat = sample.reshape(-1)
    if flat.dtype == np.uint16:  # a bincount is one pass, no sort
        distinct = int(np.count_nonzero(np.bincount(flat)))
    else:
        distinct = int(np.unique(flat).size)
    return "dictionary" if distinct <= DICTIONARY_MAX_DISTINCT else "byte_stream_split"


def parquet_write_options(codes_encoding: str, compression_level: int) -> dict[str, Any]:
    """Keyword arguments for pq.ParquetWriter; ids are delta-coded (usually consecutive)."""
    dictionary = ["label", "split"]
    column_encoding = {"id": "DELTA_BINARY_PACKED"}
    if codes_encoding == "dictionary":
        dictionary.append(CODES_LEAF)
    elif codes_encoding == "byte_stream_split":
        column_encoding[CODES_LEAF] = "BYTE_STREAM_SPLIT"
    return {
        "compression": "zstd",
        "compression_level": compression_level,
        "use_dictionary": dictionary,
        "column_encoding": column_encoding,
        "write_statistics": True,
        "store_schema": True,
    }


class ParquetTokenWriter(TokenFileWriter):
    """Append token batches to one Parquet file; it appears under ``path`` only on success.

    Rows are buffered and cut into row groups of exactly ``row_group_size`` rows, so memory
    stays bounded and the file's bytes do not depend on how the caller batched the rows.
    An exception inside ``with`` (or ``abort()``) deletes the temp file and publishes nothing.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        meta: TokenMeta,
        *,
        row_group_size: int | None = None,
        codes_encoding: CodesEncoding = DEFAULT_CODES_ENCODING,
        compression_level: int = DEFAULT_ZSTD_LEVEL,
    ) -> None:
        if codes_encoding not in _ENCODINGS:
            raise TokenStoreError(
                path, f"codes_encoding must be one of {_ENCODINGS}, got {codes_encoding!r}"
            )
        if row_group_size is not None and row_group_size < 1:
            raise TokenStoreError(path, f"row_group_size must be >= 1, got {row_group_size}")
        super().__init__(path, meta, row_group_size or default_row_group_size(meta))
        self.row_group_size = self.block_rows
        self.codes_encoding = codes_encoding
        self.compression_level = compression_level
        #: The encoding "auto" resolved to, known once the first row group is written.
        self.codes_encoding_used: str | None = None
        self._schema = arrow_schema(meta)
        self._codes_type = codes_type(meta)
        self._split_names: list[str] = []
        self._writer: pq.ParquetWriter | None = None

    def _split_column(self, split: str, rows: int) -> np.ndarray:
        """Indices into the file's split dictionary."""
        if split not in self._split_names:
            self._split_names.append(split)
        return np.full(rows, self._split_names.index(split), dtype=np.int32)

    def _open(self, sample: np.ndarray | None) -> pq.ParquetWriter:
        encoding = self.codes_encoding
        if encoding == "auto":
            encoding = choose_codes_encoding(sample)
        self.codes_encoding_used = encoding
        options = parquet_write_options(encoding, self.compression_level)
        return pq.ParquetWriter(self._target.temp, self._schema, **options)

    def _flush(self, rows: int) -> None:
        codes, ids, labels, split_index = self._buffer.take(rows)
        if self._writer is None:
            self._writer = self._open(codes)
        split = pa.DictionaryArray.from_arrays(
            pa.array(split_index), pa.array(self._split_names, type=pa.string())
        )
        flat = pa.array(codes.reshape(-1))
        table = pa.Table.from_arrays(
            [
                pa.array(ids),
                pa.array(labels),
                split,
                pa.FixedSizeListArray.from_arrays(flat, type=self._codes_type),
            ],
            schema=self._schema,
        )
        self._writer.write_table(table, row_group_size=rows)

    def _finish(self) -> None:
        if self._writer is None:  # no rows: still a valid, empty file
            self._writer = self._open(None)
        self._writer.close()

    def _release(self) -> None:
        if self._writer is not None:
            self._writer.close()


# --- reading ----------------------------------------------------------------------------------


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
    shape = meta.grid_shape
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


def read_parquet_split_rows(path: str | os.PathLike[str]) -> dict[str, int]:
    """Rows per split, reading only the ``split`` column."""
    with _open(path) as parquet:
        meta_from_schema(parquet.schema_arrow, path)  # a vqtok token file, or one line why
        try:
            column = parquet.read(columns=["split"]).column(0)
        except (pa.ArrowException, OSError) as exc:
            raise TokenStoreError(path, f"cannot decode the Parquet data ({exc}); the file is "
                                  "corrupt") from None
    index, names = _splits(column, path)
    return {name: int((index == i).sum()) for i, name in enumerate(names)}


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
