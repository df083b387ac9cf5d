"""The tokenizer's checkpoints: a checkpoint folder (``checkpoint_dir``) of kind
"vqtok-checkpoint" whose config.json holds the full run config and the image channels.

torch and the model are imported when weights are loaded or saved, so reading a checkpoint's
description (``read_checkpoint_meta``) stays cheap for the CLI's read-only commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint_dir import (
    META,
    CheckpointKind,
    Tensors,
    cpu_state,
    load_verified_weights,
    read_checkpoint_description,
    resolve_checkpoint_dir,
    weights_hash,
    write_checkpoint_dir,
)
from .config import Config, parse_config, with_legacy_defaults
from .errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    import torch

    from .model import VQVAE

FORMAT = "vqtok-checkpoint"
FORMAT_VERSION = 1
TOKENIZER = CheckpointKind(
    format=FORMAT,
    missing="checkpoint {path} does not exist; pass the training output folder",
    not_one="{path} is not a vqtok checkpoint (no " + META + "); pass the folder written by "
    "'train'",
    wrong_format="not a vqtok checkpoint description",
)


def model_weights_hash(model: VQVAE) -> str:
    """The hash ``save_checkpoint`` would record for this model's current weights."""
    return weights_hash(cpu_state(model))


def save_checkpoint(
    directory: str | Path,
    model: VQVAE,
    config: Config,
    progress: dict[str, Any] | None = None,
    train_state: tuple[Tensors, dict[str, Any]] | None = None,
) -> str:
    """Write atomically and return the weights' content hash."""
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "in_channels": model.in_channels,
        "config": config.model_dump(),
        "progress": progress or {},
    }
    return write_checkpoint_dir(directory, cpu_state(model), meta, train_state)


def resolve_checkpoint(path: str | Path) -> Path:
    """The tokenizer checkpoint folder ``path`` stands for (see ``resolve_checkpoint_dir``)."""
    return resolve_checkpoint_dir(path, TOKENIZER)


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """The checkpoint's config.json, checked; ``directory`` says where it was found."""
    return read_checkpoint_description(path, TOKENIZER)


def stored_config(meta: dict[str, Any]) -> Config:
    """The run config a checkpoint was trained with (``meta`` from ``read_checkpoint_meta``);
    keys newer than the checkpoint mean what they meant when it was written."""
    directory = Path(meta["directory"])
    try:
        return parse_config(with_legacy_defaults(meta["config"]), source=str(directory / META))
    except (ConfigError, KeyError) as exc:
        raise CheckpointError(f"{directory / META}: bad config ({exc})") from None


def load_tokenizer(path: str | Path, device: str | torch.device = "cpu") -> VQVAE:
    """The trained VQVAE from a checkpoint directory, in eval mode, weights hash verified."""
    meta = read_checkpoint_meta(path)
    directory = Path(meta["directory"])
    config = stored_config(meta)
    model = build_model(config, int(meta.get("in_channels", config.data.channels)))
    digest = load_verified_weights(model, directory, meta, "the architecture")
    model.checkpoint_hash = digest
    return model.to(device).eval()


def build_model(config: Config, in_channels: int | None = None) -> VQVAE:
    from .model import VQVAE

    return VQVAE(
        in_channels=in_channels or config.data.channels,
        model=config.model,
        quantizer=config.quantizer,
        seed=config.seed,
        image_size=config.data.image_size,
    )
