"""``parquet:PATH``: images in Parquet files as Hugging Face writes them (an ``image`` column of
structs {bytes, path}, or of plain bytes, and an optional integer ``label`` column).

Opening reads each file's metadata (rows per row group) and its label column only; a batch
reads just the row groups its ids fall in, just the image column, and keeps the last two per
process (the ids of a batch are usually neighbours). ``PATH``: a file, a folder (every
``*.parquet`` below it) or a pattern (``data/train-*.parquet``, braces too).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import DataConfig
from ..errors import DataError
from .base import ImageSource
from .decoding import read_array, to_batch
from .handles import ProcessCache
from .identity import grouped, positions_array, repeated_stamps, sha256_hex
from .labels import class_ids
from .shards import (
    below,
    common_parent,
    files_fingerprint,
    make_splits,
    match_files,
    settings_key,
)

IMAGE_COLUMN, LABEL_COLUMN = "image", "label"
OPEN_FILES, ROW_GROUPS = 16, 2  # kept per process


def parquet_files(spec: str) -> tuple[list[Path], Path]:
    """The files ``parquet:spec`` names, sorted, and the folder their names are taken from."""
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
        if not files:
            raise DataError(f"parquet:{spec}: no .parquet files under this folder")
        return files, path
    files = match_files(spec)
    if not files:
        raise DataError(f"parquet:{spec}: no files match")
    return files, common_parent(files)


def _open(path: Path) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc}); fix or remove the "
                        "file") from None


def _image_kind(path: Path, schema: Any, column: str) -> str:
    """"struct" (Hugging Face's Image feature) or "binary"; else a DataError naming the file."""
    import pyarrow as pa

    if column not in schema.names:
        raise DataError(f"{path}: no image column '{column}' (columns: "
                        f"{', '.join(schema.names)}); set data.image_key to the image column")
    kind = schema.field(column).type
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        inner = kind.field(kind.get_field_index("bytes")).type
        if _is_bytes(inner):
            return "struct"
    elif _is_bytes(kind):
        return "binary"
    raise DataError(f"{path}: column '{column}' is {kind}, not images (a struct of bytes and "
                    "path, as Hugging Face writes, or binary); set data.image_key to the image "
                    "column")


def _is_bytes(kind: Any) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
                or getattr(pa.types, "is_binary_view", lambda _: False)(kind))


