"""VQ-VAE image tokenizer: tensors in, tensors out (no orchestration, no file formats).

Parts: the core (``model``, ``training``, ``checkpoint``, ``config``, ``stats``, ``health``),
``quantizers/``, ``sources/`` (datasets, one module per format) and ``prior/`` (the token
prior). Public names are imported on first use (PEP 562), so importing an error class or a
config reader does not import torch: the CLI's read-only commands answer in a second.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module (relative to this package) that defines it
_PUBLIC = {
    "VQVAE": ".model",
    "CheckpointError": ".errors",
    "Config": ".config",
    "ConfigError": ".errors",
    "DataError": ".errors",
    "FiniteScalarQuantizer": ".quantizers",
    "QuantizerOutput": ".quantizers",
    "ResidualVectorQuantizer": ".quantizers",
    "TrainResult": ".training",
    "TrainingError": ".errors",
    "VectorQuantizer": ".quantizers",
    "load_config": ".config",
    "load_tokenizer": ".checkpoint",
    "nearest_code": ".quantizers",
    "open_source": ".sources",
    "save_checkpoint": ".checkpoint",
    "train": ".training",
}

__all__ = [  # the keys of _PUBLIC (tests/test_layout.py checks they agree)
    "VQVAE",
    "CheckpointError",
    "Config",
    "ConfigError",
    "DataError",
    "FiniteScalarQuantizer",
    "QuantizerOutput",
    "ResidualVectorQuantizer",
    "TrainResult",
    "TrainingError",
    "VectorQuantizer",
    "load_config",
    "load_tokenizer",
    "nearest_code",
    "open_source",
    "save_checkpoint",
    "train",
]

if TYPE_CHECKING:
    from .checkpoint import load_tokenizer, save_checkpoint
    from .config import Config, load_config
    from .errors import CheckpointError, ConfigError, DataError, TrainingError
    from .model import VQVAE
    from .quantizers import (
        FiniteScalarQuantizer,
        QuantizerOutput,
        ResidualVectorQuantizer,
        VectorQuantizer,
        nearest_code,
    )
    from .sources import open_source
    from .training import TrainResult, train


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
