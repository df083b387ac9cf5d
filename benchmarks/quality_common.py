"""What the quality benchmarks share: the two recipes, their interleaved training, held-out
figures with the mean-image baseline, and the per-seed table.

vqtok's recipe is trained exactly as ``tokenizer.training.train`` trains it (``start_fresh``
before the first step, ``make_optimizer``, the quantizer warm-up of ``warmup_steps``); the
lecture's recipe is the same widths with the lecture's quantizer and none of vqtok's
additions (ReLU, raw [0, 1] input, default output bias, no warm-up, Adam's default betas).
Both see the same batches in the same order, one step of each per batch, each timed on its
own, so machine noise hits both alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from lecture_vq import LectureQuantizer
from vqtok.tokenizer.checkpoint import build_model
from vqtok.tokenizer.config import Config
from vqtok.tokenizer.health import mean_image
from vqtok.tokenizer.sources import ImageSource
from vqtok.tokenizer.stats import code_histogram, psnr, usage_summary
from vqtok.tokenizer.training import make_optimizer, start_fresh, warmup_steps


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"error: --seeds takes integers separated by commas, got {text!r}") \
            from None
    if not seeds:
        raise SystemExit("error: --seeds needs at least one seed")
    return seeds


def build_recipes(config: Config, channels: int, lecture: bool = True) -> dict[str, Any]:
    torch.manual_seed(config.seed)
    recipes = {"vqtok": build_model(config, channels)}
    if lecture:
        plain = config.with_overrides(**{"model.center_input": False,
                                         "model.activation": "relu",
                                         "model.init_output_bias": False,
                                         "quantizer.warmup_steps": 0})
        torch.manual_seed(config.seed)
        model = build_model(plain, channels)
        model.quantizer = LectureQuantizer(config.model.num_embeddings,
                                           config.model.embedding_dim)
        recipes["lecture"] = model
    return recipes


def train_interleaved(
    recipes: dict[str, Any], config: Config, source: ImageSource, train_ids: np.ndarray,
    epochs: int, max_steps: int | None = None, log: Callable[[str], None] = print,
) -> tuple[dict[str, float], int]:
    """Adam at ``config.train.lr``, batches of ``config.train.batch_size`` in an order drawn
    from ``config.seed``; returns training seconds per recipe and the number of steps."""
    batch = config.train.batch_size
    seconds = dict.fromkeys(recipes, 0.0)
    t0 = time.perf_counter()
    start_fresh(recipes["vqtok"], config, source, train_ids)  # part of vqtok's cost
    seconds["vqtok"] += time.perf_counter() - t0
    optimizers = {n: make_optimizer(m, config) if n == "vqtok" else
                  torch.optim.Adam(m.parameters(), lr=config.train.lr)  # the lecture's Adam
                  for n, m in recipes.items()}
    steps_per_epoch = -(-len(train_ids) // batch)
    warmup = warmup_steps(config, steps_per_epoch)
    total = steps_per_epoch * epochs if max_steps is None else min(max_steps,
                                                                   steps_per_epoch * epochs)
    order_rng = torch.Generator().manual_seed(config.seed)
    for model in recipes.values():
        model.train()
    step = 0
    while step < total:
        order = train_ids[torch.randperm(len(train_ids), generator=order_rng).numpy()]
        for start in range(0, len(order), batch):
            if step >= total:
                break
            x, _ = source.load_batch(order[start : start + batch])
            for name, model in recipes.items():
                t0 = time.perf_counter()
                quantize = step >= warmup if name == "vqtok" else True
                loss = model(x, quantize=quantize).loss
                optimizers[name].zero_grad(set_to_none=True)
                loss.backward()
                optimizers[name].step()
                seconds[name] += time.perf_counter() - t0
            step += 1
            if step % 100 == 0 or step == total:
                log(f"  step {step}/{total}  " + "  ".join(
                    f"{n} {s:.0f}s" for n, s in seconds.items()))
    return seconds, total


@torch.no_grad()
def evaluate(model: Any, source: ImageSource, ids: np.ndarray, baseline: torch.Tensor,
             batch: int = 1000) -> tuple[dict[str, float], np.ndarray]:
    """Held-out MSE, PSNR, usage, perplexity, and the PSNR of predicting ``baseline``."""
    model.eval()
    sq, base_sq, pixels, codes = 0.0, 0.0, 0, []
    for start in range(0, len(ids), batch):
        x, _ = source.load_batch(ids[start : start + batch])
        out = model(x)
        sq += float(((out.reconstruction - x) ** 2).sum())
        base_sq += float(((baseline - x) ** 2).sum())
        pixels += x.numel()
        codes.append(out.indices.numpy())
    model.train()
    grid = np.concatenate(codes)
    usage = usage_summary(code_histogram(grid, model.quantizer.num_embeddings))
    mse = sq / pixels
    return {"mse": mse, "psnr": psnr(mse), "baseline_psnr": psnr(base_sq / pixels),
            "usage": usage["usage"], "codes_used": usage["codes_used"],
            "perplexity": usage["perplexity"]}, grid


def training_mean(source: ImageSource, train_ids: np.ndarray) -> torch.Tensor:
    return mean_image(source.load_batch, train_ids)[0]


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'seed':>4} {'recipe':<8}{'MSE':>10}{'PSNR dB':>9}{'base dB':>9}{'usage':>8}"
          f"{'used':>6}{'perplexity':>11}{'train s':>9}{'x lect':>8}")
    for r in rows:
        ratio = f"{r['time_ratio']:.2f}" if r.get("time_ratio") is not None else "-"
        print(f"{r['seed']:>4} {r['recipe']:<8}{r['mse']:>10.5f}{r['psnr']:>9.2f}"
              f"{r['baseline_psnr']:>9.2f}{r['usage']:>8.1%}{r['codes_used']:>6}"
              f"{r['perplexity']:>11.1f}{r['train_seconds']:>9.1f}{ratio:>8}")


def worst(rows: list[dict[str, Any]], recipe: str = "vqtok") -> dict[str, Any]:
    """The worst figure of each kind over the seeds (each from its own worst seed)."""
    mine = [r for r in rows if r["recipe"] == recipe]
    ratios = [r["time_ratio"] for r in mine if r.get("time_ratio") is not None]
    low = min(mine, key=lambda r: r["psnr"])
    return {"psnr": low["psnr"], "psnr_seed": low["seed"],
            "usage": min(r["usage"] for r in mine),
            "perplexity": min(r["perplexity"] for r in mine),
            "time_ratio": max(ratios) if ratios else None}


def check_targets(summary: dict[str, Any], targets: dict[str, float]) -> dict[str, bool]:
    met = {key: summary[key] >= targets[key] for key in ("psnr", "usage", "perplexity")
           if key in targets}
    if "time_ratio" in targets and summary.get("time_ratio") is not None:
        met["time_ratio"] = summary["time_ratio"] <= targets["time_ratio"]
    return met


def add_run_arguments(parser: Any) -> None:
    """The options both quality benchmarks take."""
    parser.add_argument("--config", default=None, help="YAML overriding vqtok's defaults")
    parser.add_argument("--seeds", default="0", help="comma-separated, e.g. 0,1,2,3,4")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--skip-lecture", action="store_true")


def run_seeds(args: Any, budget: Config, source: ImageSource, train_ids: np.ndarray,
              test_ids: np.ndarray, epochs: int, max_steps: int | None = None,
              on_first: Callable[..., None] | None = None) -> tuple[list[dict[str, Any]], int]:
    """Train the recipes side by side for each seed of ``args.seeds`` and measure them on
    ``test_ids``: one row per seed and recipe. ``on_first(model, config, metrics, grid,
    steps)`` gets the first seed's vqtok model (to save it)."""
    baseline = training_mean(source, train_ids)
    rows: list[dict[str, Any]] = []
    seeds = parse_seeds(args.seeds)
    steps = 0
    for seed in seeds:
        config = budget.with_overrides(seed=seed)
        print(f"seed {seed}: training", flush=True)
        recipes = build_recipes(config, source.channels, lecture=not args.skip_lecture)
        seconds, steps = train_interleaved(recipes, config, source, train_ids, epochs=epochs,
                                           max_steps=max_steps)
        for name, model in recipes.items():
            metrics, grid = evaluate(model, source, test_ids, baseline)
            ratio = seconds["vqtok"] / seconds["lecture"] if "lecture" in seconds else None
            rows.append({"seed": seed, "recipe": name, **metrics,
                         "train_seconds": seconds[name],
                         "time_ratio": ratio if name == "vqtok" else None})
            print(f"  {name}: PSNR {metrics['psnr']:.2f} dB (baseline "
                  f"{metrics['baseline_psnr']:.2f}), usage {metrics['usage']:.1%}", flush=True)
            if on_first and name == "vqtok" and seed == seeds[0]:
                on_first(model, config, metrics, grid, steps)
    return rows, steps


def summarize_seeds(args: Any, rows: list[dict[str, Any]], steps: int,
                    targets: dict[str, float], **extra: Any) -> dict[str, Any]:
    """Print the per-seed table; the JSON summary with the worst seed against ``targets``."""
    print_table(rows)
    summary = {"steps": steps, "threads": torch.get_num_threads(),
               "seeds": parse_seeds(args.seeds), **extra, "rows": rows, "worst": worst(rows),
               "targets": targets}
    if not args.skip_lecture:
        summary["worst_lecture"] = worst(rows, "lecture")
    summary["met"] = check_targets(summary["worst"], targets)
    return summary
