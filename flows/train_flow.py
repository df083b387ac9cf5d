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


@flow(name="train")
def train_flow(config: dict[str, Any], out: str, progress: bool = True,
               nproc: int = 1) -> dict[str, Any]:
    """Train into ``out/checkpoint``; ``config`` is a full config as a dict (JSON-able).

    ``nproc`` > 1 trains with that many DDP processes on this machine (torchrun).
    """
    result = train_task(config, str(Path(out)), progress, nproc)
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
