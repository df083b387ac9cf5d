"""What one encode of a versioned store does: which rows the new version holds, which of
them the model must encode, and which come unchanged from the previous version.

The driver reconciles the source with the previous version's key map (``storage.keymap``)
and writes the result as the new version's plan (``plan.npz`` and ``plan.json`` beside its
manifest). Shard tasks, here or on Dask workers, read the plan: a shard whose rows are all
unchanged and equal to a shard of the previous version is hard-linked from it; any other is
written from the previous version's rows plus newly encoded ones. The plan's basis (a
digest of everything it was computed from) tells a re-run whether an unfinished version
folder can be resumed or must be started again. A folder started again (the data changed
since it was begun, say a bad image fixed or a folder grown after a kill) hands its finished
rows on as a salvage (``salvage.npz``): rows whose image is unchanged are copied from it,
not encoded again.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from vqtok.files.atomic import atomic_path, write_json_atomic
from vqtok.storage.errors import TokenStoreError
from vqtok.storage.grid import TokenGrid, concat_grids
from vqtok.storage.keymap import Changes, KeyMap, reconcile, rows_of
from vqtok.storage.layout import (
    KEYMAP_NAME,
    PLAN_ARRAYS_NAME,
    PLAN_INFO_NAME,
    SALVAGE_NAME,
    bookkeeping_dir,
    manifest_path,
)
from vqtok.storage.manifest import Manifest, load_shard, looks_intact
from vqtok.storage.meta import TokenMeta
from vqtok.storage.sharded import finished_shard_rows
from vqtok.tokenizer.sources import ImageSource
from vqtok.tokenizer.splits import holdout_split_of


def source_changes(source: ImageSource, previous: KeyMap | None) -> Changes:
    """The source's keys against the previous key map (None: a first version)."""
    split_of = np.empty(len(source), dtype=object)
    for name, ids in source.splits.items():
        split_of[ids] = name
    rule = holdout_split_of if source.split_rule else None
    return reconcile(previous, source.item_keys(), source.item_stamps(),
                     source.content_hashes, split_of, rule)


