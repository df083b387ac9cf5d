"""Is a trained tokenizer any good? Reconstruction read against the trivial baseline.

Usage and perplexity cannot tell: a decoder that outputs black squares still shows 99 %
usage. What can: the PSNR of the reconstructions against that of predicting the training
set's mean image for every image. A tokenizer worth its tokens beats that baseline clearly;
a run that ends less than ``train.min_gain_over_baseline_db`` (3 dB) above it failed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import UnhealthyCheckpointError
from .stats import psnr

if TYPE_CHECKING:  # torch stays unimported for the CLI's read-only commands
    import torch

#: The mean image averages at most this many training images, spread evenly over the split:
#: exact for small datasets, within noise of exact for big ones, bounded in time for all.
MEAN_IMAGE_MAX_IMAGES = 10_000

HEALTHY, UNHEALTHY, UNCHECKED = "healthy", "unhealthy", "unchecked"


def mean_image_ids(ids: np.ndarray, limit: int = MEAN_IMAGE_MAX_IMAGES) -> np.ndarray:
    """At most ``limit`` ids, evenly spaced over ``ids`` (all of them when fewer)."""
    if len(ids) <= limit:
        return ids
    return ids[np.linspace(0, len(ids) - 1, limit).round().astype(np.int64)]


def mean_image(load_batch: Any, ids: np.ndarray, batch_size: int = 500) -> tuple[torch.Tensor, int]:
    """The mean (C, H, W) of the images ``load_batch(ids)`` gives (tensors that need no
    gradient), in float64 sums; and how many images it averages."""
    picked = mean_image_ids(ids)
    total: torch.Tensor | None = None
    for start in range(0, len(picked), batch_size):
        images, _ = load_batch(picked[start : start + batch_size])
        part = images.double().sum(dim=0)
        total = part if total is None else total + part
    if total is None:
        raise ValueError("no images to average")
    return (total / len(picked)).float(), len(picked)


def baseline_figures(sq_err_of_mean: float, pixels: int) -> dict[str, float]:
    mse = sq_err_of_mean / max(pixels, 1)
    return {"baseline_mse": mse, "baseline_psnr": psnr(mse)}


def quality_line(figures: dict[str, Any]) -> str:
    """'PSNR X dB (mean-image baseline Y dB)': how every report states quality."""
    line = f"PSNR {figures['psnr']:.2f} dB"
    if "baseline_psnr" in figures:
        line += f" (mean-image baseline {figures['baseline_psnr']:.2f} dB)"
    return line


def judge(validation: dict[str, Any], min_gain_db: float | None) -> dict[str, Any]:
    """The verdict on a run's last validation, as stored in the checkpoint's progress."""
    if min_gain_db is None or "baseline_psnr" not in validation or "psnr" not in validation:
        why = ("the health check is off (train.min_gain_over_baseline_db: null)"
               if min_gain_db is None else "no validation figures with a baseline")
        return {"status": UNCHECKED, "reason": why}
    gain = float(validation["psnr"]) - float(validation["baseline_psnr"])
    verdict = {"status": HEALTHY if gain >= min_gain_db else UNHEALTHY, "gain_db": gain,
               "min_gain_db": min_gain_db, "psnr": float(validation["psnr"]),
               "baseline_psnr": float(validation["baseline_psnr"])}
    if verdict["status"] == UNHEALTHY:
        where = (f"only {gain:.2f} dB above the baseline" if gain >= 0
                 else f"{-gain:.2f} dB below the baseline")
        verdict["reason"] = (
            f"validation {quality_line(validation)} is {where} (at least {min_gain_db:g} dB "
            "above it needed): the decoder has learned little or collapsed")
    return verdict


def require_healthy(meta: dict[str, Any], force: bool = False) -> None:
    """Refuse a checkpoint its training marked unhealthy unless ``force``; older checkpoints
    (no verdict) and unchecked ones pass."""
    health = (meta.get("progress") or {}).get("health") or {}
    if health.get("status") != UNHEALTHY or force:
        return
    raise UnhealthyCheckpointError(
        f"{meta['directory']} is marked unhealthy: {health.get('reason', 'failed its check')};"
        " train again (another seed, a lower train.lr, more steps), or pass --force to use it "
        "anyway")


def describe_health(meta: dict[str, Any]) -> str:
    """One phrase for ``info``."""
    health = (meta.get("progress") or {}).get("health")
    if not health:
        return "not recorded (checkpoint predates the health check)"
    if health["status"] == HEALTHY:
        return f"healthy ({health['gain_db']:.2f} dB above the mean-image baseline)"
    if health["status"] == UNHEALTHY:
        return f"UNHEALTHY: {health['reason']}"
    return f"unchecked: {health['reason']}"
