"""Training the token prior: plain PyTorch, resumable, evaluated in bits per token.

Inputs are torch Datasets of ``(codes (h, w) int, label int)`` (``storage.TokenDataset`` is
one; this module never reads files itself). Batches come from a permutation that depends only
on (seed, epoch), and a checkpoint holds the weights, the optimizer, the RNG state and the
step, so a resumed run ends with exactly the weights of an uninterrupted one.

Figures are in bits per token: the held-out negative log-likelihood, next to the order-0
entropy of the held-out codes (what a model that ignores context and position would pay at
best) and the mean per-position entropy (the same, knowing the position).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..checkpoint_dir import (
    STATE,
    optimizer_and_rng_state,
    restore_training_state,
    resume_mismatch,
)
from ..errors import TrainingError
from ..heap import keep_freed_memory
from ..stats import code_histogram, entropy_bits, position_stats
from ..training import resolve_device
from .checkpoint import load_prior, read_prior_meta, save_prior
from .config import PriorConfig, PriorShape
from .model import TokenPrior

Logger = Callable[[str], None]
LN2 = math.log(2.0)
LOG_EVERY = 100  # steps between progress lines


@dataclass
class PriorTrainResult:
    checkpoint: Path
    weights_sha256: str
    step: int
    seconds: float
    tokens_per_second: float
    heldout: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_step: int = 0


def stack_dataset(data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``(codes, label)`` items as codes (N, h, w) int64 and labels (N,) int64."""
    n = len(data)  # type: ignore[arg-type]
    if n == 0:
        return torch.zeros((0, 1, 1), dtype=torch.long), torch.zeros(0, dtype=torch.long)
    items = [data[i] for i in range(n)]
    codes = torch.stack([torch.as_tensor(c, dtype=torch.long) for c, _ in items])
    labels = torch.tensor([int(label) for _, label in items], dtype=torch.long)
    return codes, labels


def infer_shape(codes: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> PriorShape:
    """Grid from the codes, classes = largest label + 1 (0 when no grid has a label)."""
    if codes.ndim not in (3, 4) or len(codes) == 0:
        raise TrainingError("the prior needs at least one (h, w) or (h, w, depth) grid of codes "
                            "to train on")
    if int(codes.max()) >= vocab_size or int(codes.min()) < 0:
        raise TrainingError(
            f"codes range over {int(codes.min())}..{int(codes.max())} but the codebook has "
            f"{vocab_size} entries; pass the tokens' codebook size"
        )
    return PriorShape(vocab_size=vocab_size, grid_h=int(codes.shape[1]),
                      grid_w=int(codes.shape[2]), num_classes=int(labels.max().clamp(min=-1)) + 1,
                      depth=int(codes.shape[3]) if codes.ndim == 4 else 1)


def baselines(codes: torch.Tensor, vocab_size: int) -> dict[str, float]:
    """Bits per token of the context-free baselines on these grids."""
    array = codes.numpy()
    entropy, _ = position_stats(array, vocab_size)
    return {"unigram_bits": entropy_bits(code_histogram(array, vocab_size)),
            "position_bits": float(entropy.mean())}


@torch.no_grad()
def heldout_bits(model: TokenPrior, codes: torch.Tensor, labels: torch.Tensor | None,
                 batch_size: int) -> float:
    """Mean negative log2-likelihood per code (labels ``None``: every grid unconditioned)."""
    was_training = model.training
    model.eval()
    device = model.pos_emb.device
    total, count = 0.0, 0
    for start in range(0, len(codes), batch_size):
        x = codes[start : start + batch_size].reshape(-1, model.seq_len).to(device)
        y = None if labels is None else labels[start : start + batch_size]
        logits = model(x, y).float()
        total += float(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), x.reshape(-1), reduction="sum"))
        count += x.numel()
    model.train(was_training)
    return total / max(count, 1) / LN2


