"""Checks on what callers hand to writers, so bad tokens never reach a file."""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import numpy as np
from vqtok.storage.errors import TokenStoreError
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


def normalize_batch(meta: TokenMeta, codes: Any, ids: Any, labels: Any, where: object) -> Batch:
    """Validate a batch against ``meta`` and return private, contiguous copies.

    Copying matters: writers buffer rows until a row group or chunk is full, and callers often
    reuse their batch buffers.
    """
    codes = _integer_array("codes", codes, where)
    h, w = meta.grid_h, meta.grid_w
    if codes.ndim != 3 or codes.shape[1:] != (h, w):
        raise TokenStoreError(
            where, f"codes must have shape (B, {h}, {w}) for this store, got {tuple(codes.shape)}"
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
        codes=codes.astype(meta.codes_dtype, copy=True).reshape(rows, h * w),
        ids=ids.astype(np.int64, copy=True),
        labels=labels.astype(np.int32, copy=True),
    )
