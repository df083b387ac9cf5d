"""Run configuration: YAML files validated by pydantic, so a typo fails before any work starts."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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
    # The quantizer's vector width and codes per level; with quantizer.kind fsq both follow
    # from quantizer.levels when left out (len(levels), prod(levels)).
    embedding_dim: int = Field(64, ge=1)
    num_embeddings: int = Field(512, ge=1)
    activation: Literal["relu", "leaky_relu"] = "leaky_relu"  # slope 0.2 (model.LEAKY_SLOPE)
    # The encoder sees 2x - 1 (zero-centred) instead of x in [0, 1]: ~1 dB more in short runs.
    center_input: bool = True
    # A fresh run starts the decoder's output bias at the logit of the training images' mean,
    # so its first Adam steps need not drag every pixel from 0.5 to the mean (on MNIST that
    # overshoot drove the sigmoid into saturation: the dead decoder).
    init_output_bias: bool = True


#: fsq levels when a config names kind fsq without them (about 2^10 codes, as in the paper).
FSQ_DEFAULT_LEVELS = (8, 5, 5, 5)


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
    # vq: nearest learned code (the lecture's); fsq: per-dimension rounding to a fixed grid;
    # rvq: `depth` vq stages, each coding what the stages before it left over.
    kind: Literal["vq", "fsq", "rvq"] = "vq"
    # vq/rvq: search codes of this width, through learned in/out projections (factorized
    # codes); None: codes are model.embedding_dim wide, no projections.
    codebook_dim: int | None = Field(None, ge=1)
    l2_normalize: bool = False  # vq/rvq: nearest code by cosine (unit vectors and codes)
    rotation_trick: bool = False  # vq/rvq: gradients by the rotation trick, not straight-through
    # fsq: values per dimension; codes are len(levels) wide, the codebook their product.
    levels: tuple[Annotated[int, Field(ge=2)], ...] | None = Field(
        default_factory=lambda data: FSQ_DEFAULT_LEVELS if data.get("kind") == "fsq" else None,
        min_length=1,
    )
    depth: int = Field(1, ge=1)  # rvq: residual stages, each with model.num_embeddings codes
    # fsq: the encoder reaches the grid through an activation and a 1x1 conv, and the decoder
    # reads each grid point through a 1x1 conv to model.hidden_channels and an activation: a
    # learned code embedding, the nonlinear map from code to vector that vq's codebook is.
    # False: one linear 1x1 conv into the grid and the decoder reading the C-wide codes (the
    # paper's; fsq checkpoints from before this key). Measured in benchmarks/quantizers.py.
    fsq_mlp: bool = Field(default_factory=lambda data: data.get("kind") == "fsq")

    @model_validator(mode="after")
    def _options_fit_the_kind(self) -> QuantizerConfig:
        """Options of another kind would be silently ignored: refuse them instead."""
        if self.kind == "fsq":
            if self.levels is None:
                raise ValueError("kind fsq needs levels (e.g. [8, 5, 5, 5])")
            for name in ("codebook_dim", "l2_normalize", "rotation_trick"):
                if getattr(self, name):
                    raise ValueError(f"{name} applies to kinds vq and rvq, not fsq; remove it")
        elif self.fsq_mlp:
            raise ValueError(f"fsq_mlp applies to kind fsq only (kind is {self.kind}); remove it")
        elif self.levels is not None:
            raise ValueError(f"levels apply to kind fsq only (kind is {self.kind}); remove "
                             "them or set kind: fsq")
        if self.depth > 1 and self.kind != "rvq":
            raise ValueError(f"depth {self.depth} needs kind rvq (kind is {self.kind}); remove "
                             "depth or set kind: rvq")
        return self


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

    @model_validator(mode="after")
    def _fsq_sizes(self) -> Config:
        """fsq: the model's code width and codebook size follow from the levels (the one
        place a validated config is completed: its ``model`` is swapped, never mutated)."""
        if self.quantizer.kind == "fsq":
            object.__setattr__(self, "model", fsq_model_sizes(self.model, self.quantizer))
        return self

    def with_overrides(self, **dotted: Any) -> Config:
        """Copy with ``{"train.epochs": 3}``-style overrides, validated like the file."""
        raw = self.model_dump()
        if self.quantizer.kind == "fsq":  # sizes that followed the levels follow new ones too
            for key in ("embedding_dim", "num_embeddings"):
                if key not in self.model.model_fields_set:
                    raw["model"].pop(key)
        for key in ("levels", "fsq_mlp"):  # defaults that follow the kind follow a new kind
            if key not in self.quantizer.model_fields_set:
                raw["quantizer"].pop(key)
        return parse_config(apply_overrides(raw, dotted), source="overrides")


def fsq_model_sizes(model: ModelConfig, quantizer: QuantizerConfig) -> ModelConfig:
    """``model`` with ``embedding_dim = len(levels)`` and ``num_embeddings = prod(levels)``
    where they were left out; ValueError (one line) where they were given otherwise."""
    levels = quantizer.levels or FSQ_DEFAULT_LEVELS
    wanted = {"embedding_dim": (len(levels), "len(levels)"),
              "num_embeddings": (math.prod(levels), "prod(levels)")}
    values = dict(model.__dict__)
    for key, (value, rule) in wanted.items():
        if key not in model.model_fields_set:
            values[key] = value
        elif values[key] != value:
            raise ValueError(
                f"model.{key} {values[key]} does not fit quantizer.levels {list(levels)} (fsq: "
                f"{rule} = {value}); leave model.{key} out or set it to {value}")
    if values == model.__dict__:
        return model
    return ModelConfig.model_construct(_fields_set=set(model.model_fields_set), **values)


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
    "quantizer.fsq_mlp": False,
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
        if not first["loc"]:  # across sections: the message names its keys
            return f"{source}: {first['ctx']['error']}"
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
