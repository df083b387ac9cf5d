"""VQVAE: shapes, the encode/decode contract, configurable depth."""

import pytest
import torch
from vqtok.tokenizer import VQVAE
from vqtok.tokenizer.config import ModelConfig, QuantizerConfig


def small(**model) -> VQVAE:
    cfg = {"hidden_channels": 8, "latent_channels": 4, "embedding_dim": 4, "num_embeddings": 16}
    cfg.update(model)
    return VQVAE(1, ModelConfig(**cfg), QuantizerConfig(kmeans_iters=2)).eval()


def test_default_architecture_maps_mnist_to_a_7x7_grid():
    model = VQVAE().eval()
    x = torch.rand(3, 1, 28, 28)
    codes = model.encode(x)
    assert codes.shape == (3, 7, 7) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < 512
    images = model.decode(codes)
    assert images.shape == (3, 1, 28, 28)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert isinstance(model.pre_quant, torch.nn.Identity)  # latent 64 == embedding 64


def test_encode_then_decode_equals_the_eval_forward_pass():
    model = small()
    x = torch.rand(4, 1, 16, 16)
    out = model(x)
    assert torch.equal(model.encode(x), out.indices)
    assert torch.allclose(model.decode(out.indices), out.reconstruction, atol=1e-6)


def test_one_by_one_conv_bridges_encoder_and_codebook_widths():
    model = small(latent_channels=6, embedding_dim=3)
    assert isinstance(model.pre_quant, torch.nn.Conv2d)
    assert model.pre_quant.kernel_size == (1, 1)
    assert (model.pre_quant.in_channels, model.pre_quant.out_channels) == (6, 3)
    assert model.encode(torch.rand(1, 1, 8, 8)).shape == (1, 2, 2)


@pytest.mark.parametrize("downsamples,blocks", [(1, 0), (3, 2)])
def test_depth_and_residual_blocks_are_configurable(downsamples, blocks):
    model = small(num_downsamples=downsamples, num_residual_blocks=blocks)
    x = torch.rand(2, 1, 32, 32)
    side = 32 // 2**downsamples
    assert model.encode(x).shape == (2, side, side)
    assert model(x).reconstruction.shape == x.shape


def test_decode_refuses_codes_outside_the_codebook():
    model = small()
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 16\); got \[0, 16\]"):
        model.decode(torch.tensor([[[0, 16]]]))
    with pytest.raises(TypeError, match="integer"):
        model.decode(torch.zeros(1, 2, 2))


def test_decode_takes_the_stores_uint16_codes_as_they_are():
    """``torch.from_numpy`` of a token store's codes gives uint16: decoded exactly like int64."""
    import numpy as np

    model = small()
    codes = model.encode(torch.rand(3, 1, 16, 16))
    stored = torch.from_numpy(codes.numpy().astype(np.uint16))
    assert stored.dtype == torch.uint16
    assert torch.equal(model.decode(stored), model.decode(codes))
    with pytest.raises(TypeError, match="integer tensor, got torch.bool"):
        model.decode(codes > 3)


def test_decode_takes_load_grids_read_only_numpy_codes_without_a_warning():
    import warnings

    import numpy as np

    model = small()
    codes = model.encode(torch.rand(3, 1, 16, 16))
    stored = codes.numpy().astype(np.uint16)
    stored.flags.writeable = False  # what storage.load_grid returns
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "not writable" warning would fail here
        assert torch.equal(model.decode(stored), model.decode(codes))
    with pytest.raises(TypeError, match="integer array, got float32"):
        model.decode(stored.astype(np.float32))


def test_encode_ids_gives_the_same_codes_whatever_the_batch_size(tmp_path):
    """Batch 1 included: encode_ids encodes a lone image as a batch of two copies, since
    PyTorch's CPU convolutions round differently for a single image (see encode_ids)."""
    import numpy as np
    from vqtok.tokenizer import load_tokenizer, open_source
    from vqtok.tokenizer.config import parse_config
    from vqtok.tokenizer.encode import encode_ids

    from tests.helpers import make_checkpoint, tiny_raw, write_npz

    raw = tiny_raw(f"npz:{write_npz(tmp_path / 'x.npz', n=50)}")
    model = load_tokenizer(make_checkpoint(tmp_path / "ck", raw))
    source = open_source(parse_config(raw).data)
    ids = np.arange(50)[::-1].copy()  # any order: rows follow ids
    runs = {}
    for batch in (1, 3, 16, 50):
        parts = list(encode_ids(model, source, ids, batch))
        runs[batch] = [np.concatenate(column) for column in zip(*parts, strict=True)]
        assert all(len(p[0]) == len(p[1]) == len(p[2]) for p in parts)
    with torch.no_grad():
        expected = model.encode(source.load_batch(ids)[0]).numpy()
    for codes, batch_ids, labels in runs.values():
        assert np.array_equal(codes, expected) and np.array_equal(batch_ids, ids)
        assert np.array_equal(labels, source.load_batch(ids)[1].numpy())
