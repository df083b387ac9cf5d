"""HDF5 token file -> TokenGrid."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
from vqtok.storage.errors import TokenStoreError
from vqtok.storage.grid import TokenGrid, check_grid, read_only
from vqtok.storage.meta import META_KEY, TokenMeta

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
