"""One entry point for reading tokens, whatever the layout: Parquet, HDF5 or a sharded folder."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from vqtok.storage.errors import TokenStoreError
from vqtok.storage.grid import TokenGrid, concat_grids
from vqtok.storage.hdf5 import read_hdf5_meta, read_hdf5_split_rows
from vqtok.storage.layout import READ_SUFFIXES
from vqtok.storage.manifest import READERS, Manifest, load_shard
from vqtok.storage.meta import TokenMeta
from vqtok.storage.parquet import read_parquet_meta, read_parquet_split_rows

if TYPE_CHECKING:
    import pandas as pd

def file_format(path: Path) -> str:
    fmt = READ_SUFFIXES.get(path.suffix.lower())
    if fmt is None and not path.exists():
        raise TokenStoreError(path, (
            # a link that leads nowhere: OUT/tokens of a store encoded with --format hdf5
            "the store's current version has no files of this format (encoded with another "
            f"--format); pass the run folder {path.parent} or its other format's folder"
            if path.is_symlink() else
            "no such file or folder; pass a token file or the folder 'encode' wrote"))
    if fmt is None:
        raise TokenStoreError(
            path,
            "unknown token file type; expected .parquet, .h5/.hdf5 or the folder 'encode' wrote",
        )
    return fmt


def load_grid(
    path: str | os.PathLike[str],
    *,
    split: str | None = None,
    format: str | None = None,
    verify: bool = True,
    version: int | None = None,
) -> TokenGrid:
    """All codes as one (N, h, w) array ((N, h, w, depth) with depth), plus ids, labels,
    splits and metadata.

    ``path`` is a .parquet or .h5 file, or a sharded folder (``OUT`` or ``OUT/tokens``). For
    a folder, ``format`` picks which files to read (Parquet by default) and ``verify`` checks
    every shard against the manifest's size and sha256. Codes are always checked against the
    codebook. ``codes, meta = load_grid(path)`` also works (see TokenGrid). A versioned
    store (what ``encode`` writes) is read at its current version, or at ``version`` while
    that one is kept.
    """
    path = Path(path)
    if path.is_dir():
        manifest = Manifest.find(path, version)
        fmt = manifest.pick_format(format)
        grids = [
            load_shard(shard, fmt, manifest, verify) for shard in manifest.shard_files(fmt, split)
        ]
        if len(grids) == 1:  # no copy; report the store's metadata like the many-shard case
            return replace(grids[0], meta=manifest.meta)
        return concat_grids(grids, manifest.meta)
    if version is not None:
        raise TokenStoreError(path, "is a single token file; only a store folder has versions")
    fmt = file_format(path)
    if format is not None and format != fmt:
        raise TokenStoreError(path, f"is a {fmt} file, not {format}")
    grid = READERS[fmt](path)
    return grid if split is None else grid.select(split)


def read_meta(path: str | os.PathLike[str]) -> TokenMeta:
    """Metadata only (footer, attributes or manifest): check the tokenizer before loading."""
    path = Path(path)
    if path.is_dir():
        return Manifest.find(path).meta
    return read_parquet_meta(path) if file_format(path) == "parquet" else read_hdf5_meta(path)


def split_rows(path: str | os.PathLike[str]) -> dict[str, int]:
    """Rows per split, without loading codes: a store's manifest holds them; a single file's
    split column is all that is read."""
    path = Path(path)
    if path.is_dir():
        return dict(Manifest.find(path).split_rows)
    if file_format(path) == "parquet":
        return read_parquet_split_rows(path)
    return read_hdf5_split_rows(path)


def read_tokens(
    path: str | os.PathLike[str],
    *,
    split: str | None = None,
    format: str | None = None,
    verify: bool = True,
    version: int | None = None,
) -> pd.DataFrame:
    """One row per image (id, label, split, codes), the same frame for every layout.

    Equal to ``pd.read_parquet`` of a token file, after the checks of load_grid; the metadata
    is in ``df.attrs["vqtok_meta"]``.
    """
    return load_grid(path, split=split, format=format, verify=verify,
                     version=version).to_pandas()
