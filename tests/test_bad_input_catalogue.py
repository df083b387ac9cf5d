"""The bad-input catalogue: what new users get wrong, one case per row.

Each case runs the real CLI (in-process, as ``tests.helpers.fails`` does) and asserts three
things: the exact ``error:`` line (and that it is the only line), the exit code (2: change
the command or config; 1: the data, checkpoint or disk is at fault), and that the output
folder is exactly as it was (absent stays absent; an existing folder stays byte-identical).
Every case is refused before any Prefect machinery starts, so the whole table runs in
seconds. Subprocess runs of the installed command (tests/test_cli.py, test_recording.py)
cover the same error policy from outside the repo.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.helpers import fails, make_checkpoint, tiny_raw, tree, write_npz

USAGE, FAILURE = 2, 1


@dataclass(frozen=True)
class Case:
    name: str
    args: list[str]  # {placeholders} filled from the case's paths
    line: str  # the exact message after "error: "
    code: int = FAILURE
    setup: Callable[[dict[str, Path]], None] = field(default=lambda paths: None)
    out_exists: bool = False  # the output folder holds a previous run's files beforehand


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("catalogue")
    npz = write_npz(root / "images.npz", n=40)
    raw = tiny_raw(f"npz:{npz}")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    return {"npz": npz, "config": config, "checkpoint": make_checkpoint(root / "ck", raw)}


# --- setups: each writes the bad input a case needs under paths["t"] -------------------------


def _npz(**arrays: np.ndarray) -> Callable[[dict[str, Path]], None]:
    def setup(paths: dict[str, Path]) -> None:
        np.savez(paths["t"] / "bad.npz", **arrays)
    return setup


def _images(n: int = 40) -> np.ndarray:
    return np.zeros((n, 8, 8), dtype=np.uint8)


def _config(text: str | bytes, name: str = "bad.yaml") -> Callable[[dict[str, Path]], None]:
    def setup(paths: dict[str, Path]) -> None:
        target = paths["t"] / name
        target.write_bytes(text if isinstance(text, bytes) else text.encode())
    return setup


def _tiny_config(**data: object) -> Callable[[dict[str, Path]], None]:
    """The kit's config with ``data`` keys changed (a config the checkpoint cannot take)."""
    def setup(paths: dict[str, Path]) -> None:
        raw = yaml.safe_load(paths["config"].read_text())
        raw["data"].update(data)
        (paths["t"] / "bad.yaml").write_text(yaml.safe_dump(raw))
    return setup


def _checkpoint(change: Callable[[Path], None]) -> Callable[[dict[str, Path]], None]:
    """A copy of the kit's checkpoint at t/ck, damaged by ``change``."""
    def setup(paths: dict[str, Path]) -> None:
        copy = paths["t"] / "ck"
        shutil.copytree(paths["checkpoint"], copy)
        change(copy)
    return setup


def _edit_meta(**changes: object) -> Callable[[Path], None]:
    def change(ck: Path) -> None:
        meta = json.loads((ck / "config.json").read_text())
        for key, value in changes.items():
            if value is None:
                meta.pop(key, None)
            else:
                meta[key] = value
        (ck / "config.json").write_text(json.dumps(meta))
    return change


def _unhealthy(ck: Path) -> None:
    meta = json.loads((ck / "config.json").read_text())
    meta["progress"]["health"] = {"status": "unhealthy", "reason": "PSNR 11.0 dB is only "
                                  "0.2 dB above the mean-image baseline"}
    (ck / "config.json").write_text(json.dumps(meta))


def _folder(*files: str) -> Callable[[dict[str, Path]], None]:
    def setup(paths: dict[str, Path]) -> None:
        (paths["t"] / "imgs").mkdir()
        for name in files:
            (paths["t"] / "imgs" / name).write_text("not an image")
    return setup


def _file(name: str, text: str = "x") -> Callable[[dict[str, Path]], None]:
    def setup(paths: dict[str, Path]) -> None:
        (paths["t"] / name).write_text(text)
    return setup


