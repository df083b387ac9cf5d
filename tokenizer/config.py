"""Run configuration: YAML files validated by pydantic, so a typo fails before any work starts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConfigError

#: Images per batch when encoding or decoding where no GPU memory decides it (on a GPU the
#: encoder measures what fits): the one home of that default.
ENCODE_BATCH_SIZE = 256


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class DataConfig(_Strict):
    dataset: str = "mnist-sample"
    data_root: str | None = None  # where torchvision datasets live or are downloaded to
    channels: int = Field(1, ge=1, le=4)
    image_size: int = Field(28, ge=4)
    # "resize": shorter side to image_size then centre crop; "error": refuse other sizes.
    resize: Literal["resize", "error"] = "resize"
    train_split: str = "train"
    val_split: str = "validation"
    # webdataset: image member's extension (None: jpg, jpeg, png, webp); parquet: column ("image")
    image_key: str | None = None
    # webdataset: label extension or json.FIELD (None: "cls"); parquet: column (None: "label")
    label_key: str | None = None
    # "rule": every tenth id is validation; "file": a shard's split from its path (train-0.tar)
    split_by: Literal["rule", "file"] = "rule"


class ModelConfig(_Strict):
    hidden_channels: int = Field(128, ge=1)
    num_downsamples: int = Field(2, ge=1, le=6)
    num_residual_blocks: int = Field(0, ge=0)
    residual_channels: int = Field(32, ge=1)
    latent_channels: int = Field(64, ge=1)  # encoder output; a 1x1 conv maps it to embedding_dim
    embedding_dim: int = Field(64, ge=1)
    num_embeddings: int = Field(512, ge=1)
    activation: Literal["relu", "leaky_relu"] = "leaky_relu"  # slope 0.2 (model.LEAKY_SLOPE)
    # The encoder sees 2x - 1 (zero-centred) instead of x in [0, 1]: ~1 dB more in short runs.
    center_input: bool = True
    # A fresh run starts the decoder's output bias at the logit of the training images' mean,
    # so its first Adam steps need not drag every pixel from 0.5 to the mean (on MNIST that
    # overshoot drove the sigmoid into saturation: the dead decoder).
    init_output_bias: bool = True


class QuantizerConfig(_Strict):
    beta: float = Field(0.25, ge=0)
    ema: bool = True
    decay: float = Field(0.9, gt=0, lt=1)  # EMA: fast enough to follow an encoder still learning
    eps: float = Field(1e-5, gt=0)
    kmeans_init: bool = True  # fit the codebook by k-means to the first quantized batch
    kmeans_iters: int = Field(10, ge=0)
    restart_after: int = Field(10, ge=0)  # steps unused before a code is re-seeded; 0 = never
    chunk_mib: int = Field(256, ge=1)
    # The first steps train a plain autoencoder (no quantization), so k-means fits codes to a
    # trained encoder rather than a random one; at most half of the first epoch (see
    # tokenizer.training.warmup_steps).
    warmup_steps: int = Field(100, ge=0)


class TrainConfig(_Strict):
    epochs: int = Field(3, ge=1)
    max_steps: int | None = Field(None, ge=1)  # stop early after this many optimizer steps
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    num_workers: int = Field(0, ge=0)
    eval_batch_size: int = Field(500, ge=1)
    # Also checkpoint every this many steps inside an epoch (None: only at epoch ends), so a
    # killed run loses at most this many steps. Saving does not change the training result.
    checkpoint_every: int | None = Field(500, ge=1)
    # Health check: a run whose validation PSNR ends less than this many dB above the
    # mean-image baseline fails, and its checkpoint is marked unhealthy. None: no check.
    min_gain_over_baseline_db: float | None = Field(3.0, ge=0)
    # Adam's (beta1, beta2): a second moment that forgets in ~20 steps instead of ~1000
    # follows the fast-changing gradients of a short run (0.2 dB on CIFAR-10 in 220 steps).
    adam_betas: tuple[float, float] = (0.9, 0.95)


class Config(_Strict):
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    quantizer: QuantizerConfig = QuantizerConfig()
    train: TrainConfig = TrainConfig()

    def with_overrides(self, **dotted: Any) -> Config:
        """Copy with ``{"train.epochs": 3}``-style overrides, validated like the file."""
        return parse_config(apply_overrides(self.model_dump(), dotted), source="overrides")


def apply_overrides(raw: dict[str, Any], dotted: dict[str, Any]) -> dict[str, Any]:
    """Set ``{"train.epochs": 3}``-style keys in a nested dict; ``None`` values are skipped."""
    for key, value in dotted.items():
        if value is None:
            continue
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return raw


#: What configs written before a key existed meant by leaving it out: a checkpoint from an
#: older vqtok loads (and encodes) exactly as it was trained.
LEGACY_DEFAULTS: dict[str, Any] = {
    "model.activation": "relu",
    "model.center_input": False,
    "model.init_output_bias": False,
    "quantizer.warmup_steps": 0,
    "train.min_gain_over_baseline_db": None,
    "train.adam_betas": [0.9, 0.999],
}


def with_legacy_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """A stored config with the keys it predates set to what they meant then."""
    raw = json.loads(json.dumps(raw))
    for key, value in LEGACY_DEFAULTS.items():
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf not in node:
            node[leaf] = value
    return raw


def _describe(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<top level>"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'; remove it or fix its spelling"
    if first["type"] == "value_error":  # a rule across keys (a model_validator)
        return f"{source}: section '{key}': {first['ctx']['error']}"
    return f"{source}: key '{key}': {first['msg']} (got {first.get('input')!r})"


def parse_config(raw: dict[str, Any] | None, source: str = "config") -> Config:
    try:
        # JSON-style validation: YAML gives ints for floats like `1`, which strict mode refuses.
        return Config.model_validate_json(_to_json(raw or {}))
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def _to_json(raw: dict[str, Any]) -> str:
    return json.dumps(raw)


def read_yaml_mapping(path: str | Path, missing_hint: str) -> dict[str, Any] | None:
    """A YAML config file's top-level mapping (None when empty), or one ConfigError line:
    missing file, not text, not YAML (with line and column), not a mapping. Every config
    loader reads its file through here."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; {missing_hint}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8); pass a YAML config") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"{path}: not valid YAML{where} ({problem})") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return raw


def load_config(path: str | Path | None) -> Config:
    """Config from a YAML file; ``None`` gives the defaults (the bundled sample)."""
    if path is None:
        return Config()
    raw = read_yaml_mapping(path, "pass a YAML file from configs/")
    return parse_config(raw, source=str(path))
