"""tokenize_dataset: train -> encode -> stats -> decode as one flow (training skipped when a
checkpoint is given). This is what the CLI runs and what deployments serve on a schedule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from vqtok.flows.decode_flow import decode_flow
from vqtok.flows.encode_flow import DEFAULT_BATCH_SIZE, DEFAULT_SHARD_SIZE, encode_flow
from vqtok.flows.run_folder import RunPaths
from vqtok.flows.runtime import cached_source, checkpoint_config
from vqtok.flows.stats_flow import stats_flow
from vqtok.flows.train_flow import train_flow
from vqtok.tokenizer.config import parse_config
from vqtok.tokenizer.health import quality_line


def _validation_split(config: Any) -> str | None:
    splits = cached_source(config.data).splits
    for name in (config.data.val_split, "test", "validation"):
        if name in splits:
            return name
    return None


@flow(name="tokenize-dataset")
def tokenize_dataset(
    config: dict[str, Any] | None = None,
    out: str = "runs/demo",
    checkpoint: str | None = None,
    formats: list[str] | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "auto",
    progress: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """The whole pipeline into ``out``; returns the summary the CLI prints. A checkpoint
    marked unhealthy by its training is refused unless ``force`` (a run that trains one
    fails in training)."""
    if config is None and checkpoint is not None:
        cfg = checkpoint_config(checkpoint)[0]  # the data the tokenizer was trained on
    else:
        cfg = parse_config(config or {}, source="config")
    paths = RunPaths(Path(out))
    summary: dict[str, Any] = {"out": str(paths.root)}
    if checkpoint is None:
        trained = train_flow(cfg.model_dump(), str(paths.root), progress)
        checkpoint = trained["checkpoint"]
        summary["train"] = trained
    encoded = encode_flow(checkpoint, str(paths.root), cfg.data.model_dump(), formats,
                          shard_size, batch_size, device, cfg.train.num_workers, progress,
                          force=force)
    stats = stats_flow(encoded["tokens"], str(paths.stats))
    decoded = decode_flow(encoded["tokens"], checkpoint, str(paths.decode),
                          split=_validation_split(cfg), device=device)
    summary.update(checkpoint=checkpoint, encode=encoded, stats=stats, decode=decoded)
    create_markdown_artifact(
        key="vqtok-run",
        markdown=(
            f"### vqtok run `{paths.root}`\n\n| figure | value |\n|---|---:|\n"
            f"| codebook usage | {stats['usage']:.1%} ({stats['codes_used']}/"
            f"{stats['codebook_size']}) |\n| perplexity | {stats['perplexity']:.1f} |\n"
            + (f"| quality | {quality_line(decoded)} |\n" if "psnr" in decoded else "")
            + f"| encode | {encoded['images_per_second']:.0f} img/s |\n"
        ),
        description="Summary of a tokenize-dataset run",
    )
    return summary
