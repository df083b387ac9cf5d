"""Atomic publication: a file appears under its final name complete or not at all."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

_TMP_SUFFIX = ".tmp"


def temp_path_for(final: Path) -> Path:
    """A unique hidden sibling of ``final``.

    Same folder so the rename is atomic (same filesystem); a leading dot so tools that scan
    folders (pyarrow.dataset, Spark, globbing ``*.parquet``) never pick up a half-written file;
    a random part so independent writers of the same target never share a temp file.
    """
    return final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}{_TMP_SUFFIX}")


def stale_temps(final: Path) -> list[Path]:
    """Temp files a killed writer of ``final`` left behind."""
    if not final.parent.is_dir():
        return []
    return sorted(final.parent.glob(f".{final.name}.*{_TMP_SUFFIX}"))


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDWR)
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


def write_bytes_atomic(final: Path, data: bytes) -> Path:
    target = AtomicFile(final)
    try:
        target.temp.write_bytes(data)
    except BaseException:
        target.abort()
        raise
    return target.publish()


def write_json_atomic(final: Path, obj: Any) -> Path:
    """Sorted keys and fixed indentation: equal content gives equal bytes across runs."""
    text = json.dumps(obj, sort_keys=True, indent=2) + "\n"
    return write_bytes_atomic(final, text.encode("utf-8"))


class PublishOnSuccess:
    """``with`` support for writers: ``close()`` (publish) on success, ``abort()`` on error."""

    def close(self) -> Any:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
