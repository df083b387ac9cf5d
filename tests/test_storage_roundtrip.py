"""Write -> read round trips for Parquet and HDF5, on random shapes, codebooks and splits."""

import hashlib

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vqtok.storage import HDF5TokenWriter, ParquetTokenWriter, TokenMeta, load_grid, read_meta
from vqtok.storage.parquet import CODES_LEAF

WRITERS = {"parquet": (ParquetTokenWriter, ".parquet"), "hdf5": (HDF5TokenWriter, ".h5")}
SMALL_BLOCKS = {"parquet": {"row_group_size": 3}, "hdf5": {"chunk_rows": 3}}


def make_meta(codebook_size=512, grid=(7, 7), **extra):
    return TokenMeta(
        codebook_size=codebook_size,
        grid_h=grid[0],
        grid_w=grid[1],
        dataset="synthetic",
        dataset_fingerprint="f" * 64,
        checkpoint_hash="c" * 64,
        vqtok_version="0.1.0",
        created_at="2025-01-01T00:00:00+00:00",
        extra=extra,
    )


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_file(fmt, path, meta, parts, **options):
    """parts: list of (codes, ids, labels, split) batches."""
    writer_cls, _ = WRITERS[fmt]
    with writer_cls(path, meta, **options) as writer:
        for codes, ids, labels, split in parts:
            writer.write(codes, ids, labels, split)
    return path


@st.composite
def token_sets(draw):
    """A codebook, a grid, and 0-3 splits of 0-9 rows each, some unlabeled."""
    size = draw(st.sampled_from([1, 2, 255, 256, 257, 4096, 65536, 65537, 1 << 17]))
    grid = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    parts, next_id = [], 0
    for split in draw(st.lists(st.sampled_from(["train", "test", "val"]), max_size=3, unique=True)):
        rows = draw(st.integers(0, 9))
        codes = rng.integers(0, size, (rows, *grid))
        if rows and draw(st.booleans()):
            codes.flat[0] = size - 1  # the largest legal code must survive the dtype choice
        labels = None if draw(st.booleans()) else rng.integers(-1, 10, rows)
        ids = np.arange(next_id, next_id + rows) * 3
        next_id += rows
        parts.append((codes, ids, labels, split))
    return make_meta(size, grid), parts


def expected_arrays(meta, parts):
    rows = sum(len(p[1]) for p in parts)
    codes = np.concatenate([p[0] for p in parts]) if parts else np.empty((0,))
    codes = codes.reshape(rows, meta.grid_h, meta.grid_w)
    ids = np.concatenate([p[1] for p in parts]) if parts else np.empty(0)
    labels = (
        np.concatenate([np.full(len(p[1]), -1) if p[2] is None else p[2] for p in parts])
        if parts
        else np.empty(0)
    )
    splits = [p[3] for p in parts for _ in range(len(p[1]))]
    return codes, ids, labels, splits


