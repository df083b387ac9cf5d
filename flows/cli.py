"""The ``tokenize-dataset`` command line: thin wiring over the flows.

Heavy imports (torch, Prefect) happen inside the commands, so ``--help`` answers at once.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

USAGE_EXIT = 2
FAILURE_EXIT = 1
INTERRUPTED_EXIT = 130  # the shell's code for "stopped by Ctrl-C"
FORMATS = {"parquet": ["parquet"], "hdf5": ["hdf5"], "both": ["parquet", "hdf5"]}

# A temporary Prefect server on a busy 2-core machine can take longer than Prefect's default
# 20 s to start; and nothing here should phone home.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _known_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(usage errors -> exit 2, failures -> exit 1); imported late to keep --help fast."""
    from vqtok.flows.errors import PipelineError
    from vqtok.storage.errors import TokenStoreError
    from vqtok.tokenizer.errors import CheckpointError, ConfigError, DataError, TrainingError

    failures = (DataError, CheckpointError, TrainingError, TokenStoreError, PipelineError, OSError)
    return (ConfigError,), failures


# Console lines of Prefect's that only restate a failure the CLI reports itself in its one
# `error:` line, or that follow it (the server stopping, events still being flushed). The
# Prefect API keeps every flow and task run log; --debug shows everything on the console.
_RESTATING = ("Finished in state Failed", "Finished in state Crashed",
              "Stopping temporary server", "Still processing items")


class _OneLineRecords(logging.Filter):
    """Keeps Prefect's console to progress lines: no tracebacks, no ERROR records, nothing
    that restates the error the CLI prints once itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.name.startswith("prefect"):
            return False
        message = record.getMessage() if record.args else str(record.msg)
        if any(marker in message for marker in _RESTATING):
            return False
        record.exc_info, record.exc_text = None, None
        if isinstance(record.msg, str) and "Traceback (most recent call last)" in record.msg:
            record.msg = record.msg.split("\n", 1)[0]
        return True


def _quiet_tracebacks() -> None:
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()  # Prefect attaches its console handler lazily; make it exist now
    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(_OneLineRecords())


def friendly_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """One line on stderr and a non-zero exit instead of a traceback (unless --debug)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from vqtok.flows.recording import uses_prefect

        context = click.get_current_context()
        debug = context.find_root().params.get("debug", False)
        usage, failures = _known_errors()
        if not debug and uses_prefect(context.info_name or ""):
            _quiet_tracebacks()
        try:
            return command(*args, **kwargs)
        except BaseException as exc:
            interrupted = _caused_by_interrupt(exc)
            if debug or not (interrupted or isinstance(exc, (*usage, *failures))):
                raise
            if interrupted:
                click.echo("error: interrupted; re-run the same command to continue (finished "
                           "shards and checkpoints are kept)", err=True)
                sys.exit(INTERRUPTED_EXIT)
            if isinstance(exc, OSError):
                from vqtok.flows.errors import describe_os_error

                message = describe_os_error(exc)
            else:
                message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            click.echo(f"error: {message}", err=True)
            sys.exit(USAGE_EXIT if isinstance(exc, usage) else FAILURE_EXIT)

    return wrapper


