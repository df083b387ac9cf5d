"""Checkpoints as directories of safetensors + JSON: loading never unpickles anything.

Layout of a checkpoint directory:
  model.safetensors   weights and quantizer buffers
  config.json         the full run config, image channels, the weights' content hash, progress
  train_state.safetensors / train_state.json   (training checkpoints only) optimizer, RNG, step
A directory is published by renaming a finished temporary one, so a crash never leaves a
half-written checkpoint under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import Config, ConfigError, parse_config, with_legacy_defaults
from .model import VQVAE

FORMAT = "vqtok-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "config.json"
STATE = "train_state.safetensors"
STATE_META = "train_state.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes: equal iff the tensors are equal."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _state_dict(model: VQVAE) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def model_weights_hash(model: VQVAE) -> str:
    """The hash ``save_checkpoint`` would record for this model's current weights."""
    return weights_hash(_state_dict(model))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def recover_checkpoint(directory: str | Path) -> None:
    """Undo a crash between save_checkpoint's two renames: put ``.old`` back in place.

    Without this a resumed run would see no checkpoint and start over, and the next save
    would delete ``.old``: the only good copy.
    """
    directory = Path(directory)
    old = directory.with_name(directory.name + ".old")
    if not directory.exists() and (old / META).is_file():
        old.rename(directory)
        _fsync_dir(directory.parent)


def save_checkpoint(
    directory: str | Path,
    model: VQVAE,
    config: Config,
    progress: dict[str, Any] | None = None,
    train_state: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
) -> str:
    """Write atomically and return the weights' content hash."""
    state = _state_dict(model)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "in_channels": model.in_channels,
        "config": config.model_dump(),
        "progress": progress or {},
    }
    return write_checkpoint_dir(directory, state, meta, train_state)


def write_checkpoint_dir(
    directory: str | Path,
    state: dict[str, torch.Tensor],
    meta: dict[str, Any],
    train_state: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
) -> str:
    """Weights + ``meta`` (plus its ``weights_sha256``) as a checkpoint directory, atomically.

    Shared by every model vqtok saves (the tokenizer, the prior); returns the weights' hash.
    An error while writing (disk full, say) removes the temporary copy and leaves the
    previous checkpoint as it was; the OSError names the file that could not be written.
    """
    directory = Path(directory)
    recover_checkpoint(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    digest = weights_hash(state)
    target = tmp
    try:
        tmp.mkdir(parents=True)
        target = tmp / WEIGHTS
        save_file(state, str(target))
        target = tmp / META
        _write_json(target, {**meta, "weights_sha256": digest})
        if train_state is not None:
            tensors, info = train_state
            target = tmp / STATE
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                      str(target))
            target = tmp / STATE_META
            _write_json(target, info)
        for f in tmp.iterdir():
            target = f
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(target)) from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Swap: a crash between the two renames leaves ``.old``, which recover_checkpoint restores.
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    _fsync_dir(directory.parent)
    shutil.rmtree(old, ignore_errors=True)
    return digest


def optimizer_and_rng_state(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """The optimizer's slots and the RNG states as flat tensors (safetensors can hold them),
    plus its param groups (JSON); ``restore_optimizer_and_rng`` undoes it."""
    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    for index, slots in opt["state"].items():
        for key, value in slots.items():
            tensors[f"opt.{index}.{key}"] = torch.as_tensor(value)
    return tensors, opt["param_groups"]


def restore_optimizer_and_rng(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
    param_groups: list[dict[str, Any]],
) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("opt."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint directory, a training output directory, or a file of a checkpoint
    (``model.safetensors``): a file stands for its own folder only, so a token file beside a
    run's ``checkpoint`` folder is not taken for that checkpoint."""
    path = Path(path)
    if path.is_file():
        candidates: tuple[Path, ...] = (path.parent,)
    else:
        candidates = (path, path / "checkpoint", path.with_name(path.name + ".old"),
                      path / "checkpoint.old")
    for candidate in candidates:
        if (candidate / META).is_file():
            return candidate
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the training output folder")
    raise CheckpointError(
        f"{path} is not a vqtok checkpoint (no {META}); pass the folder written by 'train'"
    )


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    directory = resolve_checkpoint(path)
    try:
        meta = json.loads((directory / META).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{directory / META}: unreadable ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{directory / META}: not a vqtok checkpoint description")
    for key, kind in (("config", dict), ("weights_sha256", str)):
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(
                f"{directory / META}: '{key}' missing or malformed; the checkpoint is damaged, "
                "use another one or train again"
            )
    meta["directory"] = str(directory)
    return meta


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: not a valid safetensors file ({exc}); it may be truncated or not ours"
        ) from None


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


def load_verified_weights(
    model: torch.nn.Module, directory: Path, meta: dict[str, Any], described: str
) -> str:
    """Load ``directory``'s weights into ``model`` after checking their content hash against
    ``meta`` and that they are finite; returns the hash. Each failure is one CheckpointError
    naming the file."""
    state = load_tensors(directory / WEIGHTS)
    digest = weights_hash(state)
    if digest != meta.get("weights_sha256"):
        raise CheckpointError(
            f"{directory / WEIGHTS}: content hash does not match {META}; the checkpoint is "
            "corrupt or its files come from different runs"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise CheckpointError(
            f"{directory / WEIGHTS}: weights do not fit {described} in {META} ({detail})"
        ) from None
    bad = [name for name, t in state.items() if t.is_floating_point() and not t.isfinite().all()]
    if bad:
        raise CheckpointError(
            f"{directory / WEIGHTS}: weights hold NaN or Inf (in {bad[0]}); this checkpoint "
            "cannot encode anything, use an earlier one"
        )
    return digest


def build_model(config: Config, in_channels: int | None = None) -> VQVAE:
    return VQVAE(
        in_channels=in_channels or config.data.channels,
        model=config.model,
        quantizer=config.quantizer,
        seed=config.seed,
        image_size=config.data.image_size,
    )
