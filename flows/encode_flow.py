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
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from vqtok.flows.errors import located
from vqtok.flows.incremental import (
    PreviousShards,
    Salvage,
    VersionPlan,
    copy_rows,
    kept_shard,
    read_plan,
    read_salvage,
    source_changes,
    written_basis,
)
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
from vqtok.storage import ShardedTokenStore, ShardSpec, TokenMeta, TokenStoreError
from vqtok.storage.keymap import Changes, KeyMap
from vqtok.storage.layout import (
    DEFAULT_SHARD_SIZE,
    KEYMAP_NAME,
    SALVAGE_NAME,
    bookkeeping_dir,
    manifest_path,
)
from vqtok.storage.layout import FORMATS as STORE_FORMATS
from vqtok.storage.manifest import Manifest
from vqtok.storage.versions import DEFAULT_KEEP_VERSIONS, StoreVersions, file_suffix
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
    num_workers: int = 0, progress: bool = True, file_suffix: str = "",
    previous: str | None = None,
) -> dict[str, Any]:
    """Write shard ``index`` of ``split`` of the version being built in ``out``, as its
    plan says (``flows.incremental``), and publish it atomically: kept whole from the
    ``previous`` version when its rows are, else from kept rows plus newly encoded ones.

    ``batch_size`` None picks one that fits this machine's GPU (256 on CPU).
    """
    store = ShardedTokenStore(out, TokenMeta.from_dict(meta), shard_size, formats,
                              file_suffix=file_suffix)
    ids, positions, encode = read_plan(out).rows(split)
    start = index * shard_size
    shard = ShardSpec(split, index, start, min(start + shard_size, len(ids)))
    result = {"split": split, "index": index, "rows": shard.num_rows, "seconds": 0.0,
              "encoded": 0, "skipped": True}
    if store.is_complete(shard):
        return result
    started = time.perf_counter()
    rows = slice(shard.start, shard.stop)
    ids, positions, encode = ids[rows], positions[rows], encode[rows]
    basis = read_plan(out).basis
    salvage = read_salvage(out)  # rows an abandoned attempt encoded: copied, not encoded
    salvaged = (encode & np.isin(ids, salvage.ids) if salvage is not None
                else np.zeros(len(ids), dtype=bool))
    encode = encode & ~salvaged
    kept = None if encode.any() or salvaged.any() or previous is None else kept_shard(
        previous, basis, split, index, ids, formats, shard_size)
    try:
        if kept is not None:
            store.adopt_shard(shard, kept)
        else:
            _write_shard(store, shard, ids, positions, encode, (previous, basis),
                         (salvage, salvaged), checkpoint, data, batch_size, device,
                         num_workers, progress)
    except OSError as exc:  # still an OSError (so retried); now it names the shard
        raise located(exc, store.tokens_dir / str(shard)) from exc
    pause_point("encode-shard-published")
    return {**result, "seconds": time.perf_counter() - started, "encoded": int(encode.sum()),
            "skipped": False}


def _write_shard(store: ShardedTokenStore, shard: ShardSpec, ids: np.ndarray,
                 positions: np.ndarray, encode: np.ndarray,
                 previous: tuple[str | None, str],
                 salvage: tuple[Salvage | None, np.ndarray],
                 checkpoint: str, data: dict[str, Any], batch_size: int | None, device: str,
                 num_workers: int, progress: bool) -> None:
    """Rows encoded, taken from the salvage of an abandoned attempt (the salvage and which
    rows) or else copied from the previous version (its root and the plan's basis), written
    in id order."""
    codes = np.empty((len(ids), *store.meta.grid_shape), dtype=store.meta.codes_dtype)
    labels = np.empty(len(ids), dtype=np.int64)
    held, salvaged = salvage
    if held is not None and salvaged.any():
        codes[salvaged], labels[salvaged] = held.rows(ids[salvaged])
    copied = ~encode & ~salvaged
    if copied.any():
        codes[copied], labels[copied] = copy_rows(str(previous[0]), previous[1], shard.split,
                                                  ids[copied])
    if encode.any():
        data_cfg = DataConfig.model_validate(data)
        source = cached_source(data_cfg)
        model = cached_model(checkpoint, device)  # once per process: per Dask worker too
        accel = Accel.for_device(model.quantizer.codebook.device)
        if batch_size is None:
            shape = (source.channels, data_cfg.image_size, data_cfg.image_size)
            batch_size = encode_batch_size(model, shape, accel, ENCODE_BATCH_SIZE)
        rows = np.flatnonzero(encode)
        done = 0
        with image_progress(f"encode {shard}", len(rows), enabled=progress) as advance:
            for batch_codes, _, batch_labels in encode_ids(
                    model, source, positions[rows], batch_size, num_workers=num_workers,
                    accel=accel):
                at = rows[done : done + len(batch_codes)]
                codes[at], labels[at] = batch_codes, batch_labels
                done += len(batch_codes)
                advance(len(batch_codes))
                pause_point("encode-batch-written")  # mid-shard: nothing published yet
    with store.open_shard(shard) as writer:
        writer.write(codes, ids, labels)


