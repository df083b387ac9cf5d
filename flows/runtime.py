"""What flows share: run-folder layout, per-process caches, and token metadata.

Task inputs and results are paths and small dicts; the model and the images are loaded once
per process through these caches, so a worker that runs many shards loads them once.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from vqtok.storage import TokenMeta
from vqtok.tokenizer import VQVAE, __version__, load_tokenizer
from vqtok.tokenizer.checkpoint import read_checkpoint_meta, stored_config
from vqtok.tokenizer.config import Config, ConfigError, DataConfig
from vqtok.tokenizer.sources import ImageSource, open_source
from vqtok.tokenizer.sources.imagefolder import ImageFolderSource
from vqtok.tokenizer.sources.shards import match_files
from vqtok.tokenizer.training import resolve_device


def checkpoint_config(checkpoint: str | Path) -> tuple[Config, dict[str, Any]]:
    meta = read_checkpoint_meta(checkpoint)
    return stored_config(meta), meta


def check_data_fits(model_config: Config, data: DataConfig) -> None:
    """The data a checkpoint is asked to encode has the shape its model takes, or one
    ConfigError saying which key to change (not a convolution's error from deep inside)."""
    want = model_config.data.channels
    if data.channels != want:
        raise ConfigError(
            f"{data.dataset}: data.channels is {data.channels}, the checkpoint's model takes "
            f"{want}-channel images; set data.channels: {want} (images are converted)")
    factor = 2 ** model_config.model.num_downsamples
    if data.image_size % factor:
        raise ConfigError(
            f"{data.dataset}: data.image_size {data.image_size} is not a multiple of {factor} "
            f"(the model downsamples {model_config.model.num_downsamples} times); use e.g. "
            f"data.image_size: {max(factor, data.image_size - data.image_size % factor)}")


@lru_cache(maxsize=4)
def _cached_model(checkpoint: str, device: str, weights_sha256: str) -> VQVAE:
    return load_tokenizer(checkpoint, device=resolve_device(device))


def cached_model(checkpoint: str, device: str, meta: dict[str, Any] | None = None) -> VQVAE:
    """The checkpoint's model, loaded once per process while its weights stay the same
    (a checkpoint re-written in place, by training more, is loaded again). ``meta``: its
    config.json when the caller has just read it (else it is read here)."""
    digest = (meta or read_checkpoint_meta(checkpoint))["weights_sha256"]
    return _cached_model(str(checkpoint), device, digest)


def _data_key(data: DataConfig) -> str:
    return json.dumps(data.model_dump(), sort_keys=True)


@lru_cache(maxsize=2)
def _cached_source(key: str, stamp: str) -> ImageSource:
    return open_source(DataConfig.model_validate_json(key))


def _stamp(data: DataConfig) -> str:
    """Changes when an .npz file changes, or a tar shard or Parquet file is added, removed or
    rewritten, so a long-lived process (a notebook, the test suite, ``serve``) does not
    encode a stale listing. Cheap: one stat per file. (Image folders check their own
    listing: ``ImageFolderSource.listing_unchanged``.)"""
    kind, _, where = data.dataset.partition(":")
    if kind in ("webdataset", "parquet") and where:
        return _files_stamp(where)
    if kind != "npz" or not where:
        return ""  # named datasets: fixed files under data_root
    try:
        st = os.stat(Path(where).expanduser())
    except OSError:
        return "missing"  # open_source says what is wrong
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _files_stamp(spec: str) -> str:
    folder = Path(spec).expanduser()
    try:
        files = sorted(folder.rglob("*.parquet")) if folder.is_dir() else match_files(spec)
        return "|".join(f"{p}:{st.st_size}:{st.st_mtime_ns}" for p in files
                        for st in [p.stat()])
    except OSError:
        return "missing"  # open_source says what is wrong


_FOLDERS: dict[str, ImageFolderSource] = {}


def cached_source(data: DataConfig) -> ImageSource:
    """The source of ``data``, opened once per process while its files stay the same (an
    image rewritten in place under the same name in an image folder is not noticed until the
    process restarts; incremental encodes still see it: its stamp is read again)."""
    key = _data_key(data)
    if data.dataset.startswith("imagefolder:"):
        kept = _FOLDERS.get(key)
        if kept is not None and kept.listing_unchanged():
            kept.forget_stamps()  # a file rewritten in place changes no folder's stamp
            return kept
        source = open_source(data)
        if isinstance(source, ImageFolderSource):
            while len(_FOLDERS) >= 2:
                _FOLDERS.pop(next(iter(_FOLDERS)))
            _FOLDERS[key] = source
        return source
    return _cached_source(key, _stamp(data))


def token_meta(model: VQVAE, source: ImageSource, data: DataConfig,
               checkpoint_meta: dict[str, Any]) -> TokenMeta:
    """Everything a later decode needs: codebook, grid, the data it came from, the tokenizer."""
    h, w = model.grid_shape(data.image_size, data.image_size)
    extra = {"data": data.model_dump(), "channels": source.channels,
             "image_size": data.image_size,
             "tokenizer_quality": tokenizer_quality(checkpoint_meta)}
    quantizer = (checkpoint_meta.get("config") or {}).get("quantizer") or {}
    if quantizer.get("kind", "vq") != "vq":  # vq stores stay as they were before the family
        extra["quantizer"] = {k: quantizer.get(k) for k in ("kind", "levels", "depth")}
    return TokenMeta(
        codebook_size=model.num_embeddings,
        grid_h=h,
        grid_w=w,
        dataset=source.name,
        dataset_fingerprint=source.fingerprint,
        checkpoint_hash=model.checkpoint_hash,
        vqtok_version=__version__,
        extra=extra,
        depth=model.depth,
    )


def tokenizer_quality(checkpoint_meta: dict[str, Any]) -> dict[str, Any]:
    """The tokenizer's validation PSNR, its mean-image baseline and its health verdict, as
    its training recorded them: the token store carries them to stats and summaries."""
    progress = checkpoint_meta.get("progress") or {}
    validation = progress.get("validation") or {}
    figures = {k: validation[k] for k in ("psnr", "baseline_psnr") if k in validation}
    figures["health"] = (progress.get("health") or {}).get("status", "not recorded")
    return figures
