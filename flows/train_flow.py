"""train_flow: the training loop of ``tokenizer`` as a Prefect task (resumes on re-run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from vqtok.tokenizer.config import parse_config
from vqtok.tokenizer.health import quality_line
from vqtok.tokenizer.launch import train_distributed
from vqtok.tokenizer.training import train


@task(name="train-tokenizer")
def train_task(config: dict[str, Any], out: str, progress: bool = True,
               nproc: int = 1) -> dict[str, Any]:
    """One process trains in this task; with ``nproc`` > 1 the task runs torchrun and waits
    (the worker processes run plain ``tokenizer`` code, no Prefect)."""
    if nproc > 1:
        summary = train_distributed(parse_config(config), out, nproc, progress=progress)
        keys = ("checkpoint", "weights_sha256", "step", "epochs_done", "seconds",
                "images_per_second", "resumed_from_step", "validation", "health",
                "world_size", "rank_weights_sha256")
        return {key: summary[key] for key in keys}
    logger = get_run_logger()
    result = train(parse_config(config), out, progress=progress, log=logger.info)
    return {
        "checkpoint": str(result.checkpoint),
        "weights_sha256": result.weights_sha256,
        "step": result.step,
        "epochs_done": result.epochs_done,
        "seconds": result.seconds,
        "images_per_second": result.images_per_second,
        "resumed_from_step": result.resumed_from_step,
        "validation": result.validation,
        "health": result.health,
    }


RECONSTRUCTIONS = "reconstructions.png"


@task(name="write-reconstructions")
def reconstructions_task(checkpoint: str, config: dict[str, Any], out: str,
                         count: int = 32) -> str:
    """Held-out images above their reconstructions (``out/reconstructions.png``): a look at
    quality next to the figures."""
    import torch
    from vqtok.flows.runtime import cached_model, cached_source
    from vqtok.tokenizer.splits import heldout_split
    from vqtok.tokenizer.visualize import save_reconstruction_grid

    data = parse_config(config).data
    model = cached_model(checkpoint, "cpu")
    source = cached_source(data)
    split = heldout_split(source.splits, data.val_split, exclude=data.train_split)
    images, _ = source.load_batch(source.split_ids(split or data.train_split)[:count])
    with torch.no_grad():
        recon = model.decode(model.encode(images))
    return str(save_reconstruction_grid(images, recon, Path(out) / RECONSTRUCTIONS))


@flow(name="train")
def train_flow(config: dict[str, Any], out: str, progress: bool = True,
               nproc: int = 1, reconstructions: bool = False) -> dict[str, Any]:
    """Train into ``out/checkpoint``; ``config`` is a full config as a dict (JSON-able).

    ``nproc`` > 1 trains with that many DDP processes on this machine (torchrun).
    ``reconstructions`` also writes ``out/reconstructions.png`` (its path in the result).
    """
    result = train_task(config, str(Path(out)), progress, nproc)
    if reconstructions:
        result["reconstructions"] = reconstructions_task(result["checkpoint"], config, out)
    v = result["validation"]
    if v:
        create_markdown_artifact(
            key="vqtok-train",
            markdown=(f"### Tokenizer trained to step {result['step']}\n\n| figure | value |\n"
                      f"|---|---:|\n| validation MSE | {v['mse']:.5f} |\n| quality | "
                      f"{quality_line(v)} |\n| health | {result['health'].get('status')} |\n"
                      f"| codebook usage | {v['usage']:.1%} |\n"
                      f"| perplexity | {v['perplexity']:.1f} |\n\nCheckpoint "
                      f"`{result['checkpoint']}`"),
            description="Validation figures of the trained tokenizer",
        )
    return result
