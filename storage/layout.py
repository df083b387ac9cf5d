"""Where a sharded store puts things, and the JSON it records about them.

    OUT/tokens/manifest.json                    assembled by finalize()
    OUT/tokens/<split>/part-00000.parquet       one file per shard and format
    OUT/tokens/<split>/part-00000.h5
    OUT/tokens/<split>/_part-00000.done.json    completion record, written last, atomically

Each shard's completion is its own small file so independent workers never rewrite a shared
file; the leading underscore keeps records out of pyarrow.dataset / Spark folder scans.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from vqtok.storage.errors import TokenStoreError

TOKENS_DIR = "tokens"
MANIFEST_NAME = "manifest.json"
MANIFEST_KIND = "vqtok-token-manifest"
RECORD_KIND = "vqtok-shard-record"
LAYOUT_VERSION = 1
SUFFIXES = {"parquet": ".parquet", "hdf5": ".h5"}  # what the store writes
FORMATS = tuple(SUFFIXES)
#: What a token file may be called when read: the written suffixes and their long forms.
READ_SUFFIXES = {**{suffix: fmt for fmt, suffix in SUFFIXES.items()},
                 ".pq": "parquet", ".hdf5": "hdf5"}
DEFAULT_SHARD_SIZE = 10_000  # rows per shard unless asked otherwise


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


def shard_relpath(shard: ShardSpec, fmt: str) -> str:
    """Manifest paths are POSIX and relative to the tokens folder, so a store can be moved."""
    return f"{shard.split}/{shard.name}{SUFFIXES[fmt]}"


def record_relpath(shard: ShardSpec) -> str:
    return f"{shard.split}/_{shard.name}.done.json"


def resolve(tokens_dir: Path, relpath: str, where: object) -> Path:
    """A manifest entry as a path inside the store; anything pointing outside is refused."""
    pure = PurePosixPath(relpath)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts:
        raise TokenStoreError(
            where, f"path {relpath!r} points outside the token folder; the manifest is corrupt"
        )
    return tokens_dir.joinpath(*pure.parts)


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


def find_tokens_dir(path: Path) -> Path | None:
    """Accept the tokens folder itself or the run folder above it."""
    for candidate in (path, path / TOKENS_DIR):
        if (candidate / MANIFEST_NAME).is_file():
            return candidate
    return None
