"""Who each image of a source is, for token stores that re-encode only what changed.

Three notions, per position (the index ``load_batch`` takes):

- **key**: where the image lives (``cat/001.png``, ``shard-000001.tar/train/000123``,
  ``train-00000.parquet#17``, or the position itself for in-memory arrays). Stable across runs
  while the image stays where it is, so a store can match this run's images to last run's
  even when others were added or removed around them.
- **content hash**: sha256 of the image's stored bytes (the encoded file as stored, not the
  decoded pixels), so "same key, same image" is certain, whatever the file's dates say.
- **stamp**: the size and mtime (ns) of the file holding the image, as git's index keeps
  them. Hashing means reading every byte; a stamp is one ``stat`` per file. A store that
  finds a key's stamp unchanged trusts its last hash and reads nothing; only images with a new
  or changed stamp are hashed, and re-encoded only when the hash differs. Sources without
  files (arrays in memory) have no stamps: hashing them is as cheap.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ..errors import DataError


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def stamp(path: str | os.PathLike[str]) -> str:
    """``size:mtime_ns`` of a file: changes whenever its bytes may have."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise DataError(f"{path}: cannot stat ({exc.strerror or exc}); the dataset changed "
                        "since it was opened, open it again") from None
    return format_stamp(st.st_size, st.st_mtime_ns)


def format_stamp(size: int, mtime_ns: int) -> str:
    """A stamp from a stat already made (a folder listing stats every file once)."""
    return f"{size}:{mtime_ns}"


def repeated_stamps(files: Sequence[Path], counts: Sequence[int]) -> list[str]:
    """One stamp per image of files holding ``counts`` images each: one stat per file."""
    stamps: list[str] = []
    for path, count in zip(files, counts, strict=True):
        stamps.extend([stamp(path)] * int(count))
    return stamps


def positions_array(positions: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    """Positions as int64, refused when outside 0..n-1 (numpy would wrap negatives)."""
    ids = np.asarray(positions, dtype=np.int64).reshape(-1)
    if len(ids) and (ids.min() < 0 or ids.max() >= n):
        bad = int(ids[(ids < 0) | (ids >= n)][0])
        raise IndexError(f"position {bad} is outside the source's 0..{n - 1}")
    return ids


def grouped(owner: np.ndarray, where: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """Indices into ``owner`` by owner (a file, a row group), ascending, each group ordered by
    ``where`` (an offset, a row): lets one pass open each file once and read it front to back."""
    order = np.lexsort((where, owner))
    cuts = np.flatnonzero(np.diff(owner[order])) + 1
    for run in np.split(order, cuts):
        if len(run):
            yield int(owner[run[0]]), run
