"""Quality bar: one epoch on full MNIST, vqtok's defaults vs the seed lecture's recipe, per seed.

Same budget for both (hidden 128, latent 64, K = 512, 7x7 grid, batch 64, Adam 1e-3, one
epoch); steps interleaved and timed separately (see quality_common). Evaluation on the 10k
test images: MSE, PSNR (from the mean MSE), the mean-image baseline's PSNR on the same
images, codebook usage (codes used at least once / K) and perplexity. One table row per seed
and recipe, then the worst seed of each figure.

    python benchmarks/quality_mnist.py --data-root ../shared/data/mnist --out runs/quality \
        --seeds 0,1,2,3,4 --threads 2

The last line printed is one JSON object with every figure; the same goes to OUT/quality.json.
The first seed's checkpoint stays in OUT/checkpoint and its test-set codes in
OUT/test_codes.npy (other benchmarks start from them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from quality_common import add_run_arguments, run_seeds, summarize_seeds
from vqtok.tokenizer.checkpoint import save_checkpoint
from vqtok.tokenizer.config import Config, load_config
from vqtok.tokenizer.sources import open_source
from vqtok.tokenizer.visualize import save_reconstruction_grid

TARGETS = {"usage": 0.98, "perplexity": 100.0, "psnr": 24.5, "time_ratio": 1.3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="../shared/data/mnist")
    parser.add_argument("--out", default="runs/quality")
    add_run_arguments(parser)
    parser.add_argument("--max-steps", type=int, default=None, help="stop early (smoke runs)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    base = load_config(args.config) if args.config else Config()
    budget = base.with_overrides(**{
        "data.dataset": "mnist", "data.data_root": str(Path(args.data_root).resolve()),
        "data.val_split": "test",
        "train.batch_size": 64, "train.lr": 1e-3, "train.epochs": 1, "train.device": "cpu",
        "model.num_embeddings": 512, "model.hidden_channels": 128, "model.latent_channels": 64,
    })
    source = open_source(budget.data)
    train_ids, test_ids = source.split_ids("train"), source.split_ids("test")

    def save_first(model, config, metrics, grid, steps) -> None:
        np.save(out / "test_codes.npy", grid.astype(np.uint16))
        save_checkpoint(out / "checkpoint", model, config,
                        {"step": steps, "epochs_done": 1, "validation": metrics})
        x, _ = source.load_batch(test_ids[:32])
        with torch.no_grad():
            model.eval()
            save_reconstruction_grid(x, model(x).reconstruction, out / "reconstructions.png")

    rows, steps = run_seeds(args, budget, source, train_ids, test_ids, epochs=1,
                            max_steps=args.max_steps, on_first=save_first)
    summary = summarize_seeds(args, rows, steps, TARGETS)
    w = summary["worst"]
    ratio = f", time ratio <= {w['time_ratio']:.2f}x" if w["time_ratio"] is not None else ""
    print(f"worst seed (vqtok, {torch.get_num_threads()} threads): PSNR {w['psnr']:.2f} dB "
          f"(seed {w['psnr_seed']}), usage {w['usage']:.1%}, perplexity {w['perplexity']:.1f}"
          f"{ratio}; targets met: {summary['met']}")
    (out / "quality.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
