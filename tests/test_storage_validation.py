"""Bad batches are refused at write time; bad files are refused at read time, naming the file."""

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from vqtok.storage import (
    HDF5TokenWriter,
    ParquetTokenWriter,
    TokenGrid,
    TokenMeta,
    TokenStoreError,
    load_grid,
    read_tokens,
)

WRITERS = {"parquet": (ParquetTokenWriter, ".parquet"), "hdf5": (HDF5TokenWriter, ".h5")}


def make_meta(codebook_size=512, grid=(3, 3)):
    return TokenMeta(codebook_size, grid[0], grid[1], "d", "fp", "ck", "0.1.0", created_at="t")


GOOD = np.zeros((2, 3, 3), dtype=np.int64)


@pytest.mark.parametrize("fmt", list(WRITERS))
@pytest.mark.parametrize(
    ("codes", "ids", "labels", "split", "fragment"),
    [
        (
            np.full((2, 3, 3), 512),
            [0, 1],
            None,
            "train",
            "code 512 at row 0 is outside the codebook",
        ),
        (np.array([[[0] * 3] * 3, [[0, 0, -1]] * 3]), [0, 1], None, "train", "code -1 at row 1"),
        (np.zeros((2, 3, 4), dtype=int), [0, 1], None, "train", r"shape \(B, 3, 3\)"),
        (np.zeros((2, 9), dtype=int), [0, 1], None, "train", r"shape \(B, 3, 3\)"),
        (np.zeros((2, 3, 3), dtype=np.float32), [0, 1], None, "train", "integer array"),
        (GOOD, [0], None, "train", r"ids must have shape \(2,\)"),
        (GOOD, [0, -5], None, "train", "ids must be dataset indices"),
        (GOOD, [0, 1], [1, 2, 3], "train", r"labels must have shape \(2,\)"),
        (GOOD, [0, 1], [0, -2], "train", "labels must be in"),
        (GOOD, [0, 1], None, "../evil", "split name"),
        (GOOD, [0, 1], None, "", "split name"),
        (GOOD, [0, 1], None, "x" * 33, "split name"),
    ],
)
def test_write_refuses_bad_batches(fmt, tmp_path, codes, ids, labels, split, fragment):
    writer_cls, suffix = WRITERS[fmt]
    path = tmp_path / f"t{suffix}"
    with pytest.raises(TokenStoreError, match=fragment) as info:
        with writer_cls(path, make_meta()) as writer:
            writer.write(codes, ids, labels, split)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not path.exists()


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_a_refused_batch_leaves_the_writer_usable(fmt, tmp_path):
    writer_cls, suffix = WRITERS[fmt]
    path = tmp_path / f"t{suffix}"
    with writer_cls(path, make_meta()) as writer:
        with pytest.raises(TokenStoreError):
            writer.write(np.full((2, 3, 3), 999), [0, 1], None, "train")
        writer.write(GOOD, [0, 1], None, "train")
    assert load_grid(path).num_rows == 2


def write_raw_parquet(path, meta, codes, list_size=None):
    """A file with our metadata but contents no vqtok writer would produce."""
    rows = len(codes)
    list_size = list_size or meta.tokens_per_row
    item = pa.field("element", pa.uint16(), nullable=False)
    table = pa.table(
        {
            "id": pa.array(np.arange(rows), pa.int64()),
            "label": pa.array(np.zeros(rows, np.int32)),
            "split": pa.array(["train"] * rows).dictionary_encode(),
            "codes": pa.FixedSizeListArray.from_arrays(
                pa.array(np.asarray(codes, np.uint16).reshape(-1)), type=pa.list_(item, list_size)
            ),
        }
    ).replace_schema_metadata({"vqtok.meta": meta.to_json()})
    pq.write_table(table, path)
    return path


def test_parquet_out_of_range_code_is_refused_on_read(tmp_path):
    codes = np.zeros((4, 3, 3), dtype=np.uint16)
    codes[2, 1, 1] = 700
    path = write_raw_parquet(tmp_path / "bad.parquet", make_meta(), codes)
    with pytest.raises(TokenStoreError, match="code 700 at row 2 is outside the codebook") as info:
        load_grid(path)
    assert str(info.value).startswith(f"{path}: ")
    with pytest.raises(TokenStoreError, match="outside the codebook"):
        read_tokens(path)


