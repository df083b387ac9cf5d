"""Test data makers and CLI helpers shared by several test modules."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np


def write_npz(path, n: int = 40, size: int = 8, seed: int = 0, nhwc: bool = False):
    """Blobby images (smooth, so a tiny model can learn them) with labels 0..3."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    images = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n):
        cy, cx = rng.uniform(1, size - 2, 2)
        images[i] = (255 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 4)).astype(np.uint8)
    labels = np.arange(n) % 4
    array = images[..., None] if nhwc else images[:, None]
    np.savez(path, images=array, labels=labels)
    return path


def tiny_raw(dataset: str, **train: object) -> dict:
    """The tiny test config (conftest.TINY) as a plain dict, on another dataset."""
    from tests.conftest import TINY

    raw = json.loads(json.dumps(TINY))
    raw["data"]["dataset"] = dataset
    raw["train"].update(train)
    return raw


def make_checkpoint(folder: Path, raw: dict, seed: int = 0) -> Path:
    """An untrained tiny checkpoint whose codebook is k-means fitted, so codes vary."""
    import torch
    from vqtok.tokenizer import save_checkpoint
    from vqtok.tokenizer.checkpoint import build_model
    from vqtok.tokenizer.config import parse_config

    config = parse_config(raw)
    torch.manual_seed(seed)
    model = build_model(config)
    model.train()(torch.rand(64, config.data.channels, 8, 8))
    save_checkpoint(folder, model, config)
    return folder


PREFECT_LINE = re.compile(r"\d\d:\d\d:\d\d\.\d+ \| ")  # Prefect's console log lines


def fails(*args: object, code: int = 1) -> str:
    """Run the CLI, check the exit code and the single error line; return its message."""
    from click.testing import CliRunner
    from vqtok.flows.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    ours = [line for line in lines if not PREFECT_LINE.match(line)]
    assert len(ours) == 1 and ours[0].startswith("error: "), result.stderr
    assert lines[-1] == ours[0], result.stderr  # nothing follows the error line
    restating = [line for line in lines if "| ERROR" in line or "Failed(" in line]
    assert restating == [], result.stderr  # Prefect's console does not repeat the error
    return ours[0][len("error: "):]


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path: equal trees are byte-identical stores."""
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


STORE_FOLDERS = ("tokens", "hdf5", ".vqtok")  # what a token store writes in its run folder


def store_tree(out: Path) -> dict[str, bytes]:
    """Every file of the token store in run folder ``out``, by path relative to ``out``."""
    return {p.relative_to(out).as_posix(): p.read_bytes()
            for folder in STORE_FOLDERS for p in sorted((Path(out) / folder).rglob("*"))
            if p.is_file()}


def console_command() -> str:
    """The installed ``tokenize-dataset`` script of this environment (what users run)."""
    return str(Path(sys.executable).with_name("tokenize-dataset"))


def version_folder(out: Path, number: int | None = None) -> Path:
    """Version ``number`` of the versioned store in run folder ``out`` (the one
    ``OUT/.vqtok/current`` names when None): a whole plain store, whose own ``.vqtok`` holds
    its manifest, shard records (paths relative to this folder), key map and plan."""
    versions = Path(out) / ".vqtok" / "versions"
    if number is None:
        return versions / Path(os.readlink(Path(out) / ".vqtok" / "current")).name
    return versions / f"{number:06d}"