def _caused_by_interrupt(exc: BaseException) -> bool:
    """Ctrl-C, also when Prefect's engine hides it: a KeyboardInterrupt that lands while a task
    run is being created makes Prefect raise ``ValueError('Task run is not set')`` from it."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


class OneLineErrors(click.Group):
    """Click's own usage errors (bad option, missing path) as one ``error:`` line too."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as exc:
            hint = " (see --help)" if isinstance(exc, click.UsageError) else ""
            click.echo(f"error: {' '.join(exc.format_message().split())}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("error: interrupted", err=True)
            sys.exit(INTERRUPTED_EXIT)
        sys.exit(code if isinstance(code, int) else 0)


def _options(*specs: Callable[..., Any]) -> Callable[..., Any]:
    def apply(command: Callable[..., Any]) -> Callable[..., Any]:
        for spec in reversed(specs):
            command = spec(command)
        return command

    return apply


CONFIG = click.option("--config", "config_path", type=click.Path(dir_okay=False),
                      help="YAML config (see configs/); defaults to the bundled sample's.")
DATASET = click.option("--dataset", help="mnist-sample, mnist, fashion-mnist, cifar10, "
                       "imagefolder:PATH or npz:PATH.")
DATA_ROOT = click.option("--data-root", type=click.Path(file_okay=False),
                         help="Folder holding (or receiving) torchvision dataset files.")
DEVICE = click.option("--device", default=None, help="auto, cpu, cuda or cuda:N.")
BATCH = click.option("--batch-size", type=click.IntRange(min=1),
                     help="Images per batch (training: the config's; encoding: 256).")
SEED = click.option("--seed", type=int, help="Overrides the config's seed.")
CHECKPOINT = click.option("--checkpoint", type=click.Path(),
                          help="Trained checkpoint folder (or a run folder holding one).")
FORMAT = click.option("--format", "fmt", type=click.Choice(list(FORMATS)), default="both",
                      show_default=True, help="Token file formats to write.")
SHARD = click.option("--shard-size", type=click.IntRange(min=1), default=10_000,
                     show_default=True, help="Rows per token shard.")
QUIET = click.option("--quiet", is_flag=True, help="No progress bars.")
FORCE = click.option("--force", is_flag=True, help="Use a checkpoint its training marked "
                     "unhealthy (reconstructions barely better than the mean image).")


def out_option(default: str, help_text: str) -> Callable[..., Any]:
    return click.option("--out", type=click.Path(file_okay=False), default=default,
                        show_default=True, help=help_text)


def build_config(config_path: str | None, **overrides: Any) -> Any:
    from vqtok.tokenizer import load_config

    keys = {"dataset": "data.dataset", "data_root": "data.data_root", "device": "train.device",
            "batch_size": "train.batch_size", "seed": "seed", "epochs": "train.epochs",
            "max_steps": "train.max_steps", "lr": "train.lr"}
    dotted = {keys[k]: v for k, v in overrides.items() if k in keys and v is not None}
    return load_config(config_path).with_overrides(**dotted)


def _encode_data(checkpoint: str, dataset: str | None, data_root: str | None,
                 config_path: str | None) -> dict[str, Any]:
    """The checkpoint's data config, changed by --config / --dataset / --data-root."""
    from vqtok.flows.runtime import checkpoint_config
    from vqtok.tokenizer import load_config

    data = (load_config(config_path) if config_path else checkpoint_config(checkpoint)[0]).data
    changes = {k: v for k, v in (("dataset", dataset), ("data_root", data_root)) if v}
    return data.model_copy(update=changes).model_dump() if changes else data.model_dump()


def _check_out(out: str | Path) -> None:
    """An output folder that cannot take files fails now, not after hours of work."""
    from vqtok.flows.errors import check_writable

    check_writable(out)


def _check_model(checkpoint: str, device: str | None) -> None:
    """Load the weights up front (the flows reuse them from the cache): a truncated or
    mismatched checkpoint fails before any Prefect machinery starts."""
    from vqtok.flows.runtime import cached_model

    cached_model(checkpoint, device or "auto")


def _check_checkpoint(checkpoint: str) -> dict[str, Any]:
    """Fail in a second, before a Prefect server starts, on a path that is no checkpoint."""
    from vqtok.tokenizer.checkpoint import read_checkpoint_meta

    return read_checkpoint_meta(checkpoint)


def _check_healthy(checkpoint: str, force: bool) -> None:
    """A checkpoint its training marked unhealthy is refused now, unless --force."""
    from vqtok.tokenizer.health import require_healthy

    require_healthy(_check_checkpoint(checkpoint), force)


def _check_data(data: Any) -> None:
    """Open the dataset up front (flows reuse it from the cache): bad input fails at once."""
    from vqtok.flows.runtime import cached_source
    from vqtok.tokenizer.config import DataConfig

    cached_source(data if isinstance(data, DataConfig) else DataConfig.model_validate(data))


def _check_fits(checkpoint: str, data: Any) -> None:
    """The data has the channels and a size the checkpoint's model can take."""
    from vqtok.flows.runtime import check_data_fits, checkpoint_config
    from vqtok.tokenizer.config import DataConfig

    if data is not None:
        config, _ = checkpoint_config(checkpoint)
        check_data_fits(config, data if isinstance(data, DataConfig)
                        else DataConfig.model_validate(data))


def _check_tokens_match(tokens: str, checkpoint: str) -> None:
    from vqtok.storage import read_meta

    meta = read_meta(tokens)
    meta.check_tokenizer(_check_checkpoint(checkpoint)["weights_sha256"], where=tokens)


@click.group(cls=OneLineErrors, invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Train a VQ-VAE and turn image datasets into grids of integer tokens.

    With no command, runs the whole pipeline (train, encode, stats, decode) on the bundled
    MNIST sample into runs/demo and prints a summary.
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(run)


@main.command()
@_options(CONFIG, DATASET, DATA_ROOT, DEVICE, BATCH, SEED,
          out_option("runs/train", "Output folder; re-running on it resumes training."))
@click.option("--epochs", type=click.IntRange(min=1))
@click.option("--max-steps", type=click.IntRange(min=1))
@click.option("--lr", type=click.FloatRange(min=0, min_open=True))
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Train with N DDP processes on this machine (torchrun; gloo on CPU, one "
              "GPU each with NCCL).")
@QUIET
@friendly_errors
def train(config_path: str | None, out: str, quiet: bool, nproc: int,
          **overrides: Any) -> None:
    """Train the tokenizer; writes OUT/checkpoint and OUT/reconstructions.png."""
    from vqtok.flows.train_flow import train_flow

    config = build_config(config_path, **overrides)
    _check_data(config.data)
    _check_out(out)
    from vqtok.tokenizer.health import UNHEALTHY, quality_line

    result = train_flow(config.model_dump(), out, not quiet, nproc)
    picture = write_reconstructions(Path(result["checkpoint"]), config,
                                    Path(out) / "reconstructions.png")
    v, health = result["validation"], result.get("health") or {}
    click.echo(f"checkpoint {result['checkpoint']} (weights {result['weights_sha256'][:12]}), "
               f"step {result['step']}")
    if nproc > 1:
        agree = len(set(result["rank_weights_sha256"])) == 1
        click.echo(f"{result['world_size']} processes; identical weights on every rank: "
                   f"{'yes' if agree else 'NO'}")
    if v:
        click.echo(f"validation: mse {v['mse']:.5f}  {quality_line(v)}  "
                   f"usage {v['usage']:.1%}  perplexity {v['perplexity']:.1f}  "
                   f"health {health.get('status', 'not recorded')}")
    click.echo(f"reconstructions {picture}")
    if health.get("status") == UNHEALTHY:  # a smoke run: a full run fails instead
        click.echo(f"warning: {health['reason']}; a smoke run (--max-steps), so not an error, "
                   "but encode refuses this checkpoint without --force", err=True)


def write_reconstructions(checkpoint: Path, config: Any, path: Path, count: int = 32) -> Path:
    """Validation images above their reconstructions, for a quick look at quality."""
    import torch
    from vqtok.tokenizer import load_tokenizer, open_source
    from vqtok.tokenizer.visualize import save_reconstruction_grid

    model = load_tokenizer(checkpoint)
    source = open_source(config.data)
    split = config.data.val_split if config.data.val_split in source.splits else "test"
    images, _ = source.load_batch(source.split_ids(split)[:count])
    with torch.no_grad():
        recon = model.decode(model.encode(images))
    return save_reconstruction_grid(images, recon, path)


@main.command()
@_options(CHECKPOINT, CONFIG, DATASET, DATA_ROOT, DEVICE, BATCH, FORMAT, SHARD,
          out_option("runs/encode", "Run folder; tokens go to OUT/tokens."))
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="DataLoader worker processes (for folders of image files).")
@click.option("--cluster", help="Encode the shards on Dask: local:N (a local cluster of N "
              "workers) or tcp://HOST:8786 (a running scheduler). Needs vqtok[dask].")
@QUIET
@FORCE
@friendly_errors
def encode(checkpoint: str | None, config_path: str | None, dataset: str | None,
           data_root: str | None, device: str | None, batch_size: int | None, fmt: str,
           shard_size: int, out: str, workers: int, cluster: str | None, quiet: bool,
           force: bool) -> None:
    """Encode every split of a dataset into sharded token files (re-runs skip done shards).

    Without --batch-size: 256 on CPU, the largest power of two that fits on a GPU.
    """
    from vqtok.flows.dask_cluster import runner_options
    from vqtok.flows.encode_flow import encode_flow

    if not checkpoint:
        raise click.UsageError("encode needs --checkpoint (a folder written by 'train')")
    if cluster:
        runner_options(cluster)  # a bad --cluster fails before anything starts
    _check_healthy(checkpoint, force)
    data = _encode_data(checkpoint, dataset, data_root, config_path)
    _check_fits(checkpoint, data)
    _check_data(data)
    _check_model(checkpoint, device)
    _check_out(out)
    result = encode_flow(checkpoint, out, data, FORMATS[fmt], shard_size, batch_size,
                         device or "auto", workers, not quiet, cluster, force=force)
    click.echo(f"{result['encoded_images']} images encoded ({result['skipped_shards']} of "
               f"{result['shards']} shards already done) at {result['images_per_second']:.0f} "
               f"img/s -> {result['tokens']}")


@main.command()
@click.option("--tokens", type=click.Path(exists=True), help="Token file or folder "
              "(default: OUT/tokens).")
@out_option("runs/encode", "Run folder; stats go to OUT/stats.")
@friendly_errors
def stats(tokens: str | None, out: str) -> None:
    """Codebook usage of a token store: stats.json, usage.png, position_entropy.png."""
    from vqtok.flows.recording import uses_prefect
    from vqtok.flows.run_folder import RunPaths
    from vqtok.flows.usage_stats import usage_stats
    from vqtok.storage import read_meta

    paths = RunPaths(Path(out))
    read_meta(tokens or paths.tokens)  # a missing or damaged store fails before Prefect starts
    _check_out(paths.stats)
    if uses_prefect("stats"):
        from vqtok.flows.stats_flow import stats_flow

        result = stats_flow(tokens or str(paths.tokens), str(paths.stats))
    else:
        result = usage_stats(tokens or str(paths.tokens), str(paths.stats))
    click.echo(f"usage {result['usage']:.1%} ({result['codes_used']}/{result['codebook_size']}),"
               f" perplexity {result['perplexity']:.1f}, {result['entropy_bits']:.2f} bits/token"
               f" -> {result['stats']}")


@main.command()
@click.option("--tokens", type=click.Path(exists=True), required=True,
              help="Token file or folder to decode.")
@CHECKPOINT
@out_option("runs/decode", "Folder for the pictures and metrics.")
@click.option("--split", help="Only rows of this split.")
@click.option("--limit", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Decode at most this many rows.")
@DEVICE
@friendly_errors
def decode(tokens: str, checkpoint: str | None, out: str, split: str | None, limit: int,
           device: str | None) -> None:
    """Decode a token file with the tokenizer that made it (others are refused)."""
    from vqtok.flows.recording import uses_prefect

    if not checkpoint:
        raise click.UsageError("decode needs --checkpoint (the tokenizer that made the tokens)")
    _check_tokens_match(tokens, checkpoint)
    _check_model(checkpoint, device)
    _check_out(out)
    if uses_prefect("decode"):
        from vqtok.flows.decode_flow import decode_flow

        result = decode_flow(tokens, checkpoint, out, split, limit, device=device or "auto")
    else:
        from vqtok.flows.decoding import decode_tokens

        result = decode_tokens(tokens, checkpoint, out, split, limit, device=device or "auto")
    from vqtok.tokenizer.health import quality_line

    line = f"decoded {result['images']} images -> {result['picture']}"
    if "psnr" in result:
        line += f" (mse {result['mse']:.5f}, {quality_line(result)})"
    click.echo(line)


@main.command()
@_options(CONFIG, DATASET, DATA_ROOT, DEVICE, BATCH, SEED, CHECKPOINT, FORMAT, SHARD,
          out_option("runs/demo", "Run folder for everything the pipeline makes."))
@click.option("--epochs", type=click.IntRange(min=1))
@click.option("--max-steps", type=click.IntRange(min=1))
@QUIET
@FORCE
@friendly_errors
def run(config_path: str | None = None, out: str = "runs/demo", checkpoint: str | None = None,
        fmt: str = "both", shard_size: int = 10_000, quiet: bool = False, force: bool = False,
        **overrides: Any) -> None:
    """Train (unless --checkpoint), encode, compute stats and decode, then print a summary."""
    from vqtok.flows.pipeline import tokenize_dataset
    from vqtok.flows.summary import print_summary

    batch = overrides.pop("batch_size", None)
    config = build_config(config_path, **overrides)
    if checkpoint:
        _check_healthy(checkpoint, force)
        _check_model(checkpoint, overrides.get("device"))
    _check_data(config.data)
    _check_out(out)
    explicit = config_path or any(v is not None for v in overrides.values())
    summary = tokenize_dataset(
        config.model_dump() if (explicit or not checkpoint) else None, out, checkpoint,
        FORMATS[fmt], shard_size, batch or 256, overrides.get("device") or "auto", not quiet,
        force,
    )
    print_summary(summary)


@main.command()
@click.argument("path", type=click.Path(exists=True))
@friendly_errors
def info(path: str) -> None:
    """Describe a token file/folder or a checkpoint."""
    from vqtok.flows.recording import uses_prefect

    if uses_prefect("info"):
        from vqtok.flows.summary_flow import info_flow

        click.echo(info_flow(str(path)))
    else:
        from vqtok.flows.summary import describe

        click.echo(describe(Path(path)))


@main.command()
@_options(CONFIG, CHECKPOINT, FORMAT, SHARD,
          out_option("runs/scheduled", "Run folder each scheduled run writes to."))
@click.option("--cron", default="0 3 * * *", show_default=True, help="Schedule (cron syntax).")
@click.option("--name", default="vqtok-nightly", show_default=True, help="Deployment name.")
@FORCE
@friendly_errors
def serve(config_path: str | None, checkpoint: str | None, fmt: str, shard_size: int, out: str,
          cron: str, name: str, force: bool) -> None:
    """Serve the pipeline on a schedule (blocks; needs a Prefect server, see the README)."""
    from vqtok.flows.pipeline import tokenize_dataset

    _check_cron(cron)
    if checkpoint:  # a scheduled run at 3 a.m. is the wrong moment to learn of a typo
        _check_healthy(checkpoint, force)
    parameters = serve_parameters(build_config(config_path), checkpoint, FORMATS[fmt],
                                  shard_size, out, force)
    tokenize_dataset.serve(name=name, cron=cron, parameters=parameters)


def _check_cron(cron: str) -> None:
    """Prefect's own cron parser, asked before serving: its error is a pydantic traceback."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron)
    except ValidationError:
        raise click.BadParameter(
            f"{cron!r} is not a cron schedule; give five fields (minute hour day-of-month "
            "month day-of-week), e.g. '0 3 * * *'", param_hint="'--cron'") from None


def serve_parameters(config: Any, checkpoint: str | None, formats: list[str], shard_size: int,
                     out: str, force: bool = False) -> dict[str, Any]:
    """Flow parameters of a scheduled run: plain JSON, so the server can store them."""
    return {"config": config.model_dump(), "out": out, "checkpoint": checkpoint,
            "formats": formats, "shard_size": shard_size, "progress": False, "force": force}


from vqtok.flows.cli_prior import prior  # noqa: E402 - registered after main exists

main.add_command(prior)

if __name__ == "__main__":
    main()
