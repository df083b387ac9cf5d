"""Simulated I/O faults (disk full, a transient error) and mismatched re-runs, through the CLI.

The faults are injected where the operating system reports them on a real disk: at the
fsync before a finished temp file is renamed into place (delayed allocation makes that where
ENOSPC and EIO often surface), and in the checkpoint writer.
"""

from __future__ import annotations

import errno
import json
import os
import shutil

import numpy as np
import pytest
import safetensors.torch
import torch
import vqtok.files.atomic
import yaml
from click.testing import CliRunner
from vqtok.flows.cli import main
from vqtok.storage import load_grid
from vqtok.tokenizer import load_tokenizer

from tests.helpers import (
    fails,
    make_checkpoint,
    store_tree,
    tiny_raw,
    tree,
    version_folder,
    write_npz,
)

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture
def kit(tmp_path, monkeypatch):
    from vqtok.flows.encode_flow import encode_shard

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")  # byte-identical runs
    monkeypatch.setattr(encode_shard, "retry_delay_seconds", 0)  # retries without the wait
    npz = write_npz(tmp_path / "images.npz", n=40)
    raw = tiny_raw(f"npz:{npz}")
    return {"raw": raw, "npz": npz, "checkpoint": make_checkpoint(tmp_path / "ck", raw)}


def encode(kit, out, *extra):
    result = CliRunner().invoke(main, ["encode", "--checkpoint", str(kit["checkpoint"]),
                                       "--out", str(out), "--shard-size", "16", "--quiet",
                                       *map(str, extra)])
    assert result.exit_code == 0, result.output
    return result


def failing_fsync(monkeypatch, fail_from: int, fail_count: int, code: int):
    """fsync calls number fail_from .. fail_from + fail_count - 1 raise OSError(code)."""
    real = vqtok.files.atomic.fsync_path
    calls = {"n": 0, "raised": 0, "real": real}

    def fsync(path):
        calls["n"] += 1
        if fail_from <= calls["n"] < fail_from + fail_count:
            calls["raised"] += 1
            raise OSError(code, os.strerror(code))
        real(path)

    monkeypatch.setattr(vqtok.files.atomic, "fsync_path", fsync)
    return calls


def test_disk_full_mid_encode_leaves_only_whole_shards_and_a_rerun_completes(
    kit, tmp_path, monkeypatch
):
    encode(kit, tmp_path / "reference")
    out = tmp_path / "run"
    # First the version's key map, plan.npz and plan.json; then per shard: Parquet, HDF5,
    # record. Call 8 is shard 1's HDF5 file; the disk stays full.
    calls = failing_fsync(monkeypatch, 8, 10**6, errno.ENOSPC)
    version = out / ".vqtok/versions/000001"
    assert fails("encode", "--checkpoint", kit["checkpoint"], "--out", out, "--shard-size",
                 "16", "--quiet") == (
        f"{version}/tokens/train/part-00001: No space left on device; free some space (or "
        "choose another --out) and re-run: finished work is kept")
    assert calls["raised"] == 3  # the first try and both retries
    # Shard 0 is whole; shard 1's Parquet file, published before its HDF5 file failed, was
    # taken back; no temp file is left, and the unfinished version is not published.
    assert sorted(store_tree(out)) == [".vqtok/lock",
                                       ".vqtok/versions/000001/.vqtok/done/train/part-00000.json",
                                       ".vqtok/versions/000001/.vqtok/keys.parquet",
                                       ".vqtok/versions/000001/.vqtok/plan.json",
                                       ".vqtok/versions/000001/.vqtok/plan.npz",
                                       ".vqtok/versions/000001/hdf5/train/part-00000.h5",
                                       ".vqtok/versions/000001/tokens/train/part-00000.parquet"]
    assert not (out / ".vqtok/current").exists()

    monkeypatch.setattr(vqtok.files.atomic, "fsync_path", calls["real"])  # space freed
    result = encode(kit, out)
    assert "1 of 4 shards already done" in result.output
    assert store_tree(out) == store_tree(tmp_path / "reference")


