"""VectorQuantizer: the lecture's toy example, gradient routing, chunking, EMA, restarts."""

import pytest
import torch
from vqtok.tokenizer import VQVAE, VectorQuantizer
from vqtok.tokenizer.config import ModelConfig, QuantizerConfig
from vqtok.tokenizer.quantizers.vq import kmeans, nearest_code, squared_distances

TOY_CODES = torch.tensor([[1.0, 2.0], [3.0, 3.0], [0.5, 0.5]])
TOY_Z = torch.tensor([1.4, 2.1])


def toy_quantizer(**kwargs) -> VectorQuantizer:
    q = VectorQuantizer(num_embeddings=3, embedding_dim=2, beta=0.25, ema=False,
                        kmeans_init=False, **kwargs)
    with torch.no_grad():
        q.codebook.copy_(TOY_CODES)
    return q


def test_lecture_toy_example_picks_nearest_code_with_exact_distances():
    q = toy_quantizer()
    z = TOY_Z.view(1, 2, 1, 1)
    out = q(z)

    assert squared_distances(TOY_Z[None], q.codebook)[0].tolist() == pytest.approx(
        [0.17, 3.37, 3.37], abs=1e-5)
    assert out.indices.shape == (1, 1, 1) and out.indices.dtype == torch.int64
    assert out.indices.item() == 0  # argmin; argmax would pick index 1 (distance 3.37)
    assert out.quantized.flatten().tolist() == pytest.approx([1.0, 2.0])


def test_lecture_toy_example_losses_with_mean_reduction():
    # Reduction: mean over all elements (F.mse_loss). Per vector the sums of squares are
    # ||sg[z_e] - e||^2 = ||z_e - sg[e]||^2 = 0.4^2 + 0.1^2 = 0.17, so each term is 0.17 / D.
    out = toy_quantizer()(TOY_Z.view(1, 2, 1, 1))
    d = 2
    assert out.codebook_loss.item() * d == pytest.approx(0.17, abs=1e-6)
    assert out.commitment_loss.item() * d == pytest.approx(0.17, abs=1e-6)
    assert out.loss.item() == pytest.approx(0.085 + 0.25 * 0.085, abs=1e-6)


def test_straight_through_passes_the_output_gradient_unchanged_to_the_input():
    q = toy_quantizer()
    z = torch.randn(2, 2, 3, 3, requires_grad=True)
    weights = torch.randn(2, 2, 3, 3)
    (q(z).quantized * weights).sum().backward()
    assert torch.equal(z.grad, weights)


def _grads(loss, params):
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [g is not None and bool(g.abs().sum() > 0) for g in grads]


def test_gradient_routing_through_a_tiny_vqvae():
    torch.manual_seed(0)
    model = VQVAE(1, ModelConfig(hidden_channels=4, latent_channels=3, embedding_dim=3,
                                 num_embeddings=8),
                  QuantizerConfig(ema=False, kmeans_init=False))
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():  # codes near the encoder outputs so every term is non-trivial
        z = model.latent(x).permute(0, 2, 3, 1).reshape(-1, 3)
        model.quantizer.codebook.copy_(z[:8] + 0.01)
    out = model(x)
    encoder = [p for n, p in model.named_parameters() if n.startswith(("encoder", "pre_quant"))]
    decoder = [p for n, p in model.named_parameters() if n.startswith("decoder")]
    codebook = [model.quantizer.codebook]

    recon, codebook_loss, commitment = (out.reconstruction_loss, out.codebook_loss,
                                        out.commitment_loss)
    # Decoder: only the reconstruction loss.
    assert all(_grads(recon, decoder))
    assert not any(_grads(codebook_loss, decoder)) and not any(_grads(commitment, decoder))
    # Encoder: reconstruction (straight through) and commitment, never the codebook loss.
    assert all(_grads(recon, encoder)) and all(_grads(commitment, encoder))
    assert not any(_grads(codebook_loss, encoder))
    # Codebook: only the codebook loss.
    assert all(_grads(codebook_loss, codebook))
    assert not any(_grads(recon, codebook)) and not any(_grads(commitment, codebook))


