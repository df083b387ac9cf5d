"""``webdataset:PATTERN``: WebDataset tar shards (``data/shard-{000000..000099}.tar``), read by
random access, so ids, splits and DataLoader workers work as for any other source.

Opening reads each shard's tar headers once (``tarfile``, which seeks past the data) and keeps,
per sample, only where its image's bytes are and its label: three numbers, in numpy arrays
(70,000 samples cost under 2 MB). A batch then seeks to each image and decodes just those bytes.
WebDataset's convention: members are grouped into samples by their name up to the first dot of
the file name (``train/000123.png`` and ``train/000123.cls`` are sample ``train/000123``).

Compressed tars (``.tar.gz``) are refused, not read whole: finding one image in them means
decompressing everything before it.
"""

from __future__ import annotations

import json
import os
import posixpath
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from ..config import DataConfig
from ..errors import DataError
from .base import ImageSource
from .decoding import decode_errors, pil_array, to_batch
from .handles import ProcessCache
from .identity import grouped, positions_array, repeated_stamps, sha256_hex
from .labels import class_id
from .shards import (
    below,
    common_parent,
    files_fingerprint,
    make_splits,
    match_files,
    settings_key,
)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # the first a sample has is its image
OPEN_SHARDS = 64  # file handles kept open per process
COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz",
              b"\x28\xb5\x2f\xfd": "zstd", b"\x04\x22\x4d\x18": "lz4"}
_BLOCK = tarfile.BLOCKSIZE


@dataclass(frozen=True)
class LabelKey:
    """Where a sample's label is: the text of its ``.EXTENSION`` member, or an integer field
    of its ``.json`` member. ``required``: configured, so a sample without it is an error."""

    extension: str
    field: str | None
    required: bool

    @classmethod
    def parse(cls, key: str | None) -> LabelKey:
        if key is None:
            return cls("cls", None, False)
        extension, _, field = key.lstrip(".").partition(".")
        if extension.lower() == "json" and field:
            return cls("json", field, True)
        return cls(key.lstrip(".").lower(), None, True)


@dataclass
class _Sample:
    first: int  # order of the sample's first member in the shard
    image: tuple[int, int, int] | None = None  # (preference rank, data offset, size)
    label: tarfile.TarInfo | None = None


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset's (key, extension): ``a/b/000123.seg.png`` -> (``a/b/000123``, ``seg.png``)."""
    folder, base = posixpath.split(name)
    stem, _, extension = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, extension.lower()


def _refuse_compressed(path: Path, head: bytes) -> None:
    for magic, kind in COMPRESSED.items():
        if head.startswith(magic):
            raise DataError(
                f"{path}: a {kind}-compressed tar; images are read by seeking to them, which a "
                "compressed tar cannot do: use uncompressed .tar shards (decompress this one)")


def scan_shard(path: Path, images: Sequence[str], label: LabelKey) -> tuple[np.ndarray, ...]:
    """(data offsets, sizes, labels) of the shard's samples, in the order of their first
    members; the tar's headers are read, its images are not."""
    with _open_shard(path) as f:
        samples = _members(path, f, images, label)
        offsets = np.empty(len(samples), dtype=np.int64)
        sizes = np.empty(len(samples), dtype=np.int64)
        labels = np.full(len(samples), -1, dtype=np.int64)
        for i, (key, sample) in enumerate(samples.items()):
            if sample.image is None:
                wanted = ", ".join(f".{e}" for e in images)
                raise DataError(f"{path}: sample {key} has no image member ({wanted}); fix the "
                                "shard, or set data.image_key to its images' extension")
            _, offsets[i], sizes[i] = sample.image
            labels[i] = _label(path, f, key, sample.label, label)
    return offsets, sizes, labels


def sample_keys(path: Path) -> list[str]:
    """The shard's sample keys, in the order ``scan_shard`` gives its samples: read again
    when asked, so that no name is kept per sample."""
    with _open_shard(path) as f:
        return list(dict.fromkeys(_split_name(info.name)[0] for info in _headers(path, f)))


