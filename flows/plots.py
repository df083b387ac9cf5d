"""Usage plots from stats.json (matplotlib without a display)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from vqtok.files.atomic import atomic_path  # noqa: E402


def _save(fig: Any, path: Path) -> Path:
    try:
        with atomic_path(path) as temp:
            fig.savefig(temp, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def plot_sorted_usage(stats: dict[str, Any], path: Path) -> Path:
    """Code counts from most to least used: a flat curve means an evenly used codebook.
    Codes with depth get one curve per level."""
    counts = np.sort(np.asarray(stats["counts"]))[::-1]
    share = counts / max(counts.sum(), 1)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    levels = stats.get("levels")
    if levels:
        for i, level in enumerate(levels):
            sorted_counts = np.sort(np.asarray(level["counts"]))[::-1]
            ax.step(np.arange(len(sorted_counts)), sorted_counts / max(sorted_counts.sum(), 1),
                    where="mid", label=f"level {i}: {level['codes_used']} used, perplexity "
                    f"{level['perplexity']:.0f}")
    else:
        ax.bar(np.arange(len(counts)), share, width=1.0, color="#3b6ea8")
    ax.axhline(1 / len(counts), color="#c0392b", linestyle="--", linewidth=1,
               label=f"uniform (1/{len(counts)})")
    ax.set_yscale("log")
    ax.set_xlabel("code rank (most used first)")
    ax.set_ylabel("share of tokens")
    what = "level 0: " if levels else ""
    ax.set_title(f"Codebook usage ({what}{stats['codes_used']}/{stats['codebook_size']} codes "
                 f"used, perplexity {stats['perplexity']:.0f})")
    ax.legend(loc="upper right", fontsize=7 if levels else None)
    return _save(fig, path)


def plot_position_entropy(stats: dict[str, Any], path: Path) -> Path:
    """Entropy of the code at each grid position: where the tokenizer spends its bits."""
    entropy = np.asarray(stats["position_entropy_bits"])
    fig, ax = plt.subplots(figsize=(4.5, 4))
    image = ax.imshow(entropy, cmap="viridis", vmin=0)
    bright = 0.6 * float(entropy.max()) if entropy.size else 0.0
    for (y, x), value in np.ndenumerate(entropy):
        if entropy.size <= 100:  # numbers only while they stay legible
            ax.text(x, y, f"{value:.1f}", ha="center", va="center", fontsize=7,
                    color="black" if value > bright else "white")
    ax.set_title("Per-position entropy (bits)")
    ax.set_xticks(range(entropy.shape[1]))
    ax.set_yticks(range(entropy.shape[0]))
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, path)
