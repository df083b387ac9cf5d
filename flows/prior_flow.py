"""prior_train_flow / prior_sample_flow: a token store -> a prior -> new token grids -> images.

Training reads the store through ``storage.TokenDataset`` and hands the datasets to
``tokenizer.prior.train``. Sampling writes a token file with the store's schema (split
``sample``, ids 0..n-1, the requested label or -1) whose metadata is the training tokens',
so ``decode_flow`` decodes it with the tokenizer that made them, and nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from vqtok.flows.decode_flow import decode_flow
from vqtok.flows.errors import PipelineError
from vqtok.storage import ParquetTokenWriter, TokenDataset, TokenMeta, load_grid
from vqtok.tokenizer.checkpoint import CheckpointError, read_checkpoint_meta
from vqtok.tokenizer.prior.checkpoint import load_prior, prior_data_meta, read_prior_meta
from vqtok.tokenizer.prior.config import parse_prior_config
from vqtok.tokenizer.prior.train import train_prior
from vqtok.tokenizer.splits import heldout_split
from vqtok.tokenizer.training import resolve_device

SAMPLE_SPLIT = "sample"
SAMPLES_FILE = "samples.parquet"


@task(name="train-prior")
def train_prior_task(tokens: str, out: str, config: dict[str, Any], train_split: str,
                     heldout: str | None) -> dict[str, Any]:
    logger = get_run_logger()
    grid = load_grid(tokens)
    if train_split not in grid.split_names:
        raise PipelineError(f"{tokens} has no split '{train_split}' (it has "
                            f"{', '.join(grid.split_names) or 'no rows'}); pass --train-split")
    if heldout is not None and heldout not in grid.split_names:
        raise PipelineError(f"{tokens} has no split '{heldout}' to hold out; pass one of "
                            f"{', '.join(grid.split_names)}")
    heldout = heldout or heldout_split(grid.split_names, exclude=train_split)
    if heldout is None:
        logger.warning(f"{tokens} has no validation or test split: no held-out figures")
    data = prior_data_meta(tokens, grid.meta.to_dict(), train_split, heldout)
    result = train_prior(
        parse_prior_config(config), out, TokenDataset(grid, split=train_split),
        TokenDataset(grid, split=heldout) if heldout else None,
        vocab_size=grid.meta.codebook_size, data_meta=data, log=logger.info,
    )
    return {"checkpoint": str(result.checkpoint), "weights_sha256": result.weights_sha256,
            "step": result.step, "seconds": result.seconds,
            "tokens_per_second": result.tokens_per_second, "heldout": result.heldout,
            "heldout_split": heldout, "resumed_from_step": result.resumed_from_step}


@flow(name="prior-train")
def prior_train_flow(tokens: str, out: str, config: dict[str, Any] | None = None,
                     train_split: str = "train", heldout: str | None = None) -> dict[str, Any]:
    """Train a prior on ``train_split`` into ``out/checkpoint`` (re-running resumes)."""
    config = parse_prior_config(config or {}).model_dump()
    result = train_prior_task(tokens, out, config, train_split, heldout)
    h = result["heldout"]
    if h:
        get_run_logger().info(
            f"held-out ({result['heldout_split']}) NLL {h['nll_bits']:.3f} bits/token, unigram "
            f"entropy {h['unigram_bits']:.3f} ({h['nll_vs_unigram']:.2f}x)")
        create_markdown_artifact(
            key="vqtok-prior",
            markdown=(f"### Prior trained to step {result['step']}\n\n| bits per token "
                      f"({result['heldout_split']}) | value |\n|---|---:|\n| prior NLL | "
                      f"{h['nll_bits']:.3f} |\n| unigram entropy | {h['unigram_bits']:.3f} |\n"
                      f"| per-position entropy | {h['position_bits']:.3f} |\n\nCheckpoint "
                      f"`{result['checkpoint']}`"),
            description="Held-out negative log-likelihood of the token prior",
        )
    return result


def sample_meta(token_meta: dict[str, Any], prior: dict[str, Any]) -> TokenMeta:
    """The training tokens' metadata, marked as generated (so no image is compared with it)."""
    base = TokenMeta.from_dict(token_meta)
    extra = {**base.extra, "generated_by": "prior", "prior": prior}
    return TokenMeta(base.codebook_size, base.grid_h, base.grid_w, base.dataset,
                     base.dataset_fingerprint, base.checkpoint_hash, base.vqtok_version,
                     extra=extra, depth=base.depth)


@task(name="sample-prior")
def sample_prior_task(prior: str, out: str, n: int, label: int | None, temperature: float,
                      top_k: int | None, seed: int, device: str) -> dict[str, Any]:
    model = load_prior(prior, resolve_device(device))
    if "token_meta" not in model.data_meta:
        raise PipelineError(f"{prior} does not record the metadata of its training tokens, "
                            "so its samples cannot be written as tokens; train it with "
                            "'prior train'")
    classes = model.shape.num_classes
    if label is not None and not 0 <= label < classes:
        have = f"labels 0..{classes - 1}" if classes else "no labels (it is unconditional)"
        raise PipelineError(f"label {label} is not one the prior knows: it was trained with "
                            f"{have}; pick one of those or leave --label out")
    labels = torch.full((n,), -1 if label is None else label, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    codes = model.sample(n, labels, temperature=temperature, top_k=top_k, generator=generator)
    settings = {"checkpoint_hash": model.checkpoint_hash, "label": label,
                "temperature": temperature, "top_k": top_k, "seed": seed}
    meta = sample_meta(model.data_meta["token_meta"], settings)
    path = Path(out) / SAMPLES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with ParquetTokenWriter(path, meta) as writer:
        writer.write(codes.cpu().numpy(), np.arange(n), labels.numpy(), SAMPLE_SPLIT)
    return {"tokens": str(path), "samples": n, **settings}


def find_tokenizer(prior_data: dict[str, Any], checkpoint: str | None) -> str | None:
    """The tokenizer to decode with: the one given, else ``checkpoint/`` of the run folder the
    training tokens are (or are in) when its weights are the ones that made them."""
    if checkpoint:
        return checkpoint
    tokens = prior_data.get("tokens")
    if not tokens:
        return None
    wanted = prior_data.get("token_meta", {}).get("checkpoint_hash")
    for candidate in (Path(tokens) / "checkpoint", Path(tokens).parent / "checkpoint"):
        try:
            meta = read_checkpoint_meta(candidate)
        except CheckpointError:
            continue
        if meta.get("weights_sha256") == wanted:
            return str(candidate)
    return None


@flow(name="prior-sample")
def prior_sample_flow(prior: str, out: str, n: int = 64, label: int | None = None,
                      temperature: float = 1.0, top_k: int | None = None, seed: int = 0,
                      checkpoint: str | None = None, device: str = "auto") -> dict[str, Any]:
    """Sample ``n`` grids into ``out/samples.parquet`` and decode them to ``out/decoded.png``
    (when the tokenizer is given or found beside the training tokens)."""
    result = sample_prior_task(prior, out, n, label, temperature, top_k, seed, device)
    tokenizer = find_tokenizer(read_prior_meta(prior).get("data", {}), checkpoint)
    if tokenizer is None:
        get_run_logger().warning("no tokenizer checkpoint found beside the training tokens; "
                                 "samples are not decoded (pass --checkpoint)")
        return {**result, "picture": None}
    decoded = decode_flow(result["tokens"], tokenizer, out, split=SAMPLE_SPLIT, limit=n,
                          picture_count=n, device=device)
    return {**result, "picture": decoded["picture"], "checkpoint": tokenizer}