def evaluate_prior(model: TokenPrior, codes: torch.Tensor, labels: torch.Tensor,
                   batch_size: int = 1000) -> dict[str, float]:
    """Held-out NLL in bits per token (with labels, and without when the prior has classes)."""
    figures = baselines(codes, model.shape.vocab_size)
    figures["nll_bits"] = heldout_bits(model, codes, labels, batch_size)
    if model.shape.num_classes:
        figures["nll_bits_unconditional"] = heldout_bits(model, codes, None, batch_size)
    figures["nll_vs_unigram"] = figures["nll_bits"] / figures["unigram_bits"]
    figures["sequences"] = int(len(codes))
    return figures


def learning_rate(config: PriorConfig, step: int) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine down to ``lr * min_lr_ratio``."""
    t = config.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    span = max(t.steps - t.warmup_steps, 1)
    progress = min((step - t.warmup_steps) / span, 1.0)
    floor = t.lr * t.min_lr_ratio
    return floor + 0.5 * (t.lr - floor) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: TokenPrior, config: PriorConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not biases, norms, embeddings of positions)."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and n != "pos_emb"]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2 or n == "pos_emb"]
    groups = [{"params": decay, "weight_decay": config.train.weight_decay},
              {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.train.lr, betas=(0.9, 0.95))


# --- resumable state ------------------------------------------------------------------------


def _train_state(optimizer: torch.optim.Optimizer, step: int, history: list[dict[str, Any]]
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, info = optimizer_and_rng_state(optimizer)
    return tensors, {**info, "step": step, "history": history}


def _restore_state(directory: Path, model: TokenPrior, optimizer: torch.optim.Optimizer
                   ) -> tuple[int, list[dict[str, Any]]]:
    model.load_state_dict(load_prior(directory).state_dict())  # verifies the weights' hash
    return restore_training_state(
        directory, optimizer, lambda _tensors, info: (int(info["step"]),
                                                      list(info.get("history", []))))


# Changing any of these makes a resumed run something other than the run that was started.
RESUME_MUST_MATCH = ("seed", "model", "train.batch_size", "train.lr", "train.min_lr_ratio",
                     "train.warmup_steps", "train.weight_decay", "train.grad_clip",
                     "train.label_dropout")


# --- the loop -------------------------------------------------------------------------------


def train_prior(
    config: PriorConfig,
    out_dir: str | Path,
    train_data: Dataset,
    heldout_data: Dataset | None = None,
    *,
    vocab_size: int,
    data_meta: dict[str, Any] | None = None,
    stop_at_step: int | None = None,
    log: Logger = print,
) -> PriorTrainResult:
    """Train into ``out_dir/checkpoint``; re-running on the same ``out_dir`` resumes.

    ``vocab_size`` is the tokenizer's codebook size; ``data_meta`` (the tokens' metadata, any
    JSON dict) is stored in the checkpoint for whoever samples from it. ``stop_at_step`` ends
    this call early at that step with a checkpoint (training in chunks; the next call goes on).
    """
    out_dir = Path(out_dir)
    checkpoint = out_dir / "checkpoint"
    device = resolve_device(config.train.device)
    keep_freed_memory()  # every step frees and asks again for ~0.5 GiB of activations
    codes, labels = stack_dataset(train_data)
    shape = infer_shape(codes, labels, vocab_size)
    codes = codes.reshape(len(codes), -1)
    if heldout_data is not None:
        held_codes, held_labels = stack_dataset(heldout_data)
        if len(held_codes) and tuple(held_codes.shape[1:]) != shape.grid:
            raise TrainingError(f"held-out grids are {tuple(held_codes.shape[1:])}, training "
                                f"grids {'x'.join(map(str, shape.grid))}; use one token store")
        # A class the training split never saw has no label embedding: score it unconditioned.
        held_labels = torch.where(held_labels < shape.num_classes, held_labels, -1)
    else:
        held_codes = held_labels = None

    torch.manual_seed(config.seed)
    model = TokenPrior(shape, config.model).to(device)
    optimizer = make_optimizer(model, config)
    step, history = 0, []
    if (checkpoint / STATE).is_file():
        stored = read_prior_meta(checkpoint)
        differs = resume_mismatch(stored["config"], config.model_dump(), RESUME_MUST_MATCH)
        if differs is None and PriorShape.model_validate(stored["shape"]) != shape:
            differs = "tokens (codebook, grid or classes)"
        if differs:
            raise TrainingError(f"{out_dir} holds a prior trained with a different '{differs}'; "
                                "use a new --out, or the same settings to resume")
        step, history = _restore_state(checkpoint, model, optimizer)
        log(f"resuming from step {step} in {checkpoint}")
    resumed_from = step
    total = config.train.steps
    end = total if stop_at_step is None else min(total, stop_at_step)
    if step >= end:
        log(f"nothing to do: {checkpoint} is already at step {step} of {total}")

    n = len(codes)
    batch = min(config.train.batch_size, n)
    steps_per_epoch = n // batch
    heldout: dict[str, float] = history[-1].get("heldout", {}) if history else {}
    digest = ""
    started = time.perf_counter()
    tokens_seen = 0
    window_loss, window_steps = 0.0, 0
    model.train()

    def save() -> str:
        progress = {"step": step, "total_steps": total, "heldout": heldout}
        return save_prior(checkpoint, model, config, data_meta, progress,
                          _train_state(optimizer, step, history))

    while step < end:
        epoch, offset = divmod(step, steps_per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed * 7919
                                                                          + epoch))
        rows = order[offset * batch : (offset + 1) * batch]
        x, y = codes[rows].to(device), labels[rows].to(device)
        if config.train.label_dropout:
            dropped = torch.rand(len(y), device=device) < config.train.label_dropout
            y = torch.where(dropped, torch.full_like(y, -1), y)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        loss = model.loss(x, y)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingError(f"loss became {value} at step {step + 1}; stopped, the last good "
                                f"checkpoint ({checkpoint}) is kept; lower train.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
        optimizer.step()
        step += 1
        tokens_seen += x.numel()
        window_loss, window_steps = window_loss + value, window_steps + 1
        checkpoint_now = step % config.train.checkpoint_every == 0 or step == end
        if step % LOG_EVERY == 0 and not checkpoint_now:
            rate = tokens_seen / max(time.perf_counter() - started, 1e-9)
            log(f"step {step}/{total}: train {window_loss / window_steps / LN2:.3f} bits/token "
                f"(since the last checkpoint), {rate:,.0f} tokens/s")
        if checkpoint_now:
            entry: dict[str, Any] = {"step": step, "train_bits": window_loss / window_steps / LN2}
            window_loss, window_steps = 0.0, 0
            if held_codes is not None and len(held_codes):
                heldout = evaluate_prior(model, held_codes, held_labels,
                                         config.train.eval_batch_size)
                entry["heldout"] = heldout
            history.append(entry)
            rate = tokens_seen / max(time.perf_counter() - started, 1e-9)
            line = f"step {step}/{total}: train {entry['train_bits']:.3f} bits/token"
            if "heldout" in entry:
                line += (f", held-out {heldout['nll_bits']:.3f} (unigram "
                         f"{heldout['unigram_bits']:.3f})")
            log(f"{line}, {rate:,.0f} tokens/s")
            digest = save()

    seconds = time.perf_counter() - started
    if not digest:  # nothing trained in this call: report what is on disk
        digest = read_prior_meta(checkpoint)["weights_sha256"]
    return PriorTrainResult(
        checkpoint=checkpoint, weights_sha256=digest, step=step, seconds=seconds,
        tokens_per_second=tokens_seen / seconds if seconds > 0 else 0.0, heldout=heldout,
        history=history, resumed_from_step=resumed_from,
    )

