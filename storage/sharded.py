"""Sharded token store: resumable, and writable by independent worker processes."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from vqtok.files.atomic import is_temp, stale_temps, temp_path_for, write_json_atomic
from vqtok.storage.errors import TokenStoreError
from vqtok.storage.grid import TokenGrid
from vqtok.storage.hdf5 import HDF5TokenWriter
from vqtok.storage.layout import (
    BOOKKEEPING_DIR,
    DEFAULT_SHARD_SIZE,
    FORMAT_DIRS,
    FORMATS,
    LAYOUT_VERSION,
    MANIFEST_KIND,
    MANIFEST_NAME,
    RECORD_KIND,
    RECORDS_DIR,
    STORE_FOLDERS,
    TOKENS_DIR,
    VERSION_FILES,
    ShardSpec,
    bookkeeping_dir,
    legacy_manifest_path,
    legacy_records,
    manifest_path,
    read_json,
    record_relpath,
    resolve,
    shard_relpath,
)
from vqtok.storage.manifest import READERS, sha256_file
from vqtok.storage.meta import TokenMeta
from vqtok.storage.parquet import ParquetTokenWriter
from vqtok.storage.writer import PublishOnSuccess, check_split_name


class ShardedTokenStore:
    """``OUT/tokens/<split>/part-NNNNN.parquet``, ``OUT/hdf5/<split>/part-NNNNN.h5`` and the
    bookkeeping in ``OUT/.vqtok/`` (see ``layout``).

    A shard is complete once its record exists (written after its files are published), so a
    re-run skips complete shards and rewrites the rest from scratch; since writers lay files
    out by row count only, the result equals an uninterrupted run byte for byte (up to
    ``created_at``, fixed by passing it in ``meta``).

    For multi-process writing, plan in the driver and ship the store (it pickles) or just the
    ShardSpecs plus the same ``meta`` to workers: ``open_shard`` needs no shared state, and only
    ``finalize()`` in the driver reads all records to build the manifest.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        meta: TokenMeta,
        shard_size: int = DEFAULT_SHARD_SIZE,
        formats: Sequence[str] = ("parquet", "hdf5"),
        *,
        parquet_options: dict[str, Any] | None = None,
        hdf5_options: dict[str, Any] | None = None,
        file_suffix: str = "",
    ) -> None:
        self.root = Path(root)
        self.file_suffix = file_suffix
        self.tokens_dir = self.root / TOKENS_DIR
        self.meta = meta
        if (
            isinstance(shard_size, bool)
            or not isinstance(shard_size, (int, np.integer))
            or shard_size < 1
        ):
            raise TokenStoreError(
                self.tokens_dir, f"shard_size must be a positive int, got {shard_size!r}"
            )
        self.shard_size = int(shard_size)
        formats = tuple(formats)
        if not formats or len(set(formats)) != len(formats) or set(formats) - set(FORMATS):
            raise TokenStoreError(
                self.tokens_dir, f"formats must be distinct names from {FORMATS}, got {formats!r}"
            )
        self.formats = formats
        self.parquet_options = dict(parquet_options or {})
        self.hdf5_options = dict(hdf5_options or {})
        self._plans: dict[str, list[ShardSpec]] = {}

    # -- planning ---------------------------------------------------------------------------

    def plan(self, split: str, num_rows: int) -> list[ShardSpec]:
        """Shards of ``shard_size`` rows covering rows [0, num_rows) of ``split``.

        An empty split gets no shards but is still listed (with 0 rows) by finalize().
        """
        check_split_name(split, self.tokens_dir)
        self._refuse_legacy_layout()
        if (
            isinstance(num_rows, bool)
            or not isinstance(num_rows, (int, np.integer))
            or num_rows < 0
        ):
            raise TokenStoreError(
                self.tokens_dir, f"num_rows must be an int >= 0, got {num_rows!r}"
            )
        num_rows = int(num_rows)
        shards = [
            ShardSpec(split, index, start, min(start + self.shard_size, num_rows))
            for index, start in enumerate(range(0, num_rows, self.shard_size))
        ]
        planned = self._plans.get(split)
        if planned is not None and planned != shards:
            rows = planned[-1].stop if planned else 0
            raise TokenStoreError(
                self.tokens_dir,
                f"split {split!r} was already planned with {rows} rows, now {num_rows}",
            )
        self._plans[split] = shards
        return list(shards)

    def _refuse_legacy_layout(self) -> None:
        """A layout-1 store here still loads, but new shards must not be mixed into it."""
        if legacy_manifest_path(self.tokens_dir).is_file() or legacy_records(self.tokens_dir):
            raise TokenStoreError(
                self.tokens_dir,
                "holds a token store of an earlier vqtok layout (it still loads for reading); "
                "write new tokens to a new output folder",
            )

    def _check_spec(self, shard: ShardSpec) -> None:
        check_split_name(shard.split, self.tokens_dir)
        if (
            shard.index < 0
            or shard.start != shard.index * self.shard_size
            or not (0 < shard.num_rows <= self.shard_size)
        ):
            raise TokenStoreError(
                self.tokens_dir,
                f"{shard} rows [{shard.start}, {shard.stop}) do not fit "
                f"shard_size {self.shard_size}; "
                "use the ShardSpecs returned by plan()",
            )

    # -- paths ------------------------------------------------------------------------------

    def shard_path(self, shard: ShardSpec, fmt: str) -> Path:
        return resolve(self.root, self.shard_relpath(shard, fmt), self.root)

    def shard_relpath(self, shard: ShardSpec, fmt: str) -> str:
        return shard_relpath(shard, fmt, self.file_suffix)

    def record_path(self, shard: ShardSpec) -> Path:
        return resolve(bookkeeping_dir(self.root), record_relpath(shard), self.root)

    @property
    def manifest_path(self) -> Path:
        return manifest_path(self.root)

    # -- completion -------------------------------------------------------------------------

    def _record(self, shard: ShardSpec) -> dict[str, Any] | None:
        """The shard's record if it is complete for every format of this store, else None.

        A record from another tokenizer or another shard size is an error, not "incomplete":
        silently overwriting or mixing tokens of two tokenizers would be worse.
        """
        path = self.record_path(shard)
        if not path.is_file():
            return None
        try:
            record = read_json(path, RECORD_KIND)
        except TokenStoreError:
            return None  # a torn or foreign record: redo the shard
        theirs = TokenMeta.from_dict(record.get("meta"), where=path)
        differ = self.meta.differences(theirs)
        if differ:
            raise TokenStoreError(
                path,
                f"shard was written with different {', '.join(differ)} than this store; "
                f"write to a new output folder or delete the token store in {self.root} "
                f"({', '.join(name + '/' for name in STORE_FOLDERS)})",
            )
        if (record.get("start"), record.get("stop")) != (shard.start, shard.stop):
            raise TokenStoreError(
                path,
                f"shard covers rows [{record.get('start')}, {record.get('stop')}) but this plan "
                f"needs [{shard.start}, {shard.stop}); the shard size changed - use the old "
                f"shard_size or a new output folder",
            )
        files = record.get("files", {})
        for fmt in self.formats:
            entry = files.get(fmt)
            if not isinstance(entry, dict):
                return None
            file = self.shard_path(shard, fmt)
            if not file.is_file() or file.stat().st_size != entry.get("bytes"):
                return None
        return record

    def is_complete(self, shard: ShardSpec, *, verify_hash: bool = False) -> bool:
        """True when the shard's files and record are in place (hashes too, if asked)."""
        self._check_spec(shard)
        record = self._record(shard)
        if record is None:
            return False
        if verify_hash:
            for fmt in self.formats:
                if sha256_file(self.shard_path(shard, fmt)) != record["files"][fmt]["sha256"]:
                    return False
        return True

    def recorded_created_at(self) -> str | None:
        """The creation time of shards already written for this store's tokens, if any.

        A resumed run passes it back in ``meta`` so its new shards carry the same time as the
        finished ones: the store then equals an uninterrupted run byte for byte. Records of
        other tokenizers or data are ignored here (resuming onto them is refused later).
        """
        times = []
        for path in (bookkeeping_dir(self.root) / RECORDS_DIR).glob("*/*.json"):
            try:
                theirs = TokenMeta.from_dict(read_json(path, RECORD_KIND).get("meta"), where=path)
            except TokenStoreError:
                continue  # torn or foreign: that shard is redone anyway
            if not self.meta.differences(theirs) and theirs.created_at:
                times.append(theirs.created_at)
        return min(times) if times else None

    def open_shard(self, shard: ShardSpec) -> ShardWriter:
        """Start (or restart) a shard: leftovers of an earlier attempt are removed first."""
        self._check_spec(shard)
        record = self.record_path(shard)
        record.unlink(missing_ok=True)
        for path in [record, *(self.shard_path(shard, fmt) for fmt in self.formats)]:
            for temp in stale_temps(path):
                temp.unlink(missing_ok=True)
        return ShardWriter(self, shard)

    def adopt_shard(self, shard: ShardSpec, files: dict[str, Path]) -> None:
        """Complete ``shard`` with existing files of equal rows (a kept shard of an earlier
        version): hard-linked, so they stay byte for byte and cost no space; copied where
        links are not possible."""
        self._check_spec(shard)
        self.record_path(shard).unlink(missing_ok=True)
        entries: dict[str, dict[str, Any]] = {}
        for fmt in self.formats:
            final = self.shard_path(shard, fmt)
            final.parent.mkdir(parents=True, exist_ok=True)
            temp = temp_path_for(final)
            try:
                os.link(files[fmt], temp)
            except OSError:
                shutil.copyfile(files[fmt], temp)
            os.replace(temp, final)
            entries[fmt] = {"path": self.shard_relpath(shard, fmt),
                            "sha256": sha256_file(final), "bytes": final.stat().st_size}
        ShardWriter.publish_record(self, shard, entries)

    # -- manifest ---------------------------------------------------------------------------

    def finalize(self, extra: dict[str, Any] | None = None) -> Path:
        """Assemble manifest.json from the shard records; every planned shard must be complete.

        The folder must hold exactly the planned shards: a stray split or shard (say from an
        earlier run with other settings) is an error rather than something tools that scan the
        folder would silently pick up.
        """
        if not self._plans:
            raise TokenStoreError(
                self.tokens_dir, "finalize() before any plan(); plan every split first"
            )
        splits, missing = [], []
        for split, shards in self._plans.items():
            entries = []
            for shard in shards:
                record = self._record(shard)
                if record is None:
                    missing.append(str(shard))
                    continue
                files = {fmt: record["files"][fmt] for fmt in self.formats}
                entries.append(
                    {
                        "index": shard.index,
                        "start": shard.start,
                        "stop": shard.stop,
                        "num_rows": shard.num_rows,
                        "files": files,
                    }
                )
            rows = shards[-1].stop if shards else 0
            splits.append({"name": split, "num_rows": rows, "shards": entries})
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise TokenStoreError(
                self.tokens_dir,
                f"{len(missing)} planned shard(s) are not complete ({shown}); write them and call "
                "finalize() again",
            )
        self._check_folder()
        manifest = {
            "kind": MANIFEST_KIND,
            "version": LAYOUT_VERSION,
            "meta": self.meta.to_dict(),
            "formats": list(self.formats),
            "shard_size": self.shard_size,
            "num_rows": sum(split["num_rows"] for split in splits),
            "splits": splits,
            **(extra or {}),
        }
        return write_json_atomic(self.manifest_path, manifest)

    def _check_folder(self) -> None:
        """Remove our own stale temp files; refuse anything else that is not in the plan."""
        bookkeeping = bookkeeping_dir(self.root)
        expected = {f"{BOOKKEEPING_DIR}/{name}"
                    for name in (MANIFEST_NAME, RECORDS_DIR, *VERSION_FILES)}
        for shards in self._plans.values():
            for shard in shards:
                expected.update(_with_parents(f"{BOOKKEEPING_DIR}/{record_relpath(shard)}"))
                for fmt in self.formats:
                    expected.update(_with_parents(self.shard_relpath(shard, fmt)))
        for temp in stale_temps(self.manifest_path):
            temp.unlink(missing_ok=True)
        for folder in (bookkeeping, *(self.root / name for name in FORMAT_DIRS.values())):
            if not folder.is_dir():
                continue
            for path in sorted(folder.rglob("*")):
                if path.relative_to(self.root).as_posix() in expected:
                    continue
                if is_temp(path):
                    path.unlink(missing_ok=True)  # a killed or duplicate writer's leftovers
                elif not path.name.startswith("."):
                    raise TokenStoreError(
                        path,
                        "is not part of this plan (left from another run or shard size?); delete "
                        "it or use a new output folder",
                    )


