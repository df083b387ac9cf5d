"""The training loop: plain PyTorch, resumable, validated every epoch. No orchestration here.

Data order depends only on (seed, epoch), and a checkpoint holds the model, the optimizer,
the quantizer's EMA buffers, the step and every RNG state, so a resumed run continues exactly
where the interrupted one stood.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed as dist
from . import health
from .accel import Accel
from .checkpoint import (
    build_model,
    load_tokenizer,
    model_weights_hash,
    read_checkpoint_meta,
    save_checkpoint,
    stored_config,
)
from .checkpoint_dir import (
    STATE,
    optimizer_and_rng_state,
    recover_checkpoint,
    restore_training_state,
    resume_mismatch,
)
from .config import Config
from .errors import TrainingError
from .faults import pause_point
from .model import VQVAE
from .sources import ImageSource, iterate_batches, iterate_id_batches, open_source, split_batches
from .splits import heldout_split
from .stats import level_histograms, psnr, usage_summary

Logger = Callable[[str], None]


@dataclass
class TrainResult:
    checkpoint: Path
    weights_sha256: str
    step: int
    epochs_done: int
    seconds: float
    images_per_second: float
    validation: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_step: int = 0
    health: dict[str, Any] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(
            f"device '{name}' asked for but CUDA is not available; use --device cpu"
        )
    try:
        return torch.device(name)
    except RuntimeError:
        raise TrainingError(f"unknown device '{name}'; use auto, cpu or cuda[:N]") from None


def _rank_device(device: torch.device) -> torch.device:
    """Under DDP, plain ``cuda`` means this rank's GPU (set by ``distributed.init_from_env``)."""
    if device.type == "cuda" and device.index is None and dist.is_distributed():
        return torch.device("cuda", torch.cuda.current_device())
    return device


@torch.no_grad()
def evaluate(
    model: VQVAE, source: ImageSource, ids: np.ndarray, batch_size: int, device: torch.device,
    amp: bool = False, accel: Accel | None = None,
) -> dict[str, float]:
    """MSE and PSNR (from the mean MSE) and codebook usage over the given images, and the
    trivial baseline on the same images: the PSNR of predicting the model's training mean
    image (``baseline_psnr``; left out for checkpoints that do not know their mean image).

    Under DDP each rank takes every world-size-th image, none twice, and the sums are added
    over ranks: the figures count each image exactly once, as in one process.
    """
    accel = accel or Accel.for_device(device, amp)
    was_training = model.training
    model.eval()
    sq_err, baseline_sq_err, pixels = 0.0, 0.0, 0
    counts = np.zeros((model.depth, model.num_embeddings), dtype=np.int64)  # per level
    has_baseline = int(model.mean_image_count) > 0
    mine = dist.shard_eval(ids, dist.rank(), dist.world_size())
    for images, _ in iterate_batches(source, mine, batch_size, pin=accel.pin_memory,
                                     prefetch=accel.prefetch):
        images = accel.to_device(images)
        with accel.autocast():
            codes = model.encode(images)
            recon = model.decode(codes)
        sq_err += float(((recon.float() - images) ** 2).sum())
        if has_baseline:
            baseline_sq_err += float(((model.mean_image - images) ** 2).sum())
        pixels += images.numel()
        counts += level_histograms(codes, model.num_embeddings, model.depth)
    model.train(was_training)
    if dist.is_distributed():
        where = model.mean_image.device
        sums = dist.all_reduce_sum_(torch.tensor([sq_err, baseline_sq_err, float(pixels)],
                                                 dtype=torch.float64, device=where))
        sq_err, baseline_sq_err, pixels = float(sums[0]), float(sums[1]), int(sums[2])
        counts = dist.all_reduce_sum_(torch.from_numpy(counts).to(where)).cpu().numpy()
    mse = sq_err / max(pixels, 1)
    usage = usage_summary(counts[0])
    figures = {
        "mse": mse,
        "psnr": psnr(mse),
        "usage": usage["usage"],
        "codes_used": usage["codes_used"],
        "perplexity": usage["perplexity"],
        "images": len(ids),
    }
    if model.depth > 1:  # the figures above are level 0's; here every level's
        figures["levels"] = [{k: summary[k] for k in ("usage", "codes_used", "perplexity")}
                             for summary in map(usage_summary, counts)]
    if has_baseline:
        figures.update(health.baseline_figures(baseline_sq_err, pixels))
    return figures


# --- resumable state ------------------------------------------------------------------------


