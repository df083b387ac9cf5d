"""What the CLI prints at the end of a run, and ``info`` descriptions of files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from vqtok.tokenizer.health import describe_health, quality_line


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    stats, encoded, decoded = summary["stats"], summary["encode"], summary["decode"]
    rows = [
        ("codebook usage", f"{stats['usage']:.1%} ({stats['codes_used']}/"
                           f"{stats['codebook_size']} codes, {stats['dead_codes']} dead)"),
        ("perplexity", f"{stats['perplexity']:.1f} ({stats['entropy_bits']:.2f} bits/token)"),
    ]
    if "psnr" in decoded:
        rows.append(("quality", f"{quality_line(decoded)}; MSE {decoded['mse']:.5f} over "
                                f"{decoded['images']} validation images"))
    if "train" in summary:
        t = summary["train"]
        status = (t.get("health") or {}).get("status", "not recorded")
        rows.append(("training", f"step {t['step']}, {t['images_per_second']:.0f} img/s, "
                                 f"health {status}"))
    rows += [
        ("encoding", f"{encoded['images']} images, {encoded['images_per_second']:.0f} img/s, "
                     f"{encoded['tokens_per_second']:.0f} tokens/s"
                     + (f" ({encoded['skipped_shards']} shards reused)"
                        if encoded["skipped_shards"] else "")),
        ("version", f"{encoded['version']}: {encoded['changes']}"
                    + ("" if encoded["new_version"] else " (unchanged)")),
        ("checkpoint", summary["checkpoint"]),
        ("tokens", f"{encoded['tokens']} ({', '.join(encoded['formats'])})"),
        ("stats", stats["stats"]),
        ("pictures", ", ".join([*stats["plots"], decoded["picture"]])),
    ]
    return rows


def print_summary(summary: dict[str, Any], console: Console | None = None) -> None:
    table = Table(title=f"vqtok run {summary['out']}", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in summary_rows(summary):
        table.add_row(key, value)
    (console or Console()).print(table)


def describe(path: Path) -> str:
    """A token store's metadata and row counts, a tokenizer checkpoint's config and progress,
    or a prior's size and held-out figures."""
    from vqtok.tokenizer.checkpoint import CheckpointError, read_checkpoint_meta

    try:
        meta = read_checkpoint_meta(path)
    except CheckpointError:
        meta = None
    if meta is not None:
        cfg = meta["config"]
        progress = meta.get("progress", {})
        lines = [f"checkpoint {meta['directory']}",
                 f"  weights sha256  {meta['weights_sha256']}",
                 f"  dataset         {cfg['data']['dataset']} ({meta['in_channels']} channels, "
                 f"{cfg['data']['image_size']} px)",
                 f"  codebook        {cfg['model']['num_embeddings']} x "
                 f"{cfg['model']['embedding_dim']}, ema={cfg['quantizer']['ema']}",
                 f"  trained steps   {progress.get('step', '?')}"]
        if progress.get("validation"):
            v = progress["validation"]
            lines.append(f"  validation      {quality_line(v)}, usage {v['usage']:.1%}, "
                         f"perplexity {v['perplexity']:.1f}")
        lines.append(f"  health          {describe_health(meta)}")
        return "\n".join(lines)
    prior = _prior_meta(path)
    if prior is not None:
        return describe_prior(prior)
    return describe_tokens(path)


def describe_tokens(path: Path) -> str:
    """A token store's metadata and row counts per split."""
    from vqtok.storage import read_meta
    from vqtok.storage.reader import split_rows

    token_meta = read_meta(path)
    counts = split_rows(path)
    lines = [f"tokens {path}",
             f"  rows            {sum(counts.values())} ("
             + ", ".join(f"{k} {v}" for k, v in counts.items()) + ")",
             f"  grid            {token_meta.grid_h} x {token_meta.grid_w}, codebook "
             f"{token_meta.codebook_size}",
             f"  dataset         {token_meta.dataset} (fingerprint "
             f"{token_meta.dataset_fingerprint[:12]})",
             f"  checkpoint      {token_meta.checkpoint_hash}",
             f"  created         {token_meta.created_at} by vqtok {token_meta.vqtok_version}"]
    lines.append("  metadata        " + json.dumps(token_meta.extra)[:200])
    return "\n".join(lines + _describe_versions(path))


def _describe_versions(path: Path) -> list[str]:
    """One line per kept version of a versioned store: rows, what changed, when."""
    from vqtok.storage.keymap import format_counts
    from vqtok.storage.layout import FORMAT_DIRS
    from vqtok.storage.versions import StoreVersions

    root = path.parent if path.name in FORMAT_DIRS.values() else path
    versions = StoreVersions(root)
    if not versions.is_versioned():
        return []
    lines = ["  versions"]
    for v in versions.describe():
        lines.append(f"    {'*' if v.current else ' '} {v.number:<4} {v.num_rows:>9} rows  "
                     f"{v.published_at}  {format_counts(v.counts)}")
    return lines


def _prior_meta(path: Path) -> dict[str, Any] | None:
    from vqtok.tokenizer.checkpoint import CheckpointError
    from vqtok.tokenizer.prior.checkpoint import read_prior_meta

    try:
        return read_prior_meta(path)
    except CheckpointError:
        return None


def describe_prior(meta: dict[str, Any]) -> str:
    """A prior's size, training progress, held-out figures and the tokenizer it belongs to."""
    shape, model = meta["shape"], meta["config"]["model"]  # save_prior always writes these
    progress, data = meta.get("progress", {}), meta.get("data", {})
    token_meta = data.get("token_meta", {})
    classes = shape["num_classes"]
    lines = [f"prior {meta['directory']}",
             f"  weights sha256  {meta['weights_sha256']}",
             f"  model           {model['n_layers']} layers, width {model['d_model']}, "
             f"{model['n_heads']} heads, "
             + (f"{classes} classes" if classes else "unconditional"),
             f"  tokens          {shape['grid_h']} x {shape['grid_w']} grid, "
             f"codebook {shape['vocab_size']}, from {data.get('tokens', '?')}",
             f"  tokenizer       {token_meta.get('checkpoint_hash', '?')}",
             f"  trained steps   {progress.get('step', '?')} of "
             f"{progress.get('total_steps', '?')}"]
    heldout = progress.get("heldout") or {}
    if "nll_bits" in heldout:
        lines.append(f"  held-out        {heldout['nll_bits']:.3f} bits/token "
                     f"({data.get('heldout_split') or 'held-out split'}); unigram "
                     f"{heldout.get('unigram_bits', float('nan')):.3f}")
    return "\n".join(lines)
