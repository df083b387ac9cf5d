"""Flat memmap export for nanoGPT-style prior training loops."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from vqtok.files.atomic import AtomicFile, write_json_atomic
from vqtok.storage.errors import TokenStoreError
from vqtok.storage.manifest import Manifest, load_shard
from vqtok.storage.reader import load_grid

SIDECAR_KIND = "vqtok-memmap-export"


def sidecar_path(out: Path) -> Path:
    return out.with_suffix(".json")


def labels_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.labels.npy")


def export_memmap(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    split: str | None = None,
    verify: bool = True,
) -> Path:
    """Write all codes as one flat .npy (row-major N*h*w tokens) plus a JSON sidecar.

    The .npy is uint16 (int32 for codebooks over 65536) so ``np.load(out, mmap_mode="r")`` or
    ``np.memmap`` can serve random windows without loading the set; labels go to
    ``<stem>.labels.npy`` for class-conditional priors. Sharded stores are copied shard by
    shard, so memory stays at one shard. The sidecar is written last: if it exists, the export
    is complete. Returns the sidecar path.
    """
    out = Path(out)
    if out.suffix != ".npy":
        raise TokenStoreError(out, "export target must end in .npy")
    source = Path(path)
    if source.is_dir():
        manifest = Manifest.find(source)
        meta = manifest.meta
        rows = manifest.num_rows(split)
        fmt = manifest.pick_format(None)
        pieces = (
            load_shard(shard, fmt, manifest, verify) for shard in manifest.shard_files(fmt, split)
        )
    else:
        grid = load_grid(source, split=split, verify=verify)
        meta, rows, pieces = grid.meta, grid.num_rows, iter([grid])

    # An old sidecar must not describe the new, half-written files.
    sidecar_path(out).unlink(missing_ok=True)
    per_row = meta.tokens_per_row
    codes_target, labels_target = AtomicFile(out), AtomicFile(labels_path(out))
    try:
        codes = np.lib.format.open_memmap(
            codes_target.temp, mode="w+", dtype=meta.codes_dtype, shape=(rows * per_row,)
        )
        labels = np.lib.format.open_memmap(
            labels_target.temp, mode="w+", dtype=np.int32, shape=(rows,)
        )
        start = 0
        for piece in pieces:
            stop = start + piece.num_rows
            codes[start * per_row : stop * per_row] = piece.codes.reshape(-1)
            labels[start:stop] = piece.labels
            start = stop
        if start != rows:
            raise TokenStoreError(
                source, f"read {start} rows but the store lists {rows}; it is corrupt"
            )
        codes.flush()
        labels.flush()
        del codes, labels
    except BaseException:
        codes_target.abort()
        labels_target.abort()
        raise
    codes_target.publish()
    labels_target.publish()
    sidecar = {
        "kind": SIDECAR_KIND,
        "meta": meta.to_dict(),
        "shape": [rows, *meta.grid_shape],
        "dtype": np.dtype(meta.codes_dtype).name,
        "split": split,
        "tokens_file": out.name,
        "labels_file": labels_path(out).name,
    }
    return write_json_atomic(sidecar_path(out), sidecar)


def read_sidecar(out: str | os.PathLike[str]) -> dict[str, Any]:
    """The sidecar of an export made by export_memmap."""
    out = Path(out)
    path = sidecar_path(out)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenStoreError(path, "no export sidecar; run storage.export_memmap first") from None
    except ValueError as exc:
        raise TokenStoreError(path, f"unreadable JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("kind") != SIDECAR_KIND:
        raise TokenStoreError(path, "not a vqtok memmap export sidecar")
    return data
