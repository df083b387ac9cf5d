"""Dask clusters for encoding, by name: ``local:N`` or the address of a running scheduler.

``local:N`` starts a ``distributed.LocalCluster`` of N worker processes with one thread each
(for the length of the encode); ``tcp://HOST:PORT`` (or ``tls://``) connects to a scheduler
started by hand (README, "Encoding on a Dask cluster"). Either way the shards run as Prefect
tasks through prefect-dask's ``DaskTaskRunner`` (``pip install 'vqtok[dask]'``).
"""

from __future__ import annotations

import re
from typing import Any

from flows.runtime import PipelineError

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
                                  "processes": True, "dashboard_address": None}
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
