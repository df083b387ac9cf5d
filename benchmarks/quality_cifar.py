"""RGB quality bar: CIFAR-10 images, vqtok's defaults vs the seed lecture's recipe, per seed.

The 4,000-image development subset (one npz, loads as ``npz:``): train on the first 3,000,
measure on the other 1,000, which no recipe ever sees in training. Same budget for both
recipes: 5 epochs, batch 64, Adam 1e-3, the lecture's widths (hidden 128, latent 64),
K = 512, 32x32 -> 8x8 grid. Steps interleaved and timed separately (see quality_common).

    python benchmarks/quality_cifar.py \
        --npz ../shared/data/cifar10-dev/cifar10_train_4000.npz --seeds 0,1,2,3,4

``--tune`` trains on the first 2,000 and measures on images 2,000-2,999 instead: the split
the defaults were tuned on, so the measuring split above never steered a choice.
The last line printed is one JSON object; the same goes to OUT/quality_cifar.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from quality_common import add_run_arguments, run_seeds, summarize_seeds
from vqtok.tokenizer.config import Config, load_config
from vqtok.tokenizer.sources import open_source

TARGETS = {"usage": 0.98, "psnr": 23.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--npz", default="../shared/data/cifar10-dev/cifar10_train_4000.npz")
    parser.add_argument("--out", default="runs/quality-cifar")
    add_run_arguments(parser)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--tune", action="store_true",
                        help="train on images 0-1,999, measure on 2,000-2,999")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    base = load_config(args.config) if args.config else Config()
    budget = base.with_overrides(**{
        "data.dataset": f"npz:{Path(args.npz).resolve()}", "data.channels": 3,
        "data.image_size": 32, "train.batch_size": 64, "train.lr": 1e-3, "train.device": "cpu",
        "model.num_embeddings": 512, "model.hidden_channels": 128, "model.latent_channels": 64,
        "model.num_downsamples": 2,
    })
    source = open_source(budget.data)
    ids = np.arange(len(source), dtype=np.int64)
    if len(ids) < 4000:
        raise SystemExit(f"error: {args.npz} holds {len(ids)} images; this benchmark needs 4,000")
    train_ids, test_ids = (ids[:2000], ids[2000:3000]) if args.tune else (ids[:3000],
                                                                          ids[3000:4000])
    rows, steps = run_seeds(args, budget, source, train_ids, test_ids, epochs=args.epochs)
    split = "tuning split (train 0-1999, measure 2000-2999)" if args.tune else \
        "measuring split (train 0-2999, measure 3000-3999)"
    summary = summarize_seeds(args, rows, steps, TARGETS, split=split)
    w = summary["worst"]
    print(f"worst seed (vqtok, {split}): PSNR {w['psnr']:.2f} dB (seed {w['psnr_seed']}), "
          f"usage {w['usage']:.1%}; targets met: {summary['met']}")
    (out / "quality_cifar.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
