"""Streaming, atomic Parquet writer for token grids."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from vqtok.storage.atomic import AtomicFile, PublishOnSuccess
from vqtok.storage.batch import check_split_name, normalize_batch
from vqtok.storage.buffer import RowBuffer
from vqtok.storage.errors import TokenStoreError
from vqtok.storage.meta import TokenMeta
from vqtok.storage.parquet_schema import CODES_LEAF, arrow_schema, codes_type

CodesEncoding = Literal["auto", "dictionary", "byte_stream_split", "plain"]

# Defaults chosen with benchmarks/storage.py (10k x 7x7 skewed tokens, K=512):
# - dictionary indices are bit-packed at ceil(log2(distinct)) bits; at <= 256 distinct codes
#   that is whole bytes, which zstd's Huffman stage codes at ~1.01x the entropy. Above 256
#   the 9+ bit packing defeats zstd (~1.24x) and BYTE_STREAM_SPLIT (low and high bytes as
#   separate streams) gets ~1.14x, so "auto" decides from the first row group's codes.
# - zstd level 12: the smallest files among the levels that still write >= 5M tokens/s
#   (16+ save another 2% but write 4-5x slower).
# - row groups of ~1M tokens: 1k-row groups cost 6% in size and load slower; larger groups
#   only add writer memory.
DEFAULT_CODES_ENCODING: CodesEncoding = "auto"
DEFAULT_ZSTD_LEVEL = 12
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


class ParquetTokenWriter(PublishOnSuccess):
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
        self.path = Path(path)
        self.meta = meta
        self.row_group_size = row_group_size or default_row_group_size(meta)
        self.codes_encoding = codes_encoding
        self.compression_level = compression_level
        #: The encoding "auto" resolved to, known once the first row group is written.
        self.codes_encoding_used: str | None = None
        self.num_rows = 0
        self._schema = arrow_schema(meta)
        self._codes_type = codes_type(meta)
        self._buffer = RowBuffer()
        self._split_names: list[str] = []
        self._writer: pq.ParquetWriter | None = None
        self._target = AtomicFile(self.path)
        self._closed = False

    def write(self, codes: Any, ids: Any, labels: Any, split: str) -> None:
        """Append rows; ``labels=None`` stores -1 ("no label")."""
        if self._closed:
            raise TokenStoreError(self.path, "write() after close(); open a new writer")
        check_split_name(split, self.path)
        batch = normalize_batch(self.meta, codes, ids, labels, self.path)
        if not batch.num_rows:
            return
        if split not in self._split_names:
            self._split_names.append(split)
        split_index = np.full(batch.num_rows, self._split_names.index(split), dtype=np.int32)
        self._buffer.append(batch.codes, batch.ids, batch.labels, split_index)
        self.num_rows += batch.num_rows
        while self._buffer.num_rows >= self.row_group_size:
            self._flush(self.row_group_size)

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

    def close(self) -> Path:
        """Flush, fsync and rename into place; returns the final path."""
        if self._closed:
            return self.path
        try:
            if self._buffer.num_rows:
                self._flush(self._buffer.num_rows)
            if self._writer is None:
                self._writer = self._open(None)
            self._writer.close()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return self._target.publish()

    def abort(self) -> None:
        """Drop everything written so far; nothing appears under the final name."""
        self._closed = True
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # the temp file is deleted next; its state does not matter
                pass
        self._target.abort()