def test_codebook_gradient_comes_from_a_gather_not_a_one_hot_matmul():
    q = toy_quantizer()
    z = torch.tensor([[1.4, 2.1], [0.4, 0.6]]).T.reshape(1, 2, 1, 2)
    out = q(z)
    out.codebook_loss.backward()
    grad = q.codebook.grad
    # Only the two codes that were picked (0 and 2) receive gradient; code 1 gets exactly 0.
    assert grad[1].abs().sum() == 0
    assert grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0


@pytest.mark.parametrize("chunk_bytes", [4 * 7, 4 * 50 * 3, 4 * 300 * 10, 2**28])
def test_chunked_nearest_code_equals_full_argmin(chunk_bytes):
    g = torch.Generator().manual_seed(1)
    vectors = torch.randn(257, 8, generator=g)
    codes = torch.randn(300, 8, generator=g)
    codes[7] = codes[3]  # a tie: both searches must pick the lower index
    vectors[5] = codes[3]
    expected = squared_distances(vectors, codes).argmin(dim=1)
    got = nearest_code(vectors, codes, chunk_bytes=chunk_bytes)
    assert torch.equal(got, expected)
    assert got[5].item() == 3


def test_ema_update_matches_the_formula_on_a_hand_computed_example():
    q = VectorQuantizer(num_embeddings=2, embedding_dim=1, ema=True, decay=0.5, eps=1e-5,
                        kmeans_init=False, restart_after=0)
    with torch.no_grad():
        q.embedding.copy_(torch.tensor([[0.0], [10.0]]))
        q.ema_sum.copy_(q.embedding)
        q.ema_count.fill_(1.0)
    q.train()
    z = torch.tensor([1.0, 2.0, 9.0]).view(1, 1, 1, 3)
    q(z)
    # Assignments 1,2 -> code 0 and 9 -> code 1: n = [2, 1], sums = [3, 9].
    # N = 0.5*[1, 1] + 0.5*[2, 1] = [1.5, 1.0];  m = 0.5*[0, 10] + 0.5*[3, 9] = [1.5, 9.5]
    # Laplace: N~ = (N + eps) / (2.5 + 2 eps) * 2.5;  e = m / N~
    n_total, eps = 2.5, 1e-5
    smoothed = [(c + eps) / (n_total + 2 * eps) * n_total for c in (1.5, 1.0)]
    expected = [1.5 / smoothed[0], 9.5 / smoothed[1]]
    assert q.ema_count.tolist() == pytest.approx([1.5, 1.0])
    assert q.ema_sum.flatten().tolist() == pytest.approx([1.5, 9.5])
    assert q.codebook.flatten().tolist() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx([1.0, 9.5], abs=1e-4)


def test_ema_codebook_is_not_a_parameter_and_has_no_codebook_loss():
    q = VectorQuantizer(num_embeddings=4, embedding_dim=2, ema=True)
    assert not any(p is q.codebook for p in q.parameters())
    out = q.train()(torch.randn(1, 2, 2, 2))
    assert out.codebook_loss.item() == 0.0


def test_dead_code_restart_revives_an_unused_code():
    q = VectorQuantizer(num_embeddings=4, embedding_dim=2, ema=False, kmeans_init=False,
                        restart_after=3, seed=0)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]]))
    q.train()
    z = torch.rand(1, 2, 4, 4)
    for _ in range(2):
        q(z)
    assert q.codebook[3].tolist() == [100.0, 100.0]  # not yet: unused for only 2 steps
    q(z)
    inputs = z.permute(0, 2, 3, 1).reshape(-1, 2)
    revived = q.codebook[3]
    assert (inputs == revived).all(dim=1).any(), "code 3 should be re-seeded from an input"
    assert q.steps_unused[3].item() == 0


