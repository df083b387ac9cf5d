"""Each source's image identity for incremental token stores: keys name where an image lives
and survive other images coming and going, stamps change with the file holding the image,
content hashes are sha256 of the stored (encoded) bytes; and which sources split by rule."""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from vqtok.tokenizer.config import DataConfig
from vqtok.tokenizer.sources import ArraySource, DataError, open_source, read_idx
from vqtok.tokenizer.sources.idx import ASSETS

from tests.helpers import write_npz
from tests.test_sources_streaming import hf_table, png, sample_members, write_tar

SIZE = 8


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def as_uint8(images: torch.Tensor) -> np.ndarray:
    return (images[:, 0] * 255).round().to(torch.uint8).numpy()


@pytest.fixture(scope="module")
def pictures() -> np.ndarray:
    """12 distinct 8x8 uint8 images (each a different flat grey level plus noise)."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 40, (12, SIZE, SIZE))
    return (noise + 20 * np.arange(12)[:, None, None]).astype(np.uint8)


def source(dataset: str, **data: object):
    return open_source(DataConfig(dataset=dataset, image_size=SIZE, **data))


# --- imagefolder -----------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path, pictures) -> Path:
    root = tmp_path / "images"
    for i, name in enumerate(["cat/001.png", "cat/002.png", "dog/001.png", "top.png"]):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(png(pictures[i]))
    return root


def test_imagefolder_keys_are_relative_posix_paths_in_source_order(folder):
    images = source(f"imagefolder:{folder}")
    keys = images.item_keys()
    assert keys == ["cat/001.png", "cat/002.png", "dog/001.png", "top.png"]
    assert keys == [p.relative_to(folder).as_posix() for p in images.files]
    assert images.split_rule is True
    assert source(f"imagefolder:{folder}").item_keys() == keys  # stable across openings


def test_imagefolder_lists_files_as_rglob_does_sorted_by_path_parts(tmp_path, pictures):
    """One scandir pass replaces rglob + a stat per file: the same files in the same order
    (by path parts, so a/ sorts before a-b/), symlinked files in, symlinked folders not
    entered, dangling links and non-images out."""
    root = tmp_path / "images"
    for i, name in enumerate(["a-b/x.png", "a/x.png", "a/sub/z.JPG", "A/y.jpeg", "top.png",
                              ".png", "a/notes.txt"]):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(png(pictures[i]))
    (root / "link.png").symlink_to(root / "top.png")
    (root / "dead.png").symlink_to(tmp_path / "missing.png")
    (root / "linked").symlink_to(root / "a", target_is_directory=True)
    images = source(f"imagefolder:{root}")
    expected = sorted(p for p in root.rglob("*") if p.is_file()
                       and p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    assert images.item_keys() == [p.relative_to(root).as_posix() for p in expected] == [
        "A/y.jpeg", "a/sub/z.JPG", "a/x.png", "a-b/x.png", "link.png", "top.png"]
    assert images.class_names == ["A", "a", "a-b"]
    assert images.labels.tolist() == [0, 1, 1, 2, -1, -1]


def test_imagefolder_hashes_are_of_the_file_bytes_and_stamps_of_the_file(folder, pictures):
    images = source(f"imagefolder:{folder}")
    paths = [folder / key for key in images.item_keys()]
    assert images.content_hashes(range(4)) == [sha(p.read_bytes()) for p in paths]
    assert images.content_hashes([3, 0, 3]) == [sha(paths[i].read_bytes()) for i in (3, 0, 3)]
    assert images.content_hashes([]) == []
    assert images.item_stamps() == [file_stamp(p) for p in paths]
    assert len(set(images.content_hashes(range(4)))) == 4
    with pytest.raises(IndexError):
        images.content_hashes([4])
    with pytest.raises(IndexError):
        images.content_hashes([-1])


def test_rewriting_one_file_changes_its_stamp_and_hash_only(folder):
    before = source(f"imagefolder:{folder}")
    stamps, hashes = before.item_stamps(), before.content_hashes(range(4))
    target = folder / "cat/002.png"
    noisy = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE)).astype(np.uint8)
    target.write_bytes(png(noisy))  # noise compresses worse: the size changes too
    assert file_stamp(target) != stamps[1]
    after = source(f"imagefolder:{folder}")
    assert after.item_keys() == before.item_keys()
    new_stamps, new_hashes = after.item_stamps(), after.content_hashes(range(4))
    changed = [i for i in range(4) if new_stamps[i] != stamps[i]]
    assert changed == [1]
    assert [i for i in range(4) if new_hashes[i] != hashes[i]] == [1]
    assert new_hashes[1] == sha(target.read_bytes())
    assert before.item_stamps() == stamps  # as its listing found them...
    before.forget_stamps()  # ...until told to look again (flows.runtime does)
    assert before.item_stamps() == new_stamps


def test_adding_a_file_keeps_the_other_keys_and_hashes(folder, pictures):
    before = source(f"imagefolder:{folder}")
    old = dict(zip(before.item_keys(), before.content_hashes(range(4)), strict=True))
    old_stamps = dict(zip(before.item_keys(), before.item_stamps(), strict=True))
    (folder / "cat/0015.png").write_bytes(png(pictures[9]))  # sorts between 001 and 002
    after = source(f"imagefolder:{folder}")
    keys = after.item_keys()
    assert keys == ["cat/001.png", "cat/0015.png", "cat/002.png", "dog/001.png", "top.png"]
    new = dict(zip(keys, after.content_hashes(range(5)), strict=True))
    assert {k: new[k] for k in old} == old
    assert {k: s for k, s in zip(keys, after.item_stamps(), strict=True) if k in old} == old_stamps
    assert new["cat/0015.png"] == sha(png(pictures[9]))


def test_imagefolder_file_gone_since_opening_is_a_data_error(folder):
    images = source(f"imagefolder:{folder}")
    (folder / "dog/001.png").unlink()
    images.forget_stamps()
    with pytest.raises(DataError, match="dog/001.png: cannot stat"):
        images.item_stamps()
    with pytest.raises(DataError, match="dog/001.png: cannot read"):
        images.content_hashes([2])


# --- webdataset ------------------------------------------------------------------------------


def named_members(pictures: np.ndarray, ids: list[int]) -> list[tuple[str, bytes]]:
    """Samples ``train/%06d`` (a folder in the key) with a .png and a .cls member each."""
    return [member for i in ids for member in (
        (f"train/{i:06d}.png", png(pictures[i])), (f"train/{i:06d}.cls", b"1"))]


@pytest.fixture
def shards(tmp_path, pictures) -> Path:
    """shard-000000.tar (samples 5, 2, 9: out of order) and shard-000001.tar (0, 1)."""
    folder = tmp_path / "shards"
    write_tar(folder / "shard-000000.tar", named_members(pictures, [5, 2, 9]))
    write_tar(folder / "shard-000001.tar", named_members(pictures, [0, 1]))
    return folder


def test_webdataset_keys_are_shard_then_sample_key_in_position_order(shards, pictures):
    web = source(f"webdataset:{shards}/*.tar")
    keys = web.item_keys()
    assert keys == ["shard-000000.tar/train/000005", "shard-000000.tar/train/000002",
                    "shard-000000.tar/train/000009", "shard-000001.tar/train/000000",
                    "shard-000001.tar/train/000001"]
    loaded = as_uint8(web.load_batch(np.arange(len(keys)))[0])
    for position, key in enumerate(keys):  # each key names the image at its position
        assert np.array_equal(loaded[position], pictures[int(key.rsplit("/", 1)[1])])
    assert web.split_rule is True


def test_webdataset_keys_keep_no_names_in_memory(shards):
    web = source(f"webdataset:{shards}/*.tar")
    state = set(vars(web))
    assert len(web.item_keys()) == 5
    assert set(vars(web)) == state


def test_webdataset_hashes_are_of_the_image_members_and_stamps_of_the_shard(shards):
    web = source(f"webdataset:{shards}/*.tar")
    keys = web.item_keys()
    expected = []
    for key in keys:
        shard, sample = key.split("/", 1)
        with tarfile.open(shards / shard) as tar:
            expected.append(sha(tar.extractfile(f"{sample}.png").read()))
    assert web.content_hashes(range(5)) == expected
    assert web.content_hashes([4, 0, 2, 0]) == [expected[i] for i in (4, 0, 2, 0)]
    stamps = web.item_stamps()
    assert stamps[:3] == [file_stamp(shards / "shard-000000.tar")] * 3
    assert stamps[3:] == [file_stamp(shards / "shard-000001.tar")] * 2


def test_webdataset_keys_below_the_shards_common_folder(tmp_path, pictures):
    write_tar(tmp_path / "d/a/x.tar", sample_members(pictures, None, [3]))
    write_tar(tmp_path / "d/b/y.tar", sample_members(pictures, None, [4, 6]))
    web = source(f"webdataset:{tmp_path}/d/*/*.tar")
    assert web.item_keys() == ["a/x.tar/000003", "b/y.tar/000004", "b/y.tar/000006"]
    assert web.content_hashes([2]) == [sha(png(pictures[6]))]


def test_webdataset_shard_changed_since_opening_is_a_data_error(shards, pictures):
    web = source(f"webdataset:{shards}/*.tar")
    write_tar(shards / "shard-000001.tar", named_members(pictures, [0]))
    with pytest.raises(DataError, match="shard-000001.tar: the shard has 1 samples, 2 when it "
                                        "was opened; open the dataset again"):
        web.item_keys()


def test_split_by_file_is_not_the_rule(tmp_path, pictures):
    write_tar(tmp_path / "train-000.tar", sample_members(pictures, None, [0, 1]))
    write_tar(tmp_path / "test-000.tar", sample_members(pictures, None, [2]))
    by_file = source(f"webdataset:{tmp_path}/*.tar", split_by="file")
    assert by_file.split_rule is False
    assert by_file.item_keys() == ["test-000.tar/000002", "train-000.tar/000000",
                                   "train-000.tar/000001"]
    assert source(f"webdataset:{tmp_path}/*.tar").split_rule is True


# --- parquet ---------------------------------------------------------------------------------


@pytest.fixture
def parquet_dir(tmp_path, pictures) -> Path:
    """a.parquet (rows of images 0..6, struct column, 3 rows per row group) and
    sub/b.parquet (images 7..9, a plain binary column)."""
    root = tmp_path / "pq"
    (root / "sub").mkdir(parents=True)
    pq.write_table(hf_table(pictures, np.arange(12) % 3, range(7)), root / "a.parquet",
                   row_group_size=3)
    pq.write_table(pa.table({"image": pa.array([png(pictures[i]) for i in range(7, 10)])}),
                   root / "sub/b.parquet")
    return root


def test_parquet_keys_are_file_hash_row_and_hashes_the_rows_bytes(parquet_dir, pictures):
    rows = source(f"parquet:{parquet_dir}")
    keys = rows.item_keys()
    assert keys == [*(f"a.parquet#{r}" for r in range(7)), *(f"sub/b.parquet#{r}"
                                                            for r in range(3))]
    stored = [cell["bytes"] for cell in pq.read_table(parquet_dir / "a.parquet")
              .column("image").to_pylist()]
    stored += pq.read_table(parquet_dir / "sub/b.parquet").column("image").to_pylist()
    assert rows.content_hashes(range(10)) == [sha(b) for b in stored]
    assert stored[8] == png(pictures[8])
    picks = [9, 4, 0, 5, 4]  # across files and row groups, out of order, repeated
    assert rows.content_hashes(picks) == [sha(stored[i]) for i in picks]
    assert rows.item_stamps() == ([file_stamp(parquet_dir / "a.parquet")] * 7
                                  + [file_stamp(parquet_dir / "sub/b.parquet")] * 3)
    assert rows.split_rule is True
    one = source(f"parquet:{parquet_dir}/sub/b.parquet")
    assert one.item_keys() == ["b.parquet#0", "b.parquet#1", "b.parquet#2"]


def test_parquet_null_image_is_a_data_error(tmp_path, pictures):
    kind = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cells = [{"bytes": png(pictures[0]), "path": "0.png"}, {"bytes": None, "path": "gone.png"}]
    pq.write_table(pa.table({"image": pa.array(cells, type=kind)}), tmp_path / "n.parquet")
    rows = source(f"parquet:{tmp_path}")
    assert rows.content_hashes([0]) == [sha(png(pictures[0]))]
    with pytest.raises(DataError) as error:
        rows.content_hashes([0, 1])
    assert str(error.value) == (f"{tmp_path}/n.parquet: row 1 (id 1): image is null (it names "
                                "'gone.png' but holds no bytes); fix or remove the row")


def test_parquet_split_by_file_is_not_the_rule(tmp_path, pictures):
    pq.write_table(hf_table(pictures, np.zeros(12, dtype=np.int64), range(2)),
                   tmp_path / "train-00000-of-00001.parquet")
    assert source(f"parquet:{tmp_path}", split_by="file").split_rule is False


# --- arrays in memory ------------------------------------------------------------------------


def test_npz_keys_are_positions_without_stamps_and_hash_the_array(tmp_path):
    path = write_npz(tmp_path / "a.npz", n=6, size=SIZE)
    arrays = source(f"npz:{path}")
    assert arrays.item_keys() == ["0", "1", "2", "3", "4", "5"]
    assert arrays.item_stamps() is None
    stored = np.load(path)["images"]  # (6, 1, 8, 8) uint8, served as it is
    assert arrays.content_hashes([0, 5, 0]) == [sha(stored[i].tobytes()) for i in (0, 5, 0)]
    assert arrays.split_rule is True


def test_array_source_hashes_the_conformed_images_it_serves():
    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).reshape(2, 1, 4, 4)
    cfg = DataConfig(channels=3, image_size=4)  # grey expanded to RGB: that is what is hashed
    arrays = ArraySource(images, torch.zeros(2), {"train": np.arange(2)}, "a", "f", cfg,
                         split_rule=False)
    rgb = np.repeat(images.numpy(), 3, axis=1)
    assert arrays.content_hashes([1]) == [sha(rgb[1].tobytes())]
    assert arrays.split_rule is False
    assert ArraySource(images, torch.zeros(2), {}, "a", "f", DataConfig(image_size=4)).split_rule


def test_mnist_sample_splits_by_rule_and_hashes_its_pixels():
    sample = open_source(DataConfig())
    raw = read_idx(ASSETS / "mnist/t10k-images-idx3-ubyte.gz")
    assert sample.split_rule is True
    keys = sample.item_keys()
    assert len(keys) == len(raw) and keys[:3] == ["0", "1", "2"] and keys[-1] == "9999"
    assert sample.content_hashes([7]) == [sha(raw[7].tobytes())]


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.tobytes())


def test_mnist_and_cifar_train_test_are_their_own_splits(tmp_path, pictures):
    labels = np.arange(12, dtype=np.uint8) % 10
    write_idx(tmp_path / "train-images-idx3-ubyte", pictures[:4])
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels[:4])
    write_idx(tmp_path / "t10k-images-idx3-ubyte", pictures[4:6])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels[4:6])
    mnist = open_source(DataConfig(dataset="mnist", data_root=str(tmp_path), image_size=SIZE))
    assert mnist.split_rule is False and sorted(mnist.splits) == ["test", "train"]
    assert mnist.item_keys() == [str(i) for i in range(6)]
    assert mnist.content_hashes([5]) == [sha(pictures[5].tobytes())]
    batches = tmp_path / "cifar-10-batches-bin"
    batches.mkdir()
    record = np.arange(3073, dtype=np.int64).astype(np.uint8)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        (batches / name).write_bytes(record.tobytes())
    cifar = open_source(DataConfig(dataset="cifar10", data_root=str(tmp_path), channels=3,
                                   image_size=32))
    assert cifar.split_rule is False and cifar.item_stamps() is None
    assert cifar.content_hashes([0]) == [sha(record[1:].tobytes())]


def test_stamps_change_with_the_files_mtime(folder):
    images = source(f"imagefolder:{folder}")
    path = folder / "top.png"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, touched
    assert images.item_stamps()[3] == f"{st.st_size}:{st.st_mtime_ns}"  # as listed
    images.forget_stamps()
    assert images.item_stamps()[3] == f"{st.st_size}:{st.st_mtime_ns + 10**9}"
    assert source(f"imagefolder:{folder}").item_stamps()[3] == images.item_stamps()[3]
    assert images.content_hashes([3]) == [sha(path.read_bytes())]
