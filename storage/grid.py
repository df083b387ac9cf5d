"""TokenGrid: what readers return, as plain NumPy arrays."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
from vqtok.storage.errors import TokenStoreError
from vqtok.storage.meta import TokenMeta

if TYPE_CHECKING:
    import pandas as pd


def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))[0])


def check_codes_range(codes: np.ndarray, codebook_size: int, where: object, what: str) -> None:
    """codes must index the codebook; name the first bad row so the caller can find it."""
    if codes.size == 0:
        return
    low, high = codes.min(), codes.max()
    if low < 0 or high >= codebook_size:
        bad = (codes < 0) | (codes >= codebook_size)
        row = _first_bad(bad)
        value = codes.reshape(codes.shape[0], -1)[row][bad.reshape(bad.shape[0], -1)[row]][0]
        raise TokenStoreError(
            where,
            f"{what}: code {int(value)} at row {row} is outside the codebook [0, {codebook_size}); "
            "the tokens belong to another tokenizer or are corrupt",
        )


@dataclass(frozen=True)
class TokenGrid:
    """Codes (N, h, w), or (N, h, w, depth), with their ids, labels and splits, plus the
    store's metadata.

    Splits are kept as ``split_index`` into ``split_names`` (like a categorical) so millions of
    rows do not become millions of Python strings; ``splits`` expands them on demand.
    Arrays returned by the readers are read-only (often zero-copy views of Arrow buffers);
    call ``.copy()`` to modify them.

    Unpacking gives ``codes, meta``, so ``codes, meta = load_grid(path)`` works as well as
    ``grid = load_grid(path); grid.labels``.
    """

    codes: np.ndarray
    ids: np.ndarray
    labels: np.ndarray
    split_index: np.ndarray
    split_names: tuple[str, ...]
    meta: TokenMeta

    def __iter__(self) -> Iterator[object]:
        yield self.codes
        yield self.meta

    @property
    def num_rows(self) -> int:
        return int(self.codes.shape[0])

    @property
    def splits(self) -> np.ndarray:
        names = np.array(self.split_names, dtype=object)
        return names[self.split_index] if len(names) else np.empty(0, dtype=object)

    def select(self, split: str) -> TokenGrid:
        """Rows of one split (a copy); an empty grid when the split has no rows here."""
        if split not in self.split_names:
            keep = np.zeros(self.num_rows, dtype=bool)
            names: tuple[str, ...] = ()
            index = np.zeros(0, dtype=np.int32)
        else:
            keep = self.split_index == self.split_names.index(split)
            names = (split,)
            index = np.zeros(int(keep.sum()), dtype=np.int32)
        return TokenGrid(
            codes=self.codes[keep],
            ids=self.ids[keep],
            labels=self.labels[keep],
            split_index=index,
            split_names=names,
            meta=self.meta,
        )

    def to_arrow(self) -> pa.Table:
        """The same table the Parquet files hold, schema metadata included."""
        from vqtok.storage.parquet import arrow_schema

        schema = arrow_schema(self.meta)
        flat = np.ascontiguousarray(self.codes).reshape(-1)
        codes = pa.FixedSizeListArray.from_arrays(pa.array(flat), self.meta.tokens_per_row)
        split = pa.DictionaryArray.from_arrays(
            pa.array(self.split_index.astype(np.int32, copy=False)),
            pa.array(list(self.split_names), type=pa.string()),
        )
        columns = [pa.array(self.ids), pa.array(self.labels), split, codes]
        return pa.Table.from_arrays(columns, schema=schema)

    def to_pandas(self) -> pd.DataFrame:
        """One row per image, like ``pd.read_parquet`` of a token file; meta in ``df.attrs``."""
        frame = self.to_arrow().to_pandas()
        frame.attrs["vqtok_meta"] = self.meta.to_dict()
        return frame


def check_grid(grid: TokenGrid, where: object) -> TokenGrid:
    """Refuse grids that contradict their metadata: wrong shape, dtype or out-of-codebook codes."""
    meta = grid.meta
    codes = grid.codes
    if codes.shape[1:] != meta.grid_shape:
        raise TokenStoreError(
            where,
            f"codes have shape {tuple(codes.shape)} but the metadata says "
            f"{meta.grid_text} grids; the file is corrupt or was not written by vqtok",
        )
    if codes.dtype != meta.codes_dtype:
        raise TokenStoreError(
            where,
            f"codes are {codes.dtype} but a codebook of {meta.codebook_size} is stored as "
            f"{meta.codes_dtype}; the file was not written by vqtok",
        )
    rows = codes.shape[0]
    for name in ("ids", "labels", "split_index"):
        if getattr(grid, name).shape != (rows,):
            raise TokenStoreError(
                where,
                f"{name} has shape {getattr(grid, name).shape} but there are {rows} rows of codes",
            )
    if rows and grid.split_index.max(initial=0) >= len(grid.split_names):
        raise TokenStoreError(where, "split column refers to a split name that is not stored")
    check_codes_range(codes, meta.codebook_size, where, "read")
    return grid


def read_only(*arrays: np.ndarray) -> None:
    for array in arrays:
        array.flags.writeable = False


def concat_grids(grids: Sequence[TokenGrid], meta: TokenMeta) -> TokenGrid:
    """One copy into preallocated arrays; split names are merged in first-seen order."""
    rows = sum(grid.num_rows for grid in grids)
    codes = np.empty((rows, *meta.grid_shape), dtype=meta.codes_dtype)
    ids = np.empty(rows, dtype=np.int64)
    labels = np.empty(rows, dtype=np.int32)
    split_index = np.empty(rows, dtype=np.int32)
    names: list[str] = []
    start = 0
    for grid in grids:
        stop = start + grid.num_rows
        codes[start:stop] = grid.codes
        ids[start:stop] = grid.ids
        labels[start:stop] = grid.labels
        for name in grid.split_names:
            if name not in names:
                names.append(name)
        remap = np.array([names.index(name) for name in grid.split_names], dtype=np.int32)
        split_index[start:stop] = remap[grid.split_index] if len(remap) else 0
        start = stop
    read_only(codes, ids, labels, split_index)
    return TokenGrid(codes, ids, labels, split_index, tuple(names), meta)
