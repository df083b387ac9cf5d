"""Bad input through the CLI: one ``error:`` line saying what and where, a non-zero exit, and
nothing half-written. Inputs are checked before any Prefect machinery starts, so most of
these cases cost well under a second; the few that fail mid-flow use the session's server.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image
from vqtok.flows.cli import main
from vqtok.tokenizer import save_checkpoint
from vqtok.tokenizer.checkpoint import build_model
from vqtok.tokenizer.config import parse_config

from tests.helpers import (
    console_command,
    fails,
    make_checkpoint,
    store_tree,
    tiny_raw,
    tree,
    version_folder,
    write_npz,
)


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    npz = write_npz(root / "images.npz", n=40)
    raw = tiny_raw(f"npz:{npz}")
    return {"root": root, "npz": npz, "raw": raw,
            "checkpoint": make_checkpoint(root / "checkpoint", raw)}


# --- missing or empty paths -------------------------------------------------------------------


def test_missing_dataset_files_and_folders(kit, tmp_path):
    out = tmp_path / "out"
    ck = kit["checkpoint"]
    assert fails("encode", "--checkpoint", ck, "--dataset", f"npz:{tmp_path}/gone.npz",
                 "--out", out) == f"npz:{tmp_path}/gone.npz: file not found"
    assert fails("encode", "--checkpoint", ck, "--dataset", f"imagefolder:{tmp_path}/gone",
                 "--out", out) == f"imagefolder:{tmp_path}/gone: folder not found"
    assert not out.exists()


def test_missing_checkpoint_config_and_tokens(kit, tmp_path):
    assert fails("encode", "--checkpoint", tmp_path / "nope", "--out", tmp_path / "o") == (
        f"checkpoint {tmp_path}/nope does not exist; pass the training output folder")
    assert fails("train", "--config", tmp_path / "nope.yaml", code=2) == (
        f"config file {tmp_path}/nope.yaml does not exist; pass a YAML file from configs/")
    assert fails("decode", "--tokens", tmp_path / "none", "--checkpoint", kit["checkpoint"],
                 code=2) == (f"Invalid value for '--tokens': Path '{tmp_path}/none' does not "
                             "exist. (see --help)")
    assert not (tmp_path / "o").exists()
    # serve checks the checkpoint now, not when the first scheduled run starts
    assert fails("serve", "--checkpoint", tmp_path / "nope", "--out", tmp_path / "o") == (
        f"checkpoint {tmp_path}/nope does not exist; pass the training output folder")
    assert not (tmp_path / "o").exists()


def test_empty_folder_and_folder_of_non_images(kit, tmp_path):
    empty = tmp_path / "empty"
    (empty / "cats").mkdir(parents=True)
    (empty / "notes.txt").write_text("not an image")
    assert fails("encode", "--checkpoint", kit["checkpoint"], "--dataset",
                 f"imagefolder:{empty}", "--out", tmp_path / "o") == (
        f"imagefolder:{empty}: no .png/.jpg/.jpeg files found")
    assert not (tmp_path / "o").exists()


def test_empty_npz_and_paths_of_the_wrong_kind(kit, tmp_path):
    np.savez(tmp_path / "empty.npz", images=np.zeros((0, 8, 8), dtype=np.uint8))
    ck = kit["checkpoint"]
    assert fails("encode", "--checkpoint", ck, "--dataset", f"npz:{tmp_path}/empty.npz") == (
        f"{tmp_path}/empty.npz: 'images' holds no images; nothing to train on or encode")
    assert fails("encode", "--checkpoint", ck, "--dataset", f"imagefolder:{kit['npz']}") == (
        f"imagefolder:{kit['npz']}: is a file, not a folder; use npz:{kit['npz']}")
    assert fails("encode", "--checkpoint", ck, "--dataset", f"npz:{tmp_path}") == (
        f"npz:{tmp_path}: is a folder; use imagefolder:{tmp_path} for folders of images")


# --- images ----------------------------------------------------------------------------------


def image_folder(root: Path, n: int = 12, size: int = 8) -> Path:
    for i in range(n):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((size, size), 20 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.mark.usefixtures("prefect_harness")
def test_corrupt_image_is_named_and_finished_shards_are_kept(kit, tmp_path):
    root = image_folder(tmp_path / "images")
    (root / "b" / "8.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")  # the last file
    out = tmp_path / "out"
    message = fails("encode", "--checkpoint", kit["checkpoint"], "--dataset",
                    f"imagefolder:{root}", "--out", out, "--shard-size", "4", "--quiet")
    assert message.startswith(f"{root}/b/8.png: cannot read image (cannot identify image file")
    assert message.endswith("; fix or remove the file")
    # Sorted, b/8.png is id 11, in the third train shard: the first two are done, the third
    # failed and left nothing (validation, id 9, comes after train and was never started).
    # All of it in the unpublished first version folder: nothing is current yet.
    version = version_folder(out, 1)
    assert sorted(tree(version)) == [
        ".vqtok/done/train/part-00000.json", ".vqtok/done/train/part-00001.json",
        ".vqtok/keys.parquet", ".vqtok/plan.json", ".vqtok/plan.npz",
        "hdf5/train/part-00000.h5", "hdf5/train/part-00001.h5",
        "tokens/train/part-00000.parquet", "tokens/train/part-00001.parquet"]
    assert sorted(store_tree(out)) == [".vqtok/lock", *(
        f".vqtok/versions/000001/{rel}" for rel in sorted(tree(version)))]
    assert not (out / ".vqtok" / "current").exists() and not (out / "tokens").exists()
    # Read in DataLoader worker processes, the same line names the same file.
    again = fails("encode", "--checkpoint", kit["checkpoint"], "--dataset", f"imagefolder:{root}",
                  "--out", tmp_path / "out-workers", "--shard-size", "4", "--quiet",
                  "--workers", "2")
    assert again == message


def test_the_run_log_keeps_what_the_console_leaves_out(kit, tmp_path, prefect_harness):
    """A failure after Prefect started: one console line, the whole story in OUT/logs; with
    --verbose the console shows Prefect's own lines too. Run as users run it."""
    from prefect.settings import PREFECT_API_URL

    root = image_folder(tmp_path / "images")
    (root / "b" / "8.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    outside = tmp_path / "elsewhere"
    outside.mkdir()

    def encode(out: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [console_command(), *extra, "encode", "--checkpoint", str(kit["checkpoint"]),
             "--dataset", f"imagefolder:{root}", "--out", str(out), "--shard-size", "4",
             "--quiet"], cwd=outside, env=env, capture_output=True, text=True, timeout=300)

    quiet = encode(tmp_path / "out")
    assert quiet.returncode == 1
    ours = [line for line in quiet.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and ours[0].startswith(f"error: {root}/b/8.png: cannot read image")
    assert quiet.stderr.strip().splitlines()[-1] == ours[0]
    assert "| ERROR" not in quiet.stderr and "Traceback" not in quiet.stderr
    [log] = (tmp_path / "out" / "logs").glob("encode-*.log")
    text = log.read_text()
    assert "| ERROR" in text and "Finished in state Failed" in text  # what the console hid
    assert f"vqtok.cli - {ours[0]}" in text and "Traceback (most recent call last)" in text

    verbose = encode(tmp_path / "out-verbose", "--verbose")
    assert verbose.returncode == 1
    assert "Finished in state Failed" in verbose.stderr  # Prefect's console, unfiltered
    assert verbose.stderr.strip().splitlines()[-1] == ours[0]


@pytest.mark.usefixtures("prefect_harness")
def test_non_image_files_are_skipped_but_a_fake_png_is_an_error(kit, tmp_path):
    root = image_folder(tmp_path / "images", n=10)
    (root / "a" / "README.md").write_text("# my dataset")
    (root / "b" / "Thumbs.db").write_bytes(b"\0" * 64)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["encode", "--checkpoint", str(kit["checkpoint"]),
                                       "--dataset", f"imagefolder:{root}", "--out", str(out),
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    assert "10 images encoded" in result.output
    (root / "a" / "notes.png").write_text("plain text with a .png name")
    message = fails("encode", "--checkpoint", kit["checkpoint"], "--dataset",
                    f"imagefolder:{root}", "--out", tmp_path / "out2", "--quiet")
    assert message.startswith(f"{root}/a/notes.png: cannot read image")


def test_wrong_channels_are_converted_or_refused(kit, tmp_path):
    from vqtok.tokenizer import open_source
    from vqtok.tokenizer.config import DataConfig

    rgb = tmp_path / "rgb.npz"
    np.savez(rgb, images=np.zeros((20, 3, 8, 8), dtype=np.uint8))  # RGB -> grayscale: fine
    assert open_source(DataConfig(dataset=f"npz:{rgb}", image_size=8)).load_batch([0])[
        0].shape == (1, 1, 8, 8)
    two = tmp_path / "two.npz"
    np.savez(two, images=np.zeros((20, 2, 8, 8), dtype=np.uint8))
    ck = kit["checkpoint"]
    assert fails("encode", "--checkpoint", ck, "--dataset", f"npz:{two}") == (
        f"npz:{two}: images have 2 channels and the config wants 1")
    raw = tiny_raw(f"imagefolder:{tmp_path}")
    raw["data"]["channels"] = 4
    config = write_config(tmp_path / "rgba.yaml", raw)
    assert fails("train", "--config", config, "--out", tmp_path / "o") == (
        f"imagefolder:{tmp_path}: image files are read as 1 or 3 channels, the config has "
        "data.channels 4; set 1 or 3")
    assert not (tmp_path / "o").exists()


@pytest.mark.usefixtures("prefect_harness")
def test_wrong_image_size_is_resized_or_refused_as_configured(kit, tmp_path):
    root = image_folder(tmp_path / "images", n=10)
    Image.fromarray(np.zeros((12, 10), dtype=np.uint8)).save(root / "a" / "big.png")
    raw = json.loads(json.dumps(kit["raw"]))
    raw["data"].update(dataset=f"imagefolder:{root}", resize="error")
    config = write_config(tmp_path / "strict.yaml", raw)
    message = fails("encode", "--checkpoint", kit["checkpoint"], "--config", config, "--out",
                    tmp_path / "out", "--quiet")
    assert message == (f"{root}/a/big.png: images are 12x10 but the config wants 8x8 and "
                       "data.resize is 'error'; set data.resize: resize or data.image_size")
    assert not [p for p in (tmp_path / "out").rglob("*.parquet") if p.name != "keys.parquet"]
    assert not list((tmp_path / "out").rglob("part-*"))  # no token file, under any name
    raw["data"]["resize"] = "resize"
    config = write_config(tmp_path / "lenient.yaml", raw)
    result = CliRunner().invoke(main, ["encode", "--checkpoint", str(kit["checkpoint"]),
                                       "--config", str(config), "--out", str(tmp_path / "ok"),
                                       "--quiet"])
    assert result.exit_code == 0 and "11 images encoded" in result.output, result.output


def test_float_images_with_nan_are_refused(kit, tmp_path):
    floats = tmp_path / "floats.npz"
    images = np.full((20, 8, 8), 0.5, dtype=np.float32)
    images[3, 2, 2] = np.nan
    np.savez(floats, images=images)
    assert fails("encode", "--checkpoint", kit["checkpoint"], "--dataset", f"npz:{floats}") == (
        f"{floats}: 'images' must be uint8, got float32")


# --- checkpoints ------------------------------------------------------------------------------


def copy_checkpoint(kit, tmp_path) -> Path:
    return Path(shutil.copytree(kit["checkpoint"], tmp_path / "ck"))


def test_truncated_checkpoint_files(kit, tmp_path):
    ck = copy_checkpoint(kit, tmp_path)
    weights = ck / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    message = fails("encode", "--checkpoint", ck, "--out", tmp_path / "o")
    assert message.startswith(f"{weights}: not a valid safetensors file (")
    assert message.endswith("); it may be truncated or not ours")
    ck2 = copy_checkpoint(kit, tmp_path / "2")
    (ck2 / "config.json").write_text((ck2 / "config.json").read_text()[:100])
    assert fails("encode", "--checkpoint", ck2, "--out", tmp_path / "o").startswith(
        f"{ck2}/config.json: unreadable (")
    assert not (tmp_path / "o").exists()


def test_checkpoint_of_another_architecture_or_codebook_size(kit, tmp_path):
    ck = copy_checkpoint(kit, tmp_path)
    other_raw = json.loads(json.dumps(kit["raw"]))
    other_raw["model"]["num_embeddings"] = 32
    other = make_checkpoint(tmp_path / "k32", other_raw)
    # K=32 weights (with their own, valid hash) under a config.json that says K=16.
    shutil.copy(other / "model.safetensors", ck / "model.safetensors")
    meta = json.loads((ck / "config.json").read_text())
    meta["weights_sha256"] = json.loads((other / "config.json").read_text())["weights_sha256"]
    (ck / "config.json").write_text(json.dumps(meta))
    assert fails("encode", "--checkpoint", ck, "--out", tmp_path / "o") == (
        f"{ck}/model.safetensors: weights do not fit the architecture in config.json "
        "(size mismatch for quantizer.embedding: copying a param with shape torch.Size([32, "
        "4]) from checkpoint, the shape in current model is torch.Size([16, 4]).)")


def test_checkpoint_with_nan_weights_is_refused(kit, tmp_path):
    raw = kit["raw"]
    config = parse_config(raw)
    model = build_model(config)
    with torch.no_grad():
        model.decoder[0].weight[0, 0, 0, 0] = float("inf")
    save_checkpoint(tmp_path / "ck", model, config)
    assert fails("encode", "--checkpoint", tmp_path / "ck", "--out", tmp_path / "o") == (
        f"{tmp_path}/ck/model.safetensors: weights hold NaN or Inf (in decoder.0.weight); this "
        "checkpoint cannot encode anything, use an earlier one")


class _Payload:
    """Unpickling this creates a file: proof that something was unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_pickles_are_refused_without_running_them(kit, tmp_path):
    marker = tmp_path / "pwned"
    ck = copy_checkpoint(kit, tmp_path)
    (ck / "model.safetensors").write_bytes(pickle.dumps(_Payload(str(marker))))
    assert fails("encode", "--checkpoint", ck, "--out", tmp_path / "o").startswith(
        f"{ck}/model.safetensors: not a valid safetensors file (")
    pt = tmp_path / "model.pt"
    torch.save({"state": _Payload(str(marker))}, pt)
    assert fails("encode", "--checkpoint", pt, "--out", tmp_path / "o") == (
        f"{pt} is not a vqtok checkpoint (no config.json); pass the folder written by "
        "'train'")
    npz = tmp_path / "evil.npz"
    np.savez(npz, images=np.array([_Payload(str(marker))], dtype=object))
    assert fails("encode", "--checkpoint", kit["checkpoint"], "--dataset", f"npz:{npz}") == (
        f"{npz}: cannot read .npz (Object arrays cannot be loaded when allow_pickle=False)")
    assert not marker.exists()


@pytest.mark.usefixtures("prefect_harness")
def test_training_state_that_is_a_pickle_is_refused_on_resume(kit, tmp_path):
    from vqtok.tokenizer.training import train

    config = parse_config(kit["raw"]).with_overrides(**{"train.max_steps": 2})
    train(config, tmp_path / "run", progress=False, log=lambda _: None)
    marker = tmp_path / "pwned"
    state = tmp_path / "run/checkpoint/train_state.safetensors"
    state.write_bytes(pickle.dumps(_Payload(str(marker))))
    config_file = write_config(tmp_path / "c.yaml", kit["raw"])
    message = fails("train", "--config", config_file, "--out", tmp_path / "run")
    assert message.startswith(f"{state}: not a valid safetensors file (")
    assert not marker.exists()


# --- configs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("model:\n  widht: 3\n", "unknown key 'model.widht'; remove it or fix its spelling"),
    ("train:\n  epochs: three\n",
     "key 'train.epochs': Input should be a valid integer (got 'three')"),
    ("train:\n  checkpoint_every: 0\n",
     "key 'train.checkpoint_every': Input should be greater than or equal to 1 (got 0)"),
    ("train: [1, 2\n", "not valid YAML at line 2, column 1 (expected ',' or ']', but got "
     "'<stream end>')"),
    ("- just\n- a list\n", "expected a mapping of sections at the top level"),
])
def test_bad_configs_name_the_key(tmp_path, text, expected):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    assert fails("train", "--config", config, "--out", tmp_path / "o", code=2) == (
        f"{config}: {expected}")
    assert not (tmp_path / "o").exists()


def test_a_binary_config_is_not_text(tmp_path):
    config = tmp_path / "model.yaml"
    config.write_bytes(bytes(range(256)))
    assert fails("train", "--config", config, "--out", tmp_path / "o", code=2) == (
        f"{config}: not a text file (not UTF-8); pass a YAML config")
    assert not (tmp_path / "o").exists()


def test_bad_option_values_are_one_line_usage_errors(kit, tmp_path):
    file = tmp_path / "file.txt"
    file.write_text("x")
    assert fails("encode", "--checkpoint", kit["checkpoint"], "--out", file, code=2) == (
        f"Invalid value for '--out': Directory '{file}' is a file. (see --help)")
    assert fails("encode", "--shard-size", "0", code=2) == (
        "Invalid value for '--shard-size': 0 is not in the range x>=1. (see --help)")
    assert fails("encode", "--bogus", code=2) == (
        "No such option '--bogus'. Did you mean '--out'? (see --help)")
    assert fails("encode", "--checkpoint", kit["checkpoint"], "--device", "cuda:3") == (
        "device 'cuda:3' asked for but CUDA is not available; use --device cpu")


# --- token files ------------------------------------------------------------------------------


def forged_tokens(path: Path, checkpoint_hash: str, codes: np.ndarray) -> Path:
    """A Parquet token file written without the writer's checks (as a buggy tool might)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from vqtok.storage import TokenMeta
    from vqtok.storage.parquet import arrow_schema, codes_type

    meta = TokenMeta(codebook_size=16, grid_h=2, grid_w=2, dataset="forged",
                     dataset_fingerprint="x", checkpoint_hash=checkpoint_hash,
                     vqtok_version="0.1.0", created_at="2025-01-01T00:00:00+00:00")
    schema = arrow_schema(meta)
    n = len(codes)
    split = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int32)),
                                           pa.array(["train"]))
    table = pa.Table.from_arrays(
        [pa.array(np.arange(n)), pa.array(np.full(n, -1, dtype=np.int32)), split,
         pa.FixedSizeListArray.from_arrays(pa.array(codes.reshape(-1).astype(np.uint16)),
                                           type=codes_type(meta))],
        schema=schema)
    pq.write_table(table, path)
    return path


