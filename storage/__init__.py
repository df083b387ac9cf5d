"""vqtok token storage: integer code grids in, integer code grids out.

Needs only NumPy, pyarrow and h5py (pandas for read_tokens). ``TokenDataset`` is the one
torch-dependent name; it is imported on first use so ``import storage`` stays torch-free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vqtok.storage.errors import TokenStoreError
from vqtok.storage.export import export_memmap
from vqtok.storage.grid import TokenGrid
from vqtok.storage.hdf5 import HDF5TokenWriter
from vqtok.storage.layout import ShardSpec
from vqtok.storage.meta import TokenMeta
from vqtok.storage.parquet import ParquetTokenWriter
from vqtok.storage.reader import load_grid, read_meta, read_tokens
from vqtok.storage.sharded import ShardedTokenStore, ShardWriter

if TYPE_CHECKING:
    from vqtok.storage.dataset import TokenDataset

__all__ = [
    "HDF5TokenWriter",
    "ParquetTokenWriter",
    "ShardSpec",
    "ShardWriter",
    "ShardedTokenStore",
    "TokenDataset",
    "TokenGrid",
    "TokenMeta",
    "TokenStoreError",
    "export_memmap",
    "load_grid",
    "read_meta",
    "read_tokens",
]


def __getattr__(name: str) -> Any:
    if name == "TokenDataset":
        from vqtok.storage.dataset import TokenDataset

        return TokenDataset
    raise AttributeError(f"module 'storage' has no attribute {name!r}")
