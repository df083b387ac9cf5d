"""Map-style torch Dataset over token grids, for training priors.

The only storage module that imports torch; ``import storage`` loads it lazily.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from vqtok.storage.errors import TokenStoreError
from vqtok.storage.export import labels_path, read_sidecar
from vqtok.storage.grid import TokenGrid
from vqtok.storage.meta import TokenMeta
from vqtok.storage.reader import load_grid


class TokenDataset(Dataset):
    """``dataset[i] -> (LongTensor (h, w), label: int)``, label -1 when the store has none.

    ``source`` is a TokenGrid, a token store (.parquet, .h5 or sharded folder: loaded into one
    in-memory array) or a ``.npy`` made by ``export_memmap`` (memory-mapped, so worker processes
    share the page cache instead of copies). ``split`` keeps one split's rows.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | TokenGrid,
        split: str | None = None,
        *,
        verify: bool = True,
    ) -> None:
        self._npy: Path | None = None
        self._codes: np.ndarray | None = None
        self._labels: np.ndarray | None = None
        if isinstance(source, TokenGrid):
            grid = source if split is None else source.select(split)
            self._set_grid(grid)
        elif Path(source).suffix == ".npy":
            self._open_export(Path(source), split)
        else:
            self._set_grid(load_grid(source, split=split, verify=verify))

    def _set_grid(self, grid: TokenGrid) -> None:
        self.meta: TokenMeta = grid.meta
        self._codes, self._labels = grid.codes, grid.labels
        self._len = grid.num_rows

    def _open_export(self, npy: Path, split: str | None) -> None:
        sidecar = read_sidecar(npy)
        if split is not None and sidecar.get("split") != split:
            raise TokenStoreError(
                npy,
                f"export holds split {sidecar.get('split')!r}, not {split!r}; export with "
                f"split={split!r} or load the token store itself",
            )
        self.meta = TokenMeta.from_dict(sidecar["meta"], where=npy)
        self._npy = npy
        self._len = int(sidecar["shape"][0])
        self._map()
        assert self._codes is not None
        expected = self._len * self.meta.tokens_per_row
        if self._codes.shape != (expected,) or self._codes.dtype != self.meta.codes_dtype:
            raise TokenStoreError(
                npy,
                f"holds {self._codes.shape} {self._codes.dtype} but the sidecar says "
                f"({expected},) {self.meta.codes_dtype}; re-run export_memmap",
            )

    def _map(self) -> None:
        assert self._npy is not None
        self._codes = np.load(self._npy, mmap_mode="r")
        labels = labels_path(self._npy)
        self._labels = np.load(labels, mmap_mode="r") if labels.is_file() else None

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self._codes is None:
            self._map()  # unpickled in a worker process
        assert self._codes is not None
        if not -self._len <= index < self._len:
            raise IndexError(f"index {index} out of range for {self._len} rows")
        index %= self._len
        per_row = self.meta.tokens_per_row
        if self._npy is not None:
            flat = self._codes[index * per_row : (index + 1) * per_row]
            codes = np.asarray(flat, dtype=np.int64).reshape(self.meta.grid_shape)
        else:
            codes = np.asarray(self._codes[index], dtype=np.int64)
        label = -1 if self._labels is None else int(self._labels[index])
        return torch.from_numpy(codes), label

    def __getstate__(self) -> dict[str, Any]:
        # Ship the path, not the mapped pages: np.memmap pickles as a full copy.
        state = dict(self.__dict__)
        if self._npy is not None:
            state["_codes"] = state["_labels"] = None
        return state
