"""encode_flow: every split of a dataset -> sharded Parquet/HDF5 token stores.

Each shard is one task. Its result is cached by (checkpoint hash, dataset fingerprint, shard,
formats, output folder), and the storage layer's completion records back the cache up, so a
re-run skips finished shards, redoes unfinished ones, and ends with the same files.

By default the shards run one after another in this process. With ``cluster`` (``local:N`` or
a Dask scheduler address) they are submitted through prefect-dask's ``DaskTaskRunner`` to
Dask workers; each worker process loads the model and the dataset once (the per-process
caches of ``flows.runtime``), on its own GPU when it has one, and writes its shards through
``ShardedTokenStore``, whose per-shard records need no coordination; the manifest is then
assembled here, as in a single-process run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from vqtok.flows.errors import located
from vqtok.flows.progress import image_progress
from vqtok.flows.retry import retry_on_io_error
from vqtok.flows.run_folder import RunPaths
from vqtok.flows.runtime import (
    cached_model,
    cached_source,
    check_data_fits,
    checkpoint_config,
    token_meta,
)
from vqtok.storage import ShardedTokenStore, ShardSpec, TokenMeta
from vqtok.storage.layout import DEFAULT_SHARD_SIZE
from vqtok.storage.layout import FORMATS as STORE_FORMATS
from vqtok.tokenizer.accel import Accel, encode_batch_size
from vqtok.tokenizer.config import ENCODE_BATCH_SIZE, DataConfig
from vqtok.tokenizer.encode import encode_ids
from vqtok.tokenizer.faults import pause_point
from vqtok.tokenizer.health import require_healthy


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
    index: int, shard_size: int, formats: list[str], batch_size: int | None, device: str,
    num_workers: int = 0, progress: bool = True,
) -> dict[str, Any]:
    """Encode rows [index * shard_size, ...) of one split and publish the shard atomically.

    ``batch_size`` None picks one that fits this machine's GPU (256 on CPU).
    """
    data_cfg = DataConfig.model_validate(data)
    source = cached_source(data_cfg)
    model = cached_model(checkpoint, device)  # once per process: per Dask worker too
    accel = Accel.for_device(model.quantizer.codebook.device)
    if batch_size is None:
        shape = (source.channels, data_cfg.image_size, data_cfg.image_size)
        batch_size = encode_batch_size(model, shape, accel, ENCODE_BATCH_SIZE)
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
                                                       num_workers=num_workers, accel=accel):
                writer.write(codes, batch_ids, labels)
                advance(len(batch_ids))
                pause_point("encode-batch-written")  # mid-write: only the temp file exists
    except OSError as exc:  # still an OSError (so retried); now it names the shard
        raise located(exc, store.tokens_dir / str(shard)) from exc
    seconds = time.perf_counter() - started
    pause_point("encode-shard-published")
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


@flow(name="encode-shards-on-dask")
def encode_shards_on_dask(calls: list[dict[str, Any]], cluster: str,
                          progress: bool = True) -> list[dict]:
    """Submit every shard at once (run with a ``DaskTaskRunner``) and wait for all of them,
    failing fast on workers that cannot import vqtok, keep dying or are all gone."""
    from prefect.context import FlowRunContext
    from vqtok.flows.dask_cluster import check_workers, wait_for_all

    client = FlowRunContext.get().task_runner.client
    check_workers(client, cluster)
    futures = [encode_shard.with_options(refresh_cache=call["refresh"]).submit(**call["args"])
               for call in calls]
    total = sum(call["rows"] for call in calls)
    with image_progress("encode (Dask)", total, enabled=progress) as advance:
        return wait_for_all(futures, client, cluster, lambda result: advance(result["rows"]))


@flow(name="encode")
def encode_flow(
    checkpoint: str,
    out: str,
    data: dict[str, Any] | None = None,
    formats: list[str] | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    batch_size: int | None = ENCODE_BATCH_SIZE,
    device: str = "auto",
    num_workers: int = 0,
    progress: bool = True,
    cluster: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Encode every split of the dataset (the checkpoint's own unless ``data`` is given).

    ``cluster``: None encodes here, shard after shard; ``local:N`` or ``tcp://HOST:PORT``
    spreads the shards over Dask workers (``flows.dask_cluster``). ``batch_size`` None fits
    the batch to each machine's GPU. A checkpoint its training marked unhealthy is refused
    unless ``force``.
    """
    logger = get_run_logger()
    formats = list(formats or STORE_FORMATS)
    runner = None
    if cluster:
        from prefect.context import FlowRunContext
        from vqtok.flows.dask_cluster import dask_task_runner

        context = FlowRunContext.get()
        api_url = str(context.client.api_url) if context and context.client else None
        runner = dask_task_runner(cluster, api_url)  # fails now on a bad spec or extra
    config, checkpoint_meta = checkpoint_config(checkpoint)
    require_healthy(checkpoint_meta, force)
    data_cfg = DataConfig.model_validate(data) if data else config.data
    check_data_fits(config, data_cfg)
    source = cached_source(data_cfg)
    # With a cluster the workers encode; here the model is only read for the metadata.
    model = cached_model(checkpoint, "cpu" if cluster else device, checkpoint_meta)
    meta = token_meta(model, source, data_cfg, checkpoint_meta)
    paths = RunPaths(Path(out))
    store = ShardedTokenStore(paths.root, meta, shard_size, formats)
    recorded = store.recorded_created_at()
    if recorded and recorded != meta.created_at:
        # Resuming: new shards carry the finished ones' creation time, so the store equals
        # an uninterrupted run byte for byte.
        meta = dataclasses.replace(meta, created_at=recorded)
        store = ShardedTokenStore(paths.root, meta, shard_size, formats)
    splits = {name: len(ids) for name, ids in source.splits.items()}
    pause_point("encode-started")
    started = time.perf_counter()
    calls = []
    for split, rows in splits.items():
        for shard in store.plan(split, rows):
            # A cache hit is only trusted while the shard's files are really there.
            done = store.is_complete(shard)
            args = dict(checkpoint=str(checkpoint), data=data_cfg.model_dump(),
                        meta=meta.to_dict(), out=str(paths.root), split=split,
                        index=shard.index, shard_size=shard_size, formats=formats,
                        batch_size=batch_size, device=device, num_workers=num_workers,
                        progress=progress and not cluster)
            calls.append({"done": done, "refresh": not done, "rows": shard.num_rows,
                          "args": args})
    if runner is not None:
        logger.info(f"encoding {len(calls)} shards on Dask cluster {cluster}")
        outcomes = encode_shards_on_dask.with_options(task_runner=runner)(
            [{k: c[k] for k in ("refresh", "rows", "args")} for c in calls], cluster, progress)
    else:
        outcomes = [encode_shard.with_options(refresh_cache=c["refresh"])(**c["args"])
                    for c in calls]
    results = [{**result, "skipped": call["done"] or result["skipped"]}
               for call, result in zip(calls, outcomes, strict=True)]
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
        "grid": list(meta.grid_shape),
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