def _train_state(
    model: VQVAE, optimizer: torch.optim.Optimizer, step: int, history: list[dict[str, Any]],
    partial: tuple[float, int] = (0.0, 0),
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Everything a resumed run needs; ``partial`` is the running loss of an unfinished epoch."""
    tensors, info = optimizer_and_rng_state(optimizer)
    for name, generator in _quantizer_generators(model).items():
        tensors[name] = generator.get_state()
    info.update(step=step, history=history, epoch_loss=partial[0], epoch_batches=partial[1])
    return tensors, info


def _quantizer_generators(model: VQVAE) -> dict[str, torch.Generator]:
    """The quantizer's random streams by train-state key: "rng.quantizer" for the first (the
    key of checkpoints from before there were several), "rng.quantizer.N" for the others."""
    return {"rng.quantizer" if i == 0 else f"rng.quantizer.{i}": g
            for i, g in enumerate(model.quantizer.generators())}


@dataclass
class _Resumed:
    step: int
    history: list[dict[str, Any]]
    partial: tuple[float, int]


def _restore_state(
    directory: Path, model: VQVAE, optimizer: torch.optim.Optimizer
) -> _Resumed:
    """Load a training checkpoint into ``model`` and ``optimizer`` (and the RNGs).

    Nothing here unpickles: tensors come from safetensors, the rest from JSON. A damaged file
    is a CheckpointError naming it, never a traceback.
    """
    loaded = load_tokenizer(directory)  # verifies the weights' hash
    model.load_state_dict(loaded.state_dict())

    def rest(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> _Resumed:
        for name, generator in _quantizer_generators(model).items():
            generator.set_state(tensors[name])
        return _Resumed(int(info["step"]), list(info.get("history", [])),
                        (float(info.get("epoch_loss", 0.0)), int(info.get("epoch_batches", 0))))

    return restore_training_state(directory, optimizer, rest)


def _kept(checkpoint: Path, saved_step: int | None) -> str:
    if saved_step is None:
        return "no checkpoint was written yet"
    return f"the last good checkpoint ({checkpoint}, step {saved_step}) is kept"


def _check_finite(model: VQVAE, step: int, checkpoint: Path, saved_step: int | None) -> None:
    """Never save NaN/Inf weights over the last good checkpoint."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise TrainingError(
                f"weights became non-finite ({name}) at step {step}; stopped, "
                f"{_kept(checkpoint, saved_step)}; lower train.lr or check the data"
            )


RESUME_MUST_MATCH = ("seed", "data", "model", "quantizer", "train.batch_size", "train.lr",
                     "train.adam_betas")


# --- the loop -------------------------------------------------------------------------------


def _progress(enabled: bool):  # noqa: ANN202 - rich types stay internal
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>7.0f} img/s  loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


def _per_level(figures: dict[str, Any]) -> str:
    """Every level's usage and perplexity for a log line; "" at depth 1 (no "levels")."""
    levels = figures.get("levels")
    if not levels:
        return ""
    usage = "/".join(f"{level['usage']:.1%}" for level in levels)
    perplexity = "/".join(f"{level['perplexity']:.1f}" for level in levels)
    return f" (per level: usage {usage}, perplexity {perplexity})"


def _silent(_message: str) -> None:
    pass


def _global_mean(value: torch.Tensor) -> float:
    """The loss averaged over ranks: every rank sees the same number, so a NaN on one rank
    stops all of them at the same step instead of leaving the others waiting."""
    if not dist.is_distributed():
        return float(value)
    total = dist.all_reduce_sum_(value.detach().float().reshape(1).clone())
    return float(total) / dist.world_size()


def make_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    """Adam over the trainable parameters (an EMA codebook is a buffer, not among them)."""
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                            lr=config.train.lr, betas=config.train.adam_betas)


