"""What flows share: run-folder layout, per-process caches, and token metadata.

Task inputs and results are paths and small dicts; the model and the images are loaded once
per process through these caches, so a worker that runs many shards loads them once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from storage import TokenMeta
from tokenizer import VQVAE, __version__, load_tokenizer
from tokenizer.checkpoint import read_checkpoint_meta
from tokenizer.config import Config, DataConfig, parse_config
from tokenizer.data import ImageSource, open_source
from tokenizer.train import resolve_device


class PipelineError(RuntimeError):
    """A pipeline step cannot go on; the message says why and what to do."""


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


def checkpoint_config(checkpoint: str | Path) -> tuple[Config, dict[str, Any]]:
    meta = read_checkpoint_meta(checkpoint)
    return parse_config(meta["config"], source=f"{meta['directory']}/config.json"), meta


@lru_cache(maxsize=4)
def cached_model(checkpoint: str, device: str) -> VQVAE:
    return load_tokenizer(checkpoint, device=resolve_device(device))


def _data_key(data: DataConfig) -> str:
    return json.dumps(data.model_dump(), sort_keys=True)


@lru_cache(maxsize=2)
def _cached_source(key: str) -> ImageSource:
    return open_source(DataConfig.model_validate_json(key))


def cached_source(data: DataConfig) -> ImageSource:
    return _cached_source(_data_key(data))


def token_meta(model: VQVAE, source: ImageSource, data: DataConfig) -> TokenMeta:
    """Everything a later decode needs: codebook, grid, the data it came from, the tokenizer."""
    h, w = model.grid_shape(data.image_size, data.image_size)
    return TokenMeta(
        codebook_size=model.num_embeddings,
        grid_h=h,
        grid_w=w,
        dataset=source.name,
        dataset_fingerprint=source.fingerprint,
        checkpoint_hash=model.checkpoint_hash,
        vqtok_version=__version__,
        extra={"data": data.model_dump(), "channels": source.channels,
               "image_size": data.image_size},
    )