def _labels(path: Path, pf: Any, cfg: DataConfig) -> np.ndarray:
    """The file's labels as class ids (a null label is -1), or -1s without a label column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = cfg.label_key or LABEL_COLUMN
    rows = pf.metadata.num_rows
    if column not in pf.schema_arrow.names:
        if cfg.label_key is None:
            return np.full(rows, -1, dtype=np.int64)
        raise DataError(f"{path}: no label column '{column}' (columns: "
                        f"{', '.join(pf.schema_arrow.names)}); set data.label_key to the label "
                        "column, or unset it for unlabelled images")
    try:
        values = pf.read(columns=[column], use_threads=False).column(0)
        if pa.types.is_integer(values.type):
            values = pc.fill_null(values.cast(pa.int64()), -1)
        array = values.to_numpy()
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: cannot read column '{column}' ({exc}); fix or remove the "
                        "file") from None
    return class_ids(array, str(path), column)


class ParquetImageSource(ImageSource):
    """Rows of Parquet files, ids in sorted file order, then row order; every tenth id is
    validation, or each file's name gives its split (``train-00000-of-00004.parquet``)."""

    def __init__(self, spec: str, cfg: DataConfig) -> None:
        self.name = f"parquet:{spec}"
        if cfg.channels not in (1, 3):
            raise DataError(f"{self.name}: image files are read as 1 or 3 channels, the config "
                            f"has data.channels {cfg.channels}; set 1 or 3")
        files, root = parquet_files(spec)
        self.files, self.root, self.cfg = files, root, cfg
        self.image_column = cfg.image_key or IMAGE_COLUMN
        self.channels, self.image_size = cfg.channels, cfg.image_size
        kinds, counts, group_rows, group_file, labels = [], [], [], [], []
        for index, path in enumerate(files):
            pf = _open(path)
            kinds.append(_image_kind(path, pf.schema_arrow, self.image_column))
            meta = pf.metadata
            rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            counts.append(sum(rows))
            group_rows += rows
            group_file += [index] * len(rows)
            labels.append(_labels(path, pf, cfg))
            pf.close()
        if sum(counts) == 0:
            raise DataError(f"{self.name}: the files hold no rows; nothing to train on or "
                            "encode")
        self._kinds = kinds
        self._file_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._group_starts = np.concatenate([[0], np.cumsum(group_rows)]).astype(np.int64)
        self._group_file = np.array(group_file, dtype=np.int32)
        first_group = np.searchsorted(self._group_file, np.arange(len(files)))
        self._group_local = (np.arange(len(group_file)) - first_group[self._group_file]).astype(
            np.int32)
        self.labels = np.concatenate(labels)
        self.splits = make_splits(counts, files, root, cfg, what="file")
        self.split_rule = cfg.split_by == "rule"
        self.fingerprint = files_fingerprint(files, root, settings_key(cfg))
        self._open_files = ProcessCache(OPEN_FILES)
        self._groups = ProcessCache(ROW_GROUPS)

    def load_batch(self, ids: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        ids = np.asarray(ids, dtype=np.int64)
        groups = np.searchsorted(self._group_starts, ids, side="right") - 1
        images = [self._image(int(g), int(i)) for g, i in zip(groups, ids, strict=True)]
        batch = to_batch([a for a, _ in images], self.cfg, [w for _, w in images])
        return batch.float().div_(255), torch.from_numpy(self.labels[ids])

    def _image(self, group: int, i: int) -> tuple[np.ndarray, str]:
        images, paths = self._groups.get(group, lambda: self._read_group(group))
        where = self._where(group, i)
        data = images[i - int(self._group_starts[group])].as_py()
        if data is None:
            raise _null_image(where, paths, i - int(self._group_starts[group]))
        return read_array(data, self.cfg, where), where

    def _where(self, group: int, i: int) -> str:
        file = int(self._group_file[group])
        return f"{self.files[file]}: row {i - int(self._file_starts[file])} (id {i})"

    def _read_group(self, group: int) -> tuple[Any, Any]:
        """The image bytes of one row group (and the paths beside them, for messages), from
        the file this process keeps open."""
        file = int(self._group_file[group])
        with self._open_files.lock:
            pf = self._open_files.get(file, lambda: _open(self.files[file]))
            return self._group_images(pf, group)

    def _group_images(self, pf: Any, group: int) -> tuple[Any, Any]:
        """What ``_read_group`` gives, read from ``pf``, an open handle of the group's file."""
        import pyarrow as pa

        file = int(self._group_file[group])
        path, local = self.files[file], int(self._group_local[group])
        try:
            table = pf.read_row_group(local, columns=[self.image_column], use_threads=False)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{path}: cannot read row group {local} ({exc}); fix or remove the "
                            "file") from None
        column = table.column(0).combine_chunks()
        if self._kinds[file] == "binary":
            return column, None
        fields = dict(zip([f.name for f in column.type], column.flatten(), strict=True))
        return fields["bytes"], fields.get("path")

    def close(self) -> None:
        """Close the files this process has open (they reopen on the next batch)."""
        self._groups.close()
        self._open_files.close()

    def item_keys(self) -> list[str]:
        """``file#row``: the file's path below the source's root, the row within the file."""
        keys: list[str] = []
        for path, count in zip(self.files, np.diff(self._file_starts), strict=True):
            prefix = below(path, self.root).as_posix()
            keys.extend(f"{prefix}#{row}" for row in range(int(count)))
        return keys

    def item_stamps(self) -> list[str]:
        return repeated_stamps(self.files, np.diff(self._file_starts))

    def content_hashes(self, positions: Sequence[int] | np.ndarray) -> list[str]:
        """sha256 of each row's image bytes: each file opened once, each row group read once."""
        ids = positions_array(positions, len(self.labels))
        groups = np.searchsorted(self._group_starts, ids, side="right") - 1
        digests = [""] * len(ids)
        for file, in_file in grouped(self._group_file[groups], ids):
            with closing(_open(self.files[file])) as pf:
                for group, picks in grouped(groups[in_file], ids[in_file]):
                    chosen = in_file[picks]
                    for k, data in zip(chosen, self._row_bytes(pf, group, ids[chosen]),
                                       strict=True):
                        digests[k] = sha256_hex(data)
        return digests

    def _row_bytes(self, pf: Any, group: int, ids: np.ndarray) -> list[bytes]:
        """The stored image bytes of these ids, all in one row group."""
        images, paths = self._group_images(pf, group)
        rows = ids - self._group_starts[group]
        values = images.take(rows).to_pylist()
        for i, row, data in zip(ids, rows, values, strict=True):
            if data is None:
                raise _null_image(self._where(group, int(i)), paths, int(row))
        return values


def _null_image(where: str, paths: Any, row: int) -> DataError:
    """The error for a row without image bytes, with the path it names, if any."""
    named = paths[row].as_py() if paths else None
    hint = f" (it names {named!r} but holds no bytes)" if named else ""
    return DataError(f"{where}: image is null{hint}; fix or remove the row")