@pytest.mark.parametrize("fmt", list(WRITERS))
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=token_sets())
def test_round_trip(fmt, tmp_path_factory, data):
    meta, parts = data
    path = tmp_path_factory.mktemp("rt") / f"tokens{WRITERS[fmt][1]}"
    write_file(fmt, path, meta, parts, **SMALL_BLOCKS[fmt])

    grid = load_grid(path)
    codes, ids, labels, splits = expected_arrays(meta, parts)
    assert grid.meta == meta
    assert grid.codes.dtype == meta.codes_dtype
    assert grid.codes.shape == (len(ids), meta.grid_h, meta.grid_w)
    np.testing.assert_array_equal(grid.codes, codes)
    np.testing.assert_array_equal(grid.ids, ids)
    np.testing.assert_array_equal(grid.labels, labels)
    assert grid.splits.tolist() == splits
    assert grid.ids.dtype == np.int64 and grid.labels.dtype == np.int32
    for split in {"train", "test", "val"}:
        part = load_grid(path, split=split)
        mask = np.array([s == split for s in splits], dtype=bool)
        np.testing.assert_array_equal(part.codes, codes[mask])
        np.testing.assert_array_equal(part.ids, ids[mask])


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_unpacks_as_codes_and_meta(fmt, tmp_path):
    meta = make_meta()
    codes = np.arange(2 * 49).reshape(2, 7, 7)
    path = write_file(
        fmt, tmp_path / f"t{WRITERS[fmt][1]}", meta, [(codes, [0, 1], [4, 5], "train")]
    )
    loaded, loaded_meta = load_grid(path)
    np.testing.assert_array_equal(loaded, codes)
    assert loaded_meta == meta == read_meta(path)
    assert not loaded.flags.writeable


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_bytes_do_not_depend_on_batch_sizes(fmt, tmp_path):
    """Needed for resumable shards: only the rows decide the file, not how they were batched."""
    meta = make_meta()
    rng = np.random.default_rng(0)
    codes, ids = rng.integers(0, 512, (50, 7, 7)), np.arange(50)
    hashes = set()
    for step in (50, 7, 1, 16):
        parts = [
            (codes[i : i + step], ids[i : i + step], None, "train") for i in range(0, 50, step)
        ]
        path = tmp_path / f"{step}{WRITERS[fmt][1]}"
        hashes.add(sha(write_file(fmt, path, meta, parts, **SMALL_BLOCKS[fmt])))
    assert len(hashes) == 1


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_writer_copies_its_input(fmt, tmp_path):
    """Rows wait in a buffer; a caller reusing its batch array must not change them."""
    meta = make_meta()
    batch = np.zeros((2, 7, 7), dtype=np.int64)
    path = tmp_path / f"t{WRITERS[fmt][1]}"
    with WRITERS[fmt][0](path, meta) as writer:
        writer.write(batch, [0, 1], None, "train")
        batch[:] = 9
        writer.write(batch, [2, 3], None, "train")
    loaded = load_grid(path).codes
    assert (loaded[:2] == 0).all() and (loaded[2:] == 9).all()


def test_parquet_layout_follows_the_issue(tmp_path):
    meta = make_meta(4096, (8, 8))
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 4096, (12, 8, 8))
    parts = [(codes, np.arange(12), None, "train")]
    path = write_file("parquet", tmp_path / "t.parquet", meta, parts, row_group_size=5)
    parquet = pq.ParquetFile(path)
    schema = parquet.schema_arrow
    assert schema.names == ["id", "label", "split", "codes"]
    assert str(schema.field("id").type) == "int64"
    assert str(schema.field("label").type) == "int32"
    assert str(schema.field("split").type) == "dictionary<values=string, indices=int32, ordered=0>"
    assert str(schema.field("codes").type) == "fixed_size_list<element: uint16 not null>[64]"
    metadata = parquet.metadata
    assert [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)] == [5, 5, 2]
    columns = {
        metadata.row_group(0).column(i).path_in_schema: metadata.row_group(0).column(i)
        for i in range(metadata.num_columns)
    }
    assert columns[CODES_LEAF].compression == "ZSTD"
    # >256 distinct codes (of 4096) cannot be byte-wide dictionary indices: "auto" picks
    # byte-stream-split.
    assert "BYTE_STREAM_SPLIT" in columns[CODES_LEAF].encodings
    assert "RLE_DICTIONARY" in columns["split"].encodings
    assert "DELTA_BINARY_PACKED" in columns["id"].encodings


def test_parquet_auto_encoding_uses_dictionary_for_few_distinct_codes(tmp_path):
    meta = make_meta(4096, (4, 4))
    codes = np.random.default_rng(2).integers(0, 200, (10, 4, 4)) * 20  # 200 distinct of 4096
    path = write_file("parquet", tmp_path / "t.parquet", meta, [(codes, np.arange(10), None, "a")])
    column = pq.ParquetFile(path).metadata.row_group(0).column(3)
    assert column.path_in_schema == CODES_LEAF
    assert "RLE_DICTIONARY" in column.encodings
    np.testing.assert_array_equal(load_grid(path).codes, codes)


