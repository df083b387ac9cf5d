"""tokenize_dataset: train -> encode -> stats -> decode as one flow (training skipped when a
checkpoint is given). This is what the CLI runs and what deployments serve on a schedule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from vqtok.flows.decode_flow import decode_flow
from vqtok.flows.encode_flow import encode_flow
from vqtok.flows.run_folder import RunPaths
from vqtok.flows.runtime import cached_source, checkpoint_config
from vqtok.flows.stats_flow import stats_flow
from vqtok.flows.train_flow import train_flow
from vqtok.storage.layout import DEFAULT_SHARD_SIZE
from vqtok.storage.versions import DEFAULT_KEEP_VERSIONS
from vqtok.tokenizer.config import parse_config
from vqtok.tokenizer.health import quality_line
from vqtok.tokenizer.splits import heldout_split


def _validation_split(config: Any) -> str | None:
    return heldout_split(cached_source(config.data).splits, config.data.val_split,
                         exclude=config.data.train_split)


@flow(name="tokenize-dataset")
def tokenize_dataset(
    config: dict[str, Any] | None = None,
    out: str = "runs/demo",
    checkpoint: str | None = None,
    formats: list[str] | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    batch_size: int | None = None,
    device: str = "auto",
    progress: bool = True,
    force: bool = False,
    reencode: bool = False,
    keep_versions: int = DEFAULT_KEEP_VERSIONS,
) -> dict[str, Any]:
    """The whole pipeline into ``out``; returns the summary the CLI prints. A checkpoint
    marked unhealthy by its training is refused unless ``force`` (a run that trains one
    fails in training). ``batch_size`` None fits the encode batch to the GPU
    (``ENCODE_BATCH_SIZE`` on CPU). Run again over a dataset that changed (a nightly
    schedule), it encodes only what changed, as a new version of the store."""
    if config is None and checkpoint is not None:
        cfg = checkpoint_config(checkpoint)[0]  # the data the tokenizer was trained on
    else:
        cfg = parse_config(config or {}, source="config")
    paths = RunPaths(Path(out))
    summary: dict[str, Any] = {"out": str(paths.root)}
    if checkpoint is None:
        trained = train_flow(config=cfg.model_dump(), out=str(paths.root), progress=progress)
        checkpoint = trained["checkpoint"]
        summary["train"] = trained
    encoded = encode_flow(checkpoint=checkpoint, out=str(paths.root),
                          data=cfg.data.model_dump(), formats=formats, shard_size=shard_size,
                          batch_size=batch_size, device=device,
                          num_workers=cfg.train.num_workers, progress=progress, force=force,
                          reencode=reencode, keep_versions=keep_versions)
    stats = stats_flow(tokens=encoded["tokens"], out=str(paths.stats))
    decoded = decode_flow(tokens=encoded["tokens"], checkpoint=checkpoint,
                          out=str(paths.decode), split=_validation_split(cfg), device=device)
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
