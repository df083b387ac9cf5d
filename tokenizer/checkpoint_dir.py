"""The checkpoint folder every model vqtok saves (the tokenizer, the prior): one home for its
layout, its atomic publication, finding it from a path, reading its description by kind,
verified weights, and the training state a resumed run restores.

Layout of a checkpoint folder:
  model.safetensors   weights (and buffers)
  config.json         what the model is (``format`` says which kind), the weights' content
                      hash, progress
  train_state.safetensors / train_state.json   (training checkpoints only) optimizer, RNG,
                      step, history
A folder is published by renaming a finished temporary one, so a crash never leaves a
half-written checkpoint under the final name. Loading never unpickles anything.

torch is imported inside the functions that handle tensors: reading a description (what the
CLI's read-only commands do) stays free of it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from vqtok.files.atomic import fsync_path, previous_dir, recover_dir, swap_dir

from .errors import CheckpointError

if TYPE_CHECKING:
    import torch

WEIGHTS = "model.safetensors"
META = "config.json"
STATE = "train_state.safetensors"
STATE_META = "train_state.json"

Tensors = dict[str, "torch.Tensor"]
T = TypeVar("T")


@dataclass(frozen=True)
class CheckpointKind:
    """What tells one kind of checkpoint from another, and how its errors read."""

    format: str  # config.json's "format"
    missing: str  # "{path}" does not exist
    not_one: str  # "{path}" holds no config.json
    wrong_format: str  # config.json of another kind (after "{META path}: ")


# --- writing --------------------------------------------------------------------------------


def weights_hash(state: Tensors) -> str:
    """sha256 over names, dtypes, shapes and bytes: equal iff the tensors are equal."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cpu_state(module: torch.nn.Module) -> Tensors:
    """A module's state as contiguous CPU tensors: what is saved and hashed."""
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Into the temporary folder (published as a whole by the swap), fsynced there."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def recover_checkpoint(directory: str | Path) -> None:
    """Undo a crash between ``write_checkpoint_dir``'s two renames: put ``.old`` back.

    Without this a resumed run would see no checkpoint and start over, and the next save
    would delete ``.old``: the only good copy.
    """
    recover_dir(Path(directory), META)


def write_checkpoint_dir(
    directory: str | Path,
    state: Tensors,
    meta: dict[str, Any],
    train_state: tuple[Tensors, dict[str, Any]] | None = None,
) -> str:
    """Weights + ``meta`` (plus its ``weights_sha256``) as a checkpoint folder, atomically;
    returns the weights' hash.

    An error while writing (disk full, say) removes the temporary copy and leaves the
    previous checkpoint as it was; the OSError names the file that could not be written.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    recover_checkpoint(directory)
    tmp = directory.with_name(directory.name + ".tmp")
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
            fsync_path(f)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(target)) from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_dir(tmp, directory)  # a crash inside leaves ``.old``: recover_checkpoint restores it
    return digest


# --- finding and reading --------------------------------------------------------------------


def resolve_checkpoint_dir(path: str | Path, kind: CheckpointKind) -> Path:
    """Accept a checkpoint folder, the training output folder holding ``checkpoint``, or a
    file of a checkpoint: a file stands for its own folder only, so a token file beside a
    run's ``checkpoint`` folder is not taken for that checkpoint."""
    path = Path(path)
    if path.is_file():
        candidates: tuple[Path, ...] = (path.parent,)
    else:
        candidates = (path, path / "checkpoint", previous_dir(path),
                      previous_dir(path / "checkpoint"))
    for candidate in candidates:
        if (candidate / META).is_file():
            return candidate
    if not path.exists():
        raise CheckpointError(kind.missing.format(path=path))
    raise CheckpointError(kind.not_one.format(path=path))


def read_checkpoint_description(path: str | Path, kind: CheckpointKind) -> dict[str, Any]:
    """config.json of the checkpoint at ``path``, checked to be of ``kind`` and complete;
    ``directory`` is added (the folder it was found in)."""
    directory = resolve_checkpoint_dir(path, kind)
    try:
        meta = json.loads((directory / META).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{directory / META}: unreadable ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != kind.format:
        raise CheckpointError(f"{directory / META}: {kind.wrong_format}")
    for key, type_ in (("config", dict), ("weights_sha256", str)):
        if not isinstance(meta.get(key), type_):
            raise CheckpointError(
                f"{directory / META}: '{key}' missing or malformed; the checkpoint is damaged, "
                "use another one or train again"
            )
    meta["directory"] = str(directory)
    return meta


def load_tensors(path: Path) -> Tensors:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: not a valid safetensors file ({exc}); it may be truncated or not ours"
        ) from None


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


# --- training state -------------------------------------------------------------------------


def optimizer_and_rng_state(optimizer: torch.optim.Optimizer) -> tuple[Tensors, dict[str, Any]]:
    """The optimizer's slots and the RNG states as flat tensors (safetensors can hold them),
    plus the JSON half (``param_groups``); ``restore_training_state`` undoes it."""
    import torch

    opt = optimizer.state_dict()
    tensors: Tensors = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    for index, slots in opt["state"].items():
        for key, value in slots.items():
            tensors[f"opt.{index}.{key}"] = torch.as_tensor(value)
    return tensors, {"param_groups": opt["param_groups"]}


def _restore_optimizer_and_rng(optimizer: torch.optim.Optimizer, tensors: Tensors,
                               param_groups: list[dict[str, Any]]) -> None:
    import torch

    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("opt."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def restore_training_state(
    directory: Path, optimizer: torch.optim.Optimizer,
    rest: Callable[[Tensors, dict[str, Any]], T],
) -> T:
    """Put the optimizer and the RNGs back as the checkpoint in ``directory`` saved them;
    ``rest(tensors, info)`` restores what is the model's own and returns what the loop needs
    (step, history...). A damaged file is one CheckpointError naming the folder."""
    tensors = load_tensors(directory / STATE)
    try:
        info = json.loads((directory / STATE_META).read_text())
        _restore_optimizer_and_rng(optimizer, tensors, info["param_groups"])
        return rest(tensors, info)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise CheckpointError(
            f"{directory}: training state unusable ({type(exc).__name__}: {detail}); delete "
            f"{directory} to start over, or train into a new --out"
        ) from None


def _first_difference(stored: Any, current: Any, key: str) -> str | None:
    """The dotted name of the first leaf that differs (sorted keys), or None."""
    if isinstance(stored, dict) and isinstance(current, dict):
        for name in sorted(set(stored) | set(current)):
            found = _first_difference(stored.get(name), current.get(name), f"{key}.{name}")
            if found:
                return found
        return None
    return None if stored == current else key


def resume_mismatch(stored: dict[str, Any], current: dict[str, Any],
                    must_match: tuple[str, ...]) -> str | None:
    """The first setting among ``must_match`` (dotted keys, compared down to their leaves)
    that differs between a checkpoint's config and this run's, or None: a run resumed with
    one of them changed would be some other run."""
    for key in must_match:
        a, b = stored, current
        for part in key.split("."):
            a, b = a.get(part) if isinstance(a, dict) else None, b[part]
        found = _first_difference(a, b, key)
        if found:
            return found
    return None
