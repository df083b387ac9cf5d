"""WebDataset tar shards and Hugging Face-style Parquet as image sources: pixels and labels
equal the bundled MNIST sample they were written from, ids follow sorted files then member /
row order, splits by rule or by file name, one-line errors naming the file and the member or
row, DataLoader workers, pickling, and ``tokenize-dataset encode`` on shards."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from vqtok.tokenizer.config import DataConfig
from vqtok.tokenizer.errors import ConfigError
from vqtok.tokenizer.sources import DataError, expand_braces, iterate_batches, open_source
from vqtok.tokenizer.splits import holdout_splits

from tests.helpers import console_command, fails, make_checkpoint, tiny_raw

N, PER_SHARD = 200, 100  # images taken from the bundled sample, images per tar shard


@pytest.fixture(scope="module")
def mnist() -> tuple[np.ndarray, np.ndarray]:
    """The first N images (N, 28, 28) uint8 and labels of the bundled sample."""
    sample = open_source(DataConfig())
    return sample.images[:N, 0].numpy(), sample.labels[:N].numpy()


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sample_members(images: np.ndarray, labels: np.ndarray | None, ids: range,
                   label_ext: str = "cls") -> list[tuple[str, bytes]]:
    members = []
    for i in ids:
        members.append((f"{i:06d}.png", png(images[i])))
        if labels is not None:
            members.append((f"{i:06d}.{label_ext}", f"{labels[i]}\n".encode()))
    return members


@pytest.fixture(scope="module")
def shards(tmp_path_factory, mnist) -> Path:
    """shard-000.tar and shard-001.tar, PER_SHARD samples each (``%06d.png`` + ``.cls``)."""
    folder = tmp_path_factory.mktemp("shards")
    images, labels = mnist
    for k in range(N // PER_SHARD):
        write_tar(folder / f"shard-{k:03d}.tar",
                  sample_members(images, labels, range(k * PER_SHARD, (k + 1) * PER_SHARD)))
    return folder


def as_uint8(images: torch.Tensor) -> np.ndarray:
    return (images[:, 0] * 255).round().to(torch.uint8).numpy()


def web(pattern: str | Path, **data: object):
    return open_source(DataConfig(dataset=f"webdataset:{pattern}", **data))


# --- brace expansion -------------------------------------------------------------------------


@pytest.mark.parametrize(("pattern", "expected"), [
    ("a{1..3}b", ["a1b", "a2b", "a3b"]),
    ("{000..002}", ["000", "001", "002"]),
    ("shard-{000008..000010}.tar", ["shard-000008.tar", "shard-000009.tar", "shard-000010.tar"]),
    ("{x,y}{1..2}", ["x1", "x2", "y1", "y2"]),
    ("{a,b{1,2}}c", ["ac", "b1c", "b2c"]),
    ("{3..1}", ["3", "2", "1"]),
    ("{8..10}", ["8", "9", "10"]),
    ("plain.tar", ["plain.tar"]),
    ("{single}.tar", ["{single}.tar"]),  # neither a list nor a range: left as written
    ("open{1,2", ["open{1,2"]),
])
def test_brace_expansion(pattern, expected):
    assert expand_braces(pattern) == expected


# --- webdataset ------------------------------------------------------------------------------


def test_shards_give_the_bundled_samples_images_and_labels(shards, mnist):
    source = web(f"{shards}/shard-{{000..001}}.tar")
    assert len(source) == N and source.name == f"webdataset:{shards}/shard-{{000..001}}.tar"
    images, labels = source.load_batch(np.arange(N))
    assert images.shape == (N, 1, 28, 28) and images.dtype == torch.float32
    assert np.array_equal(as_uint8(images), mnist[0])
    assert np.array_equal(labels.numpy(), mnist[1]) and labels.dtype == torch.int64
    image, label, ident = source[150]
    assert ident == 150 and label == mnist[1][150]
    # a glob, braces out of order and a duplicate name the same shards, in sorted order
    for pattern in (f"{shards}/*.tar", f"{shards}/shard-{{001,000,001}}.tar"):
        again = web(pattern)
        assert np.array_equal(as_uint8(again.load_batch([0, 99, 100, 199])[0]),
                              mnist[0][[0, 99, 100, 199]])
        assert again.fingerprint == source.fingerprint
    one = web(shards / "shard-001.tar")  # a single shard's path
    assert len(one) == PER_SHARD and np.array_equal(one.labels, mnist[1][PER_SHARD:])


def test_ids_follow_sorted_shards_then_member_order(tmp_path, mnist):
    images, labels = mnist
    order = [5, 2, 9, 0]  # member keys out of order inside the shard
    write_tar(tmp_path / "b.tar", sample_members(images, labels, order))
    write_tar(tmp_path / "a.tar", sample_members(images, labels, range(20, 23)))
    source = web(tmp_path / "{b,a}.tar")
    expected = [20, 21, 22, *order]  # a.tar sorts first; then b.tar in member order
    batch, got = source.load_batch(np.arange(7))
    assert np.array_equal(as_uint8(batch), images[expected])
    assert got.tolist() == labels[expected].tolist()


def test_rule_splits_are_the_holdout_rule(shards):
    splits = web(f"{shards}/*.tar").splits
    expected = holdout_splits(N)
    assert splits.keys() == expected.keys()
    assert all(np.array_equal(splits[k], expected[k]) for k in expected)


def test_split_by_file_from_shard_and_folder_names(tmp_path, mnist):
    images, labels = mnist
    write_tar(tmp_path / "flat/train-000.tar", sample_members(images, labels, range(0, 10)))
    write_tar(tmp_path / "flat/train-001.tar", sample_members(images, labels, range(10, 20)))
    write_tar(tmp_path / "flat/test-000.tar", sample_members(images, labels, range(20, 25)))
    source = web(tmp_path / "flat/*.tar", split_by="file")
    # sorted: test-000, train-000, train-001
    assert source.splits["test"].tolist() == list(range(5))
    assert source.splits["train"].tolist() == list(range(5, 25))
    assert set(source.splits) == {"train", "test"}
    assert web(tmp_path / "flat/*.tar").fingerprint != source.fingerprint  # splits differ
    write_tar(tmp_path / "tree/val/000.tar", sample_members(images, labels, range(3)))
    write_tar(tmp_path / "tree/Training/000.tar", sample_members(images, labels, range(4)))
    tree = web(tmp_path / "tree/*/000.tar", split_by="file")
    assert tree.splits["train"].tolist() == [0, 1, 2, 3]  # Training/ sorts before val/
    assert tree.splits["validation"].tolist() == [4, 5, 6]
    write_tar(tmp_path / "flat/extra-000.tar", sample_members(images, labels, range(2)))
    with pytest.raises(DataError) as error:
        web(tmp_path / "flat/*.tar", split_by="file")
    assert str(error.value).startswith(f"{tmp_path}/flat/extra-000.tar: data.split_by is "
                                       "'file' but the shard's path names no split; name shards")
    with pytest.raises(ConfigError, match="data.split_by: file works only with webdataset: "
                                          "and parquet: datasets"):
        open_source(DataConfig(split_by="file"))


def test_labels_from_another_member_a_json_field_or_none(tmp_path, mnist):
    images, labels = mnist
    members = []
    for i in range(6):
        members.append((f"{i:06d}.png", png(images[i])))
        members.append((f"{i:06d}.json", json.dumps({"label": int(labels[i])}).encode()))
    write_tar(tmp_path / "json.tar", members)
    source = web(tmp_path / "json.tar", label_key="json.label")
    assert source.load_batch(np.arange(6))[1].tolist() == labels[:6].tolist()
    assert web(tmp_path / "json.tar").labels.tolist() == [-1] * 6  # no .cls member anywhere
    write_tar(tmp_path / "ext.tar", sample_members(images, labels, range(4), label_ext="label"))
    assert web(tmp_path / "ext.tar", label_key="label").labels.tolist() == labels[:4].tolist()
    with pytest.raises(DataError) as error:  # configured, so a missing label is an error
        web(tmp_path / "ext.tar", label_key="cls")
    assert str(error.value).startswith(f"{tmp_path}/ext.tar: sample 000000 has no label member "
                                       "000000.cls")
    with pytest.raises(DataError, match=r"json.tar: member 000000.json: no field 'target'"):
        web(tmp_path / "json.tar", label_key="json.target")


def test_bad_labels_name_shard_and_member(tmp_path, mnist):
    images = mnist[0]
    write_tar(tmp_path / "words.tar", [("a.png", png(images[0])), ("a.cls", b"cat")])
    with pytest.raises(DataError) as error:
        web(tmp_path / "words.tar")
    assert str(error.value) == (f"{tmp_path}/words.tar: member a.cls: label 'cat' is not an "
                                "integer class id; map class names to 0, 1, 2, ... before "
                                "writing")
    write_tar(tmp_path / "big.tar", [("a.png", png(images[0])), ("a.cls", b"2147483648")])
    with pytest.raises(DataError, match="member a.cls: label 2147483648; class ids must be 0 "
                                        r"to 2147483647 \(-1 for no label\)"):
        web(tmp_path / "big.tar")


def test_a_sample_without_an_image_names_shard_and_key(tmp_path, mnist):
    write_tar(tmp_path / "s.tar", [("dir/a.png", png(mnist[0][0])), ("dir/b.cls", b"1")])
    with pytest.raises(DataError) as error:
        web(tmp_path / "s.tar")
    assert str(error.value).startswith(f"{tmp_path}/s.tar: sample dir/b has no image member "
                                       "(.jpg, .jpeg, .png, .webp)")
    write_tar(tmp_path / "j.tar", [("a.jpg", png(mnist[0][0]))])  # a PNG named .jpg
    with pytest.raises(DataError, match="sample a has no image member \\(.png\\)"):
        web(tmp_path / "j.tar", image_key="png")
    assert len(web(tmp_path / "j.tar")) == 1  # decoded by content, whatever the name says


def test_a_corrupt_image_member_names_shard_and_member(tmp_path, mnist):
    images, labels = mnist
    members = sample_members(images, labels, range(6))
    members[6] = ("000003.png", b"\x89PNG\r\n\x1a\n but not really")
    shard = write_tar(tmp_path / "shard-000003.tar", members)
    source = web(shard)  # headers are fine: the scan does not decode
    assert np.array_equal(as_uint8(source.load_batch([0, 5])[0]), images[[0, 5]])
    with pytest.raises(DataError) as error:
        source.load_batch([2, 3])
    assert str(error.value) == (f"{shard}: member 000003.png: cannot read image (cannot "
                                "identify image file); fix or remove the shard")


def test_truncated_or_compressed_or_missing_shards(tmp_path, mnist):
    images, labels = mnist
    shard = write_tar(tmp_path / "cut.tar", sample_members(images, labels, range(10)))
    data = shard.read_bytes()
    # cut inside a member's data, inside a header, after a header, between members, at the end
    for size in (600, 1100, 1536, len(data) // 2, len(data) - 10240):
        shard.write_bytes(data[:size])
        with pytest.raises(DataError) as error:
            web(shard)
        assert str(error.value).startswith(f"{shard}: truncated"), str(error.value)
        assert str(error.value).endswith("; fix or remove the shard")
    shard.write_bytes(b"not a tar at all" * 64)
    with pytest.raises(DataError, match=f"{shard}: not a tar file"):
        web(shard)
    import gzip

    packed = tmp_path / "packed.tar.gz"
    packed.write_bytes(gzip.compress(data))
    with pytest.raises(DataError, match="a gzip-compressed tar; .*use uncompressed .tar shards"):
        web(packed)
    with pytest.raises(DataError) as error:
        web(f"{tmp_path}/nothing-{{000..003}}.tar")
    assert str(error.value) == f"webdataset:{tmp_path}/nothing-{{000..003}}.tar: no shards match"


# --- parquet ---------------------------------------------------------------------------------


def hf_table(images: np.ndarray, labels: np.ndarray, ids: range) -> pa.Table:
    """Rows as the Hugging Face Image() feature writes them: struct {bytes, path}, + label."""
    kind = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    column = pa.array([{"bytes": png(images[i]), "path": f"{i}.png"} for i in ids], type=kind)
    return pa.table({"image": column, "label": pa.array(labels[list(ids)], type=pa.int64())})


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory, mnist) -> Path:
    """data/train-0000{0,1}-of-00002.parquet (rows 0..119, 120..179) and
    data/test-00000-of-00001.parquet (180..199), 32 rows per row group."""
    folder = tmp_path_factory.mktemp("hf") / "data"
    folder.mkdir()
    images, labels = mnist
    for name, ids in (("train-00000-of-00002", range(0, 120)),
                      ("train-00001-of-00002", range(120, 180)),
                      ("test-00000-of-00001", range(180, 200))):
        pq.write_table(hf_table(images, labels, ids), folder / f"{name}.parquet",
                       row_group_size=32)
    return folder


def test_parquet_gives_the_bundled_samples_images_and_labels(parquet_dir, mnist):
    source = open_source(DataConfig(dataset=f"parquet:{parquet_dir}"))
    # sorted: test-00000 (the sample's 180..199), then train-00000, train-00001
    order = np.r_[180:200, 0:180]
    assert len(source) == N
    images, labels = source.load_batch(np.arange(N))
    assert np.array_equal(as_uint8(images), mnist[0][order])
    assert np.array_equal(labels.numpy(), mnist[1][order])
    rule = source.splits
    assert all(np.array_equal(rule[k], v) for k, v in holdout_splits(N).items())
    by_file = open_source(DataConfig(dataset=f"parquet:{parquet_dir}", split_by="file")).splits
    assert by_file["test"].tolist() == list(range(20))
    assert by_file["train"].tolist() == list(range(20, 200))
    glob = open_source(DataConfig(dataset=f"parquet:{parquet_dir}/train-*.parquet"))
    assert len(glob) == 180 and glob.labels.tolist() == mnist[1][:180].tolist()
    one = open_source(DataConfig(dataset=f"parquet:{parquet_dir}/train-00001-of-00002.parquet"))
    assert np.array_equal(as_uint8(one.load_batch([0, 59])[0]), mnist[0][[120, 179]])


def test_parquet_plain_binary_column_and_configured_names(tmp_path, mnist):
    images = mnist[0]
    path = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"png": pa.array([png(images[i]) for i in range(10)]),
                             "digit": pa.array(range(10), type=pa.int32())}), path)
    source = open_source(DataConfig(dataset=f"parquet:{path}", image_key="png",
                                    label_key="digit"))
    batch, labels = source.load_batch(np.arange(10))
    assert np.array_equal(as_uint8(batch), images[:10]) and labels.tolist() == list(range(10))
    unlabelled = open_source(DataConfig(dataset=f"parquet:{path}", image_key="png"))
    assert unlabelled.labels.tolist() == [-1] * 10  # no 'label' column, none configured
    with pytest.raises(DataError) as error:
        open_source(DataConfig(dataset=f"parquet:{path}"))
    assert str(error.value) == (f"{path}: no image column 'image' (columns: png, digit); set "
                                "data.image_key to the image column")
    with pytest.raises(DataError, match=f"{path}: no label column 'label' \\(columns: png, "
                                        "digit\\)"):
        open_source(DataConfig(dataset=f"parquet:{path}", image_key="png", label_key="label"))
    with pytest.raises(DataError, match="column 'digit' is int32, not images"):
        open_source(DataConfig(dataset=f"parquet:{path}", image_key="digit"))
    with pytest.raises(DataError, match=f"parquet:{tmp_path}/none-\\*.parquet: no files match"):
        open_source(DataConfig(dataset=f"parquet:{tmp_path}/none-*.parquet"))


def test_parquet_null_or_undecodable_image_names_file_row_and_id(tmp_path, mnist):
    images = mnist[0]
    kind = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [{"bytes": png(images[i]), "path": f"{i}.png"} for i in range(6)]
    rows[2] = {"bytes": None, "path": "elsewhere/2.png"}
    rows[4] = {"bytes": b"garbage", "path": "4.png"}
    pq.write_table(pa.table({"image": pa.array(rows, type=kind)}), tmp_path / "a.parquet")
    pq.write_table(hf_table(images, mnist[1], range(10, 14)), tmp_path / "0.parquet")
    source = open_source(DataConfig(dataset=f"parquet:{tmp_path}"))
    assert source.labels.tolist() == [*mnist[1][10:14], *[-1] * 6]  # a.parquet has no labels
    assert np.array_equal(as_uint8(source.load_batch([4, 5])[0]), images[:2])
    with pytest.raises(DataError) as error:
        source.load_batch([6])
    assert str(error.value) == (f"{tmp_path}/a.parquet: row 2 (id 6): image is null (it names "
                                "'elsewhere/2.png' but holds no bytes); fix or remove the row")
    with pytest.raises(DataError) as error:
        source.load_batch([8])
    assert str(error.value).startswith(f"{tmp_path}/a.parquet: row 4 (id 8): cannot read image")


# --- both: workers, pickling, memory ---------------------------------------------------------


@pytest.fixture(params=["webdataset", "parquet"])
def streaming(request, shards, parquet_dir):
    if request.param == "webdataset":
        return web(f"{shards}/shard-{{000..001}}.tar")
    return open_source(DataConfig(dataset=f"parquet:{parquet_dir}"))


def test_dataloader_workers_give_the_same_batches(streaming):
    ids = np.r_[150:200, 0:70]
    here = list(iterate_batches(streaming, ids, 32))
    there = list(iterate_batches(streaming, ids, 32, num_workers=2))
    assert len(here) == len(there) == 4
    for (a, la), (b, lb) in zip(here, there, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_pickles_after_opening_files_and_stays_compact(streaming):
    before = streaming.load_batch([0, 1, 120])
    copy = pickle.loads(pickle.dumps(streaming))  # open handles stay behind
    # what is kept per sample is numpy arrays (a few int64 each), no Python object per sample
    state = vars(streaming)
    assert max(len(v) for v in state.values() if isinstance(v, (list, tuple, dict))) <= 3
    arrays = [v for v in [*state.values(), *streaming.splits.values()]
              if isinstance(v, np.ndarray)]
    assert all(a.dtype != object for a in arrays)
    assert sum(a.nbytes for a in arrays) <= 40 * len(streaming) + 1024
    after = copy.load_batch([0, 1, 120])
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert copy.fingerprint == streaming.fingerprint
    assert {k: len(v) for k, v in copy.splits.items()} == {"train": 180, "validation": 20}
    streaming.close()
    assert torch.equal(streaming.load_batch([0, 1, 120])[0], before[0])  # reopened


# --- through the CLI -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny untrained checkpoint taking 28x28 images, so shards are encoded unresized."""
    raw = tiny_raw("mnist-sample")
    raw["data"]["image_size"] = 28
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint", raw)


