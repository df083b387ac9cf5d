"""The key map: which id each source key holds, forever, and what its bytes hashed to.

A versioned store (``versions``) keeps one key map per version, ``keys.parquet`` beside its
manifest, with every key it has ever seen: ``key``, ``id``, ``split``, ``sha256`` of the
stored image bytes, ``stamp`` (the source's cheap "surely unchanged" marker: a file's size
and mtime) and ``present``. Removed keys stay as tombstones (``present`` false), so an id is
never given to another key and a key that comes back gets its old id and split back.
``next_id`` (in the file's metadata) is one past the largest id ever given.

``reconcile`` compares a source's keys with the previous map and says what was added,
changed, removed and left alone; only the first two need encoding.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from vqtok.files.atomic import AtomicFile
from vqtok.storage.errors import TokenStoreError

_META_KEY = b"vqtok.keymap"
_COLUMNS = ("key", "id", "split", "sha256", "stamp", "present")

#: content hashes of these source positions, in order (the source's ``content_hashes``)
HashFn = Callable[[np.ndarray], Sequence[str]]
#: splits of newly given ids, by the source's rule (every tenth id is validation)
RuleFn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class KeyMap:
    """Parallel columns, sorted by id; ``position`` is each key's index in the source this
    map was reconciled with (-1 for tombstones and for maps read from disk)."""

    keys: np.ndarray
    ids: np.ndarray
    splits: np.ndarray
    hashes: np.ndarray
    stamps: np.ndarray
    present: np.ndarray
    next_id: int
    position: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def split_rows(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, source positions) of the present rows of ``split``, by id."""
        mask = self.present & (self.splits == split)
        positions = self.position if self.position is not None else np.full(len(self), -1)
        return self.ids[mask], positions[mask]

    def write(self, path: Path) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({
            "key": pa.array(self.keys.tolist(), pa.string()),
            "id": pa.array(self.ids, pa.int64()),
            "split": pa.array(self.splits.tolist(), pa.string()),
            "sha256": pa.array(self.hashes.tolist(), pa.string()),
            "stamp": pa.array(self.stamps.tolist(), pa.string()),
            "present": pa.array(self.present, pa.bool_()),
        }).replace_schema_metadata({_META_KEY: json.dumps({"next_id": self.next_id})})
        target = AtomicFile(path)
        try:
            # Keys and hashes are all distinct: only the split column gains from a dictionary.
            pq.write_table(table, target.temp, compression="zstd", use_dictionary=["split"])
            return target.publish()
        except BaseException:
            target.abort()
            raise

    @classmethod
    def read(cls, path: Path) -> KeyMap:
        """Read once per process while the file stays the same file (a key map is written
        whole and replaced, never changed in place): the driver and the shard tasks of one
        encode both need the previous version's. Callers must not change its arrays."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise TokenStoreError(path, "no key map; the store version is incomplete") from None
        return _read_keymap(str(path), st.st_ino, st.st_size, st.st_mtime_ns)

    @classmethod
    def _read(cls, path: Path) -> KeyMap:
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path, columns=list(_COLUMNS))
            meta = json.loads((table.schema.metadata or {})[_META_KEY])
            next_id = int(meta["next_id"])
        except FileNotFoundError:
            raise TokenStoreError(path, "no key map; the store version is incomplete") from None
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise TokenStoreError(path, f"unreadable key map ({exc}); it is corrupt") from None
        column = {name: table.column(name).to_numpy(zero_copy_only=False) for name in _COLUMNS}
        arrays = {"keys": column["key"].astype(object), "ids": column["id"].astype(np.int64),
                  "splits": column["split"].astype(object),
                  "hashes": column["sha256"].astype(object),
                  "stamps": column["stamp"].astype(object),
                  "present": column["present"].astype(bool)}
        for array in arrays.values():
            array.flags.writeable = False  # shared by every reader in this process
        return cls(**arrays, next_id=next_id)


@functools.lru_cache(maxsize=4)
def _read_keymap(path: str, _inode: int, _size: int, _mtime_ns: int) -> KeyMap:
    return KeyMap._read(Path(path))


@dataclass(frozen=True)
class Changes:
    """What a source holds against the previous key map, as ids of the new map."""

    keymap: KeyMap
    added: np.ndarray
    changed: np.ndarray
    removed: np.ndarray

    @property
    def unchanged(self) -> int:
        return int(self.keymap.present.sum()) - len(self.added) - len(self.changed)

    @property
    def to_encode(self) -> np.ndarray:
        """Ids whose codes must come from the model (sorted)."""
        return np.sort(np.concatenate([self.added, self.changed]))

    def counts(self) -> dict[str, int]:
        return {"added": len(self.added), "changed": len(self.changed),
                "removed": len(self.removed), "unchanged": self.unchanged}

    def summary(self) -> str:
        return format_counts(self.counts())


def format_counts(counts: dict[str, int]) -> str:
    """The line a run reports: ``N added, N changed, N removed, N unchanged``."""
    return ", ".join(f"{counts.get(name, 0)} {name}"
                     for name in ("added", "changed", "removed", "unchanged"))


def reconcile(previous: KeyMap | None, keys: Sequence[str], stamps: Sequence[str] | None,
              hashes: HashFn, source_splits: np.ndarray, rule: RuleFn | None) -> Changes:
    """The new key map for a source of ``keys`` (one per position) and what changed.

    Without a previous map every key is new and gets its position as id, so a first version
    has the ids a plain store has. With one, known keys keep id and split; a key whose stamp
    is unchanged is taken as unchanged without reading it, others are hashed and compared;
    new keys get ids from ``next_id`` on, in source order, with the split ``rule`` gives
    their id (or the source's own split when it names its splits: ``rule`` None).
    """
    keys_arr = np.asarray(list(keys), dtype=object)
    n = len(keys_arr)
    stamps_arr = (np.asarray(list(stamps), dtype=object) if stamps is not None
                  else np.full(n, "", dtype=object))
    positions = np.arange(n, dtype=np.int64)
    source_splits = np.asarray(source_splits, dtype=object)
    _refuse_duplicates(keys_arr)
    if previous is None:
        new = KeyMap(keys=keys_arr, ids=positions.copy(), splits=source_splits.copy(),
                     hashes=_hashes(hashes, positions), stamps=stamps_arr,
                     present=np.ones(n, dtype=bool), next_id=n, position=positions)
        return Changes(new, added=positions.copy(), changed=_none(), removed=_none())

    rows = rows_of(keys_arr, previous.keys)
    known = rows >= 0
    known_rows = rows[known]
    was_present = np.zeros(n, dtype=bool)
    was_present[known] = previous.present[known_rows]
    same_stamp = np.zeros(n, dtype=bool)
    if stamps is not None:
        same_stamp[known] = (previous.stamps[known_rows] == stamps_arr[known]) & (
            stamps_arr[known] != "")
    # unchanged by stamp: nothing read. Everything else is hashed.
    trusted = was_present & same_stamp
    new_hashes = np.empty(n, dtype=object)
    new_hashes[trusted] = previous.hashes[rows[trusted]]
    hash_positions = positions[~trusted]
    new_hashes[~trusted] = _hashes(hashes, hash_positions)

    ids = np.empty(n, dtype=np.int64)
    splits = np.empty(n, dtype=object)
    ids[known] = previous.ids[known_rows]
    splits[known] = previous.splits[known_rows]
    fresh = ~known
    ids[fresh] = previous.next_id + np.arange(int(fresh.sum()), dtype=np.int64)
    splits[fresh] = rule(ids[fresh]) if rule is not None else source_splits[fresh]

    changed = was_present & ~trusted & (new_hashes != _at(previous.hashes, rows))
    added = ~was_present  # new keys, and tombstones that came back
    gone = np.ones(len(previous), dtype=bool)
    gone[known_rows] = False
    removed = previous.ids[gone & previous.present]

    # The new map: every current key, then the tombstones (old and new), sorted by id.
    tomb = gone
    all_ids = np.concatenate([ids, previous.ids[tomb]])
    order = np.argsort(all_ids, kind="stable")
    new = KeyMap(
        keys=np.concatenate([keys_arr, previous.keys[tomb]])[order],
        ids=all_ids[order],
        splits=np.concatenate([splits, previous.splits[tomb]])[order],
        hashes=np.concatenate([new_hashes, previous.hashes[tomb]])[order],
        stamps=np.concatenate([stamps_arr, previous.stamps[tomb]])[order],
        present=np.concatenate([np.ones(n, dtype=bool), np.zeros(int(tomb.sum()), bool)])[order],
        next_id=previous.next_id + int(fresh.sum()),
        position=np.concatenate([positions, np.full(int(tomb.sum()), -1, np.int64)])[order],
    )
    return Changes(new, added=np.sort(ids[added]), changed=np.sort(ids[changed]),
                   removed=np.sort(removed))


def rows_of(keys: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Row of each key in ``known`` (unique), -1 where absent: one hash join in Arrow, not a
    Python dict of every key (a folder has one key per image)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not len(keys) or not len(known):
        return np.full(len(keys), -1, dtype=np.int64)
    found = pc.index_in(pa.array(keys, pa.string()), value_set=pa.array(known, pa.string()))
    return found.fill_null(-1).to_numpy().astype(np.int64)


def _hashes(hashes: HashFn, positions: np.ndarray) -> np.ndarray:
    out = np.empty(len(positions), dtype=object)
    if len(positions):
        out[:] = list(hashes(positions))
    return out


def _at(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """values[rows], with None where rows is -1."""
    out = np.full(len(rows), None, dtype=object)
    ok = rows >= 0
    out[ok] = values[rows[ok]]
    return out


def _none() -> np.ndarray:
    return np.zeros(0, dtype=np.int64)


def _refuse_duplicates(keys: np.ndarray) -> None:
    unique, counts = np.unique(keys.astype(str), return_counts=True)
    if len(unique) != len(keys):
        raise TokenStoreError(None, f"the source gives key {unique[counts > 1][0]!r} to more "
                              "than one image; keys must be unique")
