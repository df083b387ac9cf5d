"""Reading side of a sharded store: the manifest, and shards checked against it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vqtok.storage.errors import TokenStoreError
from vqtok.storage.grid import TokenGrid
from vqtok.storage.hdf5 import read_hdf5_grid
from vqtok.storage.layout import (
    BOOKKEEPING_DIR,
    FORMAT_DIRS,
    FORMATS,
    MANIFEST_KIND,
    MANIFEST_NAME,
    find_manifest,
    has_unfinished_store,
    read_json,
    resolve,
)
from vqtok.storage.meta import TokenMeta
from vqtok.storage.parquet import read_parquet_grid
from vqtok.storage.versions import StoreVersions

READERS = {"parquet": read_parquet_grid, "hdf5": read_hdf5_grid}


_HASH_BLOCK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """The content hash recorded in the manifest and checked on read."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ShardFile:
    """One shard file as the manifest lists it."""

    path: Path
    sha256: str
    bytes: int
    split: str
    num_rows: int


class Manifest:
    """A finalized sharded store, as ShardedTokenStore.finalize() recorded it.

    Parsed and checked up front, so a damaged manifest fails with one clear message instead
    of a KeyError halfway through loading.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        data = read_json(self.path, MANIFEST_KIND)
        # Layout 1 kept the manifest in tokens/ and listed files relative to it; layout 2 keeps
        # it in OUT/.vqtok/ and lists files relative to OUT.
        self.layout = int(data.get("version", 1))
        self.base = path.parent if self.layout < 2 else path.parent.parent
        self.meta = TokenMeta.from_dict(data.get("meta"), where=self.path)
        # A version of a versioned store: kept shards carry the dataset fingerprint of the
        # version that wrote them (the manifest's sha256 of each file is the check that counts).
        self.store_version: int | None = data.get("store_version")
        try:
            self.formats: list[str] = [fmt for fmt in data["formats"] if fmt in FORMATS]
            self.split_rows = {entry["name"]: int(entry["num_rows"]) for entry in data["splits"]}
            self.files = {
                fmt: [
                    self._file(entry, shard, fmt)
                    for entry in data["splits"]
                    for shard in entry["shards"]
                ]
                for fmt in self.formats
            }
        except TokenStoreError:
            raise  # already names the file and the problem
        except (KeyError, TypeError, ValueError) as exc:
            raise TokenStoreError(
                self.path, f"manifest is corrupt (bad or missing {exc})"
            ) from None
        if not self.formats:
            raise TokenStoreError(self.path, "manifest lists no known format; it is corrupt")

    def _file(self, entry: dict[str, Any], shard: dict[str, Any], fmt: str) -> ShardFile:
        listed = shard["files"][fmt]
        return ShardFile(
            path=resolve(self.base, listed["path"], self.path),
            sha256=str(listed["sha256"]),
            bytes=int(listed["bytes"]),
            split=str(entry["name"]),
            num_rows=int(shard["num_rows"]),
        )

    @classmethod
    def find(cls, folder: Path, version: int | None = None) -> Manifest:
        """The manifest of ``folder`` (a run folder or its tokens/ folder); of a versioned
        store, its current version's (or ``version``'s), resolved once."""
        roots = [folder, folder.parent] if folder.name in FORMAT_DIRS.values() else [folder]
        for root in roots:
            versions = StoreVersions(root)
            if versions.is_versioned():
                return cls(versions.manifest_of(version))
        if version is not None:
            raise TokenStoreError(folder, "is not a versioned store (it has one version "
                                  "only); leave the version out")
        path = find_manifest(folder)
        if path is None:
            started = has_unfinished_store(folder)
            where = f"{BOOKKEEPING_DIR}/{MANIFEST_NAME}"
            raise TokenStoreError(folder, (
                f"the token store was not finalized (no {where}); re-run the encode that "
                "writes it (finished shards are kept)") if started else (
                f"no token store here (no {where}); pass a token file or the folder 'encode' "
                "wrote"))
        return cls(path)

    def pick_format(self, wanted: str | None) -> str:
        if wanted is None:
            return "parquet" if "parquet" in self.formats else self.formats[0]
        if wanted not in self.formats:
            raise TokenStoreError(
                self.path, f"store has no {wanted} files (has: {', '.join(self.formats)})"
            )
        return wanted

    def _check_split(self, split: str | None) -> None:
        if split is not None and split not in self.split_rows:
            names = ", ".join(self.split_rows)
            raise TokenStoreError(self.path, f"no split {split!r} in this store (has: {names})")

    def shard_files(self, fmt: str, split: str | None = None) -> list[ShardFile]:
        """Shards in manifest order (splits in plan order, shards by index)."""
        self._check_split(split)
        return [f for f in self.files[fmt] if split is None or f.split == split]

    def num_rows(self, split: str | None = None) -> int:
        self._check_split(split)
        return sum(rows for name, rows in self.split_rows.items() if split in (None, name))


def looks_intact(shard: ShardFile) -> bool:
    """The file is there at its recorded size: the free check (the sha256 is verify_file's)."""
    try:
        return shard.path.stat().st_size == shard.bytes
    except OSError:
        return False


def verify_file(shard: ShardFile, manifest: Path) -> None:
    """Size first (free), then the sha256 the writer recorded."""
    if not shard.path.is_file():
        raise TokenStoreError(
            shard.path, f"listed in {manifest} but missing; re-run the tokenize flow for it"
        )
    size = shard.path.stat().st_size
    if size != shard.bytes:
        raise TokenStoreError(
            shard.path,
            f"is {size} bytes but {manifest.name} records {shard.bytes}; the shard is corrupt "
            "or was replaced - re-run the tokenize flow for it",
        )
    digest = sha256_file(shard.path)
    if digest != shard.sha256:
        raise TokenStoreError(
            shard.path,
            f"sha256 {digest[:16]} does not match {shard.sha256[:16]} in {manifest.name}; the "
            "shard is corrupt or was replaced - re-run the tokenize flow for it",
        )


def load_shard(shard: ShardFile, fmt: str, manifest: Manifest, verify: bool) -> TokenGrid:
    """A shard's grid, after checking it is the file, metadata and rows the manifest lists."""
    if verify:
        verify_file(shard, manifest.path)
    grid = READERS[fmt](shard.path)
    differ = (manifest.meta.differences(grid.meta) if manifest.store_version is None
              else manifest.meta.tokenizer_differences(grid.meta))
    if differ:
        raise TokenStoreError(
            shard.path, f"metadata differs from {manifest.path.name} in {', '.join(differ)}"
        )
    if grid.num_rows != shard.num_rows or grid.split_names not in ((shard.split,), ()):
        raise TokenStoreError(
            shard.path,
            f"holds {grid.num_rows} rows of {grid.split_names} but {manifest.path.name} lists "
            f"{shard.num_rows} rows of split {shard.split!r}",
        )
    return grid
