"""``imagefolder:PATH``: PNG/JPEG files under a folder, read one by one (in DataLoader
workers when asked); class subfolders become labels."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG

import numpy as np
import torch

from ..config import DataConfig
from ..errors import DataError
from ..splits import holdout_splits
from .base import ImageSource
from .decoding import read_array, to_batch
from .identity import format_stamp, positions_array, sha256_hex, stamp
from .shards import listing_fingerprint

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


class ImageFolderSource(ImageSource):
    """PNG/JPEG files under a folder, sorted by path; class subfolders become labels."""

    def __init__(self, root: Path, cfg: DataConfig) -> None:
        if root.is_file():
            hint = f"npz:{root}" if root.suffix == ".npz" else "the folder holding the images"
            raise DataError(f"imagefolder:{root}: is a file, not a folder; use {hint}")
        if not root.is_dir():
            raise DataError(f"imagefolder:{root}: folder not found")
        if cfg.channels not in (1, 3):
            raise DataError(
                f"imagefolder:{root}: image files are read as 1 or 3 channels, the config has "
                f"data.channels {cfg.channels}; set 1 or 3"
            )
        listing = _scan(root)
        names, self._folders = listing.names, listing.folders
        if not names:
            raise DataError(f"imagefolder:{root}: no .png/.jpg/.jpeg files found")
        tops = [name.split("/", 1)[0] if "/" in name else None for name in names]
        classes = sorted({top for top in tops if top is not None})
        self.class_names = classes
        lookup = {c: i for i, c in enumerate(classes)}
        self.names = names  # paths below root, posix: the keys
        folder = str(root)
        self.paths = [f"{folder}/{name}" for name in names]  # str: 20k Paths cost 0.1 s
        self.labels = np.array([-1 if top is None else lookup[top] for top in tops],
                               dtype=np.int64)
        self.root, self.cfg = root, cfg
        self.name = f"imagefolder:{root}"
        self.channels, self.image_size = cfg.channels, cfg.image_size
        self.splits, self.split_rule = holdout_splits(len(names)), True
        self.fingerprint = listing_fingerprint(names, listing.sizes, listing.mtimes)
        self._stamps: list[str] | None = list(map(format_stamp, listing.sizes,
                                                       listing.mtimes))

    def load_batch(self, ids: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        ids = np.asarray(ids, dtype=np.int64)
        wheres = [self.paths[i] for i in ids]
        arrays = [read_array(Path(where), self.cfg, where) for where in wheres]
        images = to_batch(arrays, self.cfg, wheres).float().div_(255)
        return images, torch.from_numpy(self.labels[ids])

    def item_keys(self) -> list[str]:
        return list(self.names)

    def item_stamps(self) -> list[str]:
        """As the listing found them, or read again after ``forget_stamps``: the listing
        already stat'ed every file, and a second stat per file would double the cost of an
        incremental update's look at the folder."""
        if self._stamps is None:
            self._stamps = [stamp(path) for path in self.paths]
        return list(self._stamps)

    def forget_stamps(self) -> None:
        """Make the next ``item_stamps`` stat every file again: a long-lived process that
        keeps this source (flows.runtime does while ``listing_unchanged``) must still see a
        file rewritten in place, which changes no folder's stamp."""
        self._stamps = None

    def content_hashes(self, positions: Sequence[int] | np.ndarray) -> list[str]:
        return [sha256_hex(_read_bytes(self.paths[i]))
                for i in positions_array(positions, len(self.paths))]

    def listing_unchanged(self) -> bool:
        """No file added, removed or renamed since the folder was listed: one stat per folder,
        so a long-lived process (flows.runtime keeps sources) can keep this source."""
        try:
            return all(folder_stamp(folder) == stamp for folder, stamp in self._folders)
        except OSError:
            return False

    @property
    def files(self) -> list[Path]:
        return [Path(path) for path in self.paths]


@dataclass(frozen=True)
class _Listing:
    """Image files below a root, sorted; each one's size and mtime_ns; each folder's stamp."""

    names: list[str]
    sizes: list[int]
    mtimes: list[int]
    folders: list[tuple[str, str]]


def _scan(root: Path) -> _Listing:
    """Image files below ``root`` (posix paths below it, sorted as paths: by their parts),
    with each folder's stamp taken before it was listed, from one scandir pass with one stat
    per file. Like ``rglob``: symlinked files count, symlinked folders are not entered,
    unreadable subfolders are skipped. Lean on purpose: an incremental update of an image
    folder lists every file, and this loop is most of that update's own cost."""
    names: list[str] = []
    sizes: list[int] = []
    mtimes: list[int] = []
    folders: list[tuple[str, str]] = []
    pending = [""]
    suffixes = IMAGE_SUFFIXES
    while pending:
        below_root = pending.pop()
        folder = str(root / below_root) if below_root else str(root)
        prefix = f"{below_root}/" if below_root else ""
        try:
            folders.append((folder, folder_stamp(folder)))
            with os.scandir(folder) as entries:
                listed = list(entries)
        except PermissionError:
            if not below_root:
                raise
            continue
        for entry in listed:
            name = entry.name
            if entry.is_dir(follow_symlinks=False):
                pending.append(prefix + name)
                continue
            dot = name.rfind(".")
            if dot <= 0 or name[dot:].lower() not in suffixes:
                continue
            try:
                st = entry.stat()
            except OSError:  # a dangling link
                continue
            if S_ISREG(st.st_mode):
                names.append(prefix + name)
                sizes.append(st.st_size)
                mtimes.append(st.st_mtime_ns)
    # By parts, as paths sort: "/" below every other character does that for whole strings.
    keys = np.array([name.replace("/", "\0") for name in names] if len(folders) > 1 else names)
    order = np.argsort(keys, kind="stable").tolist() if len(names) else []
    return _Listing([names[i] for i in order], [sizes[i] for i in order],
                    [mtimes[i] for i in order], folders)


def folder_stamp(folder: str) -> str:
    """A folder's inode, size and mtime_ns: changed by a file or folder added to, removed
    from or renamed in it (not by a file rewritten in place)."""
    st = os.stat(folder)
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc}); the folder changed "
                        "since it was opened, open it again") from None
