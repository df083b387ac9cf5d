"""Sharded layout: equals one file, resumes to identical bytes, validates against its manifest."""

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from vqtok.storage import (
    ParquetTokenWriter,
    ShardedTokenStore,
    ShardSpec,
    TokenMeta,
    TokenStoreError,
    load_grid,
    read_tokens,
)

REPO = Path(__file__).resolve().parents[1]
CREATED = "2025-01-01T00:00:00+00:00"
SPLITS = {"train": 23, "test": 9, "val": 0}
SMALL = {"parquet_options": {"row_group_size": 4}, "hdf5_options": {"chunk_rows": 4}}


def make_meta(**overrides):
    fields = dict(
        codebook_size=300,
        grid_h=3,
        grid_w=2,
        dataset="toy",
        dataset_fingerprint="fp",
        checkpoint_hash="ck",
        vqtok_version="0.1.0",
        created_at=CREATED,
    )
    fields.update(overrides)
    return TokenMeta(**fields)


def dataset(split):
    """Deterministic 'encoder output' for rows [0, n) of a split."""
    rows = SPLITS[split]
    rng = np.random.default_rng(len(split))
    codes = rng.integers(0, 300, (rows, 3, 2))
    ids = np.arange(rows) + (1000 if split == "test" else 0)
    labels = rng.integers(0, 10, rows)
    return codes, ids, labels


def write_shard(store, shard, batch=3, fail_after=None):
    codes, ids, labels = dataset(shard.split)
    with store.open_shard(shard) as writer:
        for start in range(shard.start, shard.stop, batch):
            stop = min(start + batch, shard.stop)
            if fail_after is not None and start - shard.start >= fail_after:
                raise RuntimeError("encoder crashed")
            writer.write(codes[start:stop], ids[start:stop], labels[start:stop])


def run_all(root, meta=None, shard_size=5, **options):
    store = ShardedTokenStore(
        root, meta or make_meta(), shard_size=shard_size, **(options or SMALL)
    )
    for split, rows in SPLITS.items():
        for shard in store.plan(split, rows):
            if not store.is_complete(shard):
                write_shard(store, shard)
    store.finalize()
    return store