def test_a_transient_io_error_is_retried_and_the_result_is_identical(kit, tmp_path, monkeypatch):
    encode(kit, tmp_path / "reference")
    calls = failing_fsync(monkeypatch, 5, 1, errno.EIO)
    out = tmp_path / "run"
    encode(kit, out)
    assert calls["raised"] == 1 and calls["n"] > 12  # 4 shards x 3 files + manifest + retry
    assert store_tree(out) == store_tree(tmp_path / "reference")
    assert np.array_equal(load_grid(out).codes, load_grid(tmp_path / "reference").codes)


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(kit, tmp_path, monkeypatch):
    from vqtok.tokenizer.training import train

    raw = json.loads(json.dumps(kit["raw"]))
    raw["train"].update(epochs=2, checkpoint_every=2)  # 5 steps/epoch: saves at 2, 4, 5, 7, ...
    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    from vqtok.tokenizer.config import parse_config

    reference = train(parse_config(raw), tmp_path / "reference", progress=False,
                      log=lambda _: None)

    real = safetensors.torch.save_file
    calls = {"n": 0}

    def save_file(tensors, path):
        calls["n"] += 1
        if calls["n"] == 3:  # the weights of the second save (step 4)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)  # what checkpoints write with
    out = tmp_path / "run"
    assert fails("train", "--config", config_file, "--out", out, "--quiet") == (
        f"{out}/checkpoint.tmp/model.safetensors: No space left on device; free some space "
        "(or choose another --out) and re-run: finished work is kept")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "logs"]  # no checkpoint.tmp
    assert json.loads((out / "checkpoint/train_state.json").read_text())["step"] == 2
    load_tokenizer(out)

    monkeypatch.setattr(safetensors.torch, "save_file", real)
    result = CliRunner().invoke(main, ["train", "--config", str(config_file), "--out", str(out),
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    assert f"weights {reference.weights_sha256[:12]}), step 10" in result.output


def test_rerun_with_another_shard_size_builds_a_new_version_another_checkpoint_is_refused(
    kit, tmp_path
):
    out = tmp_path / "run"
    encode(kit, out)
    first = tree(version_folder(out))
    grid = load_grid(out / "tokens")
    result = CliRunner().invoke(main, ["encode", "--checkpoint", str(kit["checkpoint"]),
                                       "--out", str(out), "--shard-size", "10", "--quiet"])
    assert result.exit_code == 0, result.output
    assert version_folder(out) == (out / ".vqtok/versions/000002").resolve()
    assert tree(out / ".vqtok/versions/000001") == first  # the old version is untouched
    second = tree(version_folder(out))
    rows = {split: int((grid.splits == split).sum()) for split in ("train", "validation")}
    assert sorted(p for p in second if p.startswith("tokens/")) == [  # shards of 10 rows
        f"tokens/{split}/part-{i:05d}-v2.parquet" for split, n in rows.items()
        for i in range(-(-n // 10))]
    again = load_grid(out / "tokens")
    assert np.array_equal(again.ids, grid.ids) and np.array_equal(again.codes, grid.codes)

    before = store_tree(out)
    other = make_checkpoint(tmp_path / "other", kit["raw"], seed=1)
    assert fails("encode", "--checkpoint", other, "--out", out, "--shard-size", "10",
                 "--quiet") == (
        f"{out}: holds tokens of another tokenizer (different checkpoint_hash); write to a new "
        "output folder, or pass --reencode to rebuild the store with this one as a new version")
    assert store_tree(out) == before


def test_split_names_from_a_dataset_never_leave_the_output_folder(kit, tmp_path, monkeypatch):
    import vqtok.flows.runtime
    from vqtok.tokenizer.sources import ArraySource, open_source

    def evil_source(cfg):
        clean = open_source(cfg)
        ids = np.arange(len(clean))
        return ArraySource(clean.images, clean.labels, {"../../escape": ids}, clean.name,
                           clean.fingerprint, cfg)

    monkeypatch.setattr(vqtok.flows.runtime, "open_source", evil_source)
    vqtok.flows.runtime._cached_source.cache_clear()
    out = tmp_path / "deep" / "run"
    try:
        message = fails("encode", "--checkpoint", kit["checkpoint"], "--out", out, "--quiet")
    finally:
        vqtok.flows.runtime._cached_source.cache_clear()
    assert message == (f"{out}/.vqtok/versions/000001/tokens: split name '../../escape' is "
                       "not allowed; use 1-32 characters from A-Z a-z 0-9 _ . - starting with a "
                       "letter or digit (it becomes a folder name)")
    assert not list(tmp_path.rglob("escape*")) and not (out / "tokens").exists()
    assert not (out / ".vqtok/current").exists()


def test_resumed_store_keeps_the_first_runs_creation_time(kit, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1000000000")
    encode(kit, out)
    first = store_tree(out)
    # As if the run had been killed before this shard: version 1 was never finalized nor
    # published (no manifest, version.json, current link or tokens/ and hdf5/ links).
    version = version_folder(out)
    for path in version.glob("*/train/part-00002.*"):
        path.unlink()
    for name in ("done/train/part-00002.json", "manifest.json", "version.json"):
        (version / ".vqtok" / name).unlink()
    for link in ("tokens", "hdf5", ".vqtok/current"):
        (out / link).unlink()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "2000000000")  # a later day
    encode(kit, out)
    # The redone shard says 2001-09-09 too; only the publication time is the resuming run's.
    info = ".vqtok/versions/000001/.vqtok/version.json"
    again = store_tree(out)
    published = [json.loads(tree_[info]) for tree_ in (first, again)]
    assert [p.pop("published_at") for p in published] == [
        "2001-09-09T01:46:40+00:00", "2033-05-18T03:33:20+00:00"]
    assert published[0] == published[1]
    assert {k: v for k, v in again.items() if k != info} == {
        k: v for k, v in first.items() if k != info}
    manifest = version_folder(out) / ".vqtok/manifest.json"
    meta = json.loads(manifest.read_text())["meta"]
    assert meta["created_at"] == "2001-09-09T01:46:40+00:00"

    for link in ("tokens", "hdf5"):
        (out / link).unlink()  # symlinks into the current version
    shutil.rmtree(out / ".vqtok")
    encode(kit, out)  # a fresh store gets the new time
    manifest = version_folder(out) / ".vqtok/manifest.json"
    assert json.loads(manifest.read_text())["meta"]["created_at"] == (
        "2033-05-18T03:33:20+00:00")


def test_same_checkpoint_data_and_batch_size_give_byte_identical_stores(kit, tmp_path):
    encode(kit, tmp_path / "a", "--batch-size", "5")
    encode(kit, tmp_path / "b", "--batch-size", "5")
    a, b = store_tree(tmp_path / "a"), store_tree(tmp_path / "b")
    assert a == b
    # The version: 4 shards x (Parquet, HDF5, record) + manifest, key map, plan.npz,
    # plan.json, version.json; the run folder adds the lock and shows the shard files again
    # through the tokens/ and hdf5/ links.
    version = tree(version_folder(tmp_path / "a"))
    assert len(version) == 4 * 3 + 5 and len(a) == len(version) + 1 + 4 * 2
    grid = load_grid(tmp_path / "a")
    model = load_tokenizer(kit["checkpoint"])
    from vqtok.tokenizer import open_source
    from vqtok.tokenizer.config import parse_config

    images, _ = open_source(parse_config(kit["raw"]).data).load_batch(grid.ids)
    with torch.no_grad():
        assert np.array_equal(grid.codes, model.encode(images).numpy())
