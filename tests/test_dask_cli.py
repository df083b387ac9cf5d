"""``tokenize-dataset encode --cluster`` run as users run it: the installed console command in
a subprocess, from a folder outside the repo (where a Dask worker's scratch folder, with its
``storage`` spill folder, sits first on the worker's sys.path: issue 17's hang).

Faults are injected on observed state, never on time: ``VQTOK_CRASH_AT`` makes a worker kill
itself at its first written batch (``VQTOK_CRASH_ONCE``: only the first worker to get there),
and a worker started with a ``vqtok/storage`` folder first on its path cannot import vqtok.
Every command is bounded by a timeout, so a hang fails the test instead of the CI job.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import (
    console_command,
    make_checkpoint,
    store_tree,
    tiny_raw,
    tree,
    version_folder,
    write_npz,
)

pytest.importorskip("prefect_dask")

TIMEOUT_S = 420  # a hang guard only: a healthy run takes well under a minute
CLUSTER_ERROR_TAIL = "then re-run: finished shards are kept"


@pytest.fixture(scope="module")
def job(tmp_path_factory, prefect_harness):
    """A tiny checkpoint, its npz (40 images: five shards of up to 10) and a folder to run from.
    The commands report to the session's Prefect server instead of each starting one."""
    from prefect.settings import PREFECT_API_URL

    root = tmp_path_factory.mktemp("dask-cli")
    raw = tiny_raw(f"npz:{write_npz(root / 'images.npz', n=40)}")
    outside = root / "elsewhere"
    outside.mkdir()
    env = {**os.environ, "SOURCE_DATE_EPOCH": "1767225600",
           "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    for name in ("VQTOK_CRASH_AT", "VQTOK_CRASH_ONCE", "VQTOK_PAUSE_AT", "PYTHONPATH"):
        env.pop(name, None)
    job = {"root": root, "checkpoint": make_checkpoint(root / "checkpoint", raw),
           "outside": outside, "env": env}
    job["single"] = encode(job, "single")
    return job


def encode(job: dict, out: str, *extra: str, **env: str) -> Path:
    """Run encode; return OUT on success (the test fails with the command's stderr if not)."""
    result = run_encode(job, out, *extra, **env)
    assert result.returncode == 0, result.stderr[-3000:]
    return job["root"] / out


def run_encode(job: dict, out: str, *extra: str, **env: str) -> subprocess.CompletedProcess:
    command = [console_command(), "encode", "--checkpoint", str(job["checkpoint"]), "--out",
               str(job["root"] / out), "--quiet", "--shard-size", "10", "--batch-size", "4",
               "--device", "cpu", *extra]
    return subprocess.run(command, cwd=job["outside"], env={**job["env"], **env},
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def error_line(result: subprocess.CompletedProcess) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr.split(errors[0])[1]  # nothing after our line
    return errors[0]


def tokens(folder: Path) -> dict[str, bytes]:
    return store_tree(folder)


def test_a_local_cluster_from_another_folder_writes_what_one_process_writes(job):
    spread = encode(job, "local2", "--cluster", "local:2")
    assert tokens(spread) == tokens(job["single"])
    version = version_folder(spread)  # the published version: the key map is no token file
    assert version == version_folder(spread, 1) and (spread / "tokens").resolve() == (
        version / "tokens")
    parquet = [p for p in tree(version) if p.endswith(".parquet") and p != ".vqtok/keys.parquet"]
    assert len(parquet) == 5 and all(p.startswith("tokens/") for p in parquet)  # 4 train, 1 val


def test_a_worker_killed_mid_shard_is_replaced_and_the_store_is_the_same(job):
    once = job["root"] / "crashed-once"
    spread = encode(job, "killed-one", "--cluster", "local:2",
                    VQTOK_CRASH_AT="encode-batch-written:1", VQTOK_CRASH_ONCE=str(once))
    assert once.exists()  # a worker really died mid-shard
    assert tokens(spread) == tokens(job["single"])


def test_workers_that_keep_dying_end_the_command_with_one_line(job):
    result = run_encode(job, "always-dying", "--cluster", "local:2",
                        VQTOK_CRASH_AT="encode-batch-written:1")
    line = error_line(result)
    assert line.startswith("error: Dask workers kept dying while encoding a shard (tcp://")
    assert line.endswith("was the last); the workers log to this command's stderr (--verbose "
                         f"shows it all), {CLUSTER_ERROR_TAIL}")
    # the re-run the line asks for completes and equals an uninterrupted encode
    assert tokens(encode(job, "always-dying")) == tokens(job["single"])


def _dask(*args: str, cwd: Path, env: dict) -> subprocess.Popen:
    dask = str(Path(sys.executable).with_name("dask"))
    return subprocess.Popen([dask, *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _scheduler_address(scheduler_file: Path) -> str:
    """The address the scheduler wrote on start; Dask's client waits for the file itself."""
    from distributed import Client

    with Client(scheduler_file=str(scheduler_file), timeout=TIMEOUT_S) as client:
        return client.scheduler.address


def _wait_for_workers(address: str, count: int) -> None:
    from distributed import Client

    with Client(address, timeout=60) as client:
        client.wait_for_workers(count, timeout=TIMEOUT_S)


def test_a_scheduler_and_workers_started_by_hand(job):
    root, env = job["root"], job["env"]
    scheduler_file = root / "scheduler.json"
    scheduler = _dask("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                      "--scheduler-file", str(scheduler_file), cwd=job["outside"], env=env)
    workers: list[subprocess.Popen] = []
    try:
        address = _scheduler_address(scheduler_file)
        worker_args = ("worker", address, "--nthreads", "1", "--no-dashboard")

        # No worker at all: the command waits a bounded time, then says so.
        line = error_line(run_encode(job, "no-worker", "--cluster", address))
        assert line == (f"error: Dask cluster {address} has had no worker for 20 s with 5 "
                        f"shard(s) left; see the log of each `dask worker` connected to "
                        f"{address}, start workers and re-run: finished shards are kept")

        # A worker whose path puts another vqtok/storage first cannot import vqtok.
        shadow = root / "shadow"
        (shadow / "vqtok" / "storage").mkdir(parents=True)
        workers.append(_dask(*worker_args, cwd=job["outside"],
                             env={**env, "PYTHONPATH": str(shadow)}))
        _wait_for_workers(address, 1)
        line = error_line(run_encode(job, "shadowed", "--cluster", address))
        assert line.startswith("error: Dask worker tcp://127.0.0.1:")
        assert "cannot import vqtok (ImportError: cannot import name '" in line
        assert "' from 'vqtok.storage' (unknown location)); install vqtok 0.1.0 in" in line
        assert not (root / "shadowed" / "tokens").exists()  # refused before any shard ran
        _stop(workers.pop())

        # Two good workers, started from the folder the user is in, as the README says.
        workers += [_dask(*worker_args, cwd=job["outside"], env=env) for _ in range(2)]
        _wait_for_workers(address, 2)
        spread = encode(job, "by-hand", "--cluster", address)
        assert tokens(spread) == tokens(job["single"])
    finally:
        for process in [*workers, scheduler]:
            _stop(process)
