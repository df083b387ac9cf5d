"""Operating-system errors as one line saying where and what to do.

A bare ``OSError`` from deep inside pyarrow or h5py often says "[Errno 28] No space left on
device" and nothing about which file; the flows attach the path they were writing
(``located``) and the CLI words the line (``describe_os_error``). The output folder is checked
before any work starts (``check_writable``), so a wrong ``--out`` fails in a second.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

_HINTS = {
    errno.ENOSPC: "free some space (or choose another --out) and re-run: finished work is kept",
    errno.EDQUOT: "free some space (or choose another --out) and re-run: finished work is kept",
    errno.EACCES: "choose another --out or fix the folder's permissions",
    errno.EPERM: "choose another --out or fix the folder's permissions",
    errno.EROFS: "the file system is read-only; choose another --out",
    errno.ENOTDIR: "a part of that path is a file, not a folder; choose another path",
    errno.EIO: "the device reported an I/O error; check it and re-run: finished work is kept",
}


class PipelineError(RuntimeError):
    """A pipeline step cannot go on; the message says why and what to do."""


class OutputNotWritable(OSError):
    """``--out`` cannot be written; raised before any work starts."""


def located(exc: OSError, path: str | os.PathLike[str]) -> OSError:
    """``exc`` if it already names a file, else the same error naming ``path``.

    The result is still an OSError of the same errno, so task retries still apply to it.
    """
    if exc.filename is not None:
        return exc
    code = exc.errno if exc.errno is not None else errno.EIO
    reason = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
    return OSError(code, reason, str(path))


def describe_os_error(exc: OSError) -> str:
    """'PATH: what went wrong; what to do' on one line."""
    if isinstance(exc, OutputNotWritable):
        return str(exc.strerror)
    reason = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
    where = f"{exc.filename}: " if exc.filename is not None else ""
    hint = _HINTS.get(exc.errno) if exc.errno is not None else None
    return f"{where}{reason}" + (f"; {hint}" if hint else "")


def check_writable(folder: str | os.PathLike[str]) -> None:
    """Fail now if ``folder`` (or the nearest existing folder above it) cannot take files.

    The probe is a real file created and deleted at once, so read-only mounts, permissions
    and quotas all count (``os.access`` says yes to root on a read-only folder).
    """
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise OutputNotWritable(
            errno.ENOTDIR,
            f"{folder}: {probe} is a file, not a folder; choose another --out",
        )
    try:
        fd, name = tempfile.mkstemp(prefix=".vqtok-probe-", dir=probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputNotWritable(
            exc.errno or errno.EACCES,
            f"{folder}: cannot write in {probe} ({reason}); choose another --out or fix the "
            "folder's permissions",
        ) from None
    os.close(fd)
    os.unlink(name)