def test_parquet_grid_size_mismatch_is_refused_on_read(tmp_path):
    path = write_raw_parquet(tmp_path / "bad.parquet", make_meta(), np.zeros((2, 16)), list_size=16)
    with pytest.raises(TokenStoreError, match=r"column codes is .*\[16\].* needs .*\[9\]") as info:
        load_grid(path)
    assert str(path) in str(info.value)


def test_parquet_without_vqtok_metadata_is_refused(tmp_path):
    path = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), path)
    with pytest.raises(TokenStoreError, match="not a vqtok token file"):
        load_grid(path)


def test_not_a_parquet_file_is_refused(tmp_path):
    path = tmp_path / "junk.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(TokenStoreError, match="not a readable Parquet file") as info:
        load_grid(path)
    assert str(path) in str(info.value)


def test_hdf5_out_of_range_code_is_refused_on_read(tmp_path):
    path = tmp_path / "t.h5"
    with HDF5TokenWriter(path, make_meta()) as writer:
        writer.write(np.zeros((3, 3, 3), dtype=int), [0, 1, 2], None, "train")
    with h5py.File(path, "r+") as handle:
        handle["codes"][1, 0, 2] = 512
    with pytest.raises(TokenStoreError, match="code 512 at row 1 is outside") as info:
        load_grid(path)
    assert str(path) in str(info.value)


def test_hdf5_shape_mismatch_is_refused_on_read(tmp_path):
    path = tmp_path / "t.h5"
    with HDF5TokenWriter(path, make_meta()) as writer:
        writer.write(np.zeros((3, 3, 3), dtype=int), [0, 1, 2], None, "train")
    with h5py.File(path, "r+") as handle:
        del handle["codes"]
        handle["codes"] = np.zeros((3, 4, 4), dtype=np.uint16)
    with pytest.raises(TokenStoreError, match=r"shape \(3, 4, 4\) but the metadata says 3x3"):
        load_grid(path)


def test_hdf5_row_count_mismatch_is_refused_on_read(tmp_path):
    path = tmp_path / "t.h5"
    with HDF5TokenWriter(path, make_meta()) as writer:
        writer.write(np.zeros((3, 3, 3), dtype=int), [0, 1, 2], None, "train")
    with h5py.File(path, "r+") as handle:
        handle["ids"].resize((2,))
    with pytest.raises(TokenStoreError, match=r"ids has shape \(2,\) but there are 3 rows"):
        load_grid(path)


def test_unknown_extension_and_missing_files(tmp_path):
    (tmp_path / "t.csv").write_text("id,codes\n")
    with pytest.raises(TokenStoreError, match="unknown token file type"):
        load_grid(tmp_path / "t.csv")
    with pytest.raises(TokenStoreError, match="no such file"):
        load_grid(tmp_path / "missing.parquet")
    with pytest.raises(TokenStoreError, match="missing: no such file or folder; pass a token "
                       "file or the folder 'encode' wrote"):
        load_grid(tmp_path / "missing")
    with pytest.raises(TokenStoreError, match=r"no token store here \(no .vqtok/manifest.json\)"):
        load_grid(tmp_path)  # a folder that never held a store
    (tmp_path / ".vqtok" / "done" / "train").mkdir(parents=True)
    (tmp_path / "tokens").mkdir()
    (tmp_path / ".vqtok" / "done" / "train" / "part-00000.json").write_text("{}")
    for folder in (tmp_path, tmp_path / "tokens"):  # an encode that stopped before finalize
        with pytest.raises(TokenStoreError, match="the token store was not finalized"):
            load_grid(folder)
    legacy = tmp_path / "legacy"  # the same, as layout 1 left it
    (legacy / "tokens" / "train").mkdir(parents=True)
    (legacy / "tokens" / "train" / "_part-00000.done.json").write_text("{}")
    with pytest.raises(TokenStoreError, match="the token store was not finalized"):
        load_grid(legacy)


def test_token_grid_select_of_an_absent_split_is_empty():
    meta = make_meta()
    grid = TokenGrid(
        np.zeros((2, 3, 3), np.uint16),
        np.arange(2),
        np.zeros(2, np.int32),
        np.zeros(2, np.int32),
        ("train",),
        meta,
    )
    assert grid.select("test").num_rows == 0
    assert grid.select("train").num_rows == 2
