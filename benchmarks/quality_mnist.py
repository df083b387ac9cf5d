"""Quality bar: one epoch on full MNIST, vqtok's defaults vs the seed lecture's recipe.

Both models share the architecture (hidden 128, latent 64, K = 512, 7x7 grid), the batches
(batch 64, same order) and the optimizer (Adam 1e-3). Their training steps are interleaved,
one of each per batch, and timed separately, so machine noise hits both alike. Evaluation is
on the 10k test images: MSE, PSNR (from the mean MSE), codebook usage (codes used at least
once / K) and perplexity (exp of the entropy of the code histogram).

    python benchmarks/quality_mnist.py --data-root ../shared/data/mnist --out runs/quality

The last line printed is one JSON object with every figure; the same goes to OUT/quality.json.
Our trained checkpoint stays in OUT/checkpoint and the test-set codes in OUT/test_codes.npy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.lecture_vq import LectureQuantizer  # noqa: E402
from tokenizer.checkpoint import build_model, save_checkpoint  # noqa: E402
from tokenizer.config import Config  # noqa: E402
from tokenizer.data import open_source  # noqa: E402
from tokenizer.stats import code_histogram, psnr, usage_summary  # noqa: E402
from tokenizer.visualize import save_reconstruction_grid  # noqa: E402

TARGETS = {"usage": 0.98, "perplexity": 100.0, "psnr": 24.0, "time_ratio": 1.3}


@torch.no_grad()
def evaluate(model, source, ids: np.ndarray, batch: int = 1000) -> tuple[dict, np.ndarray]:
    model.eval()
    sq, pixels, codes = 0.0, 0, []
    for start in range(0, len(ids), batch):
        x, _ = source.load_batch(ids[start : start + batch])
        out = model(x)
        sq += float(((out.reconstruction - x) ** 2).sum())
        pixels += x.numel()
        codes.append(out.indices.numpy())
    model.train()
    grid = np.concatenate(codes)
    mse = sq / pixels
    usage = usage_summary(code_histogram(grid, model.quantizer.num_embeddings))
    return {"mse": mse, "psnr": psnr(mse), "usage": usage["usage"],
            "codes_used": usage["codes_used"], "perplexity": usage["perplexity"]}, grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="../shared/data/mnist")
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--config", default=None, help="YAML overriding vqtok's defaults")
    parser.add_argument("--max-steps", type=int, default=None, help="stop early (smoke runs)")
    parser.add_argument("--skip-lecture", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from tokenizer.config import load_config

    base = load_config(args.config) if args.config else Config()
    config = base.with_overrides(**{
        "data.dataset": "mnist", "data.data_root": str(Path(args.data_root).resolve()),
        "data.val_split": "test",
        "train.batch_size": 64, "train.lr": 1e-3, "train.epochs": 1, "train.device": "cpu",
        "model.num_embeddings": 512, "model.hidden_channels": 128,
        "model.latent_channels": 64, "model.embedding_dim": 64,
    })
    source = open_source(config.data)
    train_ids, test_ids = source.split_ids("train"), source.split_ids("test")

    recipes = {"vqtok": build_model(config)}
    if not args.skip_lecture:
        torch.manual_seed(config.seed)
        lecture = build_model(config)
        lecture.quantizer = LectureQuantizer(512, 64)
        recipes["lecture"] = lecture
    optimizers = {n: torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-3)
                  for n, m in recipes.items()}
    seconds = dict.fromkeys(recipes, 0.0)

    order = torch.randperm(len(train_ids), generator=torch.Generator().manual_seed(0)).numpy()
    batches = [order[i : i + 64] for i in range(0, len(order), 64)]
    if args.max_steps:
        batches = batches[: args.max_steps]
    for m in recipes.values():
        m.train()
    for step, idx in enumerate(batches, 1):
        x, _ = source.load_batch(train_ids[idx])
        for name, model in recipes.items():
            t0 = time.perf_counter()
            loss = model(x).loss
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()
            seconds[name] += time.perf_counter() - t0
        if step % 100 == 0 or step == len(batches):
            print(f"step {step}/{len(batches)}  " + "  ".join(
                f"{n} {s:.0f}s" for n, s in seconds.items()), flush=True)

    results = {}
    for name, model in recipes.items():
        metrics, grid = evaluate(model, source, test_ids)
        metrics["train_seconds"] = seconds[name]
        results[name] = metrics
        if name == "vqtok":
            np.save(out / "test_codes.npy", grid.astype(np.uint16))
            save_checkpoint(out / "checkpoint", model, config,
                            {"step": len(batches), "epochs_done": 1, "validation": metrics})
            x, _ = source.load_batch(test_ids[:32])
            with torch.no_grad():
                model.eval()
                save_reconstruction_grid(x, model(x).reconstruction, out / "reconstructions.png")

    ours = results["vqtok"]
    summary = {"steps": len(batches), "vqtok": ours}
    if "lecture" in results:
        summary["lecture"] = results["lecture"]
        summary["time_ratio"] = ours["train_seconds"] / results["lecture"]["train_seconds"]
    summary["targets"] = TARGETS
    summary["met"] = {
        "usage": ours["usage"] >= TARGETS["usage"],
        "perplexity": ours["perplexity"] >= TARGETS["perplexity"],
        "psnr": ours["psnr"] >= TARGETS["psnr"],
        **({"time_ratio": summary["time_ratio"] <= TARGETS["time_ratio"]}
           if "time_ratio" in summary else {}),
    }

    print(f"\n{'recipe':<10}{'MSE':>10}{'PSNR dB':>10}{'usage':>9}{'used':>6}"
          f"{'perplexity':>12}{'train s':>10}")
    for name, r in results.items():
        print(f"{name:<10}{r['mse']:>10.5f}{r['psnr']:>10.2f}{r['usage']:>9.1%}"
              f"{r['codes_used']:>6}{r['perplexity']:>12.1f}{r['train_seconds']:>10.1f}")
    if "time_ratio" in summary:
        print(f"time ratio vqtok / lecture: {summary['time_ratio']:.2f}")
    (out / "quality.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
