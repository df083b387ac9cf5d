"""Image sources: the bundled sample, IDX files offline, .npz, folders, resizing, errors."""

import gzip

import numpy as np
import pytest
import torch
from PIL import Image
from vqtok.tokenizer.config import DataConfig
from vqtok.tokenizer.sources import DataError, open_source, read_idx

from tests.helpers import write_npz


def test_bundled_sample_is_the_default_with_a_fixed_split():
    source = open_source(DataConfig())
    assert source.name == "mnist-sample" and len(source) == 10_000
    train, val = source.split_ids("train"), source.split_ids("validation")
    assert (len(train), len(val)) == (9_000, 1_000)
    assert not set(train) & set(val)
    image, label, ident = source[123]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert ident == 123 and label == 6  # the 124th MNIST test label
    again = open_source(DataConfig())
    assert again.fingerprint == source.fingerprint
    assert np.array_equal(again.split_ids("validation"), val)


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def idx_root(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 4)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return tmp_path


def test_mnist_reads_idx_files_from_data_root_offline(idx_root):
    source = open_source(DataConfig(dataset="mnist", data_root=str(idx_root)))
    assert source.split_ids("train").tolist() == [0, 1, 2, 3, 4, 5]
    assert source.split_ids("test").tolist() == [6, 7, 8, 9]
    raw = read_idx(idx_root / "t10k-images-idx3-ubyte.gz")
    image, label, ident = source[7]
    assert ident == 7 and label == 1
    assert torch.equal((image[0] * 255).round().to(torch.uint8), torch.from_numpy(raw[1].copy()))


def test_truncated_idx_file_is_named(idx_root):
    path = idx_root / "t10k-images-idx3-ubyte.gz"
    data = gzip.open(path).read()
    with gzip.open(path, "wb") as f:
        f.write(data[:-10])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: truncated"):
        open_source(DataConfig(dataset="mnist", data_root=str(idx_root)))


@pytest.mark.parametrize("nhwc", [False, True])
def test_npz_in_either_layout(tmp_path, nhwc):
    path = write_npz(tmp_path / "x.npz", n=20, nhwc=nhwc)
    source = open_source(DataConfig(dataset=f"npz:{path}", image_size=8))
    images, labels = source.load_batch([0, 5, 19])
    assert images.shape == (3, 1, 8, 8) and labels.tolist() == [0, 1, 3]
    assert len(source.split_ids("validation")) == 2


def test_npz_without_labels_gives_minus_one(tmp_path):
    path = tmp_path / "nolabels.npz"
    np.savez(path, images=np.zeros((3, 8, 8), dtype=np.uint8))
    assert open_source(DataConfig(dataset=f"npz:{path}", image_size=8))[2][1] == -1


def test_npz_errors(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        open_source(DataConfig(dataset=f"npz:{tmp_path}/missing.npz"))
    bad = tmp_path / "bad.npz"
    np.savez(bad, pictures=np.zeros((2, 8, 8), dtype=np.uint8))
    with pytest.raises(DataError, match="no array named 'images'"):
        open_source(DataConfig(dataset=f"npz:{bad}"))
    floats = tmp_path / "floats.npz"
    np.savez(floats, images=np.zeros((2, 8, 8)))
    with pytest.raises(DataError, match="must be uint8"):
        open_source(DataConfig(dataset=f"npz:{floats}"))


def test_resize_or_refuse_other_sizes(tmp_path):
    path = write_npz(tmp_path / "big.npz", n=4, size=12)
    resized = open_source(DataConfig(dataset=f"npz:{path}", image_size=8))
    assert resized.load_batch([0])[0].shape == (1, 1, 8, 8)
    with pytest.raises(DataError, match="images are 12x12 but the config wants 8x8"):
        open_source(DataConfig(dataset=f"npz:{path}", image_size=8, resize="error"))


def test_channel_conversion(tmp_path):
    path = write_npz(tmp_path / "gray.npz", n=4)
    rgb = open_source(DataConfig(dataset=f"npz:{path}", image_size=8, channels=3))
    images, _ = rgb.load_batch([0])
    assert images.shape == (1, 3, 8, 8) and torch.equal(images[0, 0], images[0, 2])


def _folder(tmp_path):
    root = tmp_path / "images"
    for cls, value in (("cat", 40), ("dog", 200)):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((10, 10), value + i, dtype=np.uint8)).save(
                root / cls / f"{i}.png")
    return root


def test_imagefolder_labels_from_subfolders_in_sorted_order(tmp_path):
    root = _folder(tmp_path)
    source = open_source(DataConfig(dataset=f"imagefolder:{root}", image_size=8))
    assert source.class_names == ["cat", "dog"] and len(source) == 6
    image, label, ident = source[4]
    assert (label, ident) == (1, 4) and image.shape == (1, 8, 8)
    assert float(image[0, 0, 0]) == pytest.approx(201 / 255)


def test_sixteen_bit_grayscale_pngs_are_scaled_not_clipped(tmp_path):
    gray = (np.arange(64) * 4).reshape(8, 8).astype(np.uint8)
    (tmp_path / "imgs").mkdir()
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "imgs" / "wide.png")
    assert Image.open(tmp_path / "imgs" / "wide.png").mode == "I;16"
    for channels in (1, 3):
        cfg = DataConfig(dataset=f"imagefolder:{tmp_path / 'imgs'}", channels=channels,
                         image_size=8)
        images, _ = open_source(cfg).load_batch([0])
        expected = torch.from_numpy(gray).float().div(255).expand(channels, 8, 8)
        assert torch.equal(images[0], expected)


def test_imagefolder_corrupt_file_is_named(tmp_path):
    root = _folder(tmp_path)
    (root / "dog" / "broken.png").write_bytes(b"not a png")
    source = open_source(DataConfig(dataset=f"imagefolder:{root}", image_size=8))
    with pytest.raises(DataError, match=r"broken\.png: cannot read image"):
        source.load_batch(list(range(len(source))))


def test_imagefolder_missing_or_empty(tmp_path):
    with pytest.raises(DataError, match="folder not found"):
        open_source(DataConfig(dataset=f"imagefolder:{tmp_path}/nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .png/.jpg/.jpeg files"):
        open_source(DataConfig(dataset=f"imagefolder:{tmp_path}/empty"))


def test_unknown_dataset_and_split():
    with pytest.raises(DataError, match="unknown dataset 'imagenet'"):
        open_source(DataConfig(dataset="imagenet"))
    with pytest.raises(DataError, match="has no split 'extra'"):
        open_source(DataConfig()).split_ids("extra")