def warmup_steps(config: Config, steps_per_epoch: int) -> int:
    """Steps trained as a plain autoencoder before quantization starts: the configured
    number, but at most half of the first epoch, so every run quantizes most of its steps.
    It depends only on the data and the batch size, so a resumed run (or one trained for
    more epochs later) warms up exactly as an uninterrupted one."""
    return min(config.quantizer.warmup_steps, steps_per_epoch // 2)


def start_fresh(model: VQVAE, config: Config, source: ImageSource, train_ids: np.ndarray) -> None:
    """What a new run does before its first step: record the training data's mean image (the
    health check's baseline) and, with ``model.init_output_bias``, start the output there."""
    mean, count = health.mean_image(source.load_batch, train_ids)
    model.set_mean_image(mean, count)
    if config.model.init_output_bias:
        model.init_output_bias()


def _is_smoke_run(config: Config, step: int, steps_per_epoch: int) -> bool:
    """Stopped by train.max_steps before its planned epochs: a quick try, not a real run."""
    return config.train.max_steps is not None and step < steps_per_epoch * config.train.epochs


def train(
    config: Config,
    out_dir: str | Path,
    *,
    source: ImageSource | None = None,
    progress: bool = True,
    log: Logger = print,
    accel: Accel | None = None,
) -> TrainResult:
    """Train into ``out_dir/checkpoint``; re-running on the same ``out_dir`` resumes.

    Under torchrun (a process group is up: see ``tokenizer.train_main``) each step's global
    batch of ``train.batch_size`` images is split over the ranks, gradients are averaged by
    DDP, the codebook statistics are summed by the quantizer, and rank 0 alone logs and
    writes checkpoints. ``accel`` overrides the device defaults of ``Accel.for_device``.
    """
    out_dir = Path(out_dir)
    checkpoint = out_dir / "checkpoint"
    rank, world = dist.rank(), dist.world_size()
    main = rank == 0
    if not main:
        progress, log = False, _silent
    device = _rank_device(resolve_device(config.train.device))
    accel = accel or Accel.for_device(device, config.train.amp)
    source = source or open_source(config.data)
    factor = 2**config.model.num_downsamples
    if config.data.image_size % factor:
        raise TrainingError(
            f"data.image_size {config.data.image_size} is not divisible by 2^num_downsamples "
            f"= {factor}; choose a multiple of {factor}"
        )
    train_ids = source.split_ids(config.data.train_split)
    val_split = heldout_split(source.splits, config.data.val_split,
                              exclude=config.data.train_split) or config.data.val_split
    if val_split != config.data.val_split:
        log(f"dataset {source.name} has no '{config.data.val_split}' split; validating on "
            f"'{val_split}'")
    val_ids = source.split_ids(val_split)
    if len(train_ids) == 0:
        raise TrainingError(f"split '{config.data.train_split}' of {source.name} is empty")

    torch.manual_seed(config.seed)
    model = accel.prepare(build_model(config, source.channels))
    optimizer = make_optimizer(model, config)
    steps_per_epoch = math.ceil(len(train_ids) / config.train.batch_size)
    warmup = warmup_steps(config, steps_per_epoch)
    total_steps = steps_per_epoch * config.train.epochs
    if config.train.max_steps is not None:
        total_steps = min(total_steps, config.train.max_steps)

    step, history, partial = 0, [], (0.0, 0)
    saved_step: int | None = None  # step of the checkpoint on disk, if any
    last_val: dict[str, float] = {}
    recover_checkpoint(checkpoint)  # a crash inside save_checkpoint's swap leaves `.old`
    if (checkpoint / STATE).is_file():
        meta = read_checkpoint_meta(checkpoint)
        stored = stored_config(meta).model_dump()
        differs = resume_mismatch(stored, config.model_dump(), RESUME_MUST_MATCH)
        if differs:
            raise TrainingError(
                f"{out_dir} holds a checkpoint trained with a different '{differs}'; "
                "use a new --out, or the same config to resume"
            )
        resumed = _restore_state(checkpoint, model, optimizer)
        step, history, partial = resumed.step, resumed.history, resumed.partial
        saved_step = step
        last_val = dict(meta.get("progress", {}).get("validation") or {})
        log(f"resuming from step {step} in {checkpoint}")
    else:
        start_fresh(model, config, source, train_ids)
    resumed_from = step
    if step >= total_steps:
        log(f"nothing to do: {checkpoint} is already at step {step} of {total_steps}")

    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    net: torch.nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # Buffers (the EMA codebook, usage counts) are kept equal by the quantizer's own
        # all-reduces; re-broadcasting them from rank 0 every step would only cost time.
        net = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)
    scaler = accel.grad_scaler()
    digest = ""
    every = config.train.checkpoint_every
    model.train()
    started = time.perf_counter()
    images_seen = 0
    epoch_loss, epoch_batches = partial

    def save() -> str:
        nonlocal saved_step
        _check_finite(model, step, checkpoint, saved_step)
        prog = {"step": step, "epochs_done": step // steps_per_epoch, "total_steps": total_steps,
                "validation": last_val, "health": verdict()}
        saved = ""
        if main:
            state = _train_state(model, optimizer, step, history, (epoch_loss, epoch_batches))
            saved = save_checkpoint(checkpoint, model, config, prog, state)
        saved_step = step
        dist.barrier()  # no rank runs ahead of a checkpoint still being written
        pause_point("train-checkpoint-saved")
        return saved

    def verdict() -> dict[str, Any]:
        return health.judge(last_val, config.train.min_gain_over_baseline_db)

    def validate() -> dict[str, float]:
        if len(val_ids) == 0:
            return {}
        return evaluate(model, source, val_ids, config.train.eval_batch_size, device,
                        accel=accel)

    if len(val_ids) == 0:
        log(f"split '{val_split}' of {source.name} is empty; training without validation")

    with _progress(progress) as bar:
        task = bar.add_task("train", total=total_steps, completed=step, rate=0.0, loss=0.0)
        while step < total_steps:
            epoch, offset = divmod(step, steps_per_epoch)
            shuffle = torch.Generator().manual_seed(config.seed * 7919 + epoch)
            order = torch.randperm(len(train_ids), generator=shuffle)
            ids = train_ids[order.numpy()][offset * config.train.batch_size :]
            global_batches = split_batches(ids, config.train.batch_size)
            shares = [dist.shard_batch(batch, rank, world) for batch in global_batches]
            for (images, _), batch in zip(
                iterate_id_batches(source, shares, config.train.num_workers,
                                   accel.pin_memory, accel.prefetch, accel.worker_nice),
                global_batches, strict=False,
            ):
                images = accel.to_device(images)
                with accel.autocast():
                    out = net(images, quantize=step >= warmup)
                loss = out.loss
                loss_value = _global_mean(loss.detach())
                if not math.isfinite(loss_value):
                    raise TrainingError(
                        f"loss became {loss_value} at step {step + 1}; stopped, "
                        f"{_kept(checkpoint, saved_step)}; lower train.lr or check the data"
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                step += 1
                images_seen += len(batch)
                epoch_loss += loss_value
                epoch_batches += 1
                rate = images_seen / max(time.perf_counter() - started, 1e-9)
                bar.update(task, advance=1, rate=rate, loss=loss_value)
                if step >= total_steps:
                    break
                if every and step % every == 0 and step % steps_per_epoch:
                    digest = save()  # inside the epoch: a kill now loses < `every` steps
            last_val = validate()
            model.train()
            figures = (f"val mse {last_val['mse']:.5f}  {health.quality_line(last_val)}  usage "
                       f"{last_val['usage']:.1%}  perplexity {last_val['perplexity']:.1f}"
                       f"{_per_level(last_val)}" if last_val else "no validation images")
            if step % steps_per_epoch == 0:  # a whole epoch: it goes into the history
                history.append({"step": step, "epoch": step // steps_per_epoch,
                                "train_loss": epoch_loss / max(epoch_batches, 1),
                                "validation": last_val})
                log(f"epoch {step // steps_per_epoch} step {step}/{total_steps}: train loss "
                    f"{history[-1]['train_loss']:.4f}  {figures}")
                epoch_loss, epoch_batches = 0.0, 0
            else:  # stopped by max_steps inside an epoch; a later run continues it
                log(f"stopped at step {step}/{total_steps} inside epoch {epoch + 1}: {figures}")
            digest = save()

    seconds = time.perf_counter() - started
    judged = verdict()
    if judged["status"] == health.UNHEALTHY:
        if not _is_smoke_run(config, step, steps_per_epoch):
            raise TrainingError(
                f"training ended unhealthy: {judged['reason']}; {checkpoint} is marked "
                "unhealthy (encode refuses it without --force); try another seed, a lower "
                "train.lr or more epochs")
        log(f"warning: {judged['reason']} (a smoke run stopped by train.max_steps; the "
            "checkpoint is marked unhealthy)")
    if not main:  # this rank's own weights: equal to rank 0's when the ranks agree
        digest = model_weights_hash(model)
    if not digest:  # nothing trained in this call: report what is on disk
        digest = read_checkpoint_meta(checkpoint)["weights_sha256"]
    return TrainResult(
        checkpoint=checkpoint,
        weights_sha256=digest,
        step=step,
        epochs_done=step // steps_per_epoch,
        seconds=seconds,
        images_per_second=images_seen / seconds if seconds > 0 else 0.0,
        validation=last_val,
        history=history,
        resumed_from_step=resumed_from,
        health=judged,
    )