def _restart_toy(num_embeddings: int) -> tuple[VectorQuantizer, torch.Tensor]:
    """Code 0 at the origin, the others far away (so unused); the batch: ten vectors exactly
    on code 0 (like MNIST's background) and two off it, at (1, 0) and (0, 2)."""
    q = VectorQuantizer(num_embeddings=num_embeddings, embedding_dim=2, ema=False,
                        kmeans_init=False, restart_after=1, seed=0)
    with torch.no_grad():
        q.codebook.zero_()
        q.codebook[1:] = 100.0
    vectors = torch.cat([torch.zeros(10, 2), torch.tensor([[1.0, 0.0], [0.0, 2.0]])])
    return q.train(), vectors.T.reshape(1, 2, 3, 4)


def test_restarts_draw_distinct_vectors_that_no_code_sits_on():
    # codes 1 and 2 are dead after one step; the ten vectors on code 0 have error 0, so
    # both restarts must take the two others, one each, whatever the random draw
    for seed in range(5):
        q, z = _restart_toy(3)
        q.generator.manual_seed(seed)
        q(z)
        assert sorted(q.codebook[1:].tolist()) == [[0.0, 2.0], [1.0, 0.0]]
        assert q.steps_unused.tolist() == [0, 0, 0]


def test_restarts_beyond_the_vectors_worth_drawing_wait_for_the_next_step():
    q, z = _restart_toy(4)  # three dead codes, two vectors off code 0
    q(z)
    assert sorted(q.codebook[1:3].tolist()) == [[0.0, 2.0], [1.0, 0.0]]
    assert q.codebook[3].tolist() == [100.0, 100.0]  # left dead, still counted as unused
    assert q.steps_unused.tolist() == [0, 0, 0, 1]
    far = torch.tensor([[5.0, 5.0]]).T.reshape(1, 2, 1, 1)
    # the next step: code 0 is unused too now, but code 3 has waited longer; the one
    # vector off its code revives it
    q(far)
    assert q.codebook[3].tolist() == [5.0, 5.0]


def test_kmeans_initialises_the_codebook_on_the_first_training_batch():
    centres = torch.tensor([[-5.0, -5.0], [-5.0, 5.0], [5.0, -5.0], [5.0, 5.0]])
    g = torch.Generator().manual_seed(0)
    points = (centres.repeat_interleave(16, 0) + 0.1 * torch.randn(64, 2, generator=g))
    q = VectorQuantizer(num_embeddings=4, embedding_dim=2, ema=True, kmeans_init=True,
                        kmeans_iters=20, seed=3)
    assert not bool(q.initialized)
    q.train()(points.T.reshape(1, 2, 8, 8))
    assert bool(q.initialized)
    found = sorted(map(tuple, q.codebook.round().tolist()))
    assert found == sorted(map(tuple, centres.tolist()))


def test_kmeans_never_leaves_a_centre_on_a_row_that_is_not_data():
    g = torch.Generator().manual_seed(0)
    data = torch.randn(50, 3)
    centres = kmeans(data, 5, iters=0, generator=g)
    assert all((data == c).all(dim=1).any() for c in centres)


def test_usage_counts_accumulate_in_training_only():
    q = toy_quantizer()
    z = TOY_Z.view(1, 2, 1, 1)
    q.train()
    q(z)
    q(z)
    q.eval()
    q(z)
    assert q.usage_counts.tolist() == [2, 0, 0]
    q.reset_usage()
    assert q.usage_counts.sum().item() == 0


def test_eval_forward_changes_no_state():
    q = VectorQuantizer(num_embeddings=8, embedding_dim=2, ema=True, kmeans_init=True)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q.eval()(torch.randn(2, 2, 3, 3))
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())


def test_wrong_channel_count_is_a_clear_error():
    with pytest.raises(ValueError, match="expected 2 channels, got 3"):
        toy_quantizer()(torch.randn(1, 3, 2, 2))
