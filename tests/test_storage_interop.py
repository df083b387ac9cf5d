"""Other tools read our files without knowing about vqtok."""

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from vqtok.storage import (
    HDF5TokenWriter,
    ParquetTokenWriter,
    ShardedTokenStore,
    TokenMeta,
    load_grid,
    read_tokens,
)

META = TokenMeta(512, 4, 4, "toy", "fp", "ck", "0.1.0", created_at="t")
ROWS = 30


def data():
    rng = np.random.default_rng(7)
    return rng.integers(0, 512, (ROWS, 4, 4)), np.arange(ROWS), rng.integers(0, 10, ROWS)


@pytest.fixture
def parquet_file(tmp_path):
    codes, ids, labels = data()
    path = tmp_path / "tokens.parquet"
    with ParquetTokenWriter(path, META, row_group_size=7) as writer:  # several row groups
        writer.write(codes[:20], ids[:20], labels[:20], "train")
        writer.write(codes[20:], ids[20:], labels[20:], "test")
    return path


@pytest.fixture
def sharded(tmp_path):
    codes, ids, labels = data()
    store = ShardedTokenStore(tmp_path / "run", META, shard_size=8)
    for shard in store.plan("train", ROWS):
        with store.open_shard(shard) as writer:
            rows = slice(shard.start, shard.stop)
            writer.write(codes[rows], ids[rows], labels[rows])
    store.finalize()
    return tmp_path / "run" / "tokens"


def test_plain_pandas_reads_parquet(parquet_file):
    codes, ids, labels = data()
    frame = pd.read_parquet(parquet_file)
    assert frame.columns.tolist() == ["id", "label", "split", "codes"]
    assert frame["id"].tolist() == ids.tolist()
    assert frame["label"].tolist() == labels.tolist()
    assert isinstance(frame["split"].dtype, pd.CategoricalDtype)
    assert frame["split"].tolist() == ["train"] * 20 + ["test"] * 10
    np.testing.assert_array_equal(np.stack(frame["codes"].to_list()), codes.reshape(ROWS, 16))


def test_pandas_pyarrow_backend_reads_parquet(parquet_file):
    codes, ids, _ = data()
    frame = pd.read_parquet(parquet_file, dtype_backend="pyarrow")
    assert isinstance(frame["codes"].dtype, pd.ArrowDtype)
    arrow_codes = pa.chunked_array(pa.array(frame["codes"])).combine_chunks()
    np.testing.assert_array_equal(arrow_codes.flatten().to_numpy(), codes.reshape(-1))
    assert frame["id"].tolist() == ids.tolist()


def test_read_tokens_matches_pandas(parquet_file, tmp_path):
    ours = read_tokens(parquet_file)
    theirs = pd.read_parquet(parquet_file)
    for column in ("id", "label", "split"):
        pd.testing.assert_series_equal(ours[column], theirs[column])
    np.testing.assert_array_equal(
        np.stack(ours["codes"].to_list()), np.stack(theirs["codes"].to_list())
    )
    assert TokenMeta.from_dict(ours.attrs["vqtok_meta"]) == META

    codes, ids, labels = data()
    h5 = tmp_path / "tokens.h5"
    with HDF5TokenWriter(h5, META) as writer:
        writer.write(codes[:20], ids[:20], labels[:20], "train")
        writer.write(codes[20:], ids[20:], labels[20:], "test")
    from_h5 = read_tokens(h5)
    for column in ("id", "label", "split"):
        pd.testing.assert_series_equal(from_h5[column], ours[column])


def test_pyarrow_dataset_reads_the_sharded_folder(sharded):
    codes, ids, _ = data()
    dataset = ds.dataset(sharded)  # the folder holds Parquet files only
    assert len(dataset.files) == 4
    table = dataset.to_table().sort_by("id")
    assert table.column("id").to_pylist() == ids.tolist()
    np.testing.assert_array_equal(
        table.column("codes").combine_chunks().flatten().to_numpy(), codes.reshape(-1)
    )
    assert table.schema.field("codes").type == pa.list_(pa.field("element", pa.uint16(), False), 16)


def test_polars_reads_parquet(parquet_file, sharded):
    pl = pytest.importorskip("polars")  # dev extra
    codes, ids, labels = data()
    frame = pl.read_parquet(parquet_file)
    assert frame["id"].to_list() == ids.tolist()
    assert frame["label"].to_list() == labels.tolist()
    assert frame["split"].to_list()[19:21] == ["train", "test"]
    np.testing.assert_array_equal(np.asarray(frame["codes"].to_list()), codes.reshape(ROWS, 16))

    shards = pl.read_parquet(str(sharded / "*" / "*.parquet")).sort("id")
    np.testing.assert_array_equal(np.asarray(shards["codes"].to_list()), codes.reshape(ROWS, 16))


def test_h5py_reads_hdf5(tmp_path):
    codes, ids, labels = data()
    path = tmp_path / "tokens.h5"
    with HDF5TokenWriter(path, META) as writer:
        writer.write(codes, ids, labels, "train")
    with h5py.File(path, "r") as handle:
        np.testing.assert_array_equal(handle["codes"][...], codes)
        np.testing.assert_array_equal(handle["codes"][5:9, 1], codes[5:9, 1])
        np.testing.assert_array_equal(handle["ids"][...], ids)
        np.testing.assert_array_equal(handle["labels"][...], labels)
        assert handle["splits"].asstr()[0] == "train"
        assert handle.attrs["grid_h"] == 4 and handle.attrs["dataset"] == "toy"
    np.testing.assert_array_equal(load_grid(path).codes, codes)
