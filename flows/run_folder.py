"""The run folder: one place for everything a pipeline run makes, and its one layout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunPaths:
    """One run folder holds everything a pipeline run makes."""

    root: Path

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint"

    @property
    def tokens(self) -> Path:
        return self.root / "tokens"

    @property
    def stats(self) -> Path:
        return self.root / "stats"

    @property
    def decode(self) -> Path:
        return self.root / "decode"
