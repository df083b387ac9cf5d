"""Prior configuration, validated strictly like the tokenizer's (a typo fails before work starts).

``PriorConfig`` is what a user chooses (architecture, optimisation); ``PriorShape`` is what the
tokens dictate (codebook size, grid, number of classes) and is filled in from the data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from ..config import _describe, _Strict, apply_overrides, read_yaml_mapping
from ..errors import ConfigError


class PriorShape(_Strict):
    vocab_size: int = Field(ge=1)  # the tokenizer's codebook size K
    grid_h: int = Field(ge=1)
    grid_w: int = Field(ge=1)
    num_classes: int = Field(0, ge=0)  # 0: unconditional only
    depth: int = Field(1, ge=1)  # codes per grid position (residual quantizers)

    @property
    def grid(self) -> tuple[int, ...]:
        """One sample's codes: (h, w), or (h, w, depth)."""
        hw = (self.grid_h, self.grid_w)
        return hw if self.depth == 1 else (*hw, self.depth)


class PriorModelConfig(_Strict):
    # Sized for CPU budgets: a step of 128 7x7 grids costs about one CPU-core second
    # (benchmarks/prior_mnist.py has the figures this gets on MNIST tokens).
    d_model: int = Field(128, ge=8)
    n_layers: int = Field(4, ge=1)
    n_heads: int = Field(4, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> PriorModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads "
                             f"{self.n_heads}; choose a width that is a multiple of the heads")
        return self


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
    raw = read_yaml_mapping(path, "pass a YAML file with seed / model / train")
    return parse_prior_config(raw, source=str(path))
