"""export_memmap and TokenDataset: the hand-off to prior training."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from vqtok.storage import (
    ParquetTokenWriter,
    ShardedTokenStore,
    TokenDataset,
    TokenMeta,
    TokenStoreError,
    export_memmap,
    load_grid,
)

REPO = Path(__file__).resolve().parents[1]
META = TokenMeta(512, 3, 4, "toy", "fp", "ck", "0.1.0", created_at="t")


def data():
    rng = np.random.default_rng(11)
    return rng.integers(0, 512, (17, 3, 4)), np.arange(17), rng.integers(0, 10, 17)


@pytest.fixture
def parquet_file(tmp_path):
    codes, ids, labels = data()
    path = tmp_path / "tokens.parquet"
    with ParquetTokenWriter(path, META) as writer:
        writer.write(codes[:12], ids[:12], labels[:12], "train")
        writer.write(codes[12:], ids[12:], None, "test")
    return path


@pytest.fixture
def sharded(tmp_path):
    codes, ids, labels = data()
    store = ShardedTokenStore(tmp_path / "run", META, shard_size=5, formats=("hdf5",))
    for split, rows in (("train", slice(0, 12)), ("test", slice(12, 17))):
        for shard in store.plan(split, rows.stop - rows.start):
            part = slice(rows.start + shard.start, rows.start + shard.stop)
            with store.open_shard(shard) as writer:
                writer.write(codes[part], ids[part], labels[part] if split == "train" else None)
    store.finalize()
    return tmp_path / "run"


@pytest.mark.parametrize("source", ["parquet_file", "sharded"])
def test_export_memmap_round_trip(source, request, tmp_path):
    codes, _, labels = data()
    out = tmp_path / "export" / "tokens.npy"
    sidecar = export_memmap(request.getfixturevalue(source), out)
    flat = np.load(out, mmap_mode="r")
    assert isinstance(flat, np.memmap) and flat.dtype == np.uint16 and flat.shape == (17 * 12,)
    np.testing.assert_array_equal(flat, codes.reshape(-1))
    info = json.loads(sidecar.read_text())
    assert info["shape"] == [17, 3, 4] and info["dtype"] == "uint16"
    assert TokenMeta.from_dict(info["meta"]) == META
    stored_labels = np.load(out.with_name("tokens.labels.npy"))
    np.testing.assert_array_equal(stored_labels, np.concatenate([labels[:12], [-1] * 5]))
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "tokens.json",
        "tokens.labels.npy",
        "tokens.npy",
    ]


def test_export_of_one_split(sharded, tmp_path):
    codes, _, _ = data()
    out = tmp_path / "test.npy"
    export_memmap(sharded, out, split="test")
    np.testing.assert_array_equal(np.load(out).reshape(-1, 3, 4), codes[12:])


def test_failed_export_leaves_nothing(sharded, tmp_path):
    shard = sharded / "hdf5" / "test" / "part-00000.h5"
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")
    out = tmp_path / "x" / "tokens.npy"
    with pytest.raises(TokenStoreError, match="does not match"):
        export_memmap(sharded, out)
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("source", ["parquet_file", "sharded"])
def test_token_dataset_over_a_store(source, request):
    codes, _, labels = data()
    dataset = TokenDataset(request.getfixturevalue(source))
    assert len(dataset) == 17
    item, label = dataset[3]
    assert isinstance(item, torch.Tensor) and item.dtype == torch.long and item.shape == (3, 4)
    assert torch.equal(item, torch.from_numpy(codes[3]))
    assert label == labels[3] and type(label) is int
    assert dataset[-1][1] == -1  # test rows were written without labels
    with pytest.raises(IndexError):
        dataset[17]


def test_token_dataset_split_filter_and_grid(parquet_file):
    codes, _, _ = data()
    test = TokenDataset(parquet_file, split="test")
    assert len(test) == 5 and torch.equal(test[0][0], torch.from_numpy(codes[12]))
    from_grid = TokenDataset(load_grid(parquet_file), split="train")
    assert len(from_grid) == 12


def test_token_dataset_over_a_memmap_export(parquet_file, tmp_path):
    codes, _, labels = data()
    out = tmp_path / "tokens.npy"
    export_memmap(parquet_file, out)
    dataset = TokenDataset(out)
    assert len(dataset) == 17
    assert torch.equal(dataset[16][0], torch.from_numpy(codes[16]))
    assert dataset[2][1] == labels[2]
    clone = pickle.loads(pickle.dumps(dataset))  # DataLoader workers get the path, not a copy
    assert clone.__dict__["_codes"] is None
    assert torch.equal(clone[5][0], dataset[5][0])
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch[0].shape == (4, 3, 4) and batch[0].dtype == torch.long
    with pytest.raises(TokenStoreError, match="export holds split None"):
        TokenDataset(out, split="train")


def test_import_storage_does_not_import_torch():
    code = "import sys, storage; assert 'torch' not in sys.modules; storage.TokenDataset"
    check = code + "; assert 'torch' in sys.modules"
    result = subprocess.run(
        [sys.executable, "-c", check],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