def _open_shard(path: Path) -> BinaryIO:
    """The shard opened for reading at byte 0; refused when compressed."""
    try:
        f = open(path, "rb")  # the caller closes it
    except OSError as exc:
        raise DataError(f"{path}: cannot open shard ({exc.strerror or exc})") from None
    try:
        _refuse_compressed(path, f.read(8))
    except DataError:
        f.close()
        raise
    f.seek(0)
    return f


def _members(path: Path, f: BinaryIO, images: Sequence[str],
             label: LabelKey) -> dict[str, _Sample]:
    """The shard's samples by key, in the order of their first members."""
    samples: dict[str, _Sample] = {}
    for info in _headers(path, f):
        key, extension = _split_name(info.name)
        sample = samples.setdefault(key, _Sample(len(samples)))
        if extension in images:
            rank = images.index(extension)
            if sample.image is None or rank < sample.image[0]:
                sample.image = (rank, info.offset_data, info.size)
        elif extension == label.extension:
            sample.label = info
    return samples


def _headers(path: Path, f: BinaryIO) -> Iterator[tarfile.TarInfo]:
    """The shard's regular members, from one pass over its headers; a truncated or corrupt
    tar is a DataError naming the last member read."""
    size = os.fstat(f.fileno()).st_size
    try:
        tar = tarfile.open(fileobj=f, mode="r:")
    except tarfile.ReadError as exc:
        raise DataError(f"{path}: not a tar file ({exc}); fix or remove the shard") from None
    last = "(none)"
    while True:
        try:
            info = tar.next()
        except tarfile.ReadError as exc:
            raise DataError(f"{path}: truncated or corrupt tar after member {last} ({exc}); "
                            "fix or remove the shard") from None
        if info is None:
            break
        tar.members.clear()  # tarfile keeps every header; the scan needs none of them
        if info.offset_data + info.size > size:
            raise DataError(f"{path}: truncated tar: member {info.name} ends past the end of "
                            "the file; fix or remove the shard")
        last = info.name
        if info.isreg():
            yield info
    f.seek(tar.offset)
    if f.read(_BLOCK) != bytes(_BLOCK):  # tarfile stops quietly at a cut or damaged header
        raise DataError(f"{path}: truncated or corrupt tar: no valid header after member "
                        f"{last}; fix or remove the shard")


def _label(path: Path, f: BinaryIO, key: str, info: tarfile.TarInfo | None,
           label: LabelKey) -> int:
    if info is None:
        if label.required:
            member = f"{key}.{label.extension}"
            raise DataError(f"{path}: sample {key} has no label member {member} (data.label_key "
                            f"is set); add it, or unset data.label_key for unlabelled images")
        return -1
    f.seek(info.offset_data)
    raw = f.read(info.size)
    where = f"{path}: member {info.name}"
    if label.field is None:
        return class_id(raw, where)
    try:
        value: object = json.loads(raw)
    except ValueError as exc:
        raise DataError(f"{where}: not valid JSON ({exc}); fix or remove the shard") from None
    for part in label.field.split("."):
        if not isinstance(value, dict) or part not in value:
            raise DataError(f"{where}: no field '{label.field}' (data.label_key is "
                            f"json.{label.field})")
        value = value[part]
    return class_id(value, f"{where}: field '{label.field}'")


