"""The errors ``tokenizer`` raises for input a user can fix: each message names the file or
key and what to do. Their one home, free of torch, so the CLI can sort exceptions into exit
codes without paying for a torch import."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


class DataError(ValueError):
    """Input data that cannot be used; the message names the file or dataset."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


class UnhealthyCheckpointError(CheckpointError):
    """A checkpoint marked unhealthy by its training run, used without ``force``."""


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to do."""
