"""Codes with depth (residual quantizers: several codes per grid position) through every
store format, and one-level stores exactly as before depth existed."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from vqtok.storage import (
    HDF5TokenWriter,
    ParquetTokenWriter,
    ShardedTokenStore,
    TokenDataset,
    TokenMeta,
    TokenStoreError,
    export_memmap,
    load_grid,
    read_tokens,
)

DEPTH = 4
META = TokenMeta(512, 3, 2, "toy", "fp", "ck", "0.1.0", created_at="t", depth=DEPTH)


def codes(rows: int) -> np.ndarray:
    """(rows, 3, 2, DEPTH) with every value telling its row, position and level apart."""
    r, y, x, d = np.indices((rows, 3, 2, DEPTH))
    return (r * 24 + y * 8 + x * 4 + d) % 512


def test_depth_is_recorded_only_when_above_one():
    assert META.grid_shape == (3, 2, DEPTH) and META.tokens_per_row == 24
    assert TokenMeta.from_dict(META.to_dict()) == META
    flat = TokenMeta(512, 3, 2, "toy", "fp", "ck", "0.1.0", created_at="t")
    assert "depth" not in flat.to_dict() and flat.grid_shape == (3, 2)
    assert META.differences(flat) == ["depth"]


@pytest.mark.parametrize("writer, suffix", [(ParquetTokenWriter, ".parquet"),
                                            (HDF5TokenWriter, ".h5")])
def test_a_file_round_trips_codes_with_depth(tmp_path, writer, suffix):
    path = tmp_path / f"t{suffix}"
    with writer(path, META) as w:
        w.write(codes(5), np.arange(5), None, "train")
    grid = load_grid(path)
    assert grid.codes.shape == (5, 3, 2, DEPTH) and grid.meta.depth == DEPTH
    np.testing.assert_array_equal(grid.codes, codes(5))
    with pytest.raises(TokenStoreError, match=r"codes must have shape \(B, 3, 2, 4\)"):
        with writer(tmp_path / f"bad{suffix}", META) as w:
            w.write(codes(2)[..., 0], np.arange(2), None, "train")


def test_parquet_rows_hold_h_w_depth_in_that_order_and_hdf5_is_4d(tmp_path):
    with ParquetTokenWriter(tmp_path / "t.parquet", META) as w:
        w.write(codes(2), np.arange(2), None, "train")
    row = pq.read_table(tmp_path / "t.parquet").column("codes")[1].as_py()
    assert row == codes(2)[1].reshape(-1).tolist()  # (y, x, level) with level fastest
    assert row[:5] == [24, 25, 26, 27, 28]
    with HDF5TokenWriter(tmp_path / "t.h5", META) as w:
        w.write(codes(2), np.arange(2), None, "train")
    with h5py.File(tmp_path / "t.h5") as f:
        assert f["codes"].shape == (2, 3, 2, DEPTH)
        assert json.loads(f.attrs["vqtok.meta"])["depth"] == DEPTH


def test_a_sharded_store_export_and_dataset_keep_depth(tmp_path):
    store = ShardedTokenStore(tmp_path / "run", META, shard_size=4)
    all_codes = codes(10)
    for shard in store.plan("train", 10):
        with store.open_shard(shard) as w:
            rows = slice(shard.start, shard.stop)
            w.write(all_codes[rows], np.arange(10)[rows], None)
    store.finalize()
    for fmt in ("parquet", "hdf5"):
        np.testing.assert_array_equal(load_grid(tmp_path / "run", format=fmt).codes, all_codes)
    frame = read_tokens(tmp_path / "run")
    assert frame.attrs["vqtok_meta"]["depth"] == DEPTH and len(frame["codes"][0]) == 24
    dataset = TokenDataset(tmp_path / "run")
    item, label = dataset[7]
    assert item.shape == (3, 2, DEPTH) and item.dtype == torch.int64 and label == -1
    np.testing.assert_array_equal(item.numpy(), all_codes[7])
    export_memmap(tmp_path / "run", tmp_path / "flat.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "flat.npy"), all_codes.reshape(-1))
    sidecar = json.loads((tmp_path / "flat.json").read_text())
    assert sidecar["shape"] == [10, 3, 2, DEPTH]
    mapped = TokenDataset(tmp_path / "flat.npy")
    np.testing.assert_array_equal(mapped[3][0].numpy(), all_codes[3])