class WebDatasetSource(ImageSource):
    """Samples of tar shards matched by a pattern, ids in sorted shard order, then member
    order; every tenth id is validation, or each shard's name gives its split."""

    def __init__(self, pattern: str, cfg: DataConfig) -> None:
        self.name = f"webdataset:{pattern}"
        if cfg.channels not in (1, 3):
            raise DataError(f"{self.name}: image files are read as 1 or 3 channels, the config "
                            f"has data.channels {cfg.channels}; set 1 or 3")
        shards = match_files(pattern)
        if not shards:
            hint = (f"; name the shards, e.g. webdataset:{pattern.rstrip('/')}/*.tar"
                    if Path(pattern).expanduser().is_dir() else "")
            raise DataError(f"{self.name}: no shards match{hint}")
        images = (cfg.image_key.lstrip(".").lower(),) if cfg.image_key else IMAGE_EXTENSIONS
        label = LabelKey.parse(cfg.label_key)
        scanned = [scan_shard(p, images, label) for p in shards]
        counts = [len(offsets) for offsets, _, _ in scanned]
        if sum(counts) == 0:
            raise DataError(f"{self.name}: the shards hold no samples; nothing to train on or "
                            "encode")
        self.shards, self.cfg = shards, cfg
        self.channels, self.image_size = cfg.channels, cfg.image_size
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._offsets, self._sizes, self.labels = (
            np.concatenate([part[k] for part in scanned]) for k in range(3))
        self.root = root = common_parent(shards)
        self.splits = make_splits(counts, shards, root, cfg, what="shard")
        self.split_rule = cfg.split_by == "rule"
        self.fingerprint = files_fingerprint(shards, root, settings_key(cfg))
        self._files = ProcessCache(OPEN_SHARDS)

    def load_batch(self, ids: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        ids = np.asarray(ids, dtype=np.int64)
        shard_of = np.searchsorted(self._starts, ids, side="right") - 1
        images = [self._image(int(s), int(i)) for s, i in zip(shard_of, ids, strict=True)]
        wheres = [str(self.shards[s]) for s in shard_of]
        batch = to_batch(images, self.cfg, wheres)
        return batch.float().div_(255), torch.from_numpy(self.labels[ids])

    def _image(self, shard: int, i: int) -> np.ndarray:
        path, offset, size = self.shards[shard], int(self._offsets[i]), int(self._sizes[i])
        try:
            with self._files.lock:
                f = self._files.get(shard, lambda: open(path, "rb"))
                f.seek(offset)
                data = f.read(size)
        except OSError as exc:
            raise DataError(f"{path}: cannot read shard ({exc.strerror or exc})") from None
        if len(data) != size:
            raise DataError(f"{path}: member {_member_at(path, offset)}: the shard is shorter "
                            "than when it was opened; open the dataset again")
        try:
            return pil_array(data, self.cfg.channels)
        except decode_errors() as exc:
            raise DataError(f"{path}: member {_member_at(path, offset)}: cannot read image "
                            f"({exc}); fix or remove the shard") from None

    def close(self) -> None:
        """Close the shards this process has open (they reopen on the next batch)."""
        self._files.close()

    def item_keys(self) -> list[str]:
        """``shard/samplekey``, the shard's path below the shards' common folder."""
        keys: list[str] = []
        for shard, path in enumerate(self.shards):
            names = sample_keys(path)
            if len(names) != self._count(shard):
                raise DataError(f"{path}: the shard has {len(names)} samples, "
                                f"{self._count(shard)} when it was opened; open the dataset "
                                "again")
            prefix = below(path, self.root).as_posix()
            keys.extend(f"{prefix}/{name}" for name in names)
        return keys

    def item_stamps(self) -> list[str]:
        return repeated_stamps(self.shards, np.diff(self._starts))

    def content_hashes(self, positions: Sequence[int] | np.ndarray) -> list[str]:
        """sha256 of each image member's bytes: each shard opened once, read in offset
        order."""
        ids = positions_array(positions, len(self._offsets))
        shard_of = np.searchsorted(self._starts, ids, side="right") - 1
        digests = [""] * len(ids)
        for shard, picks in grouped(shard_of, self._offsets[ids]):
            path = self.shards[shard]
            with _open_shard(path) as f:
                for k in picks:
                    digests[k] = sha256_hex(self._member_bytes(f, path, int(ids[k])))
        return digests

    def _count(self, shard: int) -> int:
        return int(self._starts[shard + 1] - self._starts[shard])

    def _member_bytes(self, f: BinaryIO, path: Path, i: int) -> bytes:
        offset, size = int(self._offsets[i]), int(self._sizes[i])
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise DataError(f"{path}: member {_member_at(path, offset)}: the shard is shorter "
                            "than when it was opened; open the dataset again")
        return data


def _member_at(path: Path, offset: int) -> str:
    """The name of the member whose data starts at ``offset``: looked up again only for an
    error message, so names cost no memory per sample."""
    try:
        with tarfile.open(path, "r:") as tar:
            while (info := tar.next()) is not None:
                if info.offset_data == offset:
                    return info.name
                tar.members.clear()
    except (OSError, tarfile.TarError):
        pass
    return f"at byte {offset}"
