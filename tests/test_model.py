"""VQVAE: shapes, the encode/decode contract, configurable depth."""

import pytest
import torch

from tokenizer import VQVAE
from tokenizer.config import ModelConfig, QuantizerConfig


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