@task(name="finalize-manifest", retries=2, retry_condition_fn=retry_on_io_error,
      retry_delay_seconds=1)
def finalize_store(out: str, meta: dict[str, Any], shard_size: int, formats: list[str],
                   splits: dict[str, int], file_suffix: str = "",
                   extra: dict[str, Any] | None = None) -> str:
    store = ShardedTokenStore(out, TokenMeta.from_dict(meta), shard_size, formats,
                              file_suffix=file_suffix)
    for split, rows in splits.items():
        store.plan(split, rows)
    try:
        return str(store.finalize(extra))
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
    reencode: bool = False,
    keep_versions: int = DEFAULT_KEEP_VERSIONS,
) -> dict[str, Any]:
    """Encode every split of the dataset (the checkpoint's own unless ``data`` is given).

    ``cluster``: None encodes here, shard after shard; ``local:N`` or ``tcp://HOST:PORT``
    spreads the shards over Dask workers (``flows.dask_cluster``). ``batch_size`` None fits
    the batch to each machine's GPU. A checkpoint its training marked unhealthy is refused
    unless ``force``.

    The store is versioned (``storage.versions``): a re-run over a dataset that gained,
    lost or changed images encodes only the added and changed ones and publishes a new
    version; one over an unchanged dataset changes nothing. Another checkpoint needs a new
    folder or ``reencode``, which rebuilds every row (ids kept). ``keep_versions`` bounds
    how many versions stay on disk.
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
    if keep_versions < 1:
        raise ValueError(f"keep_versions must be at least 1, got {keep_versions}")
    # With a cluster the workers encode; here the model is only read for the metadata.
    model = cached_model(checkpoint, "cpu" if cluster else device, checkpoint_meta)
    meta = token_meta(model, source, data_cfg, checkpoint_meta)
    paths = RunPaths(Path(out))
    versions = StoreVersions(paths.root)
    with versions.lock():
        build = _plan_version(versions, source, meta, formats, shard_size, reencode)
        if build.number is None:  # nothing changed: the current version stands
            logger.info(f"{build.changes.summary()}; version {build.previous_number} stands")
            result = _summary(paths, build, formats, [], 0.0, meta)
        else:
            result = _build_version(versions, build, checkpoint, data_cfg, formats, shard_size,
                                    batch_size, device, num_workers, progress, cluster, runner,
                                    keep_versions)
    create_markdown_artifact(
        key="vqtok-encode",
        markdown=(f"### Encoded {source.name}\n\n{result['changes']}"
                  + (f" (version {result['version']})" if result["new_version"] else
                     f" (version {result['version']} stands)")
                  + "\n\n| split | images |\n|---|---:|\n"
                  + "".join(f"| {s} | {n} |\n" for s, n in result["splits"].items())
                  + f"\n{result['encoded_images']} images encoded at "
                  f"{result['images_per_second']:.0f} img/s; tokens in `{result['tokens']}`"),
        description="Token store written by encode_flow",
    )
    return result


@dataclass
class _Build:
    """What an encode will do: the changes, the version to build (None: nothing to do),
    the previous version and its folder."""

    changes: Changes
    meta: TokenMeta
    number: int | None
    previous_number: int | None
    previous_root: Path | None
    plan: VersionPlan | None = None
    repaired: int = 0  # rows of damaged shards of the previous version, encoded again
    salvaged: int = 0  # rows of an abandoned attempt's finished shards, copied


def _plan_version(versions: StoreVersions, source: Any, meta: TokenMeta, formats: list[str],
                  shard_size: int, reencode: bool) -> _Build:
    """Reconcile the source with the current version; start (or resume) the next one."""
    if reencode:
        versions.remove_plain_store()
    versions.refuse_plain_store()
    current = versions.current()
    previous_root = versions.version_root(current) if current is not None else None
    previous_keys, same_layout, damaged = None, False, np.zeros(0, np.int64)
    if previous_root is not None:
        previous = _readable(Manifest, manifest_path(previous_root), current, reencode)
        differ = [] if previous is None else meta.tokenizer_differences(previous.meta)
        if differ and not reencode:
            raise TokenStoreError(versions.root, (
                f"holds tokens of another tokenizer (different {', '.join(differ)}); write to "
                "a new output folder, or pass --reencode to rebuild the store with this one as "
                "a new version"))
        # Without its key map (only with --reencode) the ids start again from 0.
        previous_keys = _readable(KeyMap.read, bookkeeping_dir(previous_root) / KEYMAP_NAME,
                                  current, reencode)
        same_layout = (previous is not None and previous.formats == formats
                       and _shard_size_of(previous) == shard_size)
        if not reencode:
            # A shard file lost or cut since it was published: its rows are encoded again.
            damaged = PreviousShards.read(previous_root, previous_keys).damaged_ids()
    changes = source_changes(source, previous_keys)
    if (current is not None and not reencode and same_layout and not len(damaged)
            and not (len(changes.added) or len(changes.changed) or len(changes.removed))):
        _record_new_stamps(changes.keymap, previous_keys, previous_root)
        return _Build(changes, meta, None, current, previous_root)
    number = versions.next_number()
    basis = [str(current), json.dumps(meta.identity(), sort_keys=True), ",".join(formats),
             str(shard_size), str(reencode)]
    repair = np.intersect1d(damaged, changes.keymap.ids[changes.keymap.present])
    plan = VersionPlan.build(changes, list(source.splits), reencode, basis, repair)
    unfinished = number - 1
    salvage = None
    if unfinished > (current or 0):  # a version folder that was never published
        number = unfinished
        old_root = versions.version_root(unfinished)
        if written_basis(old_root) != plan.basis:  # started from other data: start again,
            salvage = None if reencode else Salvage.harvest(old_root, meta)  # rows kept
            versions.discard(unfinished)
    root = versions.version_root(number)
    root.mkdir(parents=True, exist_ok=True)
    if salvage is not None:  # the plan stays as the data asks; shard tasks read the salvage
        salvage = salvage.usable(changes.keymap, plan.encoded_ids())
        if len(salvage.ids):
            salvage.write(root)
    else:  # resuming: what the first attempt salvaged (the basis does not name it)
        salvage = read_salvage(str(root))
    store = ShardedTokenStore(root, meta, shard_size, formats, file_suffix=file_suffix(number))
    recorded = store.recorded_created_at()
    if recorded and recorded != meta.created_at:
        # Resuming: new shards carry the finished ones' creation time, so the version equals
        # an uninterrupted run byte for byte.
        meta = dataclasses.replace(meta, created_at=recorded)
    changes.keymap.write(bookkeeping_dir(root) / KEYMAP_NAME)
    plan.write(root)
    return _Build(changes, meta, number, current, previous_root, plan, len(repair),
                  len(salvage.ids) if salvage is not None else 0)


def _readable(read: Any, path: Path, number: int | None, reencode: bool) -> Any:
    """``read(path)``; when that fails, None under --reencode (the store is rebuilt), else
    one line saying the way out."""
    try:
        return read(path)
    except (TokenStoreError, OSError) as exc:
        if reencode:
            return None
        raise TokenStoreError(None, (
            f"{exc}; version {number} of this store is damaged - pass --reencode to rebuild "
            "it as a new version, or write to a new folder")) from None


def _record_new_stamps(keymap: KeyMap, previous: KeyMap | None, root: Path | None) -> None:
    """Files touched but equal (new stamps, same hashes) leave the version standing; their
    new stamps go into its key map, so the next run does not hash them again. Only the
    stamps differ, and readers never read them."""
    if (previous is not None and root is not None and np.array_equal(keymap.ids, previous.ids)
            and not np.array_equal(keymap.stamps, previous.stamps)):
        keymap.write(bookkeeping_dir(root) / KEYMAP_NAME)


def _shard_size_of(manifest: Manifest) -> int | None:
    return json.loads(manifest.path.read_text(encoding="utf-8")).get("shard_size")


def _build_version(versions: StoreVersions, build: _Build, checkpoint: str,
                   data_cfg: DataConfig, formats: list[str], shard_size: int,
                   batch_size: int | None, device: str, num_workers: int, progress: bool,
                   cluster: str | None, runner: Any, keep_versions: int) -> dict[str, Any]:
    logger = get_run_logger()
    assert build.number is not None and build.plan is not None
    root = versions.version_root(build.number)
    suffix = file_suffix(build.number)
    meta = build.meta
    store = ShardedTokenStore(root, meta, shard_size, formats, file_suffix=suffix)
    splits = {name: len(rows[0]) for name, rows in build.plan.splits.items()}
    pause_point("encode-started")
    started = time.perf_counter()
    calls = []
    for split, rows in splits.items():
        for shard in store.plan(split, rows):
            # A cache hit is only trusted while the shard's files are really there.
            done = store.is_complete(shard)
            args = dict(checkpoint=str(checkpoint), data=data_cfg.model_dump(),
                        meta=meta.to_dict(), out=str(root), split=split,
                        index=shard.index, shard_size=shard_size, formats=formats,
                        batch_size=batch_size, device=device, num_workers=num_workers,
                        progress=progress and not cluster, file_suffix=suffix,
                        previous=str(build.previous_root) if build.previous_root else None)
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
    finalize_store(str(root), meta.to_dict(), shard_size, formats, splits, suffix,
                   {"store_version": build.number})
    (bookkeeping_dir(root) / SALVAGE_NAME).unlink(missing_ok=True)  # copied into the shards now
    pause_point("encode-version-finalized")
    counts = build.changes.counts()
    versions.publish(build.number, {
        "num_rows": sum(splits.values()), "counts": counts, "previous": build.previous_number,
        "reencoded": bool(build.plan and all(e.all() for _, _, e in build.plan.splits.values())
                          and build.previous_number is not None),
        "checkpoint_hash": meta.checkpoint_hash, "dataset_fingerprint": meta.dataset_fingerprint})
    pause_point("encode-version-published")
    pruned = versions.prune(keep_versions)
    seconds = time.perf_counter() - started
    result = _summary(RunPaths(versions.root), build, formats, results, seconds, meta)
    logger.info(f"version {build.number}: {result['changes']}; encoded "
                f"{result['encoded_images']} images in {seconds:.1f}s "
                f"({result['images_per_second']:.0f} img/s); {result['skipped_shards']} of "
                f"{len(results)} shards were already done"
                + (f"; {build.salvaged} rows kept from an unfinished earlier run"
                   if build.salvaged else "")
                + (f"; removed versions {', '.join(map(str, pruned))}" if pruned else ""))
    return result


def _summary(paths: RunPaths, build: _Build, formats: list[str], results: list[dict],
             seconds: float, meta: TokenMeta) -> dict[str, Any]:
    encoded = sum(r["encoded"] for r in results if not r["skipped"])
    rate = encoded / seconds if seconds > 0 and encoded else 0.0
    keymap = build.changes.keymap
    if build.plan is not None:
        splits = {name: len(rows[0]) for name, rows in build.plan.splits.items()}
    else:
        present = keymap.splits[keymap.present]
        splits = {name: int((present == name).sum()) for name in dict.fromkeys(present.tolist())}
    version = build.number if build.number is not None else build.previous_number
    return {
        "tokens": str(paths.store),
        "manifest": str(manifest_path(StoreVersions(paths.root).version_root(version))),
        "version": version,
        "new_version": build.number is not None,
        "changes": build.changes.summary() + (
            f"; {build.repaired} rows of damaged shards encoded again" if build.repaired else ""),
        "repaired": build.repaired,
        "salvaged": build.salvaged,
        "counts": build.changes.counts(),
        "formats": formats,
        "splits": splits,
        "images": sum(splits.values()),
        "encoded_images": encoded,
        "skipped_shards": sum(1 for r in results if r["skipped"]),
        "shards": len(results),
        "seconds": seconds,
        "images_per_second": rate,
        "tokens_per_second": rate * meta.grid_h * meta.grid_w,
        "grid": list(meta.grid_shape),
        "checkpoint_hash": meta.checkpoint_hash,
    }
