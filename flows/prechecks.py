"""Input checks the CLI runs before any Prefect machinery starts, so bad input fails in a
second with one line (``flows.error_policy``) and leaves nothing behind. The flows reuse
what they load (models and datasets are cached per process in ``flows.runtime``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

# CLI option -> dotted config key it overrides
CONFIG_OVERRIDES = {"dataset": "data.dataset", "data_root": "data.data_root",
                    "device": "train.device", "batch_size": "train.batch_size", "seed": "seed",
                    "epochs": "train.epochs", "max_steps": "train.max_steps", "lr": "train.lr"}


def build_config(config_path: str | None, **overrides: Any) -> Any:
    """The run config: the YAML file (or the bundled sample's) with the CLI's overrides."""
    from vqtok.tokenizer.config import load_config

    dotted = {CONFIG_OVERRIDES[k]: v for k, v in overrides.items()
              if k in CONFIG_OVERRIDES and v is not None}
    return load_config(config_path).with_overrides(**dotted)


def checkpoint_description(checkpoint: str) -> dict[str, Any]:
    """The checkpoint's config.json, read once per command: a path that is no checkpoint
    fails here."""
    from vqtok.tokenizer.checkpoint import read_checkpoint_meta

    return read_checkpoint_meta(checkpoint)


def encode_data(meta: dict[str, Any], dataset: str | None, data_root: str | None,
                config_path: str | None) -> Any:
    """The data config to encode: the checkpoint's, or --config's, changed by --dataset and
    --data-root."""
    from vqtok.tokenizer.checkpoint import stored_config
    from vqtok.tokenizer.config import load_config

    data = (load_config(config_path) if config_path else stored_config(meta)).data
    changes = {k: v for k, v in (("dataset", dataset), ("data_root", data_root)) if v}
    return data.model_copy(update=changes) if changes else data


def check_out(out: str | Path) -> None:
    """An output folder that cannot take files fails now, not after hours of work."""
    from vqtok.flows.errors import check_writable

    check_writable(out)


def check_model(checkpoint: str, device: str | None, meta: dict[str, Any] | None = None) -> None:
    """Load the weights up front (the flows reuse them from the cache): a truncated or
    mismatched checkpoint fails before any Prefect machinery starts."""
    from vqtok.flows.runtime import cached_model

    cached_model(checkpoint, device or "auto", meta)


def check_healthy(meta: dict[str, Any], force: bool) -> None:
    """A checkpoint its training marked unhealthy is refused now, unless --force."""
    from vqtok.tokenizer.health import require_healthy

    require_healthy(meta, force)


def check_data(data: Any) -> None:
    """Open the dataset up front (flows reuse it from the cache): bad input fails at once."""
    from vqtok.flows.runtime import cached_source

    cached_source(data)


def check_fits(meta: dict[str, Any], data: Any) -> None:
    """The data has the channels and a size the checkpoint's model can take."""
    from vqtok.flows.runtime import check_data_fits
    from vqtok.tokenizer.checkpoint import stored_config

    check_data_fits(stored_config(meta), data)


def check_tokens_match(tokens: str, meta: dict[str, Any]) -> None:
    """Tokens are decoded only by the tokenizer that made them."""
    from vqtok.storage import read_meta

    read_meta(tokens).check_tokenizer(meta["weights_sha256"], where=tokens)


def check_cron(cron: str) -> None:
    """Prefect's own cron parser, asked before serving: its error is a pydantic traceback."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron)
    except ValidationError:
        raise click.BadParameter(
            f"{cron!r} is not a cron schedule; give five fields (minute hour day-of-month "
            "month day-of-week), e.g. '0 3 * * *'", param_hint="'--cron'") from None
