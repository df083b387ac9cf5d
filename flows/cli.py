"""The ``tokenize-dataset`` command line: thin wiring over the flows.

Each command checks its input (``flows.prechecks``) before any Prefect machinery starts, runs
its flow by keyword, and prints one summary line; how it ends on an error is
``flows.error_policy``. Heavy imports (torch, Prefect) happen inside the commands, so
``--help`` answers at once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from vqtok.flows.cli_prior import prior
from vqtok.flows.error_policy import OneLineErrors, friendly_errors
from vqtok.flows.prechecks import (
    build_config,
    check_cron,
    check_data,
    check_fits,
    check_healthy,
    check_model,
    check_out,
    check_tokens_match,
    checkpoint_description,
    encode_data,
)
from vqtok.storage.layout import DEFAULT_SHARD_SIZE
from vqtok.storage.layout import FORMATS as STORE_FORMATS
from vqtok.storage.versions import DEFAULT_KEEP_VERSIONS
from vqtok.tokenizer.config import ENCODE_BATCH_SIZE

FORMATS = {**{name: [name] for name in STORE_FORMATS}, "both": list(STORE_FORMATS)}


def _options(*specs: Callable[..., Any]) -> Callable[..., Any]:
    def apply(command: Callable[..., Any]) -> Callable[..., Any]:
        for spec in reversed(specs):
            command = spec(command)
        return command

    return apply


CONFIG = click.option("--config", "config_path", type=click.Path(dir_okay=False),
                      help="YAML config (see configs/); defaults to the bundled sample's.")
DATASET = click.option("--dataset", help="mnist-sample, mnist, fashion-mnist, cifar10, "
                       "imagefolder:PATH, npz:PATH, webdataset:PATTERN (tar shards, "
                       "'shard-{000..009}.tar': quote it) or parquet:PATH (image Parquet).")
DATA_ROOT = click.option("--data-root", type=click.Path(file_okay=False),
                         help="Folder holding (or receiving) torchvision dataset files.")
DEVICE = click.option("--device", default=None, help="auto, cpu, cuda or cuda:N.")
BATCH = click.option("--batch-size", type=click.IntRange(min=1),
                     help=f"Images per batch (training: the config's; encoding: "
                     f"{ENCODE_BATCH_SIZE} on CPU, what fits on a GPU).")
SEED = click.option("--seed", type=int, help="Overrides the config's seed.")
CHECKPOINT = click.option("--checkpoint", type=click.Path(),
                          help="Trained checkpoint folder (or a run folder holding one).")
FORMAT = click.option("--format", "fmt", type=click.Choice(list(FORMATS)), default="both",
                      show_default=True, help="Token file formats to write.")
SHARD = click.option("--shard-size", type=click.IntRange(min=1), default=DEFAULT_SHARD_SIZE,
                     show_default=True, help="Rows per token shard.")
QUIET = click.option("--quiet", is_flag=True, help="No progress bars.")
FORCE = click.option("--force", is_flag=True, help="Use a checkpoint its training marked "
                     "unhealthy (reconstructions barely better than the mean image).")
REENCODE = click.option("--reencode", is_flag=True, help="Encode every image again (say, "
                        "with another checkpoint) as a new version of the store; ids are kept.")
KEEP = click.option("--keep-versions", type=click.IntRange(min=1),
                    default=DEFAULT_KEEP_VERSIONS, show_default=True,
                    help="Store versions kept on disk (older ones are deleted).")


def out_option(default: str, help_text: str) -> Callable[..., Any]:
    return click.option("--out", type=click.Path(file_okay=False), default=default,
                        show_default=True, help=help_text)


@click.group(cls=OneLineErrors, invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.option("--verbose", is_flag=True, help="Show Prefect's whole console output (the "
              "run's log file under OUT/logs has it either way).")
@click.pass_context
def main(ctx: click.Context, debug: bool, verbose: bool) -> None:
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
    from vqtok.tokenizer.health import UNHEALTHY, quality_line

    config = build_config(config_path, **overrides)
    check_data(config.data)
    check_out(out)
    result = train_flow(config=config.model_dump(), out=out, progress=not quiet, nproc=nproc,
                        reconstructions=True)
    picture = result["reconstructions"]
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


@main.command()
@_options(CHECKPOINT, CONFIG, DATASET, DATA_ROOT, DEVICE, BATCH, FORMAT, SHARD,
          out_option("runs/encode", "Run folder; tokens go to OUT/tokens."))
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="DataLoader worker processes (for folders of image files).")
@click.option("--cluster", help="Encode the shards on Dask: local:N (a local cluster of N "
              "workers) or tcp://HOST:8786 (a running scheduler). Needs vqtok[dask].")
@QUIET
@FORCE
@REENCODE
@KEEP
@friendly_errors
def encode(checkpoint: str | None, config_path: str | None, dataset: str | None,
           data_root: str | None, device: str | None, batch_size: int | None, fmt: str,
           shard_size: int, out: str, workers: int, cluster: str | None, quiet: bool,
           force: bool, reencode: bool, keep_versions: int) -> None:
    """Encode every split of a dataset into a versioned token store.

    Re-running on a dataset that grew, shrank or changed encodes only the new and changed
    images and publishes a new version; an interrupted run resumes. Without --batch-size:
    256 on CPU (``ENCODE_BATCH_SIZE``), the largest power of two that fits on a GPU.
    """
    from vqtok.flows.dask_cluster import runner_options
    from vqtok.flows.encode_flow import encode_flow

    if not checkpoint:
        raise click.UsageError("encode needs --checkpoint (a folder written by 'train')")
    if cluster:
        runner_options(cluster)  # a bad --cluster fails before anything starts
    meta = checkpoint_description(checkpoint)
    check_healthy(meta, force)
    data = encode_data(meta, dataset, data_root, config_path)
    check_fits(meta, data)
    check_data(data)
    check_model(checkpoint, device, meta)
    check_out(out)
    result = encode_flow(checkpoint=checkpoint, out=out, data=data.model_dump(),
                         formats=FORMATS[fmt], shard_size=shard_size, batch_size=batch_size,
                         device=device or "auto", num_workers=workers, progress=not quiet,
                         cluster=cluster, force=force, reencode=reencode,
                         keep_versions=keep_versions)
    click.echo(encode_line(result))


def encode_line(result: dict[str, Any]) -> str:
    """The encode summary: what changed, what was encoded, which version readers now see."""
    if not result["new_version"]:
        return f"{result['changes']}: version {result['version']} stands -> {result['tokens']}"
    done = (f", {result['skipped_shards']} of {result['shards']} shards already done"
            if result["skipped_shards"] else "")
    kept = (f", {result['salvaged']} rows kept from an unfinished earlier run"
            if result.get("salvaged") else "")
    return (f"{result['changes']}: {result['encoded_images']} images encoded at "
            f"{result['images_per_second']:.0f} img/s{kept}{done}; version {result['version']} "
            f"-> {result['tokens']}")


@main.command()
@click.option("--tokens", type=click.Path(exists=True), help="Token file or folder "
              "(default: OUT/tokens, or OUT/hdf5 when only HDF5 was written).")
@out_option("runs/encode", "Run folder; stats go to OUT/stats.")
@friendly_errors
def stats(tokens: str | None, out: str) -> None:
    """Codebook usage of a token store: stats.json, usage.png, position_entropy.png."""
    from vqtok.flows.recording import uses_prefect
    from vqtok.flows.run_folder import RunPaths
    from vqtok.flows.usage_stats import usage_stats
    from vqtok.storage import read_meta

    paths = RunPaths(Path(out))
    tokens = tokens or str(paths.store)
    read_meta(tokens)  # a missing or damaged store fails before Prefect starts
    check_out(paths.stats)
    if uses_prefect("stats"):
        from vqtok.flows.stats_flow import stats_flow

        result = stats_flow(tokens=tokens, out=str(paths.stats))
    else:
        result = usage_stats(tokens=tokens, out=str(paths.stats))
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
    meta = checkpoint_description(checkpoint)
    check_tokens_match(tokens, meta)
    check_model(checkpoint, device, meta)
    check_out(out)
    if uses_prefect("decode"):
        from vqtok.flows.decode_flow import decode_flow as decode_tokens
    else:
        from vqtok.flows.decoding import decode_tokens
    result = decode_tokens(tokens=tokens, checkpoint=checkpoint, out=out, split=split,
                           limit=limit, device=device or "auto")
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
@REENCODE
@KEEP
@friendly_errors
def run(config_path: str | None = None, out: str = "runs/demo", checkpoint: str | None = None,
        fmt: str = "both", shard_size: int = DEFAULT_SHARD_SIZE, quiet: bool = False,
        force: bool = False, reencode: bool = False,
        keep_versions: int = DEFAULT_KEEP_VERSIONS, **overrides: Any) -> None:
    """Train (unless --checkpoint), encode, compute stats and decode, then print a summary."""
    from vqtok.flows.pipeline import tokenize_dataset
    from vqtok.flows.summary import print_summary

    batch = overrides.pop("batch_size", None)
    config = build_config(config_path, **overrides)
    if checkpoint:
        meta = checkpoint_description(checkpoint)
        check_healthy(meta, force)
        check_model(checkpoint, overrides.get("device"), meta)
    check_data(config.data)
    check_out(out)
    explicit = config_path or any(v is not None for v in overrides.values())
    summary = tokenize_dataset(
        config=config.model_dump() if (explicit or not checkpoint) else None, out=out,
        checkpoint=checkpoint, formats=FORMATS[fmt], shard_size=shard_size, batch_size=batch,
        device=overrides.get("device") or "auto", progress=not quiet, force=force,
        reencode=reencode, keep_versions=keep_versions)
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

    check_cron(cron)
    if checkpoint:  # a scheduled run at 3 a.m. is the wrong moment to learn of a typo
        check_healthy(checkpoint_description(checkpoint), force)
    parameters = serve_parameters(build_config(config_path), checkpoint, FORMATS[fmt],
                                  shard_size, out, force)
    tokenize_dataset.serve(name=name, cron=cron, parameters=parameters)


def serve_parameters(config: Any, checkpoint: str | None, formats: list[str], shard_size: int,
                     out: str, force: bool = False) -> dict[str, Any]:
    """Flow parameters of a scheduled run: plain JSON, so the server can store them."""
    return {"config": config.model_dump(), "out": out, "checkpoint": checkpoint,
            "formats": formats, "shard_size": shard_size, "progress": False, "force": force}


main.add_command(prior)

if __name__ == "__main__":
    main()
