"""The split rules, in one place: which images a source holds out when it has no splits of
its own, and which split figures are measured on."""

from __future__ import annotations

import re

import numpy as np

VALIDATION_EVERY = 10  # one image in ten (id % 10 == 9) is validation
HELDOUT_SPLITS = ("validation", "test")  # where figures are measured, in order of preference


def holdout_splits(n: int) -> dict[str, np.ndarray]:
    """Every tenth image (id % 10 == 9) is validation: deterministic and spread evenly."""
    ids = np.arange(n, dtype=np.int64)
    last = VALIDATION_EVERY - 1
    return {"train": ids[ids % VALIDATION_EVERY != last],
            "validation": ids[ids % VALIDATION_EVERY == last]}


def holdout_split_of(ids: np.ndarray) -> np.ndarray:
    """The split ``holdout_splits`` puts each id in: how ids given later get theirs."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.where(ids % VALIDATION_EVERY == VALIDATION_EVERY - 1, "validation",
                    "train").astype(object)


def heldout_split(split_names: object, preferred: str | None = None,
                  exclude: str | None = None) -> str | None:
    """The split held-out figures come from: ``preferred`` when there is one, else
    validation, else test (never ``exclude``, the split being trained on); None if none."""
    names = set(split_names)  # type: ignore[call-overload]
    for name in (preferred, *HELDOUT_SPLITS):
        if name is not None and name in names and name != exclude:
            return name
    return None


#: Words that name a split in a shard's or file's path (``data.split_by: file``).
SPLIT_WORDS = {"train": "train", "training": "train",
               "validation": "validation", "valid": "validation", "val": "validation",
               "dev": "validation",
               "test": "test", "testing": "test", "eval": "test"}
SPLIT_ORDER = ("train", "validation", "test")


def split_from_path(relative: str) -> str | None:
    """The split a file's path names: its first folder or file-name token (split on
    ``- _ . /``) that is a split word, case ignored (``train-000.tar``, ``val/part-3.tar``,
    ``data/test-00000-of-00002.parquet``); None if no token is one."""
    for token in re.split(r"[-_./\\]", relative.lower()):
        if token in SPLIT_WORDS:
            return SPLIT_WORDS[token]
    return None
