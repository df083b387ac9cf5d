"""Dask clusters for encoding, by name: ``local:N`` or the address of a running scheduler.

``local:N`` starts a ``distributed.LocalCluster`` of N worker processes with one thread each
(for the length of the encode); ``tcp://HOST:PORT`` (or ``tls://``) connects to a scheduler
started by hand (README, "Encoding on a Dask cluster"). Either way the shards run as Prefect
tasks through prefect-dask's ``DaskTaskRunner`` (``pip install 'vqtok[dask]'``).

A cluster never makes the command hang: before any shard is sent, every worker must import
vqtok (the same version as here), and while shards run the driver watches the workers; a
cluster left without workers for ``NO_WORKER_GRACE_S``, or a shard whose workers keep dying
(Dask's ``KilledWorker``), ends the command with one line naming the cause.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from importlib.metadata import version
from typing import Any

from vqtok.flows.errors import PipelineError

# How long the cluster may have no worker at all while shards are waiting. A nanny restarts
# a dead worker within seconds; a cluster that stays empty this long will not recover.
NO_WORKER_GRACE_S = 20.0
POLL_S = 0.5
# Evaluated on each worker: imports what the shard tasks need, returns vqtok's version.
_PROBE = ("(__import__('vqtok.flows.encode_flow'), "
          "__import__('importlib.metadata').metadata.version('vqtok'))[1]")

_LOCAL = re.compile(r"^local:(\d+)$")
_ADDRESS = re.compile(r"^(tcp|tls|inproc|ucx)://\S+$")


def runner_options(spec: str, api_url: str | None = None) -> dict[str, Any]:
    """``DaskTaskRunner`` keyword arguments for a ``--cluster`` value.

    ``api_url``: the Prefect API the driver talks to. Local workers get it in their
    environment, so with Prefect's temporary server they report to the driver's server
    instead of each starting its own. Remote workers need ``PREFECT_API_URL`` set by hand.
    """
    match = _LOCAL.match(spec)
    if match:
        workers = int(match.group(1))
        if workers < 1:
            raise PipelineError(f"--cluster {spec}: a local cluster needs at least 1 worker")
        # One thread per worker: torch already uses the worker's cores, and Dask sets
        # OMP_NUM_THREADS=1 in worker processes, so N workers use about N cores.
        kwargs: dict[str, Any] = {"n_workers": workers, "threads_per_worker": 1,
                                  "processes": True,
                                  # any free port: a second encode never collides with a first
                                  "dashboard_address": ":0"}
        if api_url:
            kwargs["env"] = {"PREFECT_API_URL": api_url}
        return {"cluster_class": "distributed.LocalCluster", "cluster_kwargs": kwargs}
    if _ADDRESS.match(spec):
        return {"address": spec}
    raise PipelineError(
        f"--cluster {spec!r} is neither local:N nor a scheduler address; use e.g. local:4 or "
        "tcp://HOST:8786"
    )


def dask_task_runner(spec: str, api_url: str | None = None) -> Any:
    """A prefect-dask ``DaskTaskRunner`` for ``spec``; a clear error when it is not installed."""
    options = runner_options(spec, api_url)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise PipelineError(
            "--cluster needs prefect-dask and dask.distributed: pip install 'vqtok[dask]'"
        ) from None
    return DaskTaskRunner(**options)


def _where_logs_are(spec: str) -> str:
    if _LOCAL.match(spec):
        return "the workers log to this command's stderr (--verbose shows it all)"
    return f"see the log of each `dask worker` connected to {spec}"


def check_workers(client: Any, spec: str) -> None:
    """Every connected worker imports vqtok, the same version as here, or one-line error.

    Run before any shard is submitted: a worker that cannot unpickle a shard task dies
    without telling the driver why (issue 17's hang), so it is asked first.
    """
    expected = version("vqtok")
    answers = client.run(eval, _PROBE, on_error="return")
    for worker, answer in sorted(answers.items()):
        if isinstance(answer, BaseException):
            raise PipelineError(
                f"Dask worker {worker} cannot import vqtok ({type(answer).__name__}: {answer});"
                f" install vqtok {expected} in the workers' environment and restart them; "
                f"{_where_logs_are(spec)}")
        if answer != expected:
            raise PipelineError(
                f"Dask worker {worker} runs vqtok {answer}, this command {expected}; install "
                "the same version on every worker so the tokens do not depend on where a "
                "shard ran")


def wait_for_all(futures: Sequence[Any], client: Any, spec: str,
                 on_done: Callable[[Any], None],
                 grace_s: float = NO_WORKER_GRACE_S) -> list[Any]:
    """Results of prefect-dask ``futures`` in order, calling ``on_done`` as each finishes.

    Unlike a bare wait, this returns or raises: a shard whose workers all died raises Dask's
    ``KilledWorker`` as a one-line ``PipelineError``, and so does a cluster that has had no
    worker for ``grace_s`` seconds while shards wait.
    """
    from distributed.scheduler import KilledWorker

    pending = list(futures)
    empty_since: float | None = None
    while pending:
        still = []
        for future in pending:
            if not future.wrapped_future.done():
                still.append(future)
                continue
            try:
                on_done(future.result())
            except KilledWorker as exc:
                last = getattr(exc.last_worker, "address", exc.last_worker)
                raise PipelineError(
                    f"Dask workers kept dying while encoding a shard ({last} was "
                    f"the last); {_where_logs_are(spec)}, then re-run: finished shards are "
                    "kept") from None
        pending = still
        if not pending:
            break
        if client.nthreads():
            empty_since = None
        elif empty_since is None:
            empty_since = time.monotonic()
        elif time.monotonic() - empty_since > grace_s:
            raise PipelineError(
                f"Dask cluster {spec} has had no worker for {grace_s:.0f} s with {len(pending)}"
                f" shard(s) left; {_where_logs_are(spec)}, start workers and re-run: finished "
                "shards are kept")
        time.sleep(POLL_S)
    return [future.result() for future in futures]
