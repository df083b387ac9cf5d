"""stats_flow: codebook usage over a whole token store -> stats.json and two plots, recorded.

The work is ``flows.usage_stats``; this flow runs it as tasks and adds the usage artifact.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from vqtok.flows.retry import retry_on_io_error
from vqtok.flows.usage_stats import write_plots, write_stats
from vqtok.tokenizer.health import quality_line

compute_stats = task(name="compute-stats", retries=1,
                     retry_condition_fn=retry_on_io_error)(write_stats)
plot_usage = task(name="plot-usage")(write_plots)


@flow(name="stats")
def stats_flow(tokens: str, out: str) -> dict[str, Any]:
    """Usage %, dead codes, perplexity, entropy, per-position figures, most/least used codes."""
    logger = get_run_logger()
    stats = compute_stats(tokens, out)
    plots = plot_usage(stats["stats"])
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
    return {**stats, "plots": plots}
