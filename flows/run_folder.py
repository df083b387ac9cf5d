"""The run folder: one place for everything a pipeline run makes, and its one layout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vqtok.storage.layout import FORMAT_DIRS, TOKENS_DIR


@dataclass(frozen=True)
class RunPaths:
    """One run folder holds everything a pipeline run makes."""

    root: Path

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint"

    @property
    def tokens(self) -> Path:
        return self.root / TOKENS_DIR

    @property
    def store(self) -> Path:
        """The folder readers are pointed to: tokens/ (Parquet) where the current version has
        it, else hdf5/ (an encode with ``--format hdf5``, whose tokens/ link leads nowhere);
        tokens/ when neither exists, so the error names the usual place."""
        for name in FORMAT_DIRS.values():  # Parquet's first
            if (self.root / name).exists():
                return self.root / name
        return self.tokens

    @property
    def stats(self) -> Path:
        return self.root / "stats"

    @property
    def decode(self) -> Path:
        return self.root / "decode"
