"""Where a sharded store puts things, and the JSON it records about them.

    OUT/tokens/<split>/part-00000.parquet       the Parquet dataset, and nothing else
    OUT/hdf5/<split>/part-00000.h5              the same shards as HDF5
    OUT/.vqtok/manifest.json                    assembled by finalize()
    OUT/.vqtok/done/<split>/part-00000.json     completion record, written last, atomically

``OUT/tokens`` holds only Parquet files, one folder per split, so pyarrow.dataset,
``pd.read_parquet``, polars, DuckDB and Hugging Face ``load_dataset`` all open it as one
dataset (the last with its splits from the folder names). Each shard's completion is its own
small file so independent workers never rewrite a shared file. Paths in the manifest are
relative to OUT, so the run folder can be moved.

Stores of layout 1 (manifest.json, ``_part-*.done.json`` records and .h5 files all in
``OUT/tokens``, paths relative to it) still load; new stores are never written that way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from vqtok.storage.errors import TokenStoreError

TOKENS_DIR = "tokens"
FORMAT_DIRS = {"parquet": TOKENS_DIR, "hdf5": "hdf5"}  # each format its own tree in OUT
BOOKKEEPING_DIR = ".vqtok"  # in OUT, beside tokens/: readers that list tokens/ never see it
RECORDS_DIR = "done"  # inside the bookkeeping folder, one folder per split
STORE_FOLDERS = (*FORMAT_DIRS.values(), BOOKKEEPING_DIR)  # all a store writes in OUT
MANIFEST_NAME = "manifest.json"
MANIFEST_KIND = "vqtok-token-manifest"
RECORD_KIND = "vqtok-shard-record"
LAYOUT_VERSION = 2
SUFFIXES = {"parquet": ".parquet", "hdf5": ".h5"}  # what the store writes
FORMATS = tuple(SUFFIXES)
#: What a token file may be called when read: the written suffixes and their long forms.
READ_SUFFIXES = {**{suffix: fmt for fmt, suffix in SUFFIXES.items()},
                 ".pq": "parquet", ".hdf5": "hdf5"}
DEFAULT_SHARD_SIZE = 10_000  # rows per shard unless asked otherwise
# What a versioned store keeps beside a version's manifest (see ``versions``, ``keymap`` and
# flows.incremental, which write them).
KEYMAP_NAME = "keys.parquet"  # every key ever seen: its id, split, hash and stamp
VERSION_INFO_NAME = "version.json"  # written when the version is published
PLAN_INFO_NAME = "plan.json"  # the plan's basis: whole once this exists
PLAN_ARRAYS_NAME = "plan.npz"  # the plan's rows: which to encode, which to copy
SALVAGE_NAME = "salvage.npz"  # rows handed on from an unfinished attempt
VERSION_FILES = (KEYMAP_NAME, VERSION_INFO_NAME, PLAN_INFO_NAME, PLAN_ARRAYS_NAME, SALVAGE_NAME)


@dataclass(frozen=True)
class ShardSpec:
    """Rows [start, stop) of one split, written as one file per format."""

    split: str
    index: int
    start: int
    stop: int

    @property
    def num_rows(self) -> int:
        return self.stop - self.start

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}"

    def __str__(self) -> str:
        return f"{self.split}/{self.name}"


def shard_relpath(shard: ShardSpec, fmt: str, suffix: str = "") -> str:
    """A shard file's path relative to the run folder: POSIX, so a store can be moved.
    ``suffix`` marks the files of a later store version (``versions.file_suffix``)."""
    return f"{FORMAT_DIRS[fmt]}/{shard.split}/{shard.name}{suffix}{SUFFIXES[fmt]}"


def bookkeeping_dir(root: Path) -> Path:
    return root / BOOKKEEPING_DIR


def manifest_path(root: Path) -> Path:
    return bookkeeping_dir(root) / MANIFEST_NAME


def record_relpath(shard: ShardSpec) -> str:
    """A completion record's path inside the bookkeeping folder."""
    return f"{RECORDS_DIR}/{shard.split}/{shard.name}.json"


def resolve(base: Path, relpath: str, where: object) -> Path:
    """A manifest entry as a path inside ``base``; anything pointing outside is refused."""
    pure = PurePosixPath(relpath)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts:
        raise TokenStoreError(
            where, f"path {relpath!r} points outside the token folder; the manifest is corrupt"
        )
    return base.joinpath(*pure.parts)


def read_json(path: Path, kind: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenStoreError(path, "no such file") from None
    except (OSError, ValueError) as exc:
        raise TokenStoreError(path, f"unreadable JSON ({exc}); the file is corrupt") from None
    if not isinstance(data, dict) or data.get("kind") != kind:
        raise TokenStoreError(path, f"not a {kind} file")
    if data.get("version", 0) > LAYOUT_VERSION:
        raise TokenStoreError(
            path, f"layout version {data.get('version')} is newer than this vqtok; upgrade vqtok"
        )
    return data


# -- layout 1, read only ---------------------------------------------------------------------

def legacy_manifest_path(tokens_dir: Path) -> Path:
    return tokens_dir / MANIFEST_NAME


def legacy_records(tokens_dir: Path) -> list[Path]:
    return sorted(tokens_dir.glob("*/_part-*.done.json"))


def find_manifest(path: Path) -> Path | None:
    """The manifest of the store at ``path``: the run folder, or its tokens/ (or hdf5/)
    folder; layout 2 first, then layout 1."""
    candidates = [manifest_path(path)]
    if path.name in FORMAT_DIRS.values():
        candidates.append(manifest_path(path.parent))
    candidates += [legacy_manifest_path(path), legacy_manifest_path(path / TOKENS_DIR)]
    return next((c for c in candidates if c.is_file()), None)


def has_unfinished_store(path: Path) -> bool:
    """Shard records without a manifest: an encode that has not finished (either layout)."""
    roots = [path, path.parent] if path.name in FORMAT_DIRS.values() else [path]
    return any(any((bookkeeping_dir(r) / RECORDS_DIR).glob("*/*.json")) for r in roots) or any(
        legacy_records(d) for d in (path, path / TOKENS_DIR))