@dataclass(frozen=True)
class VersionPlan:
    """Per split, by id: the ids of the new version, their source positions, and which
    must be encoded (the others are copied from the previous version)."""

    splits: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]
    basis: str

    @classmethod
    def build(cls, changes: Changes, split_order: Sequence[str], reencode: bool,
              basis: Sequence[str], repair: np.ndarray | None = None) -> VersionPlan:
        """``repair``: ids whose previous rows are lost (damaged shards), encoded again."""
        keymap = changes.keymap
        encode_ids = changes.to_encode
        if repair is not None and len(repair):
            encode_ids = np.union1d(encode_ids, repair)
        present_splits = set(keymap.splits[keymap.present].tolist())
        names = [*split_order, *sorted(present_splits - set(split_order))]
        splits = {}
        for name in names:
            ids, positions = keymap.split_rows(name)
            encode = np.ones(len(ids), bool) if reencode else np.isin(ids, encode_ids)
            splits[name] = (ids, positions, encode)
        digest = hashlib.sha256("\0".join(basis).encode())
        for column in (keymap.keys, keymap.splits, keymap.hashes):
            digest.update("\0".join(map(str, column.tolist())).encode())
        digest.update(keymap.ids.tobytes() + keymap.present.tobytes() + encode_ids.tobytes())
        return cls(splits, digest.hexdigest())

    def rows(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.splits[split]

    def encoded_ids(self) -> np.ndarray:
        """Ids of every row the plan encodes, sorted."""
        parts = [ids[encode] for ids, _, encode in self.splits.values()]
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    def write(self, version_root: Path) -> None:
        """The arrays first, then plan.json naming the basis: the plan is whole once the
        JSON exists."""
        folder = bookkeeping_dir(version_root)
        arrays = {}
        for i, (ids, positions, encode) in enumerate(self.splits.values()):
            arrays.update({f"ids_{i}": ids, f"positions_{i}": positions, f"encode_{i}": encode})
        save_npz_atomic(folder / PLAN_ARRAYS_NAME, arrays)
        write_json_atomic(folder / PLAN_INFO_NAME, {"basis": self.basis,
                                               "splits": list(self.splits)})


def save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Arrays as one .npz that appears whole or not at all (a handle, so no suffix added)."""
    with atomic_path(path) as temp, open(temp, "wb") as handle:
        np.savez(handle, **arrays)


def written_basis(version_root: Path) -> str | None:
    """The basis of the plan an unfinished version folder was started with, if any."""
    try:
        info = json.loads((bookkeeping_dir(version_root) / PLAN_INFO_NAME).read_text())
        return str(info["basis"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_plan(version_root: str) -> VersionPlan:
    """The plan, read once per process while plan.json stays the same file (a version's plan
    never changes once its shards run; a folder started again gets a new one)."""
    info = (bookkeeping_dir(Path(version_root)) / PLAN_INFO_NAME).stat()
    return _read_plan(version_root, info.st_mtime_ns, info.st_ino)


@functools.lru_cache(maxsize=2)
def _read_plan(version_root: str, _mtime_ns: int, _inode: int) -> VersionPlan:
    folder = bookkeeping_dir(Path(version_root))
    info = json.loads((folder / PLAN_INFO_NAME).read_text(encoding="utf-8"))
    with np.load(folder / PLAN_ARRAYS_NAME, allow_pickle=False) as arrays:
        splits = {name: (arrays[f"ids_{i}"], arrays[f"positions_{i}"], arrays[f"encode_{i}"])
                  for i, name in enumerate(info["splits"])}
    return VersionPlan(splits, str(info["basis"]))


@dataclass(frozen=True)
class Salvage:
    """Rows an unfinished version had finished when a re-run gave it up: each with its key
    and the content hash of the image it was encoded from, and its id in the folder it was
    read from. Matched by key, so rows survive ids given afresh (a first version numbers
    its images by position)."""

    keys: np.ndarray
    ids: np.ndarray  # sorted
    hashes: np.ndarray
    codes: np.ndarray
    labels: np.ndarray

    @classmethod
    def harvest(cls, version_root: Path, meta: TokenMeta) -> Salvage | None:
        """What the unfinished folder holds for a tokenizer of ``meta``: its finished shards
        (keys and hashes from its key map) and its own salvage; None when nothing."""
        try:
            parts = [part for part in [read_salvage(str(version_root))] if part is not None]
        except TokenStoreError:  # damaged: its rows are encoded again
            parts = []
        try:
            keymap = KeyMap.read(bookkeeping_dir(version_root) / KEYMAP_NAME)
        except TokenStoreError:
            keymap = None
        for grid in finished_shard_rows(version_root, meta) if keymap is not None else []:
            rows = np.minimum(np.searchsorted(keymap.ids, grid.ids), len(keymap.ids) - 1)
            if np.array_equal(keymap.ids[rows], grid.ids):
                parts.append(cls(keymap.keys[rows], grid.ids, keymap.hashes[rows], grid.codes,
                                 grid.labels))
        if not parts:
            return None
        keys = np.concatenate([part.keys for part in parts])
        _, first = np.unique(keys.astype(str), return_index=True)  # a row found twice: once
        return cls(*(np.concatenate([getattr(part, name) for part in parts])[first]
                     for name in ("keys", "ids", "hashes", "codes", "labels")))

    def usable(self, keymap: KeyMap, wanted: np.ndarray) -> Salvage:
        """The rows whose key ``keymap`` holds with the same hash and an id among ``wanted``,
        by those ids."""
        rows = rows_of(self.keys, keymap.keys)
        keep = rows >= 0
        found = rows[keep]
        keep[keep] = (keymap.present[found] & (keymap.hashes[found] == self.hashes[keep])
                      & np.isin(keymap.ids[found], wanted))
        ids = keymap.ids[rows[keep]]
        order = np.argsort(ids, kind="stable")
        return Salvage(self.keys[keep][order], ids[order], self.hashes[keep][order],
                       self.codes[keep][order], self.labels[keep][order])

    def rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(codes, labels) of ``ids``, all of them held here."""
        where = np.searchsorted(self.ids, ids)
        return self.codes[where], self.labels[where]

    def write(self, version_root: Path) -> None:
        """Before the plan: a plan that takes rows from a salvage finds it there."""
        save_npz_atomic(bookkeeping_dir(version_root) / SALVAGE_NAME, {
            "keys": self.keys.astype(str), "ids": self.ids, "hashes": self.hashes.astype(str),
            "codes": self.codes, "labels": self.labels})


def read_salvage(version_root: str) -> Salvage | None:
    """The version folder's salvage, once per process while it stays the same file."""
    try:
        info = (bookkeeping_dir(Path(version_root)) / SALVAGE_NAME).stat()
    except FileNotFoundError:
        return None
    return _read_salvage(version_root, info.st_mtime_ns, info.st_ino)


@functools.lru_cache(maxsize=2)
def _read_salvage(version_root: str, _mtime_ns: int, _inode: int) -> Salvage:
    path = bookkeeping_dir(Path(version_root)) / SALVAGE_NAME
    try:
        with np.load(path, allow_pickle=False) as data:
            return Salvage(data["keys"].astype(object), data["ids"],
                           data["hashes"].astype(object), data["codes"], data["labels"])
    except (OSError, ValueError, KeyError) as exc:
        raise TokenStoreError(path, f"unreadable ({exc}); delete it and re-run: its rows are "
                              "then encoded again") from None


@dataclass(frozen=True)
class PreviousShards:
    """The previous version's shards, by split: each one's ids (from the version's key map,
    so no token file is read) and whether its files are all there at their recorded sizes.
    A missing or cut file makes its rows be encoded again rather than copied."""

    root: Path
    manifest: Manifest
    ids: dict[str, list[np.ndarray]]
    intact: dict[str, list[bool]]

    @classmethod
    def read(cls, root: Path, keymap: KeyMap | None = None) -> PreviousShards:
        """``keymap``: the version's key map when the caller has already read it."""
        manifest = Manifest(manifest_path(root))
        if keymap is None:
            keymap = KeyMap.read(bookkeeping_dir(root) / KEYMAP_NAME)
        ids: dict[str, list[np.ndarray]] = {}
        intact: dict[str, list[bool]] = {}
        for split, rows in manifest.split_rows.items():
            split_ids = keymap.split_rows(split)[0]
            if len(split_ids) != rows:
                raise TokenStoreError(manifest.path, (
                    f"lists {rows} rows of split {split} but its key map {len(split_ids)}; the "
                    "version is damaged - re-run with --reencode"))
            per_format = [manifest.shard_files(fmt, split) for fmt in manifest.formats]
            bounds = np.cumsum([0, *(f.num_rows for f in per_format[0])])
            ids[split] = [split_ids[a:b] for a, b in itertools.pairwise(bounds)]
            intact[split] = [all(looks_intact(files[i]) for files in per_format)
                             for i in range(len(per_format[0]))]
        return cls(root, manifest, ids, intact)

    def damaged_ids(self) -> np.ndarray:
        """Ids of the rows in shards with a file missing or of the wrong size (sorted)."""
        parts = [ids for split in self.ids
                 for ids, ok in zip(self.ids[split], self.intact[split], strict=True) if not ok]
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    def rows(self, split: str) -> TokenGrid:
        """The rows of ``split`` in its intact shards, each checked against its sha256."""
        fmt = self.manifest.pick_format(None)
        shards = [shard for shard, ok in zip(self.manifest.shard_files(fmt, split),
                                             self.intact.get(split, []), strict=False) if ok]
        return concat_grids([load_shard(s, fmt, self.manifest, verify=True) for s in shards],
                            self.manifest.meta)


@functools.lru_cache(maxsize=2)
def previous_shards(previous_root: str, basis: str) -> PreviousShards:
    """The previous version as the plan of ``basis`` saw it, once per process and plan."""
    return PreviousShards.read(Path(previous_root))


@functools.lru_cache(maxsize=2)
def _previous_rows(previous_root: str, basis: str, split: str) -> TokenGrid:
    return previous_shards(previous_root, basis).rows(split)


def copy_rows(previous_root: str, basis: str, split: str,
              ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes, labels) of ``ids`` (not empty) as the previous version holds them."""
    grid = _previous_rows(previous_root, basis, split)
    where = np.searchsorted(grid.ids, ids)
    if len(ids) and (where.max() >= len(grid.ids) or not np.array_equal(grid.ids[where], ids)):
        raise RuntimeError(f"{previous_root}: split {split} lacks rows its key map lists; the "
                           "previous version was damaged while this one was built - re-run")
    return grid.codes[where], grid.labels[where]


def kept_shard(previous_root: str, basis: str, split: str, index: int, ids: np.ndarray,
               formats: Sequence[str], shard_size: int) -> dict[str, Path] | None:
    """The previous version's files of shard ``index`` when they are intact, hold exactly
    ``ids`` in every wanted format and were cut at the same shard size; None otherwise."""
    previous = previous_shards(previous_root, basis)
    manifest = previous.manifest
    data = json.loads(manifest.path.read_text(encoding="utf-8"))
    if data.get("shard_size") != shard_size or set(formats) - set(manifest.formats):
        return None
    if split not in previous.ids or index >= len(previous.ids[split]):
        return None
    if not previous.intact[split][index] or not np.array_equal(previous.ids[split][index], ids):
        return None
    return {fmt: manifest.shard_files(fmt, split)[index].path for fmt in formats}
