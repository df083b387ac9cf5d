"""Atomic publish: a file exists under its final name complete, or not at all."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from vqtok.storage import HDF5TokenWriter, ParquetTokenWriter, TokenMeta, load_grid

WRITERS = {"parquet": (ParquetTokenWriter, ".parquet"), "hdf5": (HDF5TokenWriter, ".h5")}
REPO = Path(__file__).resolve().parents[1]


def make_meta():
    return TokenMeta(16, 2, 2, "d", "fp", "ck", "0.1.0", created_at="t")


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_exception_inside_with_publishes_nothing(fmt, tmp_path):
    writer_cls, suffix = WRITERS[fmt]
    with pytest.raises(RuntimeError, match="boom"):
        with writer_cls(tmp_path / f"t{suffix}", make_meta()) as writer:
            writer.write(np.zeros((5, 2, 2), int), np.arange(5), None, "train")
            assert len(list(tmp_path.iterdir())) == 1  # the hidden temp file, only
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_nothing_under_the_final_name_until_close(fmt, tmp_path):
    writer_cls, suffix = WRITERS[fmt]
    final = tmp_path / f"t{suffix}"
    writer = writer_cls(final, make_meta(), **({"row_group_size": 2} if fmt == "parquet" else {}))
    writer.write(np.ones((5, 2, 2), int), np.arange(5), None, "train")
    temps = list(tmp_path.iterdir())
    assert not final.exists()
    assert len(temps) == 1 and temps[0].name.startswith(f".t{suffix}.")
    assert temps[0].name.endswith(".tmp")
    assert writer.close() == final
    assert [p.name for p in tmp_path.iterdir()] == [final.name]
    assert load_grid(final).num_rows == 5


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_publishing_replaces_an_older_file(fmt, tmp_path):
    writer_cls, suffix = WRITERS[fmt]
    final = tmp_path / f"t{suffix}"
    for rows in (3, 1):
        with writer_cls(final, make_meta()) as writer:
            writer.write(np.zeros((rows, 2, 2), int), np.arange(rows), None, "a")
    assert load_grid(final).num_rows == 1


KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from vqtok.storage import {cls}, TokenMeta
    meta = TokenMeta(16, 2, 2, "d", "fp", "ck", "0.1.0", created_at="t")
    writer = {cls}(sys.argv[1], meta)
    for start in range(0, 4000, 500):
        writer.write(np.ones((500, 2, 2), int), np.arange(start, start + 500), None, "train")
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_killed_writer_leaves_no_final_file(fmt, tmp_path):
    writer_cls, suffix = WRITERS[fmt]
    final = tmp_path / f"t{suffix}"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    script = KILLED_WRITER.format(cls=writer_cls.__name__)
    result = subprocess.run([sys.executable, "-c", script, str(final)], env=env, timeout=120)
    assert result.returncode == -signal.SIGKILL
    assert not final.exists()
    leftovers = list(tmp_path.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".")  # hidden from folder scans