def finished_shard_rows(root: str | os.PathLike[str], meta: TokenMeta) -> list[TokenGrid]:
    """The rows of every shard a store folder that was never finalized has completed with
    the tokenizer of ``meta`` (``tokenizer_differences``), read from files that still match
    their records (size and sha256): what a run that must give the folder up can keep.
    Shards of another tokenizer, torn records and damaged files are left out."""
    root = Path(root)
    grids = []
    for path in sorted((bookkeeping_dir(root) / RECORDS_DIR).glob("*/*.json")):
        try:
            record = read_json(path, RECORD_KIND)
            if meta.tokenizer_differences(TokenMeta.from_dict(record.get("meta"), where=path)):
                continue
            files = record.get("files") or {}
            fmt = next(fmt for fmt in FORMATS if isinstance(files.get(fmt), dict))
            entry = files[fmt]
            file = resolve(root, entry["path"], path)
            if file.stat().st_size != entry["bytes"] or sha256_file(file) != entry["sha256"]:
                continue
            grid = READERS[fmt](file)
        except (TokenStoreError, OSError, KeyError, TypeError, StopIteration):
            continue
        if grid.num_rows == record.get("num_rows") and not meta.tokenizer_differences(grid.meta):
            grids.append(grid)
    return grids


def _with_parents(relpath: str) -> list[str]:
    """``a/b/c`` and the folders it needs: ``a``, ``a/b``."""
    parts = relpath.split("/")
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


