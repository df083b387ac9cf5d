"""Atomic publication: write under a hidden temporary name, fsync, rename into place.

A reader (or a crash) never sees a half-written file under its final name, and tools that
scan folders (pyarrow.dataset, Spark, globbing ``*.parquet``) never pick up a temp file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"


def temp_path_for(final: Path) -> Path:
    """A unique hidden sibling of ``final``.

    Same folder so the rename is atomic (same filesystem); a leading dot so folder scans skip
    it; a random part so independent writers of the same target never share a temp file.
    """
    return final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")


def is_temp(path: Path) -> bool:
    """Whether ``path`` is a temp file of ``temp_path_for`` (a killed writer's leftover)."""
    return path.name.startswith(".") and path.name.endswith(TMP_SUFFIX)


def stale_temps(final: Path) -> list[Path]:
    """Temp files a killed writer of ``final`` left behind."""
    if not final.parent.is_dir():
        return []
    return sorted(final.parent.glob(f".{final.name}.*{TMP_SUFFIX}"))


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Make a rename durable; some platforms cannot open folders, which is fine there."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicFile:
    """Owns the temp file behind one final path; publish() or abort() ends it."""

    def __init__(self, final: str | os.PathLike[str]) -> None:
        self.final = Path(final)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.temp = temp_path_for(self.final)
        self.temp.touch(exist_ok=False)

    def publish(self) -> Path:
        fsync_path(self.temp)
        os.replace(self.temp, self.final)
        fsync_dir(self.final.parent)
        return self.final

    def abort(self) -> None:
        self.temp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """A temp path to write ``final`` through (for libraries that write to a path: PIL,
    matplotlib, csv); published when the block ends, removed if it raises."""
    target = AtomicFile(final)
    try:
        yield target.temp
    except BaseException:
        target.abort()
        raise
    target.publish()


def write_bytes_atomic(final: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_path(final) as temp:
        temp.write_bytes(data)
    return Path(final)


def write_json_atomic(final: str | os.PathLike[str], obj: Any) -> Path:
    """Sorted keys and fixed indentation: equal content gives equal bytes across runs."""
    text = json.dumps(obj, sort_keys=True, indent=2, default=str) + "\n"
    return write_bytes_atomic(final, text.encode("utf-8"))


# --- folders --------------------------------------------------------------------------------


def previous_dir(final: Path) -> Path:
    """Where ``swap_dir`` keeps the folder it replaces until the new one is in place."""
    return final.with_name(final.name + ".old")


def swap_dir(finished: Path, final: Path) -> None:
    """Publish the finished folder ``finished`` (a sibling of ``final``, its files fsynced)
    as ``final``, replacing what was there. A crash between the two renames leaves
    ``final.old``, which ``recover_dir`` puts back."""
    old = previous_dir(final)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    finished.rename(final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(final: Path, complete_marker: str) -> None:
    """Undo a crash inside ``swap_dir``: with ``final`` gone and ``final.old`` complete (it
    holds ``complete_marker``), put the old folder back. Without this a reader would find
    nothing and the next swap would delete the only good copy."""
    old = previous_dir(final)
    if not final.exists() and (old / complete_marker).is_file():
        old.rename(final)
        fsync_dir(final.parent)
