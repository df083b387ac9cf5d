"""The token folder ``OUT/tokens`` is one dataset for every common reader, splits included,
and stores written by layout 1 (before the bookkeeping moved out of it) still load."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest
from click.testing import CliRunner
from vqtok.flows.cli import main
from vqtok.storage import ShardedTokenStore, TokenMeta, TokenStoreError, load_grid, read_tokens
from vqtok.storage.reader import read_meta, split_rows
from vqtok.storage.versions import StoreVersions, file_suffix

META = TokenMeta(300, 3, 2, "toy", "fp", "ck", "0.1.0", created_at="2025-01-01T00:00:00+00:00")
SPLITS = {"train": 11, "validation": 3, "test": 5}  # several shards in train
LEGACY = Path(__file__).parent / "fixtures" / "layout1_store"


def rows(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic codes, ids and labels of a split (ids run on across the splits)."""
    first = sum(n for name, n in SPLITS.items() if name < split)
    ids = np.arange(first, first + SPLITS[split])
    codes = (ids[:, None, None] * 7 + np.arange(6).reshape(1, 3, 2) * 31) % 300
    return codes, ids, ids % 10


def write_store(root: Path, file_suffix: str = "", extra_row: bool = False) -> None:
    """The SPLITS rows as a sharded store in ``root``; ``extra_row`` adds a train row (id
    1000) that only an older version holds."""
    store = ShardedTokenStore(root, META, shard_size=4, file_suffix=file_suffix)
    for split in SPLITS:
        codes, ids, labels = rows(split)
        if extra_row and split == "train":
            codes = np.concatenate([codes, codes[:1]])
            ids, labels = np.append(ids, 1000), np.append(labels, 0)
        for shard in store.plan(split, len(ids)):
            part = slice(shard.start, shard.stop)
            with store.open_shard(shard) as writer:
                writer.write(codes[part], ids[part], labels[part])
    store.finalize()


@pytest.fixture(params=["plain", "versioned"])
def run(tmp_path, request) -> Path:
    """A run folder as encode leaves it: a plain store, or (what encode writes now) a
    versioned one whose tokens/ links to the current of two versions; the older one holds a
    row that no reader may see."""
    out = tmp_path / "run"
    if request.param == "plain":
        write_store(out)
        return out
    versions = StoreVersions(out)
    write_store(versions.version_root(1), extra_row=True)
    versions.publish(1, {"num_rows": sum(SPLITS.values()) + 1})
    write_store(versions.version_root(2), file_suffix=file_suffix(2))
    versions.publish(2, {"num_rows": sum(SPLITS.values())})
    assert (out / "tokens").is_symlink()
    return out


def expected() -> pd.DataFrame:
    """What every reader must see: one row per image, codes flattened, sorted by id."""
    frames = []
    for split in SPLITS:
        codes, ids, labels = rows(split)
        frames.append(pd.DataFrame({"id": ids, "label": labels, "split": split,
                                    "codes": list(codes.reshape(len(ids), -1))}))
    return pd.concat(frames).sort_values("id").reset_index(drop=True)


def assert_same_rows(frame: pd.DataFrame, split: str | None = None) -> None:
    want = expected()
    if split is not None:
        want = want[want["split"] == split].reset_index(drop=True)
    got = frame.sort_values("id").reset_index(drop=True)
    assert got["id"].tolist() == want["id"].tolist()
    assert got["label"].tolist() == want["label"].tolist()
    assert got["split"].astype(str).tolist() == want["split"].tolist()
    np.testing.assert_array_equal(np.stack([np.asarray(c) for c in got["codes"]]),
                                  np.stack(want["codes"].to_list()))


def test_the_tokens_folder_holds_parquet_files_only(run):
    files = [p for p in (run / "tokens").rglob("*") if p.is_file()]
    assert len(files) == 3 + 1 + 2 and all(p.suffix == ".parquet" for p in files)
    assert sorted({p.parent.name for p in files}) == ["test", "train", "validation"]


def test_pyarrow_dataset_and_pandas_open_the_folder(run):
    tokens = run / "tokens"
    assert_same_rows(ds.dataset(tokens).to_table().to_pandas())
    assert_same_rows(pd.read_parquet(tokens))


