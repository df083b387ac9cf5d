"""Datasets stored as many files (tar shards, Parquet files): which files a pattern names, in
which order, their fingerprint, and the splits their ids fall into."""

from __future__ import annotations

import glob
import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..errors import DataError
from ..splits import SPLIT_ORDER, holdout_splits, split_from_path

_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion, as WebDataset shard lists are written:
    ``a{1..3}b`` -> a1b a2b a3b, ``{000..002}`` -> 000 001 002 (zero padding kept),
    ``{x,y}{1..2}`` -> x1 x2 y1 y2, nested ``{a,b{1,2}}``. A brace pair that is neither a
    list nor a range stays as written, like in bash."""
    start = pattern.find("{")
    while start != -1:
        end = _closing(pattern, start)
        if end is None:
            return [pattern]
        options = _options(pattern[start + 1 : end])
        if options is not None:
            head, tails = pattern[:start], expand_braces(pattern[end + 1 :])
            return [head + body + tail for option in options
                    for body in expand_braces(option) for tail in tails]
        start = pattern.find("{", start + 1)
    return [pattern]


def _closing(text: str, start: int) -> int | None:
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return i
    return None


def _options(body: str) -> list[str] | None:
    """A brace body's alternatives: its top-level comma list, or a numeric range."""
    parts, depth, last = [], 0, 0
    for i, char in enumerate(body):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(body[last:i])
            last = i + 1
    if parts:
        return [*parts, body[last:]]
    match = _RANGE.fullmatch(body)
    if match is None:
        return None
    first, last_bound = match.groups()
    lo, hi = int(first), int(last_bound)
    padded = any(len(b.lstrip("-")) > 1 and b.lstrip("-")[0] == "0" for b in match.groups())
    width = max(len(first), len(last_bound)) if padded else 0
    step = 1 if hi >= lo else -1
    return [f"{n:0{width}d}" for n in range(lo, hi + step, step)]


def match_files(pattern: str) -> list[Path]:
    """Files a pattern names (braces expanded, then ``*``/``?``/``[...]`` globbed; ``~``
    expanded), without duplicates, sorted by path."""
    found: set[Path] = set()
    for path in expand_braces(os.path.expanduser(pattern)):
        names = glob.glob(path, recursive=True) if glob.has_magic(path) else [path]
        found.update(Path(name) for name in names if os.path.isfile(name))
    return sorted(found)


def common_parent(files: Sequence[Path]) -> Path:
    """The deepest folder holding every file: what their names are taken relative to."""
    return Path(os.path.commonpath([str(p.parent.absolute()) for p in files]))


def below(path: Path, root: Path) -> Path:
    """``path`` relative to ``root``, either of them relative to the working folder."""
    return path.absolute().relative_to(root.absolute())


def files_fingerprint(files: Sequence[Path], root: Path, extra: str = "") -> str:
    """sha256 over each file's path below ``root``, size and mtime: cheap (one stat each) and
    changed by any file added, removed, renamed or rewritten. ``extra``: settings that change
    what the files mean (which member is the image, how ids are split)."""
    stats = [p.stat() for p in files]
    return listing_fingerprint([str(below(p, root)) for p in files],
                               [st.st_size for st in stats], [st.st_mtime_ns for st in stats],
                               extra)


def listing_fingerprint(names: Sequence[str], sizes: Sequence[int], mtimes_ns: Sequence[int],
                        extra: str = "") -> str:
    """files_fingerprint of files already listed (paths below the root, sizes, mtimes), in
    a few whole-array hash updates: an image folder has one entry per image."""
    h = hashlib.sha256("\0".join(names).encode("utf-8", "surrogateescape"))
    h.update(np.asarray(sizes, dtype=np.int64).tobytes())
    h.update(np.asarray(mtimes_ns, dtype=np.int64).tobytes())
    if extra:
        h.update(extra.encode())
    return h.hexdigest()


def settings_key(cfg: DataConfig) -> str:
    """The config keys that change which images, labels and splits a file source gives."""
    return f"image_key={cfg.image_key}\0label_key={cfg.label_key}\0split_by={cfg.split_by}\n"


def make_splits(counts: Sequence[int], files: Sequence[Path], root: Path, cfg: DataConfig,
                what: str = "shard") -> dict[str, np.ndarray]:
    """Ids (positions over ``files`` in order, ``counts`` each) by split: every tenth is
    validation (``data.split_by: rule``), or each file's ids go to the split its path below
    ``root`` names (``data.split_by: file``)."""
    total = int(sum(counts))
    if cfg.split_by == "rule":
        return holdout_splits(total)
    names = []
    for path in files:
        relative = below(path, root).as_posix()
        split = split_from_path(relative)
        if split is None:
            raise DataError(
                f"{path}: data.split_by is 'file' but the {what}'s path names no split; name "
                f"{what}s like train-000000, validation-000000, test-000000 (or put them in "
                "train/, validation/, test/ folders), or set data.split_by: rule")
        names.append(split)
    owner = np.repeat(np.array([SPLIT_ORDER.index(n) for n in names], dtype=np.int8),
                      np.asarray(counts, dtype=np.int64))
    ids = np.arange(total, dtype=np.int64)
    return {name: ids[owner == i] for i, name in enumerate(SPLIT_ORDER) if name in names}
