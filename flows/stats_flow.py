"""stats_flow: codebook usage over a whole token store -> stats.json and two plots."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from vqtok.flows.plots import plot_position_entropy, plot_sorted_usage
from vqtok.flows.retry import retry_on_io_error
from vqtok.storage import load_grid
from vqtok.tokenizer.health import quality_line
from vqtok.tokenizer.usage import usage_report


@task(name="compute-stats", retries=1, retry_condition_fn=retry_on_io_error)
def compute_stats(tokens: str, out: str) -> str:
    """Read every code once and write stats.json (atomically); returns its path."""
    grid = load_grid(tokens)
    report = usage_report(grid.codes, grid.meta.codebook_size, grid.split_index,
                          tuple(grid.split_names))
    report["dataset"] = grid.meta.dataset
    report["checkpoint_hash"] = grid.meta.checkpoint_hash
    # Usage alone cannot tell a working tokenizer from a dead decoder: carry its quality.
    report["tokenizer_quality"] = grid.meta.extra.get("tokenizer_quality", {})
    report["tokens"] = str(tokens)
    path = Path(out) / "stats.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".stats.json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, path)
    return str(path)


@task(name="plot-usage")
def plot_usage(stats_path: str) -> list[str]:
    stats = json.loads(Path(stats_path).read_text())
    folder = Path(stats_path).parent
    return [str(plot_sorted_usage(stats, folder / "usage.png")),
            str(plot_position_entropy(stats, folder / "position_entropy.png"))]


@flow(name="stats")
def stats_flow(tokens: str, out: str) -> dict[str, Any]:
    """Usage %, dead codes, perplexity, entropy, per-position figures, most/least used codes."""
    logger = get_run_logger()
    stats_path = compute_stats(tokens, out)
    plots = plot_usage(stats_path)
    stats = json.loads(Path(stats_path).read_text())
    logger.info(f"usage {stats['usage']:.1%} ({stats['codes_used']}/{stats['codebook_size']}), "
                f"perplexity {stats['perplexity']:.1f}, {stats['entropy_bits']:.2f} bits/token")
    most = ", ".join(f"{c['code']} ({c['count']})" for c in stats["most_used"][:5])
    quality = stats.get("tokenizer_quality") or {}
    quality_row = (f"| tokenizer quality | {quality_line(quality)}, {quality['health']} |\n"
                   if "psnr" in quality else "")
    create_markdown_artifact(
        key="vqtok-usage",
        markdown=(
            f"### Codebook usage of {stats['dataset']}\n\n| figure | value |\n|---|---:|\n"
            f"| images | {stats['images']} |\n| codes used | {stats['codes_used']} / "
            f"{stats['codebook_size']} ({stats['usage']:.1%}) |\n| dead codes | "
            f"{stats['dead_codes']} |\n| perplexity | {stats['perplexity']:.1f} |\n"
            f"| entropy | {stats['entropy_bits']:.3f} bits/token |\n{quality_row}"
            f"\nMost used: {most}\n"
        ),
        description="Codebook usage from stats_flow",
    )
    summary = {k: stats[k] for k in ("images", "codebook_size", "codes_used", "dead_codes",
                                     "usage", "perplexity", "entropy_bits",
                                     "tokenizer_quality")}
    return {**summary, "stats": stats_path, "plots": plots}