def test_encode_webdataset_shards_with_the_installed_command(shards, checkpoint, tmp_path,
                                                            prefect_harness):
    from prefect.settings import PREFECT_API_URL
    from vqtok.storage import load_grid
    from vqtok.tokenizer import load_tokenizer
    from vqtok.tokenizer.encode import encode_ids

    outside = tmp_path / "elsewhere"  # not the repository: the installed package is used
    outside.mkdir()
    out = tmp_path / "out"
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    done = subprocess.run(
        [console_command(), "encode", "--checkpoint", str(checkpoint), "--dataset",
         f"webdataset:{shards}/shard-{{000..001}}.tar", "--out", str(out), "--workers", "2",
         "--device", "cpu", "--quiet"],
        cwd=outside, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{N} images encoded" in done.stdout
    grid = load_grid(out)
    assert grid.num_rows == N and sorted(grid.ids.tolist()) == list(range(N))
    model = load_tokenizer(checkpoint)
    sample = open_source(DataConfig(image_size=28))
    codes = np.concatenate([c for c, _, _ in encode_ids(model, sample, np.arange(N), 64)])
    assert len(np.unique(codes)) > 1  # codes vary, so agreeing means something
    order = np.argsort(grid.ids)
    assert np.array_equal(grid.codes[order], codes)
    assert np.array_equal(grid.labels[order], sample.labels[:N].numpy())


@pytest.mark.usefixtures("prefect_harness")
def test_a_bad_member_through_the_cli_is_one_error_line(tmp_path, mnist, checkpoint):
    images, labels = mnist
    members = sample_members(images, labels, range(12))
    members[14] = ("000007.png", b"\x89PNG\r\n\x1a\n but not really")
    shard = write_tar(tmp_path / "shard-000.tar", members)
    message = fails("encode", "--checkpoint", checkpoint, "--dataset", f"webdataset:{shard}",
                    "--out", tmp_path / "out", "--quiet")
    assert message == (f"{shard}: member 000007.png: cannot read image (cannot identify image "
                       "file); fix or remove the shard")
