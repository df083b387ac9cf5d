"""Prior configuration, validated strictly like the tokenizer's (a typo fails before work starts).

``PriorConfig`` is what a user chooses (architecture, optimisation); ``PriorShape`` is what the
tokens dictate (codebook size, grid, number of classes) and is filled in from the data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from .config import ConfigError, _describe, _Strict, apply_overrides


class PriorShape(_Strict):
    vocab_size: int = Field(ge=1)  # the tokenizer's codebook size K
    grid_h: int = Field(ge=1)
    grid_w: int = Field(ge=1)
    num_classes: int = Field(0, ge=0)  # 0: unconditional only


class PriorModelConfig(_Strict):
    # Sized for CPU budgets: a step of 128 7x7 grids costs about one CPU-core second
    # (benchmarks/prior_mnist.py has the figures this gets on MNIST tokens).
    d_model: int = Field(128, ge=8)
    n_layers: int = Field(4, ge=1)
    n_heads: int = Field(4, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)


class PriorTrainConfig(_Strict):
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0)  # peak; linear warm-up, then cosine down to lr * min_lr_ratio
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    grad_clip: float = Field(1.0, ge=0)  # 0 = no clipping
    # Fraction of training grids whose label is replaced by "no label", so one model also
    # samples unconditionally.
    label_dropout: float = Field(0.1, ge=0, le=1)
    checkpoint_every: int = Field(500, ge=1)
    eval_batch_size: int = Field(1000, ge=1)
    device: str = "auto"


class PriorConfig(_Strict):
    seed: int = 0
    model: PriorModelConfig = PriorModelConfig()
    train: PriorTrainConfig = PriorTrainConfig()

    def with_overrides(self, **dotted: Any) -> PriorConfig:
        """Copy with ``{"train.steps": 300}``-style overrides (``None`` values are skipped)."""
        return parse_prior_config(apply_overrides(self.model_dump(), dotted), source="overrides")


def parse_prior_config(raw: dict[str, Any] | None, source: str = "prior config") -> PriorConfig:
    try:
        # JSON-style validation, as for the tokenizer config: YAML's `1` is fine for a float.
        return PriorConfig.model_validate_json(json.dumps(raw or {}))
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def load_prior_config(path: str | Path | None) -> PriorConfig:
    """Prior config from a YAML file; ``None`` gives the defaults."""
    if path is None:
        return PriorConfig()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prior config {path} does not exist; pass a YAML file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with seed / model / train")
    return parse_prior_config(raw, source=str(path))
