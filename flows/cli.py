"""The ``tokenize-dataset`` command line: thin wiring over ``tokenizer`` and ``storage``."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

USAGE_EXIT = 2
FAILURE_EXIT = 1


def _known_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(usage errors -> exit 2, failures -> exit 1); imported late to keep --help fast."""
    from tokenizer import CheckpointError, ConfigError, DataError, TrainingError

    return (ConfigError,), (DataError, CheckpointError, TrainingError, OSError)


def friendly_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """One line on stderr and a non-zero exit instead of a traceback (unless --debug)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = click.get_current_context().find_root().params.get("debug", False)
        usage, failures = _known_errors()
        try:
            return command(*args, **kwargs)
        except (*usage, *failures) as exc:
            if debug:
                raise
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            click.echo(f"error: {message}", err=True)
            sys.exit(USAGE_EXIT if isinstance(exc, usage) else FAILURE_EXIT)

    return wrapper


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Train a VQ-VAE and turn image datasets into grids of integer tokens."""
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


def _config_options(command: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--config", "config_path", type=click.Path(dir_okay=False),
                     help="YAML config (see configs/); defaults to the bundled sample's."),
        click.option("--dataset", help="mnist-sample, mnist, fashion-mnist, cifar10, "
                     "imagefolder:PATH or npz:PATH."),
        click.option("--data-root", type=click.Path(file_okay=False),
                     help="Folder holding (or receiving) torchvision dataset files."),
        click.option("--device", help="auto, cpu, cuda or cuda:N."),
        click.option("--batch-size", type=click.IntRange(min=1)),
        click.option("--seed", type=int),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def build_config(config_path: str | None, **overrides: Any) -> Any:
    from tokenizer import load_config

    keys = {"dataset": "data.dataset", "data_root": "data.data_root", "device": "train.device",
            "batch_size": "train.batch_size", "seed": "seed", "epochs": "train.epochs",
            "max_steps": "train.max_steps", "lr": "train.lr"}
    dotted = {keys[k]: v for k, v in overrides.items() if k in keys and v is not None}
    return load_config(config_path).with_overrides(**dotted)


@main.command()
@_config_options
@click.option("--out", type=click.Path(file_okay=False), default="runs/train", show_default=True,
              help="Output folder; re-running on it resumes training.")
@click.option("--epochs", type=click.IntRange(min=1))
@click.option("--max-steps", type=click.IntRange(min=1))
@click.option("--lr", type=click.FloatRange(min=0, min_open=True))
@click.option("--quiet", is_flag=True, help="No progress bar.")
@friendly_errors
def train(config_path: str | None, out: str, quiet: bool, **overrides: Any) -> None:
    """Train the tokenizer; writes OUT/checkpoint and OUT/reconstructions.png."""
    from tokenizer.train import train as run_training

    config = build_config(config_path, **overrides)
    result = run_training(config, out, progress=not quiet, log=click.echo)
    picture = write_reconstructions(result.checkpoint, config, Path(out) / "reconstructions.png")
    v = result.validation
    click.echo(f"checkpoint {result.checkpoint} (weights {result.weights_sha256[:12]}), "
               f"step {result.step}")
    if v:
        click.echo(f"validation: mse {v['mse']:.5f}  psnr {v['psnr']:.2f} dB  "
                   f"usage {v['usage']:.1%}  perplexity {v['perplexity']:.1f}")
    click.echo(f"reconstructions {picture}")


def write_reconstructions(checkpoint: Path, config: Any, path: Path, count: int = 32) -> Path:
    """Validation images above their reconstructions, for a quick look at quality."""
    import torch

    from tokenizer import load_tokenizer, open_source
    from tokenizer.visualize import save_reconstruction_grid

    model = load_tokenizer(checkpoint)
    source = open_source(config.data)
    split = config.data.val_split if config.data.val_split in source.splits else "test"
    ids = source.split_ids(split)[:count]
    images, _ = source.load_batch(ids)
    with torch.no_grad():
        recon = model.decode(model.encode(images))
    return save_reconstruction_grid(images, recon, path)


if __name__ == "__main__":
    main()
