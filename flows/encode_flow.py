"""encode_flow: every split of a dataset -> sharded Parquet/HDF5 token stores.

Each shard is one task. Its result is cached by (checkpoint hash, dataset fingerprint, shard,
formats, output folder), and the storage layer's completion records back the cache up, so a
re-run skips finished shards, redoes unfinished ones, and ends with the same files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.errors import located
from flows.progress import image_progress
from flows.retry import retry_on_io_error
from flows.runtime import RunPaths, cached_model, cached_source, checkpoint_config, token_meta
from storage import ShardedTokenStore, ShardSpec, TokenMeta
from tokenizer.config import DataConfig
from tokenizer.encode import encode_ids

DEFAULT_FORMATS = ("parquet", "hdf5")
DEFAULT_SHARD_SIZE = 10_000
DEFAULT_BATCH_SIZE = 256


def _shard_cache_key(_context: Any, params: dict[str, Any]) -> str:
    meta = params["meta"]
    parts = [meta["checkpoint_hash"], meta["dataset_fingerprint"], params["split"],
             str(params["index"]), str(params["shard_size"]), "+".join(params["formats"]),
             str(Path(params["out"]).resolve())]
    return "encode-" + hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


# Results are small dicts, persisted as JSON: nothing a later run reads back is unpickled.
@task(name="encode-shard", retries=2, retry_condition_fn=retry_on_io_error,
      retry_delay_seconds=2, cache_key_fn=_shard_cache_key, persist_result=True,
      result_serializer="json", task_run_name="encode {split}/part-{index:05d}")
def encode_shard(
    checkpoint: str, data: dict[str, Any], meta: dict[str, Any], out: str, split: str,
    index: int, shard_size: int, formats: list[str], batch_size: int, device: str,
    num_workers: int = 0, progress: bool = True,
) -> dict[str, Any]:
    """Encode rows [index * shard_size, ...) of one split and publish the shard atomically."""
    data_cfg = DataConfig.model_validate(data)
    source = cached_source(data_cfg)
    model = cached_model(checkpoint, device)
    store = ShardedTokenStore(out, TokenMeta.from_dict(meta), shard_size, formats)
    ids = source.split_ids(split)
    start = index * shard_size
    shard = ShardSpec(split, index, start, min(start + shard_size, len(ids)))
    if store.is_complete(shard):
        return {"split": split, "index": index, "rows": shard.num_rows, "seconds": 0.0,
                "skipped": True}
    started = time.perf_counter()
    shard_ids = ids[shard.start : shard.stop]
    try:
        with store.open_shard(shard) as writer, image_progress(
            f"encode {shard}", len(shard_ids), enabled=progress
        ) as advance:
            for codes, batch_ids, labels in encode_ids(model, source, shard_ids, batch_size,
                                                       model.quantizer.codebook.device,
                                                       num_workers=num_workers):
                writer.write(codes, batch_ids, labels)
                advance(len(batch_ids))
    except OSError as exc:  # still an OSError (so retried); now it names the shard
        raise located(exc, store.tokens_dir / str(shard)) from exc
    seconds = time.perf_counter() - started
    return {"split": split, "index": index, "rows": shard.num_rows, "seconds": seconds,
            "skipped": False}


@task(name="finalize-manifest", retries=2, retry_condition_fn=retry_on_io_error,
      retry_delay_seconds=1)
def finalize_store(out: str, meta: dict[str, Any], shard_size: int, formats: list[str],
                   splits: dict[str, int]) -> str:
    store = ShardedTokenStore(out, TokenMeta.from_dict(meta), shard_size, formats)
    for split, rows in splits.items():
        store.plan(split, rows)
    try:
        return str(store.finalize())
    except OSError as exc:
        raise located(exc, store.manifest_path) from exc


@flow(name="encode")
def encode_flow(
    checkpoint: str,
    out: str,
    data: dict[str, Any] | None = None,
    formats: list[str] | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "auto",
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Encode every split of the dataset (the checkpoint's own unless ``data`` is given)."""
    logger = get_run_logger()
    formats = list(formats or DEFAULT_FORMATS)
    config, _ = checkpoint_config(checkpoint)
    data_cfg = DataConfig.model_validate(data) if data else config.data
    source = cached_source(data_cfg)
    model = cached_model(checkpoint, device)
    meta = token_meta(model, source, data_cfg)
    paths = RunPaths(Path(out))
    store = ShardedTokenStore(paths.root, meta, shard_size, formats)
    recorded = store.recorded_created_at()
    if recorded and recorded != meta.created_at:
        # Resuming: new shards carry the finished ones' creation time, so the store equals
        # an uninterrupted run byte for byte.
        meta = dataclasses.replace(meta, created_at=recorded)
        store = ShardedTokenStore(paths.root, meta, shard_size, formats)
    splits = {name: len(ids) for name, ids in source.splits.items()}
    started = time.perf_counter()
    results = []
    for split, rows in splits.items():
        for shard in store.plan(split, rows):
            # A cache hit is only trusted while the shard's files are really there.
            done = store.is_complete(shard)
            run = encode_shard.with_options(refresh_cache=not done)
            result = run(
                str(checkpoint), data_cfg.model_dump(), meta.to_dict(), str(paths.root), split,
                shard.index, shard_size, formats, batch_size, device, num_workers, progress,
            )
            results.append({**result, "skipped": done or result["skipped"]})
    manifest = finalize_store(str(paths.root), meta.to_dict(), shard_size, formats, splits)
    seconds = time.perf_counter() - started
    encoded = sum(r["rows"] for r in results if not r["skipped"])
    skipped = sum(1 for r in results if r["skipped"])
    rate = encoded / seconds if seconds > 0 and encoded else 0.0
    logger.info(f"encoded {encoded} images in {seconds:.1f}s ({rate:.0f} img/s); "
                f"{skipped} of {len(results)} shards were already done")
    summary = {
        "tokens": str(paths.tokens),
        "manifest": manifest,
        "formats": formats,
        "images": sum(splits.values()),
        "encoded_images": encoded,
        "skipped_shards": skipped,
        "shards": len(results),
        "seconds": seconds,
        "images_per_second": rate,
        "tokens_per_second": rate * meta.grid_h * meta.grid_w,
        "grid": [meta.grid_h, meta.grid_w],
        "checkpoint_hash": meta.checkpoint_hash,
    }
    create_markdown_artifact(
        key="vqtok-encode",
        markdown=(f"### Encoded {source.name}\n\n| split | images |\n|---|---:|\n"
                  + "".join(f"| {s} | {n} |\n" for s, n in splits.items())
                  + f"\n{encoded} images encoded at {rate:.0f} img/s, {skipped} shards skipped; "
                  f"tokens in `{paths.tokens}`"),
        description="Token store written by encode_flow",
    )
    return summary