def test_int32_codes_for_large_codebooks(tmp_path):
    meta = make_meta(1 << 17, (2, 2))
    codes = np.array([[[0, 65536], [131071, 7]]])
    for fmt in WRITERS:
        path = write_file(fmt, tmp_path / f"t{WRITERS[fmt][1]}", meta, [(codes, [0], [1], "x")])
        grid = load_grid(path)
        assert grid.codes.dtype == np.int32
        np.testing.assert_array_equal(grid.codes, codes)


def test_hdf5_layout_follows_the_issue(tmp_path):
    import h5py

    meta = make_meta()
    codes = np.random.default_rng(3).integers(0, 512, (5, 7, 7))
    path = write_file("hdf5", tmp_path / "t.h5", meta, [(codes, np.arange(5), [1] * 5, "train")])
    with h5py.File(path, "r") as handle:
        assert set(handle) == {"codes", "ids", "labels", "splits"}
        dataset = handle["codes"]
        assert dataset.shape == (5, 7, 7) and dataset.dtype == np.uint16
        assert dataset.chunks == (1024, 7, 7) and dataset.maxshape == (None, 7, 7)
        assert dataset.compression == "gzip" and dataset.shuffle
        assert handle["splits"][0] == b"train"
        assert handle.attrs["codebook_size"] == 512
        assert handle.attrs["checkpoint_hash"] == "c" * 64
        assert TokenMeta.from_json(handle.attrs["vqtok.meta"]) == meta


def test_codes_from_sliced_arrow_chunks():
    """Arrow may hand back chunks that are slices of a bigger array; .values would ignore that."""
    import pyarrow as pa
    from vqtok.storage.parquet import _codes

    meta = make_meta(512, (2, 2))
    flat = np.arange(40, dtype=np.uint16)
    whole = pa.FixedSizeListArray.from_arrays(pa.array(flat), 4)
    chunks = pa.chunked_array([whole.slice(1, 3), whole.slice(6, 2)])
    assert chunks.chunk(0).values.to_numpy()[0] == 0  # the pitfall: offset ignored
    codes = _codes(chunks, meta, "test")
    np.testing.assert_array_equal(codes, flat.reshape(10, 2, 2)[[1, 2, 3, 6, 7]])
    single = _codes(pa.chunked_array([whole.slice(5, 2)]), meta, "test")
    np.testing.assert_array_equal(single, flat.reshape(10, 2, 2)[5:7])


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_writer_memory_is_bounded_by_one_block(fmt, tmp_path):
    meta = make_meta()
    block = 64
    options = {"row_group_size": block} if fmt == "parquet" else {"chunk_rows": block}
    with WRITERS[fmt][0](tmp_path / f"t{WRITERS[fmt][1]}", meta, **options) as writer:
        for start in range(0, 1000, 50):
            writer.write(np.zeros((50, 7, 7), int), np.arange(start, start + 50), None, "train")
            assert writer._buffer.num_rows < block
    assert load_grid(writer.path).num_rows == 1000


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_split_rows_counts_without_loading_codes(fmt, tmp_path):
    from vqtok.storage.reader import split_rows

    meta = make_meta(codebook_size=16, grid=(2, 2))
    rng = np.random.default_rng(0)
    parts = [(rng.integers(0, 16, (n, 2, 2)), np.arange(start, start + n), None, split)
             for start, n, split in ((0, 5, "train"), (5, 2, "test"), (7, 4, "train"))]
    path = tmp_path / f"t{WRITERS[fmt][1]}"
    write_file(fmt, path, meta, parts, **SMALL_BLOCKS[fmt])
    grid = load_grid(path)
    assert split_rows(path) == {"train": 9, "test": 2} == {
        name: int((grid.splits == name).sum()) for name in grid.split_names}