@pytest.mark.usefixtures("prefect_harness")
def test_token_file_with_codes_outside_the_codebook(kit, tmp_path):
    digest = json.loads((kit["checkpoint"] / "config.json").read_text())["weights_sha256"]
    codes = np.array([[[1, 2], [3, 4]], [[5, 6], [16, 7]]])  # 16 is not in [0, 16)
    tokens = forged_tokens(tmp_path / "forged.parquet", digest, codes)
    expected = (f"{tokens}: read: code 16 at row 1 is outside the codebook [0, 16); the tokens "
                "belong to another tokenizer or are corrupt")
    assert fails("decode", "--tokens", tokens, "--checkpoint", kit["checkpoint"], "--out",
                 tmp_path / "decoded") == expected
    assert fails("stats", "--tokens", tokens, "--out", tmp_path / "s") == expected
    assert not (tmp_path / "decoded").exists() and not (tmp_path / "s").exists()


def test_token_file_of_another_tokenizer(kit, tmp_path):
    tokens = forged_tokens(tmp_path / "other.parquet", "feed" * 16, np.zeros((2, 2, 2)))
    digest = json.loads((kit["checkpoint"] / "config.json").read_text())["weights_sha256"]
    assert fails("decode", "--tokens", tokens, "--checkpoint", kit["checkpoint"], "--out",
                 tmp_path / "d") == (
        f"{tokens}: tokens were made by checkpoint feedfeedfeedfeed but the tokenizer is "
        f"{digest[:16]}; decode with the checkpoint that encoded them")
    assert not (tmp_path / "d").exists()


