"""``tokenize-dataset prior train|sample``: an autoregressive prior over a token store.

A group of its own, registered by ``flows/cli.py`` (this module does not import it). Like
the other commands, heavy imports happen inside the commands and inputs are checked before
any Prefect machinery starts.
"""

from __future__ import annotations

from typing import Any

import click
from vqtok.flows.error_policy import friendly_errors


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def prior() -> None:
    """Train an autoregressive prior on tokens; sample new grids and decode them to images."""


OVERRIDES = {"seed": "seed", "d_model": "model.d_model", "layers": "model.n_layers",
             "heads": "model.n_heads", "dropout": "model.dropout", "steps": "train.steps",
             "batch_size": "train.batch_size", "lr": "train.lr", "device": "train.device",
             "checkpoint_every": "train.checkpoint_every"}


@prior.command()
@click.option("--tokens", type=click.Path(exists=True), required=True,
              help="Token file or folder (e.g. RUN/tokens).")
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Output folder (e.g. RUN/prior); re-running on it resumes.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="YAML prior config (seed, model, train); see tokenizer/prior/config.py.")
@click.option("--steps", type=click.IntRange(min=1), help="Optimizer steps (default 1000).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Grids per step (default 128).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Peak learning rate.")
@click.option("--d-model", type=click.IntRange(min=8), help="Transformer width.")
@click.option("--layers", type=click.IntRange(min=1), help="Transformer blocks.")
@click.option("--heads", type=click.IntRange(min=1), help="Attention heads.")
@click.option("--dropout", type=click.FloatRange(min=0, max=1, max_open=True))
@click.option("--checkpoint-every", type=click.IntRange(min=1),
              help="Steps between checkpoints and held-out evaluations.")
@click.option("--seed", type=int)
@click.option("--device", help="auto, cpu, cuda or cuda:N.")
@click.option("--train-split", default="train", show_default=True)
@click.option("--heldout-split", help="Split for held-out figures (default: validation, else "
              "test).")
@friendly_errors
def train(tokens: str, out: str, config_path: str | None, train_split: str,
          heldout_split: str | None, **overrides: Any) -> None:
    """Train (or resume) a prior on a token store; reports held-out bits per token."""
    from vqtok.flows.prior_flow import prior_train_flow
    from vqtok.storage import read_meta
    from vqtok.tokenizer.prior.config import load_prior_config

    config = load_prior_config(config_path).with_overrides(
        **{OVERRIDES[k]: v for k, v in overrides.items()})
    read_meta(tokens)  # a path that holds no tokens fails here, before Prefect starts
    result = prior_train_flow(tokens=tokens, out=out, config=config.model_dump(),
                              train_split=train_split, heldout=heldout_split)
    click.echo(f"prior {result['checkpoint']} (weights {result['weights_sha256'][:12]}), "
               f"step {result['step']}")
    h = result["heldout"]
    if h:
        click.echo(f"held-out ({result['heldout_split']}): {h['nll_bits']:.3f} bits/token; "
                   f"unigram entropy {h['unigram_bits']:.3f} ({h['nll_vs_unigram']:.2f}x), "
                   f"per-position entropy {h['position_bits']:.3f}")


@prior.command()
@click.option("--prior", "prior_path", type=click.Path(exists=True), required=True,
              help="Folder written by 'prior train'.")
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Folder for samples.parquet and decoded.png.")
@click.option("--n", type=click.IntRange(min=1), default=64, show_default=True,
              help="Number of grids to sample.")
@click.option("--label", type=click.IntRange(min=0), help="Class to condition on (default: "
              "unconditional).")
@click.option("--temperature", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Softmax temperature; 0 is greedy.")
@click.option("--top-k", type=click.IntRange(min=1), help="Sample among the k likeliest codes.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--checkpoint", type=click.Path(), help="Tokenizer to decode with (default: the "
              "checkpoint beside the training tokens, when it made them).")
@click.option("--device", default="auto", show_default=True)
@friendly_errors
def sample(prior_path: str, out: str, n: int, label: int | None, temperature: float,
           top_k: int | None, seed: int, checkpoint: str | None, device: str) -> None:
    """Sample token grids from a prior into a token file, and decode them to a PNG."""
    from vqtok.flows.prior_flow import prior_sample_flow
    from vqtok.tokenizer.checkpoint import read_checkpoint_meta
    from vqtok.tokenizer.prior.checkpoint import read_prior_meta

    meta = read_prior_meta(prior_path)  # fail before Prefect starts
    classes = meta["shape"]["num_classes"]
    if label is not None and label >= classes:
        raise click.BadParameter(
            f"the prior knows labels 0..{classes - 1}" if classes else
            "the prior was trained without labels; leave --label out", param_hint="--label")
    if checkpoint:
        wanted = meta.get("data", {}).get("token_meta", {}).get("checkpoint_hash")
        if read_checkpoint_meta(checkpoint)["weights_sha256"] != wanted:
            raise click.BadParameter("this tokenizer did not make the prior's training tokens; "
                                     "pass the one that did", param_hint="--checkpoint")
    result = prior_sample_flow(prior=prior_path, out=out, n=n, label=label,
                               temperature=temperature, top_k=top_k, seed=seed,
                               checkpoint=checkpoint, device=device)
    line = f"{result['samples']} samples -> {result['tokens']}"
    if result["picture"]:
        line += f", decoded -> {result['picture']}"
    else:
        line += " (not decoded: pass --checkpoint, the tokenizer that made the tokens)"
    click.echo(line)
