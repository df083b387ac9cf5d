"""Token store metadata: what is needed to decode grids later and to refuse a wrong tokenizer."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
from vqtok.storage.errors import TokenStoreError

#: Bumped when the on-disk layout changes in a way old readers cannot handle.
STORAGE_FORMAT_VERSION = 1
#: Fields that name the dataset a store was encoded from, not the tokenizer.
DATASET_FIELDS = ("dataset", "dataset_fingerprint")
#: Entries of ``extra["data"]`` (the data config an encode recorded) naming where the data
#: lives, not how it is read: like DATASET_FIELDS, no part of what the tokens mean.
DATA_LOCATION_FIELDS = ("dataset", "data_root")
#: Key of the JSON metadata in Parquet schema metadata and HDF5 attributes.
META_KEY = "vqtok.meta"
#: Largest codebook that still fits uint16 codes; bigger ones use int32.
UINT16_MAX_CODEBOOK = 1 << 16
_MAX_CODEBOOK = (1 << 31) - 1

_REQUIRED = (
    "codebook_size",
    "grid_h",
    "grid_w",
    "dataset",
    "dataset_fingerprint",
    "checkpoint_hash",
    "vqtok_version",
)


def codes_dtype_for(codebook_size: int) -> np.dtype:
    """uint16 halves the size of int32 and covers every codebook up to 2**16 entries."""
    return np.dtype(np.uint16) if codebook_size <= UINT16_MAX_CODEBOOK else np.dtype(np.int32)


def utc_now_iso() -> str:
    """Now in UTC, or the time ``SOURCE_DATE_EPOCH`` fixes (the reproducible-builds convention).

    With the variable set, two runs over the same data write byte-identical token files.
    """
    fixed = os.environ.get("SOURCE_DATE_EPOCH")
    if fixed is None or not fixed.strip():
        return datetime.now(timezone.utc).isoformat(timespec="seconds")
    try:
        seconds = int(fixed)
    except ValueError:
        raise TokenStoreError(
            None, f"SOURCE_DATE_EPOCH={fixed!r} is not a whole number of seconds; fix or unset it"
        ) from None
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


def _as_int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TokenStoreError(None, f"TokenMeta.{name} must be an int, got {value!r}")
    if not low <= int(value) <= high:
        raise TokenStoreError(None, f"TokenMeta.{name} must be in [{low}, {high}], got {value}")
    return int(value)


@dataclass(frozen=True)
class TokenMeta:
    """Identity of a token store: codebook, grid, source data and tokenizer checkpoint.

    ``created_at=None`` is resolved to the current UTC time (or ``SOURCE_DATE_EPOCH``) once,
    at construction, so every file written with one TokenMeta carries the same timestamp; pass
    a fixed string to get byte-identical files across runs.
    """

    codebook_size: int
    grid_h: int
    grid_w: int
    dataset: str
    dataset_fingerprint: str
    checkpoint_hash: str
    vqtok_version: str
    created_at: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: Codes per grid position: 1 for one codebook, the number of stages for residual VQ.
    depth: int = 1

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "codebook_size", _as_int("codebook_size", self.codebook_size, 1, _MAX_CODEBOOK))
        set_(self, "grid_h", _as_int("grid_h", self.grid_h, 1, 1 << 16))
        set_(self, "grid_w", _as_int("grid_w", self.grid_w, 1, 1 << 16))
        set_(self, "depth", _as_int("depth", self.depth, 1, 1 << 10))
        for name in ("dataset", "dataset_fingerprint", "checkpoint_hash", "vqtok_version"):
            if not isinstance(getattr(self, name), str):
                raise TokenStoreError(
                    None, f"TokenMeta.{name} must be a str, got {getattr(self, name)!r}"
                )
        if self.created_at is None:
            set_(self, "created_at", utc_now_iso())
        elif not isinstance(self.created_at, str):
            raise TokenStoreError(
                None, f"TokenMeta.created_at must be an ISO string or None, got {self.created_at!r}"
            )
        if not isinstance(self.extra, dict):
            raise TokenStoreError(
                None, f"TokenMeta.extra must be a dict, got {type(self.extra).__name__}"
            )
        try:
            # Round-trip now so a non-JSON value fails here, not when the file is closed.
            set_(self, "extra", json.loads(json.dumps(self.extra, sort_keys=True)))
        except (TypeError, ValueError) as exc:
            raise TokenStoreError(
                None, f"TokenMeta.extra must be JSON-serialisable: {exc}"
            ) from None

    @property
    def codes_dtype(self) -> np.dtype:
        return codes_dtype_for(self.codebook_size)

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """One image's codes: (h, w), or (h, w, depth) when there is more than one level."""
        grid = (self.grid_h, self.grid_w)
        return grid if self.depth == 1 else (*grid, self.depth)

    @property
    def grid_text(self) -> str:
        return "x".join(str(n) for n in self.grid_shape)

    @property
    def tokens_per_row(self) -> int:
        return self.grid_h * self.grid_w * self.depth

    def to_dict(self) -> dict[str, Any]:
        """Depth 1 is left out, so one-level stores are written exactly as before depth
        existed (and stores from before read as depth 1)."""
        data = {
            "storage_format": STORAGE_FORMAT_VERSION,
            "codebook_size": self.codebook_size,
            "grid_h": self.grid_h,
            "grid_w": self.grid_w,
            "dataset": self.dataset,
            "dataset_fingerprint": self.dataset_fingerprint,
            "checkpoint_hash": self.checkpoint_hash,
            "vqtok_version": self.vqtok_version,
            "created_at": self.created_at,
            "extra": self.extra,
        }
        if self.depth != 1:
            data["depth"] = self.depth
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: object = None) -> TokenMeta:
        if not isinstance(data, dict):
            raise TokenStoreError(
                where, "token metadata is not a JSON object; the file was not written by vqtok"
            )
        version = data.get("storage_format", STORAGE_FORMAT_VERSION)
        if not isinstance(version, int) or version > STORAGE_FORMAT_VERSION:
            raise TokenStoreError(
                where,
                f"storage format {version!r} is newer than this vqtok supports "
                f"({STORAGE_FORMAT_VERSION}); upgrade vqtok to read it",
            )
        missing = [key for key in _REQUIRED if key not in data]
        if missing:
            raise TokenStoreError(
                where,
                f"token metadata lacks {', '.join(missing)}; the file is incomplete or foreign",
            )
        try:
            return cls(
                **{key: data[key] for key in _REQUIRED},
                created_at=data.get("created_at"),
                extra=data.get("extra") or {},
                depth=data.get("depth", 1),
            )
        except TokenStoreError as exc:
            raise TokenStoreError(where, f"bad token metadata: {exc}") from None

    @classmethod
    def from_json(cls, text: str | bytes, *, where: object = None) -> TokenMeta:
        try:
            data = json.loads(text)
        except ValueError:
            raise TokenStoreError(
                where, "token metadata is not valid JSON; the file is corrupt"
            ) from None
        return cls.from_dict(data, where=where)

    def identity(self) -> dict[str, Any]:
        """to_dict() minus created_at: stores with equal identities hold interchangeable tokens."""
        data = self.to_dict()
        del data["created_at"]
        return data

    def differences(self, other: TokenMeta) -> list[str]:
        """Names of the identity fields that differ (created_at is not one of them)."""
        mine, theirs = self.identity(), other.identity()
        return [key for key in mine if mine[key] != theirs.get(key)]

    def tokenizer_differences(self, other: TokenMeta) -> list[str]:
        """``differences`` but for which dataset the rows came from: rows of metas with none
        are interchangeable, row for row (the versions of one store hold such rows). Where
        ``extra`` differs, the names of its entries that do (``extra.data.resize``), leaving
        out where the data lives (the same folder spelled another way is the same data)."""
        names = [name for name in self.differences(other) if name not in DATASET_FIELDS]
        if "extra" in names:
            at = names.index("extra")
            names[at:at + 1] = _entry_differences(_without_location(self.extra),
                                                  _without_location(other.extra), "extra")
        return names

    def check_tokenizer(
        self,
        checkpoint_hash: str,
        codebook_size: int | None = None,
        grid: tuple[int, ...] | None = None,
        *,
        where: object = None,
    ) -> None:
        """Refuse to decode these tokens with a tokenizer they were not made by."""
        if checkpoint_hash != self.checkpoint_hash:
            raise TokenStoreError(
                where,
                f"tokens were made by checkpoint {self.checkpoint_hash[:16]} but the tokenizer is "
                f"{checkpoint_hash[:16]}; decode with the checkpoint that encoded them",
            )
        if codebook_size is not None and codebook_size != self.codebook_size:
            raise TokenStoreError(
                where,
                f"tokens use a codebook of {self.codebook_size} but the tokenizer has "
                f"{codebook_size}; decode with the checkpoint that encoded them",
            )
        if grid is not None and tuple(grid) != self.grid_shape:
            raise TokenStoreError(
                where,
                f"tokens are {self.grid_text} grids but the tokenizer makes "
                f"{'x'.join(map(str, grid))}; decode with the checkpoint that encoded them",
            )


def _without_location(extra: dict[str, Any]) -> dict[str, Any]:
    data = extra.get("data")
    if not isinstance(data, dict):
        return extra
    kept = {k: v for k, v in data.items() if k not in DATA_LOCATION_FIELDS}
    return {**extra, "data": kept}


def _entry_differences(mine: Any, theirs: Any, name: str) -> list[str]:
    """Dotted names of the entries that differ between two JSON values (dicts recursed)."""
    if mine == theirs:
        return []
    if not (isinstance(mine, dict) and isinstance(theirs, dict)):
        return [name]
    return [found for key in sorted(set(mine) | set(theirs), key=str)
            for found in _entry_differences(mine.get(key), theirs.get(key), f"{name}.{key}")]
