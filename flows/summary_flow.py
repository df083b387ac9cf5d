"""info_flow: ``info`` recorded as a flow run when a Prefect server is configured."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from vqtok.flows.summary import describe


@flow(name="info")
def info_flow(path: str) -> str:
    """The description ``info`` prints, of a token file/folder or a checkpoint."""
    return describe(Path(path))