def tree(root):
    """Every file the store wrote (tokens/, hdf5/, .vqtok/), by path relative to the run
    folder."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for folder in ("tokens", "hdf5", ".vqtok")
        for p in sorted((Path(root) / folder).rglob("*"))
        if p.is_file()
    }


def test_plan_covers_rows_in_shard_size_steps(tmp_path):
    store = ShardedTokenStore(tmp_path, make_meta(), shard_size=10)
    shards = store.plan("train", 25)
    assert shards == [
        ShardSpec("train", 0, 0, 10),
        ShardSpec("train", 1, 10, 20),
        ShardSpec("train", 2, 20, 25),
    ]
    assert store.plan("train", 25) == shards
    assert store.plan("empty", 0) == []
    with pytest.raises(TokenStoreError, match="already planned with 25 rows"):
        store.plan("train", 26)


def test_layout_and_manifest(tmp_path):
    run_all(tmp_path)
    files = set(tree(tmp_path))
    assert ".vqtok/manifest.json" in files
    assert {
        "tokens/train/part-00004.parquet",
        "hdf5/train/part-00004.h5",
        ".vqtok/done/train/part-00004.json",
        "tokens/test/part-00001.parquet",
    } <= files
    assert "tokens/train/part-00005.parquet" not in files
    # tokens/ holds Parquet files and nothing else, so every reader can open it.
    in_tokens = {f for f in files if f.startswith("tokens/")}
    assert in_tokens and all(f.endswith(".parquet") for f in in_tokens)
    manifest = json.loads((tmp_path / ".vqtok" / "manifest.json").read_text())
    assert manifest["num_rows"] == 32
    assert TokenMeta.from_dict(manifest["meta"]) == make_meta()
    train, test, val = manifest["splits"]
    assert (train["name"], train["num_rows"], len(train["shards"])) == ("train", 23, 5)
    assert (val["name"], val["num_rows"], val["shards"]) == ("val", 0, [])
    last = train["shards"][-1]
    assert (last["start"], last["stop"], last["num_rows"]) == (20, 23, 3)
    parquet = last["files"]["parquet"]
    assert len(parquet["sha256"]) == 64
    assert parquet["path"] == "tokens/train/part-00004.parquet"
    assert parquet["bytes"] == (tmp_path / parquet["path"]).stat().st_size


@pytest.mark.parametrize("fmt", ["parquet", "hdf5"])
def test_sharded_equals_unsharded(tmp_path, fmt):
    run_all(tmp_path / "sharded")
    single = tmp_path / "all.parquet"
    with ParquetTokenWriter(single, make_meta()) as writer:
        for split in SPLITS:
            codes, ids, labels = dataset(split)
            writer.write(codes, ids, labels, split)
    whole, sharded = load_grid(single), load_grid(tmp_path / "sharded", format=fmt)
    np.testing.assert_array_equal(sharded.codes, whole.codes)
    np.testing.assert_array_equal(sharded.ids, whole.ids)
    np.testing.assert_array_equal(sharded.labels, whole.labels)
    assert sharded.splits.tolist() == whole.splits.tolist()
    assert sharded.meta == whole.meta
    test_only = load_grid(tmp_path / "sharded" / "tokens", split="test", format=fmt)
    np.testing.assert_array_equal(test_only.ids, dataset("test")[1])
    assert load_grid(tmp_path / "sharded", split="val").num_rows == 0
    frame = read_tokens(tmp_path / "sharded", format=fmt)
    assert frame["id"].tolist() == whole.ids.tolist()


def test_resume_after_failures_is_byte_identical(tmp_path):
    reference = run_all(tmp_path / "a")

    # First attempt: one shard done, one crashes mid-way, one dies after publishing its
    # Parquet file but before its record, one leaves a killed writer's temp file.
    root = tmp_path / "b"
    store = ShardedTokenStore(root, make_meta(created_at=CREATED), shard_size=5, **SMALL)
    train = store.plan("train", SPLITS["train"])
    write_shard(store, train[0])
    with pytest.raises(RuntimeError, match="encoder crashed"):
        write_shard(store, train[1], fail_after=3)
    assert not store.is_complete(train[1])
    assert not store.shard_path(train[1], "parquet").exists()
    write_shard(store, train[2])
    store.record_path(train[2]).unlink()
    store.shard_path(train[3], "parquet").parent.mkdir(parents=True, exist_ok=True)
    Path(store.shard_path(train[3], "hdf5")).with_name(".part-00003.h5.dead.tmp").write_bytes(b"x")
    with pytest.raises(TokenStoreError, match=r"4 planned shard\(s\) are not complete"):
        store.finalize()

    # Second attempt, as a fresh process would: skip what is complete, redo the rest.
    redone = []
    store = ShardedTokenStore(root, make_meta(), shard_size=5, **SMALL)
    for split, rows in SPLITS.items():
        for shard in store.plan(split, rows):
            if not store.is_complete(shard):
                redone.append(str(shard))
                write_shard(store, shard, batch=4)  # other batch sizes: same bytes
    store.finalize()
    assert redone == [
        "train/part-00001",
        "train/part-00002",
        "train/part-00003",
        "train/part-00004",
        "test/part-00000",
        "test/part-00001",
    ]
    assert tree(root) == tree(reference.root)


KILLED_SHARD = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from vqtok.storage import ShardedTokenStore, TokenMeta
    meta = TokenMeta(300, 3, 2, "toy", "fp", "ck", "0.1.0", created_at=sys.argv[2])
    store = ShardedTokenStore(sys.argv[1], meta, shard_size=5)
    shard = store.plan("train", 23)[1]
    writer = store.open_shard(shard)
    writer.write(np.zeros((3, 3, 2), int), np.arange(3), None)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_resume_after_a_killed_worker(tmp_path):
    reference = run_all(tmp_path / "a", shard_size=5, parquet_options=None, hdf5_options=None)
    root = tmp_path / "b"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-c", KILLED_SHARD, str(root), CREATED], env=env, timeout=120
    )
    assert result.returncode == -signal.SIGKILL
    leftovers = sorted(p.name for folder in ("tokens", "hdf5")
                       for p in (root / folder / "train").iterdir())
    assert len(leftovers) == 2 and all(name.startswith(".part-00001.") for name in leftovers)
    run_all(root, shard_size=5, parquet_options=None, hdf5_options=None)
    assert tree(root) == tree(reference.root)


def test_workers_need_no_shared_state(tmp_path):
    """Shards written through pickled copies (as Dask workers would) finalize in the driver."""
    driver = ShardedTokenStore(tmp_path, make_meta(), shard_size=5, **SMALL)
    shards = [shard for split, rows in SPLITS.items() for shard in driver.plan(split, rows)]
    for shard in reversed(shards):
        worker = pickle.loads(pickle.dumps(driver))
        write_shard(worker, pickle.loads(pickle.dumps(shard)))
    driver.finalize()
    reference = run_all(tmp_path / "ref")
    assert tree(tmp_path) == tree(reference.root)


def test_corrupt_shard_fails_the_hash_check_naming_the_file(tmp_path):
    run_all(tmp_path)
    shard = tmp_path / "tokens" / "train" / "part-00002.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(TokenStoreError, match="does not match") as info:
        load_grid(tmp_path)
    assert str(info.value).startswith(f"{shard}: sha256 ")
    assert load_grid(tmp_path, split="test").num_rows == 9  # other shards still verify
    assert load_grid(tmp_path, format="hdf5").num_rows == 32

    short = tmp_path / "hdf5" / "test" / "part-00000.h5"
    short.write_bytes(short.read_bytes()[:-10])
    with pytest.raises(TokenStoreError, match="bytes but manifest.json records") as info:
        load_grid(tmp_path, format="hdf5", split="test")
    assert str(short) in str(info.value)


def test_missing_shard_file_is_reported(tmp_path):
    run_all(tmp_path)
    gone = tmp_path / "tokens" / "test" / "part-00001.parquet"
    gone.unlink()
    with pytest.raises(TokenStoreError, match="listed in .* but missing") as info:
        load_grid(tmp_path)
    assert str(gone) in str(info.value)


def test_resume_with_another_tokenizer_is_refused(tmp_path):
    run_all(tmp_path)
    store = ShardedTokenStore(tmp_path, make_meta(checkpoint_hash="other"), shard_size=5)
    shard = store.plan("train", SPLITS["train"])[0]
    with pytest.raises(TokenStoreError, match="different checkpoint_hash"):
        store.is_complete(shard)


def test_resume_with_another_shard_size_is_refused(tmp_path):
    run_all(tmp_path)
    store = ShardedTokenStore(tmp_path, make_meta(), shard_size=4)
    with pytest.raises(TokenStoreError, match="shard size changed"):
        store.is_complete(store.plan("train", SPLITS["train"])[0])


def test_shard_size_must_be_respected(tmp_path):
    store = ShardedTokenStore(tmp_path, make_meta(), shard_size=5)
    shard = store.plan("train", 23)[0]
    codes, ids, labels = dataset("train")
    with pytest.raises(TokenStoreError, match="planned for 5 rows but got 6"):
        with store.open_shard(shard) as writer:
            writer.write(codes[:6], ids[:6], labels[:6])
    with pytest.raises(TokenStoreError, match="got 2 rows but is planned for 5"):
        with store.open_shard(shard) as writer:
            writer.write(codes[:2], ids[:2], labels[:2])
    with pytest.raises(TokenStoreError, match="do not fit shard_size 5"):
        store.open_shard(ShardSpec("train", 1, 3, 8))
    assert not store.is_complete(shard)
    assert [p for p in (tmp_path / "tokens" / "train").iterdir()] == []


def test_deleted_shard_file_makes_the_shard_incomplete(tmp_path):
    store = run_all(tmp_path)
    shard = store.plan("test", SPLITS["test"])[1]
    assert store.is_complete(shard, verify_hash=True)
    store.shard_path(shard, "hdf5").unlink()
    assert not store.is_complete(shard)


def test_finalize_refuses_stray_files_and_empty_plans(tmp_path):
    with pytest.raises(TokenStoreError, match="before any plan"):
        ShardedTokenStore(tmp_path, make_meta()).finalize()
    run_all(tmp_path)
    stray = tmp_path / "tokens" / "train" / "part-00099.parquet"
    stray.write_bytes(b"old")
    with pytest.raises(TokenStoreError, match="not part of this plan") as info:
        run_all(tmp_path)
    assert str(stray) in str(info.value)


def test_parquet_only_store(tmp_path):
    run_all(tmp_path, formats=("parquet",), parquet_options={"row_group_size": 2})
    assert not list(tmp_path.rglob("*.h5")) and not (tmp_path / "hdf5").exists()
    assert load_grid(tmp_path).num_rows == 32
    with pytest.raises(TokenStoreError, match="no hdf5 files"):
        load_grid(tmp_path, format="hdf5")


def test_damaged_manifest_is_refused(tmp_path):
    run_all(tmp_path)
    manifest = tmp_path / ".vqtok" / "manifest.json"
    original = json.loads(manifest.read_text())

    damaged = json.loads(json.dumps(original))
    del damaged["splits"][0]["shards"][0]["files"]["parquet"]["sha256"]
    manifest.write_text(json.dumps(damaged))
    with pytest.raises(TokenStoreError, match="manifest is corrupt") as info:
        load_grid(tmp_path)
    assert str(manifest) in str(info.value)

    escaping = json.loads(json.dumps(original))
    escaping["splits"][0]["shards"][0]["files"]["parquet"]["path"] = "../../elsewhere.parquet"
    manifest.write_text(json.dumps(escaping))
    with pytest.raises(TokenStoreError, match="points outside the token folder"):
        load_grid(tmp_path)

    manifest.write_text("{not json")
    with pytest.raises(TokenStoreError, match="unreadable JSON"):
        load_grid(tmp_path)


def test_the_flow_calls_from_the_issue(tmp_path):
    """The exact call pattern the flows layer uses, keyword arguments included."""
    meta = make_meta()
    store = ShardedTokenStore(tmp_path, meta, shard_size=10, formats=("parquet", "hdf5"))
    codes, ids, labels = dataset("train")
    for shard in store.plan(split="train", num_rows=len(ids)):
        if store.is_complete(shard):
            continue
        with store.open_shard(shard) as w:
            w.write(
                codes[shard.start : shard.stop],
                ids[shard.start : shard.stop],
                labels[shard.start : shard.stop],
            )
    store.plan(split="test", num_rows=0)
    store.finalize()
    grid = load_grid(tmp_path)
    np.testing.assert_array_equal(grid.codes, codes)
    assert grid.meta == meta
