"""vqtok token storage: integer code grids in, integer code grids out.

Needs only NumPy, pyarrow and h5py (pandas for read_tokens). ``TokenDataset`` is the one
torch-dependent name; it is imported on first use so ``import storage`` stays torch-free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from storage.errors import TokenStoreError
from storage.export import export_memmap
from storage.grid import TokenGrid
from storage.hdf5_writer import HDF5TokenWriter
from storage.layout import ShardSpec
from storage.meta import TokenMeta
from storage.parquet_writer import ParquetTokenWriter
from storage.reader import load_grid, read_meta, read_tokens
from storage.sharded import ShardedTokenStore, ShardWriter

if TYPE_CHECKING:
    from storage.dataset import TokenDataset

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
        from storage.dataset import TokenDataset

        return TokenDataset
    raise AttributeError(f"module 'storage' has no attribute {name!r}")