class ShardWriter(PublishOnSuccess):
    """Writes one shard in every format of its store; see ShardedTokenStore.open_shard."""

    def __init__(self, store: ShardedTokenStore, shard: ShardSpec) -> None:
        self.store = store
        self.shard = shard
        self.num_rows = 0
        self._writers: dict[str, ParquetTokenWriter | HDF5TokenWriter] = {}
        try:
            for fmt in store.formats:
                path = store.shard_path(shard, fmt)
                if fmt == "parquet":
                    self._writers[fmt] = ParquetTokenWriter(
                        path, store.meta, **store.parquet_options
                    )
                else:
                    self._writers[fmt] = HDF5TokenWriter(path, store.meta, **store.hdf5_options)
        except BaseException:
            self.abort()
            raise

    def write(self, codes: Any, ids: Any, labels: Any = None) -> None:
        codes = np.asarray(codes)
        rows = codes.shape[0] if codes.ndim else 0
        if self.num_rows + rows > self.shard.num_rows:
            raise TokenStoreError(
                self.store.shard_path(self.shard, self.store.formats[0]),
                f"shard {self.shard} is planned for {self.shard.num_rows} rows but got "
                f"{self.num_rows + rows}; pass exactly rows "
                f"[{self.shard.start}, {self.shard.stop})",
            )
        for writer in self._writers.values():
            writer.write(codes, ids, labels, self.shard.split)
        self.num_rows += rows

    def close(self) -> None:
        """Publish every format, then the record that marks the shard complete."""
        if self.num_rows != self.shard.num_rows:
            self.abort()
            raise TokenStoreError(
                self.store.shard_path(self.shard, self.store.formats[0]),
                f"shard {self.shard} got {self.num_rows} rows but is planned for "
                f"{self.shard.num_rows}; nothing was published",
            )
        files: dict[str, dict[str, Any]] = {}
        try:
            for fmt, writer in self._writers.items():
                path = writer.close()
                files[fmt] = {
                    "path": self.store.shard_relpath(self.shard, fmt),
                    "sha256": sha256_file(path),
                    "bytes": path.stat().st_size,
                }
            self.publish_record(self.store, self.shard, files)
        except BaseException:
            self.abort()
            # Formats already renamed into place belong to a shard that never completed: take
            # them back, so a failed shard (disk full, say) leaves no file under a final name.
            for fmt in files:
                self.store.shard_path(self.shard, fmt).unlink(missing_ok=True)
            raise

    @staticmethod
    def publish_record(store: ShardedTokenStore, shard: ShardSpec,
                       files: dict[str, dict[str, Any]]) -> None:
        """The completion record, written last: the shard counts as done once it exists."""
        record = {
            "kind": RECORD_KIND,
            "version": LAYOUT_VERSION,
            "split": shard.split,
            "index": shard.index,
            "start": shard.start,
            "stop": shard.stop,
            "num_rows": shard.num_rows,
            "meta": store.meta.to_dict(),
            "files": files,
        }
        write_json_atomic(store.record_path(shard), record)

    def abort(self) -> None:
        for writer in self._writers.values():
            writer.abort()