def test_manifest_pointing_outside_the_store_is_refused(kit, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    secret = tmp_path / "secret.parquet"
    forged_tokens(secret, "feed" * 16, np.zeros((2, 2, 2)))
    from vqtok.storage import TokenMeta

    meta = TokenMeta(16, 2, 2, "forged", "x", "feed" * 16, "0.1.0", created_at="t")
    manifest = {"kind": "vqtok-token-manifest", "version": 1, "meta": meta.to_dict(),
                "formats": ["parquet"], "shard_size": 2, "num_rows": 2,
                "splits": [{"name": "train", "num_rows": 2, "shards": [
                    {"index": 0, "start": 0, "stop": 2, "num_rows": 2, "files": {"parquet": {
                        "path": "../secret.parquet", "sha256": "0" * 64, "bytes": 1}}}]}]}
    (tokens / "manifest.json").write_text(json.dumps(manifest))  # layout 1
    assert fails("stats", "--tokens", tokens, "--out", tmp_path / "s") == (
        f"{tokens}/manifest.json: path '../secret.parquet' points outside the token folder; "
        "the manifest is corrupt")
    assert not (tmp_path / "s").exists()

    run = tmp_path / "run"  # layout 2: the manifest in OUT/.vqtok, paths relative to OUT
    (run / "tokens").mkdir(parents=True)
    (run / ".vqtok").mkdir()
    (run / ".vqtok" / "manifest.json").write_text(json.dumps({**manifest, "version": 2}))
    assert fails("stats", "--tokens", run / "tokens", "--out", tmp_path / "s") == (
        f"{run}/.vqtok/manifest.json: path '../secret.parquet' points outside the token "
        "folder; the manifest is corrupt")
    assert not (tmp_path / "s").exists()


# --- training ---------------------------------------------------------------------------------


@pytest.mark.usefixtures("prefect_harness")
def test_non_finite_loss_stops_training_naming_the_step(kit, tmp_path):
    config = write_config(tmp_path / "hot.yaml", tiny_raw(f"npz:{kit['npz']}", lr=1e6))
    assert fails("train", "--config", config, "--out", tmp_path / "run", "--quiet") == (
        "loss became nan at step 2; stopped, no checkpoint was written yet; lower train.lr "
        "or check the data")
    assert not (tmp_path / "run" / "checkpoint").exists()
    assert not list((tmp_path / "run").glob("checkpoint*"))


# --- output folders ---------------------------------------------------------------------------


def test_output_under_a_file(kit, tmp_path):
    file = tmp_path / "file.txt"
    file.write_text("x")
    assert fails("encode", "--checkpoint", kit["checkpoint"], "--out", file / "run") == (
        f"{file}/run: {file} is a file, not a folder; choose another --out")
    assert file.read_text() == "x"


@contextlib.contextmanager
def as_nobody():
    """Permission checks apply: drop the effective uid to 'nobody' (root can write anywhere)."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def test_output_folder_without_write_permission(kit):
    # World-readable inputs in a folder 'nobody' may not write to (pytest's tmp is private).
    base = Path(tempfile.mkdtemp(prefix="vqtok-readonly-"))
    try:
        shutil.copytree(kit["checkpoint"], base / "ck")
        shutil.copy(kit["npz"], base / "images.npz")
        for path in [base, *base.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        args = ["encode", "--checkpoint", base / "ck", "--dataset", f"npz:{base}/images.npz"]
        # The same checks once as root first: whatever they import lazily is loaded before
        # 'nobody' runs them (this Python may live where 'nobody' cannot read).
        fails(*args, "--out", base / "ck" / "config.json" / "run")
        with as_nobody():
            message = fails(*args, "--out", base / "run")
        assert message == (f"{base}/run: cannot write in {base} (Permission denied); choose "
                           "another --out or fix the folder's permissions")
        assert sorted(p.name for p in base.iterdir()) == ["ck", "images.npz"]
    finally:
        for path in [base, *base.rglob("*")]:
            path.chmod(stat.S_IRWXU)
        shutil.rmtree(base)


@pytest.mark.parametrize("cron", ["61 * * * *", "every night", "0 3 * *"])
def test_serve_with_a_bad_cron_is_refused_before_prefect_serves(kit, tmp_path, cron):
    assert fails("serve", "--checkpoint", kit["checkpoint"], "--out", tmp_path / "o", "--cron",
                 cron, code=2) == (
        f"Invalid value for '--cron': {cron!r} is not a cron schedule; give five fields "
        "(minute hour day-of-month month day-of-week), e.g. '0 3 * * *' (see --help)")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("labels", "expected"), [
    (np.array(["cat", "dog"] * 20), "'labels' must be integer class ids, got dtype <U3; map "
     "class names to 0, 1, 2, ... before saving"),
    (np.r_[np.arange(5.0), np.nan, np.zeros(34)], "'labels' must be whole class ids; entry 5 "
     "is np.float64(nan); store -1 for an image without a label"),
    (np.r_[np.zeros(3), 1.5, np.zeros(36)], "'labels' must be whole class ids; entry 3 is "
     "np.float64(1.5); store -1 for an image without a label"),
    (np.r_[np.zeros(7, dtype=np.int64), -2, np.zeros(32, dtype=np.int64)],
     "'labels' entry 7 is -2; class ids must be 0 to 2147483647 (-1 for no label)"),
    (np.r_[np.zeros(7, dtype=np.int64), 2**40, np.zeros(32, dtype=np.int64)],
     f"'labels' entry 7 is {2**40}; class ids must be 0 to 2147483647 (-1 for no label)"),
])
def test_npz_labels_that_are_not_class_ids_name_the_file_and_entry(kit, tmp_path, labels,
                                                                     expected):
    bad = tmp_path / "labelled.npz"
    with np.load(kit["npz"]) as archive:
        np.savez(bad, images=archive["images"], labels=labels)
    out = tmp_path / "out"
    assert fails("encode", "--checkpoint", kit["checkpoint"], "--dataset", f"npz:{bad}",
                 "--out", out) == f"{bad}: {expected}"
    assert not out.exists()
    with np.load(kit["npz"]) as archive:  # whole floats are fine: they are class ids
        np.savez(bad, images=archive["images"], labels=archive["labels"].astype(np.float32))
    from vqtok.tokenizer import open_source
    from vqtok.tokenizer.config import DataConfig

    source = open_source(DataConfig(dataset=f"npz:{bad}", image_size=8))
    assert source.load_batch([0, 1, 2, 3])[1].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(("data", "expected"), [
    ({"channels": 3}, "data.channels is 3, the checkpoint's model takes 1-channel images; set "
     "data.channels: 1 (images are converted)"),
    ({"image_size": 10}, "data.image_size 10 is not a multiple of 4 (the model downsamples 2 "
     "times); use e.g. data.image_size: 8"),
])
def test_a_config_the_checkpoints_model_cannot_take_is_refused_up_front(kit, tmp_path, data,
                                                                          expected):
    config = write_config(tmp_path / "other.yaml",
                          {"data": {"dataset": f"npz:{kit['npz']}", "image_size": 8, **data}})
    out = tmp_path / "out"
    assert fails("encode", "--checkpoint", kit["checkpoint"], "--config", config, "--out", out,
                 code=2) == f"npz:{kit['npz']}: {expected}"
    assert not out.exists()
