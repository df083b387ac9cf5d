"""The fused quantizer path: same values and gradients as the textbook formulation, any layout,
blocks within budget, fp32 distances and losses under autocast."""

import pytest
import torch
import torch.nn.functional as F
from vqtok.tokenizer import VectorQuantizer
from vqtok.tokenizer.quantizers.vq import (
    CPU_BLOCK_BYTES,
    CPU_MIN_BLOCK_ROWS,
    _block_shape,
    nearest_code,
    squared_distances,
)

LAYOUTS = [torch.contiguous_format, torch.channels_last]


def _reference(q: VectorQuantizer, z: torch.Tensor):
    """The formulation the fused path replaces: gather, mse_loss twice, z + sg(q - z)."""
    b, d, h, w = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, d)
    indices = squared_distances(flat, q.codebook).argmin(dim=1)
    quantized = F.embedding(indices, q.codebook).view(b, h, w, d).permute(0, 3, 1, 2)
    commitment = F.mse_loss(z, quantized.detach())
    codebook_loss = F.mse_loss(quantized, z.detach())
    return z + (quantized - z).detach(), indices.view(b, h, w), commitment, codebook_loss


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fused_values_and_gradients_equal_the_textbook_formulation(layout):
    torch.manual_seed(0)
    q = VectorQuantizer(num_embeddings=7, embedding_dim=4, beta=0.25, ema=False,
                        kmeans_init=False, restart_after=0).double()
    z = torch.randn(3, 4, 5, 6, dtype=torch.float64).contiguous(memory_format=layout)
    z.requires_grad_()
    upstream = torch.randn(3, 4, 5, 6, dtype=torch.float64)

    out = q.eval()(z)  # eval: no codebook bookkeeping, so both runs see the same codebook
    ref_q, ref_idx, ref_commit, ref_cb = _reference(q, z)
    assert torch.equal(out.indices, ref_idx)
    assert torch.allclose(out.quantized, ref_q, rtol=0, atol=1e-15)
    assert out.quantized.is_contiguous(memory_format=layout)
    assert out.commitment_loss.item() == pytest.approx(ref_commit.item(), rel=1e-14)
    assert out.codebook_loss.item() == pytest.approx(ref_cb.item(), rel=1e-14)

    params = (z, q.codebook)
    got = torch.autograd.grad((out.quantized * upstream).sum() + out.loss, params)
    want = torch.autograd.grad((ref_q * upstream).sum() + ref_cb + 0.25 * ref_commit, params)
    for g, r in zip(got, want, strict=True):
        assert torch.allclose(g, r, rtol=0, atol=1e-15)


def test_each_loss_sends_its_gradient_to_one_side_only():
    torch.manual_seed(1)
    q = VectorQuantizer(num_embeddings=5, embedding_dim=3, ema=False, kmeans_init=False)
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = q.eval()(z)
    dz, de = torch.autograd.grad(out.commitment_loss, (z, q.codebook), allow_unused=True,
                                 retain_graph=True)
    assert dz.abs().sum() > 0 and (de is None or de.abs().sum() == 0)
    dz, de = torch.autograd.grad(out.codebook_loss, (z, q.codebook), allow_unused=True)
    assert (dz is None or dz.abs().sum() == 0) and de.abs().sum() > 0


def test_blocks_stay_within_the_budget_and_are_cache_sized_on_cpu():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    budget = 256 * 2**20
    rows, codes = _block_shape(65536, 512, budget, cpu)
    assert codes == 512 and rows * codes * 4 == CPU_BLOCK_BYTES
    rows, codes = _block_shape(65536, 65536, budget, cpu)
    assert (rows, codes) == (CPU_MIN_BLOCK_ROWS, 65536)
    assert rows * codes * 4 <= budget
    # On a GPU the whole budget is one block: few, large kernels.
    assert _block_shape(65536, 512, budget, gpu) == (65536, 512)
    assert _block_shape(10**6, 65536, budget, gpu) == (1024, 65536)
    # A budget smaller than a row splits the codes too, and is never exceeded.
    rows, codes = _block_shape(100, 300, 4 * 50, cpu)
    assert (rows, codes) == (1, 50)


def test_channels_last_input_gives_the_same_codes_and_layout():
    torch.manual_seed(2)
    q = VectorQuantizer(num_embeddings=16, embedding_dim=8, kmeans_init=False).eval()
    z = torch.randn(4, 8, 6, 6)
    plain = q(z)
    cl = q(z.contiguous(memory_format=torch.channels_last))
    assert torch.equal(plain.indices, cl.indices)
    assert torch.equal(plain.quantized, cl.quantized)
    assert cl.quantized.is_contiguous(memory_format=torch.channels_last)


def test_under_bf16_autocast_codes_and_losses_stay_fp32():
    torch.manual_seed(3)
    q = VectorQuantizer(num_embeddings=32, embedding_dim=8, ema=True, kmeans_init=False)
    z = torch.randn(2, 8, 4, 4).bfloat16().requires_grad_()
    before = q.codebook.clone()  # the training step moves the codebook (EMA)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q.train()(z)
    flat = z.detach().float().permute(0, 2, 3, 1).reshape(-1, 8)
    assert torch.equal(out.indices.flatten(), squared_distances(flat, before).argmin(1))
    assert out.quantized.dtype == torch.bfloat16
    assert out.commitment_loss.dtype == torch.float32
    diff = out.quantized.detach().float() - z.detach().float()
    assert out.commitment_loss.item() == pytest.approx(float((diff**2).mean()), rel=1e-6)
    out.loss.backward(retain_graph=True)
    assert z.grad.dtype == torch.bfloat16 and torch.isfinite(z.grad.float()).all()


def test_nearest_code_blocked_on_cpu_equals_one_big_block():
    g = torch.Generator().manual_seed(4)
    vectors = torch.randn(3000, 16, generator=g)
    codes = torch.randn(2000, 16, generator=g)  # 2000 codes -> 524-row CPU blocks
    expected = squared_distances(vectors, codes).argmin(dim=1)
    assert torch.equal(nearest_code(vectors, codes), expected)
