"""Versioned stores: every update is a new complete store, published by one rename.

    OUT/.vqtok/versions/000001/      one whole layout-2 store (tokens/, hdf5/, .vqtok/ with
                                     manifest.json, keys.parquet, version.json)
    OUT/.vqtok/current -> versions/000003     the published version: swapped atomically
    OUT/tokens -> .vqtok/current/tokens       what plain readers open (pandas, DuckDB, ...)
    OUT/hdf5   -> .vqtok/current/hdf5
    OUT/.vqtok/lock                  held (flock) by the one writer

A version is built in its own folder while ``current`` still names the previous one, so a
reader never sees a half-written version and a killed update leaves the previous one in
place; re-running resumes the unfinished folder. vqtok's readers resolve ``current`` once
and read every file from that folder. Files written in version N > 1 carry ``-vN`` in their
names, so a plain reader that listed one version and opens files after a swap gets "file not
found" rather than rows of two versions.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vqtok.files.atomic import fsync_dir, write_json_atomic
from vqtok.storage.errors import TokenStoreError
from vqtok.storage.layout import (
    BOOKKEEPING_DIR,
    FORMAT_DIRS,
    KEYMAP_NAME,
    VERSION_INFO_NAME,
    bookkeeping_dir,
    manifest_path,
    read_json,
)
from vqtok.storage.meta import utc_now_iso

VERSIONS_DIR = "versions"
CURRENT_NAME = "current"
LOCK_NAME = "lock"
VERSION_KIND = "vqtok-store-version"
DEFAULT_KEEP_VERSIONS = 3


def version_name(number: int) -> str:
    return f"{number:06d}"


def file_suffix(number: int) -> str:
    """What version ``number``'s shard files add to their names (none for the first)."""
    return "" if number <= 1 else f"-v{number}"


@dataclass(frozen=True)
class VersionInfo:
    """One published version, as ``info`` lists it."""

    number: int
    root: Path
    published_at: str
    num_rows: int
    counts: dict[str, int]
    current: bool


