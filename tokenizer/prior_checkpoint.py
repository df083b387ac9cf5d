"""Prior checkpoints: the tokenizer's layout (safetensors + JSON, atomic directory swap).

    model.safetensors     the transformer's weights
    config.json           format "vqtok-prior", the PriorConfig, the PriorShape, the weights'
                          content hash, progress and held-out figures, and ``data``: the
                          metadata of the tokens it was trained on (so samples can be written
                          as a token file that the right tokenizer decodes)
    train_state.*         (while training) optimizer, RNG, step, history
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .checkpoint import META, CheckpointError, load_verified_weights
from .checkpoint import write_checkpoint_dir as _write
from .config import ConfigError
from .prior import TokenPrior
from .prior_config import PriorConfig, PriorShape, parse_prior_config

FORMAT = "vqtok-prior"
FORMAT_VERSION = 1


def save_prior(
    directory: str | Path,
    model: TokenPrior,
    config: PriorConfig,
    data: dict[str, Any] | None = None,
    progress: dict[str, Any] | None = None,
    train_state: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
) -> str:
    """Write atomically; returns the weights' content hash."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "shape": model.shape.model_dump(),
        "config": config.model_dump(),
        "data": data or {},
        "progress": progress or {},
    }
    return _write(directory, state, meta, train_state)


def resolve_prior(path: str | Path) -> Path:
    """Accept the checkpoint directory or the training output folder holding ``checkpoint``."""
    path = Path(path)
    for candidate in (path, path / "checkpoint", path.with_name(path.name + ".old"),
                      path / "checkpoint.old"):
        if (candidate / META).is_file():
            return candidate
    if not path.exists():
        raise CheckpointError(f"prior {path} does not exist; pass the folder 'prior train' wrote")
    raise CheckpointError(f"{path} is not a prior checkpoint (no {META}); pass the folder "
                          "'prior train' wrote")


def read_prior_meta(path: str | Path) -> dict[str, Any]:
    directory = resolve_prior(path)
    try:
        meta = json.loads((directory / META).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{directory / META}: unreadable ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{directory / META}: not a prior checkpoint (a tokenizer's?); pass the folder "
            "'prior train' wrote"
        )
    meta["directory"] = str(directory)
    return meta


def load_prior(path: str | Path, device: str | torch.device = "cpu") -> TokenPrior:
    """The trained prior in eval mode, weights hash verified; ``.checkpoint_hash``,
    ``.prior_config`` and ``.data_meta`` (the tokens' metadata) are set on it."""
    meta = read_prior_meta(path)
    directory = Path(meta["directory"])
    try:
        config = parse_prior_config(meta["config"], source=str(directory / META))
        shape = PriorShape.model_validate(meta["shape"])
    except (ConfigError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{directory / META}: bad prior description ({exc})") from None
    model = TokenPrior(shape, config.model)
    digest = load_verified_weights(model, directory, meta, "the prior described")
    model.checkpoint_hash = digest
    model.prior_config = config
    model.data_meta = dict(meta.get("data") or {})
    return model.to(device).eval()
