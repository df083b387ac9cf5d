"""Prior checkpoints: a checkpoint folder (``checkpoint_dir``) of kind "vqtok-prior".

    model.safetensors     the transformer's weights
    config.json           format "vqtok-prior", the PriorConfig, the PriorShape, the weights'
                          content hash, progress and held-out figures, and ``data``: the
                          metadata of the tokens it was trained on (so samples can be written
                          as a token file that the right tokenizer decodes)
    train_state.*         (while training) optimizer, RNG, step, history
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoint_dir import (
    META,
    CheckpointKind,
    Tensors,
    cpu_state,
    load_verified_weights,
    read_checkpoint_description,
    resolve_checkpoint_dir,
    write_checkpoint_dir,
)
from ..errors import CheckpointError, ConfigError
from .config import PriorConfig, PriorShape, parse_prior_config

if TYPE_CHECKING:
    import torch

    from .model import TokenPrior

FORMAT = "vqtok-prior"
FORMAT_VERSION = 1
PRIOR = CheckpointKind(
    format=FORMAT,
    missing="prior {path} does not exist; pass the folder 'prior train' wrote",
    not_one="{path} is not a prior checkpoint (no " + META + "); pass the folder 'prior train' "
    "wrote",
    wrong_format="not a prior checkpoint (a tokenizer's?); pass the folder 'prior train' wrote",
)


def prior_data_meta(tokens: str | Path, token_meta: dict[str, Any], train_split: str,
                    heldout: str | None) -> dict[str, Any]:
    """What a prior checkpoint keeps about its tokens (``data``): sampling writes token files
    with this metadata, so the right tokenizer decodes them."""
    return {"tokens": str(Path(tokens).resolve()), "token_meta": dict(token_meta),
            "train_split": train_split, "heldout_split": heldout}


def save_prior(
    directory: str | Path,
    model: TokenPrior,
    config: PriorConfig,
    data: dict[str, Any] | None = None,
    progress: dict[str, Any] | None = None,
    train_state: tuple[Tensors, dict[str, Any]] | None = None,
) -> str:
    """Write atomically; returns the weights' content hash."""
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        # Depth 1 left out: one-level priors are described exactly as before depth existed.
        "shape": model.shape.model_dump(exclude={"depth"} if model.shape.depth == 1 else None),
        "config": config.model_dump(),
        "data": data or {},
        "progress": progress or {},
    }
    return write_checkpoint_dir(directory, cpu_state(model), meta, train_state)


def resolve_prior(path: str | Path) -> Path:
    """The prior checkpoint folder ``path`` stands for (see ``resolve_checkpoint_dir``)."""
    return resolve_checkpoint_dir(path, PRIOR)


def read_prior_meta(path: str | Path) -> dict[str, Any]:
    """The prior checkpoint's config.json, checked; ``directory`` says where it was found."""
    return read_checkpoint_description(path, PRIOR)


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
    from .model import TokenPrior

    model = TokenPrior(shape, config.model)
    digest = load_verified_weights(model, directory, meta, "the prior described")
    model.checkpoint_hash = digest
    model.prior_config = config
    model.data_meta = dict(meta.get("data") or {})
    return model.to(device).eval()