class StoreVersions:
    """The versions of the store in ``root`` (a run folder)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.bookkeeping = bookkeeping_dir(self.root)
        self.versions_dir = self.bookkeeping / VERSIONS_DIR
        self.current_link = self.bookkeeping / CURRENT_NAME

    # -- reading ----------------------------------------------------------------------------

    def is_versioned(self) -> bool:
        return self.current_link.is_symlink() or self.versions_dir.is_dir()

    def current(self) -> int | None:
        """The published version's number, None before the first publish."""
        try:
            target = os.readlink(self.current_link)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TokenStoreError(self.current_link, f"unreadable ({exc})") from None
        try:
            return int(Path(target).name)
        except ValueError:
            raise TokenStoreError(self.current_link, f"points at {target!r}, not a version "
                                  "folder; the store is corrupt") from None

    def version_root(self, number: int) -> Path:
        return self.versions_dir / version_name(number)

    def folders(self) -> list[int]:
        """Numbers of every version folder, published or not."""
        if not self.versions_dir.is_dir():
            return []
        return sorted(int(p.name) for p in self.versions_dir.iterdir()
                      if p.is_dir() and p.name.isdigit())

    def published(self) -> list[int]:
        """Versions that were published (have their version.json), oldest first."""
        return [n for n in self.folders() if self.info_path(n).is_file()]

    def info_path(self, number: int) -> Path:
        return bookkeeping_dir(self.version_root(number)) / VERSION_INFO_NAME

    def read_info(self, number: int) -> dict[str, Any]:
        return read_json(self.info_path(number), VERSION_KIND)

    def describe(self) -> list[VersionInfo]:
        current = self.current()
        out = []
        for number in self.published():
            data = self.read_info(number)
            out.append(VersionInfo(number=number, root=self.version_root(number),
                                   published_at=str(data.get("published_at", "?")),
                                   num_rows=int(data.get("num_rows", 0)),
                                   counts=dict(data.get("counts", {})),
                                   current=number == current))
        return out

    def manifest_of(self, number: int | None = None) -> Path:
        """The manifest of version ``number`` (the current one by default), resolved to its
        real folder so that a later swap of ``current`` cannot change what is read."""
        if number is None:
            number = self.current()
            if number is None:
                raise TokenStoreError(self.root, "no version of this store is published yet; "
                                      "re-run the encode that writes it (finished shards are "
                                      "kept)")
        kept = self.published()
        if number not in kept:
            have = ", ".join(map(str, kept)) or "none"
            raise TokenStoreError(self.root, f"no version {number} in this store (kept: {have})")
        return manifest_path(self.version_root(number).resolve())

    # -- writing ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One writer at a time: a second one fails at once with one line. The lock is the
        kernel's (flock), so a killed writer's lock goes with its process."""
        self.bookkeeping.mkdir(parents=True, exist_ok=True)
        path = self.bookkeeping / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise TokenStoreError(self.root, "another encode is updating this store (it "
                                      f"holds {BOOKKEEPING_DIR}/{LOCK_NAME}); wait for it to "
                                      "finish, or write to another folder") from None
            yield
        finally:
            os.close(fd)  # releases the lock

    def refuse_plain_store(self) -> None:
        """A store written before versions (real tokens/ folders) is not updated in place."""
        for name in FORMAT_DIRS.values():
            path = self.root / name
            if path.exists() and not path.is_symlink():
                raise TokenStoreError(path, "holds a token store written without versions (an "
                                      "earlier vqtok); delete it or pass --reencode to rebuild "
                                      "it as a versioned store, or write to a new folder")

    def remove_plain_store(self) -> None:
        """What --reencode does to a store of before versions: it is rebuilt from scratch."""
        for name in FORMAT_DIRS.values():
            path = self.root / name
            if path.exists() and not path.is_symlink():
                shutil.rmtree(path)
        for name in ("manifest.json", "done"):
            path = self.bookkeeping / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    def next_number(self) -> int:
        return max([0, *self.folders()]) + 1

    def discard(self, number: int) -> None:
        shutil.rmtree(self.version_root(number), ignore_errors=True)

    def publish(self, number: int, info: dict[str, Any]) -> None:
        """Record version.json, then swap ``current`` to it: the one atomic step."""
        root = self.version_root(number)
        write_json_atomic(self.info_path(number), {
            "kind": VERSION_KIND, "version": 2, "number": number,
            "published_at": utc_now_iso(), **info})
        for fmt_dir in FORMAT_DIRS.values():
            link = self.root / fmt_dir
            # Only formats this version has: an HDF5-only store gets no tokens/ leading nowhere.
            # A link stays once made (a later version may lack its format; readers say so).
            if (root / fmt_dir).is_dir() and not link.is_symlink():
                link.symlink_to(f"{BOOKKEEPING_DIR}/{CURRENT_NAME}/{fmt_dir}",
                                target_is_directory=True)
        temp = self.bookkeeping / f".{CURRENT_NAME}.{uuid.uuid4().hex[:12]}.tmp"
        temp.symlink_to(f"{VERSIONS_DIR}/{root.name}", target_is_directory=True)
        os.replace(temp, self.current_link)
        fsync_dir(self.bookkeeping)

    def prune(self, keep: int) -> list[int]:
        """Delete published versions but the newest ``keep`` (never the current one), and
        unfinished folders older than the current version; returns what went."""
        current = self.current()
        published = self.published()
        keep_set = set(published[-keep:]) | {current}
        gone = []
        for number in self.folders():
            unfinished_old = number not in published and current is not None and number < current
            if (number in published and number not in keep_set) or unfinished_old:
                self.discard(number)
                gone.append(number)
        return gone



def version_keymap_path(tokens: str | os.PathLike[str]) -> Path | None:
    """The key map of the store version a token path belongs to (a run folder, its tokens/
    or hdf5/ link, a split folder or a shard file in a version), None for a plain token file
    or a store made before versions: ids there are source positions."""
    path = Path(os.path.realpath(tokens))
    current = bookkeeping_dir(path) / CURRENT_NAME
    if current.exists():
        path = Path(os.path.realpath(current))
    for folder in (path, *path.parents)[:4]:  # a version root is at most 3 above a shard
        candidate = bookkeeping_dir(folder) / KEYMAP_NAME
        if candidate.is_file():
            return candidate
    return None