def _tokens_of_another_tokenizer(paths: dict[str, Path]) -> None:
    from vqtok.storage import ParquetTokenWriter, TokenMeta

    meta = TokenMeta(codebook_size=16, grid_h=2, grid_w=2, dataset="other",
                     dataset_fingerprint="x", checkpoint_hash="feedfeed" * 8,
                     vqtok_version="0.1.0", created_at="2025-01-01T00:00:00+00:00")
    with ParquetTokenWriter(paths["t"] / "tokens.parquet", meta) as writer:
        writer.write(np.zeros((2, 2, 2), dtype=np.int64), np.arange(2),
                     np.zeros(2, dtype=np.int64), "train")


ENCODE = ["encode", "--checkpoint", "{checkpoint}", "--out", "{out}"]
NPZ_T = "{t}/bad.npz"
UNKNOWN_DATASET = ("unknown dataset 'minst'; use one of mnist-sample, mnist, fashion-mnist, "
                   "cifar10, imagefolder:PATH, npz:PATH, webdataset:PATTERN, parquet:PATH")

CASES = [
    # --- datasets --------------------------------------------------------------------------
    Case("npz file missing", [*ENCODE, "--dataset", "npz:{t}/gone.npz"],
         "npz:{t}/gone.npz: file not found"),
    Case("image folder missing", [*ENCODE, "--dataset", "imagefolder:{t}/gone"],
         "imagefolder:{t}/gone: folder not found"),
    Case("npz given as a folder", [*ENCODE, "--dataset", "npz:{t}"],
         "npz:{t}: is a folder; use imagefolder:{t} for folders of images"),
    Case("npz given as an image folder", [*ENCODE, "--dataset", "imagefolder:{npz}"],
         "imagefolder:{npz}: is a file, not a folder; use npz:{npz}"),
    Case("folder without images", [*ENCODE, "--dataset", "imagefolder:{t}/imgs"],
         "imagefolder:{t}/imgs: no .png/.jpg/.jpeg files found", setup=_folder("notes.txt")),
    Case("unknown dataset name", [*ENCODE, "--dataset", "minst"], UNKNOWN_DATASET),
    Case("npz without images", [*ENCODE, "--dataset", "npz:" + NPZ_T],
         NPZ_T + ": no array named 'images' (found ['pixels'])", setup=_npz(pixels=_images())),
    Case("npz with no images", [*ENCODE, "--dataset", "npz:" + NPZ_T],
         NPZ_T + ": 'images' holds no images; nothing to train on or encode",
         setup=_npz(images=_images(0))),
    Case("npz of float images", [*ENCODE, "--dataset", "npz:" + NPZ_T],
         NPZ_T + ": 'images' must be uint8, got float32",
         setup=_npz(images=_images().astype(np.float32))),
    Case("npz of a 2-d array", [*ENCODE, "--dataset", "npz:" + NPZ_T],
         NPZ_T + ": 'images' must be NHW, NHWC or NCHW, got shape (8, 8)",
         setup=_npz(images=np.zeros((8, 8), dtype=np.uint8))),
    Case("npz labels of the wrong length", [*ENCODE, "--dataset", "npz:" + NPZ_T],
         NPZ_T + ": 'labels' has shape (3,), expected (40,)",
         setup=_npz(images=_images(), labels=np.zeros(3, dtype=np.int64))),
    Case("npz labels that are names", [*ENCODE, "--dataset", "npz:" + NPZ_T],
         NPZ_T + ": 'labels' must be integer class ids, got dtype <U3; map class names to 0, "
         "1, 2, ... before saving", setup=_npz(images=_images(), labels=np.array(["cat"] * 40))),
    Case("npz labels with NaN", [*ENCODE, "--dataset", "npz:" + NPZ_T],
         NPZ_T + ": 'labels' must be whole class ids; entry 0 is np.float64(nan); store -1 for "
         "an image without a label", setup=_npz(images=_images(), labels=np.full(40, np.nan))),
    Case("npz labels below -1", [*ENCODE, "--dataset", "npz:" + NPZ_T],
         NPZ_T + ": 'labels' entry 0 is -2; class ids must be 0 to 2147483647 (-1 for no label)",
         setup=_npz(images=_images(), labels=np.full(40, -2))),
    Case("text file as npz", [*ENCODE, "--dataset", "npz:{t}/bad.npz"],
         "{t}/bad.npz: not a .npz file (not a zip archive); write it with "
         "numpy.savez(path, images=..., labels=...)", setup=_file("bad.npz", "not a zip")),
    # --- checkpoints -----------------------------------------------------------------------
    Case("encode without a checkpoint", ["encode", "--out", "{out}"],
         "encode needs --checkpoint (a folder written by 'train') (see --help)", code=USAGE),
    Case("decode without a checkpoint", ["decode", "--tokens", "{npz}", "--out", "{out}"],
         "decode needs --checkpoint (the tokenizer that made the tokens) (see --help)",
         code=USAGE),
    Case("checkpoint missing", ["encode", "--checkpoint", "{t}/nope", "--out", "{out}"],
         "checkpoint {t}/nope does not exist; pass the training output folder"),
    Case("checkpoint folder without config.json",
         ["encode", "--checkpoint", "{t}/imgs", "--out", "{out}"],
         "{t}/imgs is not a vqtok checkpoint (no config.json); pass the folder written by "
         "'train'", setup=_folder("model.safetensors")),
    Case("checkpoint whose config.json is not JSON",
         ["encode", "--checkpoint", "{t}/ck", "--out", "{out}"],
         "{t}/ck/config.json: unreadable (Expecting value: line 1 column 1 (char 0))",
         setup=_checkpoint(lambda ck: (ck / "config.json").write_text("garbage"))),
    Case("prior given as a tokenizer", ["encode", "--checkpoint", "{t}/ck", "--out", "{out}"],
         "{t}/ck/config.json: not a vqtok checkpoint description",
         setup=_checkpoint(_edit_meta(format="vqtok-prior"))),
    Case("checkpoint without its weights hash",
         ["encode", "--checkpoint", "{t}/ck", "--out", "{out}"],
         "{t}/ck/config.json: 'weights_sha256' missing or malformed; the checkpoint is "
         "damaged, use another one or train again",
         setup=_checkpoint(_edit_meta(weights_sha256=None))),
    Case("checkpoint with weights from another run",
         ["encode", "--checkpoint", "{t}/ck", "--out", "{out}"],
         "{t}/ck/model.safetensors: content hash does not match config.json; the checkpoint "
         "is corrupt or its files come from different runs",
         setup=_checkpoint(_edit_meta(weights_sha256="0" * 64))),
    Case("checkpoint without its weights", ["encode", "--checkpoint", "{t}/ck", "--out", "{out}"],
         "{t}/ck/model.safetensors is missing; the checkpoint is incomplete",
         setup=_checkpoint(lambda ck: (ck / "model.safetensors").unlink())),
    Case("unhealthy checkpoint", ["encode", "--checkpoint", "{t}/ck", "--out", "{out}"],
         "{t}/ck is marked unhealthy: PSNR 11.0 dB is only 0.2 dB above the mean-image "
         "baseline; train again (another seed, a lower train.lr, more steps), or pass --force "
         "to use it anyway", setup=_checkpoint(_unhealthy)),
    # --- configs ---------------------------------------------------------------------------
    Case("config file missing", ["train", "--config", "{t}/nope.yaml", "--out", "{out}"],
         "config file {t}/nope.yaml does not exist; pass a YAML file from configs/", code=USAGE),
    Case("misspelt config key", ["train", "--config", "{t}/bad.yaml", "--out", "{out}"],
         "{t}/bad.yaml: unknown key 'model.widht'; remove it or fix its spelling", code=USAGE,
         setup=_config("model:\n  widht: 3\n")),
    Case("config value of the wrong type", ["train", "--config", "{t}/bad.yaml", "--out", "{out}"],
         "{t}/bad.yaml: key 'train.epochs': Input should be a valid integer (got 'three')",
         code=USAGE, setup=_config("train:\n  epochs: three\n")),
    Case("config value out of range", ["train", "--config", "{t}/bad.yaml", "--out", "{out}"],
         "{t}/bad.yaml: key 'train.checkpoint_every': Input should be greater than or equal to "
         "1 (got 0)", code=USAGE, setup=_config("train:\n  checkpoint_every: 0\n")),
    Case("config that is not YAML", ["train", "--config", "{t}/bad.yaml", "--out", "{out}"],
         "{t}/bad.yaml: not valid YAML at line 2, column 1 (expected ',' or ']', but got "
         "'<stream end>')", code=USAGE, setup=_config("train: [1, 2\n")),
    Case("config that is a list", ["train", "--config", "{t}/bad.yaml", "--out", "{out}"],
         "{t}/bad.yaml: expected a mapping of sections at the top level", code=USAGE,
         setup=_config("- just\n- a list\n")),
    Case("config that is binary", ["train", "--config", "{t}/bad.yaml", "--out", "{out}"],
         "{t}/bad.yaml: not a text file (not UTF-8); pass a YAML config", code=USAGE,
         setup=_config(bytes(range(256)))),
    Case("config with channels the checkpoint cannot take",
         [*ENCODE, "--config", "{t}/bad.yaml"],
         "npz:{npz}: data.channels is 3, the checkpoint's model takes 1-channel images; set "
         "data.channels: 1 (images are converted)", code=USAGE, setup=_tiny_config(channels=3)),
    Case("config with a size the model cannot downsample",
         [*ENCODE, "--config", "{t}/bad.yaml"],
         "npz:{npz}: data.image_size 10 is not a multiple of 4 (the model downsamples 2 "
         "times); use e.g. data.image_size: 8", code=USAGE, setup=_tiny_config(image_size=10)),
    # --- options ---------------------------------------------------------------------------
    Case("output folder is a file", ["encode", "--checkpoint", "{checkpoint}", "--out", "{t}/f"],
         "Invalid value for '--out': Directory '{t}/f' is a file. (see --help)", code=USAGE,
         setup=_file("f")),
    Case("output folder under a file",
         ["encode", "--checkpoint", "{checkpoint}", "--out", "{t}/f/out"],
         "{t}/f/out: {t}/f is a file, not a folder; choose another --out", setup=_file("f")),
    Case("shard size zero", [*ENCODE, "--shard-size", "0"],
         "Invalid value for '--shard-size': 0 is not in the range x>=1. (see --help)",
         code=USAGE),
    Case("unknown option", [*ENCODE, "--bogus"],
         "No such option '--bogus'. Did you mean '--out'? (see --help)", code=USAGE),
    Case("unknown format", [*ENCODE, "--format", "csv"],
         "Invalid value for '--format': 'csv' is not one of 'parquet', 'hdf5', 'both'. "
         "(see --help)", code=USAGE),
    Case("CUDA device on a machine without one", [*ENCODE, "--device", "cuda:3"],
         "device 'cuda:3' asked for but CUDA is not available; use --device cpu"),
    Case("local cluster of no workers", [*ENCODE, "--cluster", "local:0"],
         "--cluster local:0: a local cluster needs at least 1 worker"),
    Case("cron expression with four fields",
         ["serve", "--checkpoint", "{checkpoint}", "--out", "{out}", "--cron", "0 3 * *"],
         "Invalid value for '--cron': '0 3 * *' is not a cron schedule; give five fields "
         "(minute hour day-of-month month day-of-week), e.g. '0 3 * * *' (see --help)",
         code=USAGE),
    # --- token stores ----------------------------------------------------------------------
    Case("tokens made by another tokenizer",
         ["decode", "--tokens", "{t}/tokens.parquet", "--checkpoint", "{checkpoint}",
          "--out", "{out}"], "{t}/tokens.parquet: tokens were made by checkpoint "
         "feedfeedfeedfeed but the tokenizer is {ck_hash}; decode with the checkpoint that "
         "encoded them",
         setup=_tokens_of_another_tokenizer),
    Case("stats of a folder without tokens", ["stats", "--tokens", "{t}/imgs", "--out", "{out}"],
         "{t}/imgs: no token store here (no .vqtok/manifest.json); pass a token file or the "
         "folder 'encode' wrote", setup=_folder()),
    Case("stats of a run folder encode never wrote", ["stats", "--out", "{t}/empty"],
         "{t}/empty/tokens: no such file or folder; pass a token file or the folder 'encode' "
         "wrote"),
    Case("decode a text file as tokens",
         ["decode", "--tokens", "{t}/tokens.txt", "--checkpoint", "{checkpoint}",
          "--out", "{out}"], "{t}/tokens.txt: unknown token file type; expected .parquet, "
         ".h5/.hdf5 or the folder 'encode' wrote", setup=_file("tokens.txt")),
    # --- the prior -------------------------------------------------------------------------
    Case("prior width not divisible by its heads",
         ["prior", "train", "--tokens", "{t}/tokens.parquet", "--out", "{out}", "--d-model",
          "30", "--heads", "4"], "overrides: section 'model': d_model 30 is not divisible by "
         "n_heads 4; choose a width that is a multiple of the heads", code=USAGE,
         setup=_tokens_of_another_tokenizer),
    Case("prior config that is binary",
         ["prior", "train", "--tokens", "{t}/tokens.parquet", "--out", "{out}", "--config",
          "{t}/bad.yaml"], "{t}/bad.yaml: not a text file (not UTF-8); pass a YAML config",
         code=USAGE, setup=lambda p: (_tokens_of_another_tokenizer(p),
                                      _config(b"\xff\xfe\x00")(p))),
    Case("prior sample from a tokenizer checkpoint",
         ["prior", "sample", "--prior", "{checkpoint}", "--out", "{out}"],
         "{checkpoint}/config.json: not a prior checkpoint (a tokenizer's?); pass the folder "
         "'prior train' wrote"),
    # --- an existing run folder is left exactly as it was -----------------------------------
    Case("bad dataset over an existing run", [*ENCODE, "--dataset", "minst"], UNKNOWN_DATASET,
         out_exists=True),
    Case("bad config over an existing run", ["train", "--config", "{t}/bad.yaml", "--out", "{out}"],
         "{t}/bad.yaml: unknown key 'model.widht'; remove it or fix its spelling", code=USAGE,
         setup=_config("model:\n  widht: 3\n"), out_exists=True),
]


def test_the_catalogue_is_what_the_issue_asked_for():
    assert len(CASES) >= 40
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input(case: Case, kit, tmp_path):
    paths = {**kit, "t": tmp_path, "out": tmp_path / "out"}
    case.setup(paths)
    if case.out_exists:
        (paths["out"] / ".vqtok").mkdir(parents=True)
        (paths["out"] / ".vqtok" / "manifest.json").write_text('{"kept": true}')
        (paths["out"] / "notes.txt").write_text("a previous run's files")
    before = tree(paths["out"]) if paths["out"].exists() else None
    fill = {key: str(value) for key, value in paths.items()}
    fill["ck_hash"] = json.loads((kit["checkpoint"] / "config.json").read_text())[
        "weights_sha256"][:16]
    args = [arg.format(**fill) for arg in case.args]
    assert fails(*args, code=case.code) == case.line.format(**fill)
    assert (tree(paths["out"]) if paths["out"].exists() else None) == before