def test_polars_scans_the_folder(run):
    pl = pytest.importorskip("polars")  # dev extra
    assert_same_rows(pl.scan_parquet(run / "tokens").collect().to_pandas())
    assert_same_rows(pl.scan_parquet(f"{run}/tokens/**/*.parquet").collect().to_pandas())


def test_duckdb_reads_the_folder_with_hive_partitioning_on(run):
    duckdb = pytest.importorskip("duckdb")  # dev extra
    query = f"SELECT * FROM read_parquet('{run}/tokens/**/*.parquet', hive_partitioning = true)"
    frame = duckdb.sql(query).df()
    assert frame.columns.tolist() == ["id", "label", "split", "codes"]
    assert_same_rows(frame)


@pytest.mark.parametrize("how", ["folder", "data_dir"])
def test_hugging_face_datasets_finds_the_splits(run, tmp_path, monkeypatch, how):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datasets = pytest.importorskip("datasets")  # dev extra
    cache = str(tmp_path / "hf-cache")
    if how == "folder":
        loaded = datasets.load_dataset(str(run / "tokens"), cache_dir=cache)
    else:
        loaded = datasets.load_dataset("parquet", data_dir=str(run / "tokens"), cache_dir=cache)
    assert sorted(loaded) == sorted(SPLITS)
    for split in SPLITS:
        assert loaded[split].num_rows == SPLITS[split]
        assert_same_rows(loaded[split].to_pandas(), split)


def test_vqtok_readers_accept_the_run_folder_and_the_tokens_folder(run):
    for path in (run, run / "tokens"):
        grid = load_grid(path)
        assert grid.meta == META and grid.num_rows == sum(SPLITS.values())
        assert_same_rows(read_tokens(path))
    assert_same_rows(load_grid(run / "hdf5", format="hdf5").to_pandas())


# --- layout 1 ---------------------------------------------------------------------------------
# tests/fixtures/layout1_store was written by vqtok at main 8c02161 (the last layout-1 code):
# ShardedTokenStore(out, TokenMeta(300, 3, 2, "toy", "fp", "ck", "0.1.0", created_at=
# "2025-01-01T00:00:00+00:00"), shard_size=4), train ids 0-6 and validation ids 7-9, codes
# (id * 7 + position * 31) % 300, labels id % 10, both formats.


def legacy_rows(ids: np.ndarray) -> np.ndarray:
    return (ids[:, None, None] * 7 + np.arange(6).reshape(1, 3, 2) * 31) % 300


def test_a_layout1_store_still_loads(tmp_path):
    assert (LEGACY / "tokens" / "manifest.json").is_file()  # the old layout, untouched
    for path in (LEGACY, LEGACY / "tokens"):
        for fmt in ("parquet", "hdf5"):
            grid = load_grid(path, format=fmt)
            np.testing.assert_array_equal(grid.ids, np.arange(10))
            np.testing.assert_array_equal(grid.codes, legacy_rows(np.arange(10)))
            np.testing.assert_array_equal(grid.labels, np.arange(10) % 10)
            assert grid.splits.tolist() == ["train"] * 7 + ["validation"] * 3
        assert read_meta(path) == META
        assert split_rows(path) == {"train": 7, "validation": 3}
        frame = read_tokens(path, split="validation")
        assert frame["id"].tolist() == [7, 8, 9]
        assert frame.attrs["vqtok_meta"]["codebook_size"] == 300

    result = CliRunner().invoke(main, ["info", str(LEGACY)])
    assert result.exit_code == 0, result.output
    assert "train" in result.output and "7" in result.output


def test_new_shards_are_never_mixed_into_a_layout1_store(tmp_path):
    copy = tmp_path / "old"
    shutil.copytree(LEGACY, copy)
    store = ShardedTokenStore(copy, META, shard_size=4)
    with pytest.raises(TokenStoreError) as info:
        store.plan("train", 7)
    assert str(info.value) == (
        f"{copy}/tokens: holds a token store of an earlier vqtok layout (it still loads for "
        "reading); write new tokens to a new output folder")
    assert sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*")) == sorted(
        p.relative_to(LEGACY).as_posix() for p in LEGACY.rglob("*"))
